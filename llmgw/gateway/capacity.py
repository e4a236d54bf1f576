"""Replica capacity as the request path takes and gives it back: tickets, in-flight counts, exclusions, breakers.

`Capacity.try_acquire(ticket)` picks a replica for the ticket (through the routing policy) among those not full,
busy, draining, excluded by the ticket (already tried) or by an exclusion source (open breakers, routing drains),
and takes a slot on it in one synchronous step -- atomic on the event loop, which is what strict-FIFO admission
(admission.py) relies on. `give_back(ticket)` returns the slot. Capacity calls nothing above it: whoever gives
capacity back (the request path, the membership driver) tells admission that it may have freed up.

The breaker's half-open probe slot is taken with the capacity (BreakerBoard.allow) and freed with it when the
attempt gave no verdict; `report_*` hand an attempt's verdict to the breaker, at most once per ticket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

from llmgw.gateway.membership import MembershipView
from llmgw.policy import BreakerBoard
from llmgw.policy.breaker import HALF_OPEN
from llmgw.routing import RoutingPolicy

log = logging.getLogger("llmgw.gateway.capacity")

ExclusionSource = Callable[[], Iterable[str]]


def _event_loop_time() -> float:
    return asyncio.get_running_loop().time()


@dataclasses.dataclass(eq=False)
class Ticket:
    """One request's claim on replica capacity, as seen by admission (a hedge leg has its own).

    `exclude` holds replicas this request must not go to again (shared with the request, not copied)."""

    prompt: str
    exclude: set[str]
    replica_id: str | None = None
    address: str = ""
    # Per attempt, set when capacity is taken: the breaker clock then (its started_at), whether allow() gave this
    # attempt the half-open probe slot, and whether its outcome has been reported to the breaker.
    sent_at: float = 0.0
    probe: bool = False
    reported: bool = False

    def take_over(self, other: Ticket) -> None:
        """Become the owner of `other`'s capacity (a hedge that won); `other` no longer owns anything."""
        self.replica_id, self.address = other.replica_id, other.address
        self.sent_at, self.probe, self.reported = other.sent_at, other.probe, other.reported
        other.replica_id = None


class RoutingDrains:
    """Replicas an operator (or a rollout) took out of routing. Whoever composes the gateway makes `excluded` one
    of its capacity's exclusion sources (so the request path skips drained replicas exactly like draining or
    breaker-open ones) and passes `on_undrain`, told when a replica may take requests again."""

    def __init__(self, on_undrain: Callable[[], None] = lambda: None) -> None:
        self.drained: set[str] = set()
        self._on_undrain = on_undrain

    def excluded(self) -> set[str]:
        return self.drained

    def drain(self, replica_id: str) -> None:
        if replica_id not in self.drained:
            log.info("replica %s drained in routing", replica_id)
        self.drained.add(replica_id)

    def undrain(self, replica_id: str) -> None:
        if replica_id in self.drained:
            self.drained.discard(replica_id)
            log.info("replica %s undrained in routing", replica_id)
            # Requests may be queued that only this replica can now take.
            self._on_undrain()


