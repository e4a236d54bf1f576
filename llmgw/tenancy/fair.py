"""Fair admission across tenants: deficit round robin (DRR) between tenants, strict FIFO within each.

`FairQueue` has the interface and the rules of `llmgw.gateway.admission.AdmissionQueue` (read its docstring), plus
a tenant and a weight on `submit`; with a single tenant it behaves exactly like it (a hypothesis property drives
both with the same operations). Sans-IO: no clock, deadlines are numbers the caller compares with its own time.

Why DRR and not weighted fair queuing: a request's cost is unknown when it waits (tokens come later), so every
request costs one unit and WFQ's virtual finish times would reduce to a weighted round robin anyway, at O(log n)
per operation and with floating-point virtual clocks to keep stable. DRR is O(1) per admission, takes fractional
weights (a tenant's deficit grows by its weight per round and it is served while the deficit is >= 1), and bounds a
light tenant's wait: once it is waiting, at most one round, the sum of the other backlogged tenants' weights
(rounded up, plus one each), is admitted before it.

Rules added to AdmissionQueue's:
- "the head" that freed capacity is offered to is the waiter DRR picks next; when it cannot acquire, nobody is
  admitted (the same rule as FIFO: capacity is never handed past the waiter whose turn it is) and the round is
  not advanced;
- `front=True` (a failover resume) goes ahead of every tenant, most recent resume first, like FIFO's front;
  it is not charged to its tenant's deficit (it was admitted once already) and still ignores the bounds;
- bounds: `max_waiters` overall and `max_waiters_per_tenant`. When the whole queue is full, an arrival from a
  tenant holding less of the queue (per unit of weight) than the most-queued tenant pushes out that tenant's
  newest waiter instead of being refused: one tenant cannot fill the queue and lock the others out. Pushed-out
  waiters are collected by `drain_evicted()`, and the shell fails them as if the queue had been full.
- `waiters()` and `expire()` list resumes first, then the others in arrival order.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["DEFAULT_TENANT", "FairQueue", "Outcome"]

W = TypeVar("W")

class Outcome(enum.Enum):
    """The same members and values as llmgw.gateway.admission.Outcome (this core must not import the gateway
    package); the admission shell should take its Outcome from here when it switches to FairQueue."""

    ADMITTED = "admitted"
    QUEUED = "queued"
    REJECTED = "rejected"


DEFAULT_TENANT = ""  # requests without a tenant (no key file): one tenant, so plain FIFO


@dataclass(eq=False)  # entries are compared by identity: a waiter's own __eq__ is never called
class _Entry(Generic[W]):
    waiter: W
    deadline: float
    tenant: str
    seq: int
    resume: bool


@dataclass
class _TenantQueue(Generic[W]):
    weight: float
    entries: deque[_Entry[W]] = field(default_factory=deque)  # not resumes
    count: int = 0  # entries + this tenant's resumes: what the per-tenant bound counts
    deficit: float = 0.0


class FairQueue(Generic[W]):
    def __init__(self, max_waiters: int, max_waiters_per_tenant: int | None = None) -> None:
        if max_waiters < 0:
            raise ValueError("max_waiters must be >= 0")
        if max_waiters_per_tenant is not None and max_waiters_per_tenant < 0:
            raise ValueError("max_waiters_per_tenant must be >= 0")
        self.max_waiters = max_waiters
        self.max_waiters_per_tenant = max_waiters if max_waiters_per_tenant is None else max_waiters_per_tenant
        self._resumes: deque[_Entry[W]] = deque()
        self._tenants: dict[str, _TenantQueue[W]] = {}
        self._active: deque[str] = deque()  # tenants with non-resume waiters, in DRR order
        self._where: dict[int, _Entry[W]] = {}  # id(waiter) -> its entry
        self._evicted: list[W] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._where)

    def waiters(self) -> list[W]:
        rest = sorted((e for q in self._tenants.values() for e in q.entries), key=lambda e: e.seq)
        return [e.waiter for e in self._resumes] + [e.waiter for e in rest]

    def tenant_waiting(self, tenant: str) -> int:
        queue = self._tenants.get(tenant)
        return queue.count if queue else 0

    def drain_evicted(self) -> list[W]:
        """Waiters pushed out by another tenant's arrival since the last call (fail them: queue full)."""
        evicted, self._evicted = self._evicted, []
        return evicted

    # ----------------------------------------------------------------------------------------------------------

    def submit(self, waiter: W, deadline: float, try_acquire: Callable[[W], bool], *, front: bool = False,
               tenant: str = DEFAULT_TENANT, weight: float = 1.0) -> Outcome:
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError("weight must be a finite number > 0")
        if id(waiter) in self._where:
            raise ValueError("this waiter is already queued")
        if not self._where and try_acquire(waiter):
            return Outcome.ADMITTED
        queue = self._tenants.get(tenant)
        if queue is None:
            queue = self._tenants[tenant] = _TenantQueue(weight)
        queue.weight = weight  # the latest configuration wins (a key file reload may change it)
        if front:
            self._add(_Entry(waiter, deadline, tenant, next(self._seq), True), queue)
            return Outcome.QUEUED
        if queue.count >= self.max_waiters_per_tenant:
            self._drop_if_empty(tenant)
            return Outcome.REJECTED
        if len(self._where) >= self.max_waiters and not self._push_out_for(tenant, queue):
            self._drop_if_empty(tenant)
            return Outcome.REJECTED
        self._add(_Entry(waiter, deadline, tenant, next(self._seq), False), queue)
        return Outcome.QUEUED

    def _add(self, entry: _Entry[W], queue: _TenantQueue[W]) -> None:
        if entry.resume:
            self._resumes.appendleft(entry)
        else:
            if not queue.entries:
                self._active.append(entry.tenant)
            queue.entries.append(entry)
        queue.count += 1
        self._where[id(entry.waiter)] = entry

    def _push_out_for(self, tenant: str, queue: _TenantQueue[W]) -> bool:
        """Make room for `tenant` by pushing out the newest waiter of the tenant most over its share, if that
        tenant holds more of the queue per unit of weight than `tenant` would after joining."""
        mine = (queue.count + 1) / queue.weight
        victim_name, victim_load = None, mine
        for name, other in self._tenants.items():
            if name != tenant and other.entries and other.count / other.weight > victim_load:
                victim_name, victim_load = name, other.count / other.weight
        if victim_name is None:
            return False
        victim = self._tenants[victim_name].entries[-1]
        self._remove(victim)
        self._evicted.append(victim.waiter)
        return True

    def _remove(self, entry: _Entry[W]) -> None:
        del self._where[id(entry.waiter)]
        queue = self._tenants[entry.tenant]
        queue.count -= 1
        if entry.resume:
            self._resumes.remove(entry)
        else:
            queue.entries.remove(entry)
            if not queue.entries:
                self._active.remove(entry.tenant)
                queue.deficit = 0.0
        self._drop_if_empty(entry.tenant)

    def _drop_if_empty(self, tenant: str) -> None:
        queue = self._tenants.get(tenant)
        if queue is not None and queue.count == 0:
            del self._tenants[tenant]

    # ----------------------------------------------------------------------------------------------------------

    def _next(self) -> _Entry[W] | None:
        """The waiter whose turn it is, topping up deficits as DRR visits tenants (no waiter is removed)."""
        if self._resumes:
            return self._resumes[0]
        while self._active:
            queue = self._tenants[self._active[0]]
            if queue.deficit >= 1.0:
                return queue.entries[0]
            queue.deficit += queue.weight
            if queue.deficit < 1.0:  # a weight below 1 needs several rounds to earn one admission
                self._active.rotate(-1)
        return None

    def pump(self, try_acquire: Callable[[W], bool]) -> list[W]:
        """Capacity may have freed up: admit waiters in DRR order while the one whose turn it is can acquire."""
        admitted = []
        while (entry := self._next()) is not None and try_acquire(entry.waiter):
            admitted.append(entry.waiter)
            if entry.resume:
                self._remove(entry)
                continue
            queue = self._tenants[entry.tenant]
            queue.deficit -= 1.0
            more = len(queue.entries) > 1
            self._remove(entry)
            if more and queue.deficit < 1.0:
                self._active.rotate(-1)  # its quantum is spent: the next tenant's turn
        return admitted

    def cancel(self, waiter: W) -> bool:
        entry = self._where.get(id(waiter))
        if entry is None or entry.waiter is not waiter:
            return False
        self._remove(entry)
        return True

    def expire(self, now: float) -> list[W]:
        """Remove and return every waiter whose deadline has passed."""
        expired = [e for e in self._resumes if e.deadline <= now]
        expired += sorted((e for q in self._tenants.values() for e in q.entries if e.deadline <= now),
                          key=lambda e: e.seq)
        for entry in expired:
            self._remove(entry)
        return [e.waiter for e in expired]

    def next_deadline(self) -> float | None:
        return min((e.deadline for e in self._where.values()), default=None)
