"""The hedge race: the first replica to produce a token wins, the other is cancelled at once.

A request's first attempt starts on its primary replica. If no first token has come when the hedge delay expires
(0 for a request with hedge=true), `start_hedge()` may hand over a second replica's ticket (the request path decides:
a free replica that can take it without queueing, and, for a policy hedge, budget). Both legs then wait for their
first message; the first leg to get one wins and is streamed by the caller at once, every other leg is cancelled
and awaited (bounded) before the race returns, so its gRPC call is cancelled and its slot can be freed right away.

A leg that fails (`recoverable` exception) before a token does not end the race while another leg is still
running. The race never joins both legs before streaming (the reference did, so its TTFT was the slower one's).

This module knows nothing about gRPC or capacity: legs are opened by an injected coroutine function and tickets are
opaque. The request path (request_path.py) turns the outcome into capacity give-backs, breaker outcomes and stats.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("llmgw.gateway.hedging")

# How long the race waits for a cancelled loser to unwind (its gRPC call is cancelled synchronously on the first
# step of that unwinding; this only bounds a misbehaving opener).
LOSER_UNWIND_TIMEOUT_S = 1.0


@dataclasses.dataclass(eq=False)
class Leg:
    """One replica's attempt at the first token."""

    ticket: Any
    is_hedge: bool
    started: float  # event-loop time the leg was started
    task: asyncio.Task

    @property
    def failure(self) -> BaseException | None:
        """The exception the leg ended with (None while running, on success, or when it was cancelled)."""
        if not self.task.done() or self.task.cancelled():
            return None
        return self.task.exception()

    @property
    def succeeded(self) -> bool:
        return self.task.done() and not self.task.cancelled() and self.task.exception() is None


class RaceFailed(Exception):
    """Every leg failed with a recoverable error before producing a token; `legs` tells which and why."""

    def __init__(self, legs: list[Leg]) -> None:
        super().__init__("; ".join(f"{'hedge' if leg.is_hedge else 'primary'}: {leg.failure}" for leg in legs))
        self.legs = legs


async def race_first_token(open_leg: Callable[[Any], Coroutine[Any, Any, Any]], primary: Any, *, delay_s: float,
                           start_hedge: Callable[[], Any | None], recoverable: type[BaseException],
                           legs: list[Leg], discard: Callable[[Any], None] = lambda opened: None) -> Leg:
    """Run the race and return the winning leg (`leg.task.result()` is what `open_leg` returned).

    `legs` is filled as legs start, so the caller can account for every one of them however the race ends.
    At most one hedge is started: at `delay_s` after the primary, if the primary is still running then and
    `start_hedge()` returns a ticket. Raises RaceFailed when every started leg failed with `recoverable` (a primary
    failing before the delay fails the race at once: normal failover takes over), or the first non-recoverable
    exception of a leg. On any exit every leg but the winner has finished (cancelled or failed); a leg that
    succeeded in the same instant as the winner is passed to `discard` (e.g. to cancel its call).
    """
    if delay_s < 0:
        raise ValueError(f"delay_s must be >= 0, got {delay_s}")
    loop = asyncio.get_running_loop()
    first = Leg(primary, False, loop.time(), loop.create_task(open_leg(primary)))
    legs.append(first)
    winner: Leg | None = None
    hedge_decided = False
    try:
        while True:
            running = [leg.task for leg in legs if not leg.task.done()]
            if not running:
                raise RaceFailed(list(legs))
            timeout = None if hedge_decided else max(0.0, first.started + delay_s - loop.time())
            done, _ = await asyncio.wait(running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:  # the hedge delay expired with the primary still silent
                hedge_decided = True
                ticket = start_hedge()
                if ticket is not None:
                    legs.append(Leg(ticket, True, loop.time(), loop.create_task(open_leg(ticket))))
                continue
            # Several legs may finish in the same loop iteration: prefer a success, in start order.
            for leg in legs:
                if leg.succeeded:
                    winner = leg
                    return leg
            for leg in legs:
                exc = leg.failure
                if exc is not None and not isinstance(exc, recoverable):
                    raise exc
            if not hedge_decided:
                # The primary failed before the hedge delay: no race happened, plain failover handles it.
                raise RaceFailed(list(legs))
    finally:
        losers = [leg.task for leg in legs if leg is not winner and not leg.task.done()]
        for task in losers:
            task.cancel()
        if losers:
            _, stuck = await asyncio.wait(losers, timeout=LOSER_UNWIND_TIMEOUT_S)
            if stuck:
                log.warning("%d hedge race leg(s) still unwinding after %.1f s", len(stuck), LOSER_UNWIND_TIMEOUT_S)
        for leg in legs:
            if leg is winner or not leg.task.done() or leg.task.cancelled():
                continue
            if leg.task.exception() is None:  # (also marks a failure as retrieved for asyncio)
                discard(leg.task.result())