class Capacity:
    """Slots on replicas: `view` knows who is routable, full or busy; `policy` picks among the rest; `breakers`
    (None = no circuit breaking) excludes open replicas and owns the half-open probe slots."""

    def __init__(self, view: MembershipView, policy: RoutingPolicy, breakers: BreakerBoard | None = None, *,
                 clock: Callable[[], float] = time.monotonic, loop_time: Callable[[], float] | None = None
                 ) -> None:
        self.view = view
        self.policy = policy
        self.breakers = breakers
        self.in_flight: dict[str, int] = {}
        self.exclusion_sources: list[ExclusionSource] = []
        self._clock = clock  # the breakers' clock
        self._loop_time = loop_time or _event_loop_time  # the clock of busy marks (the event loop's)
        self._known_replicas: frozenset[str] = frozenset()
        if breakers is not None:
            self.exclusion_sources.append(self._breaker_exclusions)

    # ---- taking and giving back (synchronous: atomic on the event loop) -------------------------------------
    def try_acquire(self, ticket: Ticket) -> bool:
        view = self.view
        blocked = view.unavailable(self._loop_time())
        blocked |= ticket.exclude
        blocked |= self.excluded()
        breakers = self.breakers
        while True:
            # Draining replicas are among `blocked` (view.unavailable), so every known address is a candidate.
            replica_id = self.policy.pick(ticket.prompt, view.addresses, blocked)
            if replica_id is None:
                return False
            address = view.addresses.get(replica_id)
            if address is None:
                return False
            # available() (the exclusion source) reserves nothing; allow() takes the half-open probe slot.
            if breakers is None or breakers.allow(replica_id):
                break
            blocked.add(replica_id)
        view.acquired(replica_id)
        self.in_flight[replica_id] = self.in_flight.get(replica_id, 0) + 1
        ticket.replica_id, ticket.address = replica_id, address
        ticket.sent_at = self._clock()
        ticket.probe = breakers is not None and breakers.state(replica_id) == HALF_OPEN
        ticket.reported = False
        return True

    def give_back(self, ticket: Ticket) -> bool:
        """Return the ticket's slot (nothing when it holds none); True when a slot was returned."""
        replica_id = ticket.replica_id
        if replica_id is None:
            return False
        ticket.replica_id = None
        if ticket.probe and not ticket.reported and self.breakers is not None:
            self.breakers.release(replica_id)  # the probe gave no verdict (cancelled, refused): free its slot
        ticket.probe = False
        self.view.released(replica_id)
        left = self.in_flight.get(replica_id, 0) - 1
        if left > 0:
            self.in_flight[replica_id] = left
        else:
            self.in_flight.pop(replica_id, None)
        return True

    def mark_busy(self, replica_id: str, until: float) -> None:
        """The replica refused for want of capacity: treat it as full until `until` (event-loop time)."""
        self.view.mark_busy(replica_id, until)

    # ---- who may be routed to -----------------------------------------------------------------------------
    def excluded(self) -> set[str]:
        """Replicas every exclusion source (open breakers, routing drains, ...) takes out of routing now."""
        out: set[str] = set()
        for source in self.exclusion_sources:
            out.update(source())
        return out

    def routable(self) -> set[str]:
        """Replicas a request could be sent to now, full or not."""
        return self.view.routable() - self.excluded()

    def replicas_changed(self) -> None:
        """The membership view changed: new replicas' breakers start CLOSED, departed ones are forgotten (a
        rejoined one starts afresh)."""
        known = frozenset(self.view.addresses)
        if known != self._known_replicas and self.breakers is not None:
            self._known_replicas = known
            self.breakers.set_replicas(known)

    def _breaker_exclusions(self) -> list[str]:
        breakers = self.breakers
        assert breakers is not None
        return [rid for rid in self.view.addresses if not breakers.available(rid)]

    def breaker_states(self) -> dict[str, str]:
        """replica id -> "closed" | "open" | "half_open", for every routable replica."""
        if self.breakers is None:
            return {}
        return {rid: self.breakers.state(rid) for rid in sorted(self.view.addresses)}

    # ---- an attempt's verdict, to the breaker (at most once per ticket) -----------------------------------
    def report_success(self, ticket: Ticket, ttft_s: float, mean_itl_s: float | None) -> None:
        if self.breakers is None or ticket.reported or ticket.replica_id is None:
            return
        ticket.reported = True
        self.breakers.record_success(ticket.replica_id, ttft_s, mean_itl_s, started_at=ticket.sent_at)

    def report_failure(self, ticket: Ticket, failure_kind: str) -> None:
        """`failure_kind`: llmgw.policy.breaker FAILURE_ERROR, FAILURE_UNAVAILABLE or FAILURE_TIMEOUT."""
        if self.breakers is None or ticket.reported or ticket.replica_id is None:
            return
        ticket.reported = True
        self.breakers.record_failure(ticket.replica_id, failure_kind, started_at=ticket.sent_at)

    def report_slow_start(self, ticket: Ticket, waited_s: float) -> None:
        """The ticket's replica was still silent after `waited_s` when another replica answered: a lower bound on
        its time to first token."""
        if self.breakers is None or ticket.reported or ticket.replica_id is None:
            return
        ticket.reported = True
        self.breakers.record_slow_start(ticket.replica_id, waited_s, started_at=ticket.sent_at)
