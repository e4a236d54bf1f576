"""How a long-running llmgw process (gateway, replica) ends: on SIGTERM/SIGINT, by a bounded orderly stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger("llmgw.signals")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def serve_until_signalled(stop: Callable[[], Awaitable[object]], stop_timeout_s: float = 10.0) -> None:
    """Run until SIGTERM/SIGINT, then await `stop()` (bounded) so gossip can announce the leave."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stopped.set)
    try:
        await stopped.wait()
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    try:
        await asyncio.wait_for(stop(), timeout=stop_timeout_s)
    except TimeoutError:
        log.warning("shutdown did not finish within %.1f s", stop_timeout_s)
