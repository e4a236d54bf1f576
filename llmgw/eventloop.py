"""Which asyncio event loop the long-running processes (gateway, replica, load generators) run on.

uvloop by default: the data plane is thousands of timers and stream callbacks per second, and uvloop runs them
at a fraction of the stock loop's cost. Measured here with a bare grpc.aio server and client, 256 streams x 100
messages at 20 ms: TTFT p99 ~0.2 s on uvloop against 0.4-2.2 s on the stock loop, which fell behind its own
schedule (docs/performance.md). The stock loop stays one flag away (`--event-loop asyncio`) for platforms
without uvloop and for telling a loop problem from an llmgw one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import argparse

_T = TypeVar("_T")

CHOICES = ("auto", "uvloop", "asyncio")
# Overrides the default of every process llmgw starts (e.g. a test harness comparing the two loops).
ENV_VAR = "LLMGW_EVENT_LOOP"


def default_choice() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A new-loop factory for asyncio.Runner; None = the stock loop. "auto" = uvloop when it is installed."""
    if choice not in CHOICES:
        raise ValueError(f"unknown event loop {choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, _T], choice: str | None = None) -> _T:
    """asyncio.run(main) on the chosen loop (None = $LLMGW_EVENT_LOOP, else auto)."""
    try:
        factory = loop_factory(choice or default_choice())
    except ValueError:
        close = getattr(main, "close", None)
        if close is not None:  # never awaited: close it rather than leave a "never awaited" warning behind
            close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def add_argument(parser: argparse.ArgumentParser) -> None:
    """The --event-loop flag of the commands that serve."""
    parser.add_argument("--event-loop", choices=CHOICES, default=None,
                        help=f"asyncio event loop: uvloop (auto: when installed) or the stock one "
                             f"(default: ${ENV_VAR} or auto)")
