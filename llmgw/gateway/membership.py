"""Feeds the Router from gossip: which replicas exist, their state, weight, capacity and load.

Load rule (documented in docs/dataplane.md): the load of replica R as this gateway sees it is

    own(R) + others(R)

where own(R) is this gateway's in-flight requests on R (exact, updated synchronously) and others(R) is the load
the replica reported by gossip minus what this gateway contributed to that report. Reports lag, so "what we
contributed" is taken as the peak of own(R) since the previous report: a report can only contain our requests that
were running during that window. Overestimating our share under-counts others briefly; the replica enforces its
capacity itself (RESOURCE_EXHAUSTED), so an under-count costs a retry, never an overfilled replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Callable

log = logging.getLogger("llmgw.gateway.membership")

ROUTABLE_STATES = ("alive", "suspect")


def is_replica(member) -> bool:
    # Reference peers carry no role; their convention is that ids starting with "gateway" are gateways.
    return member.role == "replica" and not member.member_id.startswith("gateway")


@dataclasses.dataclass
class ReplicaLoad:
    capacity: int = 0  # 0 = unknown / unlimited
    own: int = 0
    own_peak: int = 0  # max of `own` since the last gossip report
    others: int = 0
    busy_until: float = 0.0  # set when the replica answered RESOURCE_EXHAUSTED

    @property
    def total(self) -> int:
        return self.own + self.others

    def full(self, now: float) -> bool:
        return (self.capacity > 0 and self.total >= self.capacity) or now < self.busy_until


class MembershipView:
    """Router + load book + address table, kept in sync with a membership source (a GossipNode or a fake).

    `on_change` is called (on the event loop) after anything that may have freed capacity.
    """

    def __init__(self, router, source, *, on_change: Callable[[], None] = lambda: None,
                 on_removed: Callable[[str, str], None] = lambda member_id, address: None) -> None:
        self.router = router
        self.source = source
        self.loads: dict[str, ReplicaLoad] = {}
        self.addresses: dict[str, str] = {}
        self.draining: set[str] = set()
        self._on_change = on_change
        self._on_removed = on_removed
        self._unsubscribe = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self.source.subscribe(self._from_source_thread)
        for member in self.source.members():
            self.apply(member, member.state)

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _from_source_thread(self, event) -> None:
        # With threaded gossip this runs on the gossip thread: all state is owned by the event loop.
        loop = self._loop
        if loop is None:
            return
        kind = "removed" if event.kind == "removed" else event.member.state
        try:
            loop.call_soon_threadsafe(self.apply, event.member, kind)
        except RuntimeError:  # the loop closed under us: the gateway is shutting down
            pass

    def apply(self, member, state: str) -> None:
        """Bring the router in line with one member's latest known state."""
        try:
            self._apply(member, state)
        except (ValueError, KeyError):  # e.g. a weight the ring rejects: keep the previous view of this member
            log.exception("cannot apply membership update for %s", getattr(member, "member_id", member))

    def _apply(self, member, state: str) -> None:
        if not is_replica(member):
            return
        mid = member.member_id
        if state not in ROUTABLE_STATES:
            if mid in self.addresses:
                log.info("replica %s removed from routing (%s)", mid, state)
                self.router.remove_member(mid)
                address = self.addresses.pop(mid)
                self.loads.pop(mid, None)
                self.draining.discard(mid)
                self._on_removed(mid, address)
            return
        if not member.grpc_address:
            return  # cannot reach it; the gossip layer fills this in for reference peers
        old_address = self.addresses.get(mid)
        self.addresses[mid] = member.grpc_address
        if old_address is not None and old_address != member.grpc_address:  # restarted elsewhere
            self._on_removed(mid, old_address)
        weight = member.weight if member.weight and member.weight > 0 else 1.0
        self.router.set_member(mid, weight=weight, capacity=int(member.max_capacity), state=state,
                               draining=bool(member.draining))
        if member.draining:
            self.draining.add(mid)
        else:
            self.draining.discard(mid)
        load = self.loads.setdefault(mid, ReplicaLoad())
        load.capacity = int(member.max_capacity)
        load.others = max(0, int(member.active_requests) - load.own_peak)
        load.own_peak = load.own
        self.router.set_load(mid, load.total)
        self._on_change()

    # ---- own load ------------------------------------------------------------------------------------
    def acquired(self, mid: str) -> None:
        load = self.loads.get(mid)
        if load is None:
            return
        load.own += 1
        if load.own > load.own_peak:
            load.own_peak = load.own
        self.router.set_load(mid, load.total)

    def released(self, mid: str) -> None:
        load = self.loads.get(mid)
        if load is None:
            return  # removed meanwhile
        load.own = max(0, load.own - 1)
        self.router.set_load(mid, load.total)

    def mark_busy(self, mid: str, until: float) -> None:
        load = self.loads.get(mid)
        if load is not None:
            load.busy_until = until

    def unavailable(self, now: float) -> set[str]:
        """Replicas that must not get a new request right now (full, busy or draining)."""
        out = set(self.draining)
        for mid, load in self.loads.items():
            if load.full(now):
                out.add(mid)
        return out

    def routable(self) -> set[str]:
        return set(self.addresses) - self.draining
