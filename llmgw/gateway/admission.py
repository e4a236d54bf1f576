"""Strict-FIFO admission: a bounded queue of requests waiting for replica capacity.

`AdmissionQueue` is the decision logic with no I/O and no clock (time is passed in); `Admission` wraps the same
rules, kept across tenants by weight (llmgw.tenancy.fair.FairQueue: strict FIFO with a single tenant), for
asyncio with futures and timers.

Rules (the reference leaked credit through a "now serving" counter that advanced even when nobody waited):
- an arrival only tries to acquire capacity when nobody is waiting; otherwise it queues behind the waiters;
- freed capacity is offered to the head waiter only; if the head cannot use it, nobody behind it may;
- nothing is counted or remembered when capacity frees up with nobody waiting: admission always re-asks the
  `try_acquire` hook, which checks and takes capacity in one synchronous step (atomic on the event loop);
- a full queue or an expired wait is rejected at once; a cancelled waiter leaves the queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

# The fair queue (tenants by weight, FIFO within one) returns the same outcomes; one enum serves both queues.
from llmgw.tenancy.fair import DEFAULT_TENANT, FairQueue, Outcome

W = TypeVar("W")


class AdmissionQueue(Generic[W]):
    """FIFO of waiters. `try_acquire(waiter) -> bool` takes capacity for a waiter, or says there is none."""

    def __init__(self, max_waiters: int) -> None:
        if max_waiters < 0:
            raise ValueError("max_waiters must be >= 0")
        self.max_waiters = max_waiters
        self._waiters: deque[tuple[W, float]] = deque()

    def __len__(self) -> int:
        return len(self._waiters)

    def waiters(self) -> list[W]:
        return [w for w, _ in self._waiters]

    def submit(self, waiter: W, deadline: float, try_acquire: Callable[[W], bool], *, front: bool = False
               ) -> Outcome:
        """A new request. `front=True` is for a request that was already admitted once (failover) and must not
        lose its place to later arrivals; it still never bypasses the capacity check."""
        if front:
            if not self._waiters and try_acquire(waiter):
                return Outcome.ADMITTED
            self._waiters.appendleft((waiter, deadline))
            return Outcome.QUEUED
        if not self._waiters and try_acquire(waiter):
            return Outcome.ADMITTED
        if len(self._waiters) >= self.max_waiters:
            return Outcome.REJECTED
        self._waiters.append((waiter, deadline))
        return Outcome.QUEUED

    def pump(self, try_acquire: Callable[[W], bool]) -> list[W]:
        """Capacity may have freed up: admit head waiters, in order, while they can acquire."""
        admitted = []
        while self._waiters and try_acquire(self._waiters[0][0]):
            admitted.append(self._waiters.popleft()[0])
        return admitted

    def cancel(self, waiter: W) -> bool:
        for i, (w, _) in enumerate(self._waiters):
            if w is waiter:
                del self._waiters[i]
                return True
        return False

    def expire(self, now: float) -> list[W]:
        """Remove and return every waiter whose deadline has passed."""
        expired = [w for w, d in self._waiters if d <= now]
        if expired:
            self._waiters = deque((w, d) for w, d in self._waiters if d > now)
        return expired

    def next_deadline(self) -> float | None:
        return min((d for _, d in self._waiters), default=None)


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    pass


class Admission(Generic[W]):
    """asyncio shell: `await acquire(waiter)` returns once `try_acquire(waiter)` succeeded for it."""

    def __init__(self, try_acquire: Callable[[W], bool], release: Callable[[W], object], *, max_waiters: int,
                 timeout_s: float) -> None:
        # Across tenants by weight (deficit round robin), FIFO within one: with a single tenant (no key file) it
        # is exactly AdmissionQueue's strict FIFO (llmgw.tenancy.fair).
        self.queue: FairQueue[W] = FairQueue(max_waiters)
        self.timeout_s = timeout_s
        self._try_acquire = try_acquire
        self._release = release  # gives back what try_acquire took, for a waiter cancelled after admission
        self._futures: dict[int, asyncio.Future] = {}
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self.queue)

    async def acquire(self, waiter: W, *, front: bool = False, timeout_s: float | None = None,
                      tenant: str = DEFAULT_TENANT, weight: float = 1.0) -> None:
        loop = asyncio.get_running_loop()
        wait = self.timeout_s if timeout_s is None else min(self.timeout_s, timeout_s)
        outcome = self.queue.submit(waiter, loop.time() + wait, self._try_acquire, front=front, tenant=tenant,
                                    weight=weight)
        self._fail_pushed_out()
        if outcome is Outcome.ADMITTED:
            return
        if outcome is Outcome.REJECTED:
            raise QueueFull(f"admission queue full ({self.queue.max_waiters} waiting)")
        fut = loop.create_future()
        self._futures[id(waiter)] = fut
        self._arm_timer()
        try:
            await fut
        except asyncio.CancelledError:
            self.queue.cancel(waiter)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Admitted in the same loop iteration as the cancellation: hand the capacity back.
                self._release(waiter)
                self.capacity_changed()
            raise
        finally:
            self._futures.pop(id(waiter), None)

    def _fail_pushed_out(self) -> None:
        """Waiters another tenant's arrival pushed out of a full queue fail as if the queue had been full."""
        for waiter in self.queue.drain_evicted():
            fut = self._futures.get(id(waiter))
            if fut is not None and not fut.done():
                fut.set_exception(QueueFull(f"admission queue full ({self.queue.max_waiters} waiting): pushed out "
                                            "by a tenant with a smaller share of the queue"))

    def give_back(self, waiter: W) -> None:
        """Return what `try_acquire` took for `waiter` (nothing when it holds nothing), and offer it to the head
        of the queue: every holder of capacity gives it back through here."""
        if self._release(waiter) and self.queue:
            self.capacity_changed()

    def capacity_changed(self) -> None:
        """Call whenever capacity may have become available (a release, a membership or load change)."""
        for waiter in self.queue.pump(self._try_acquire):
            fut = self._futures.get(id(waiter))
            if fut is not None and not fut.done():
                fut.set_result(None)
            else:  # its task is gone; do not keep the capacity it was just given
                self._release(waiter)

    def _arm_timer(self) -> None:
        deadline = self.queue.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        for waiter in self.queue.expire(asyncio.get_running_loop().time()):
            fut = self._futures.get(id(waiter))
            if fut is not None and not fut.done():
                fut.set_exception(QueueTimeout(f"no replica capacity within {self.timeout_s:g} s"))
        self._arm_timer()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(QueueTimeout("gateway stopping"))
