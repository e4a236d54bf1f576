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

import dataclasses
import logging

from llmgw.topology import is_replica, is_routable

log = logging.getLogger("llmgw.gateway.membership")


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
    """Router + load book + address table, brought in line with membership updates by whoever drives it (the
    Gateway: it reads its membership source, calls apply(), then acts on what apply() reports)."""

    def __init__(self, router) -> None:
        self.router = router
        self.loads: dict[str, ReplicaLoad] = {}
        self.addresses: dict[str, str] = {}
        self.draining: set[str] = set()

    def apply(self, member, state: str) -> list[str]:
        """Bring the router in line with one member's latest known state (`state` "removed" or a SWIM state).
        Returns the addresses no longer used by this replica (it left, or restarted elsewhere)."""
        try:
            return self._apply(member, state)
        except (ValueError, KeyError):  # e.g. a weight the ring rejects: keep the previous view of this member
            log.exception("cannot apply membership update for %s", getattr(member, "member_id", member))
            return []

    def _apply(self, member, state: str) -> list[str]:
        if not is_replica(member):
            return []
        mid = member.member_id
        if not is_routable(state):
            if mid in self.addresses:
                log.info("replica %s removed from routing (%s)", mid, state)
                self.router.remove_member(mid)
                address = self.addresses.pop(mid)
                self.loads.pop(mid, None)
                self.draining.discard(mid)
                return [address]
            return []
        if not member.grpc_address:
            return []  # cannot reach it; the gossip layer fills this in for reference peers
        old_address = self.addresses.get(mid)
        self.addresses[mid] = member.grpc_address
        gone = [old_address] if old_address is not None and old_address != member.grpc_address else []
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
        return gone

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
