"""The Gateway: its parts wired together, membership driven in, started and stopped, and read for status.

Parts, each calling only the ones below it: the request path (request_path.py) -> admission (admission.py) ->
capacity (capacity.py) -> membership view (membership.py) and routing policy (llmgw.routing); attempts reach
replicas through a transport (replica_stream.py; gRPC in grpc_transport.py). The Gateway is what drives the
membership view: it reads its membership source, applies each update, then tells admission that capacity may
have freed up and the transport which replica addresses are gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable

from llmgw.gateway.admission import Admission
from llmgw.gateway.api import GatewayConfig, InferenceRequest, TokenEvent
from llmgw.gateway.attempt import Limits, StaticLimits
from llmgw.gateway.capacity import Capacity, RoutingDrains, Ticket
from llmgw.gateway.events import RequestListener
from llmgw.gateway.membership import MembershipView
from llmgw.gateway.replica_stream import Transport
from llmgw.gateway.request_path import GatewayStats, RequestPath
from llmgw.gateway.stall_race import StallGuard
from llmgw.gateway.tenancy_gate import TenancyGate
from llmgw.policy import BreakerBoard, HedgePolicy
from llmgw.policy.deadlines import StallDeadlines
from llmgw.routing import Router, make_policy
from llmgw.topology import is_upstream_agent

log = logging.getLogger("llmgw.gateway")


class Gateway:
    """Routes, admits and streams requests to replicas; failover is token-exact.

    `transport` reaches replicas (a llmgw.gateway.replica_stream.Transport, e.g. grpc_transport.GrpcTransport).
    `membership` is any object with `members(include_self=False)` and `subscribe(cb) -> unsubscribe` yielding
    llmgw.gossip.Member / MemberEvent values; it may also be given to start(). `limits` bounds replica silences
    (default: the configured first-token and inter-token timeouts for every replica).

    Resilience (docs/resilience.md): `breakers` (a BreakerBoard, None with breaker_enabled=False) is one of the
    exclusion sources and gets every attempt's outcome; `hedger` (a HedgePolicy) decides when a request's first
    attempt is raced against a second replica (gateway/hedging.py). `drains` is the gateway's one set of replicas
    taken out of routing by an operator or a rolling update (llmgw.gateway.operations).

    Extension seams: `exclusion_sources` (callables returning replica ids to skip) and listeners
    (`add_listener`, llmgw.gateway.events.RequestListener: attempt outcomes, queue waits, tokens, request records).
    """

    def __init__(self, config: GatewayConfig, transport: Transport, *, membership=None,
                 router: Router | None = None, limits: Limits | None = None, upstreams=None) -> None:
        config.validate()
        self.config = config
        if router is None:
            router = Router(vnodes=config.vnodes, balance=config.balance, prefix_chars=config.prefix_chars)
        self.router = router
        self.membership = membership
        self.transport = transport
        self.view = MembershipView(router)
        self.breakers: BreakerBoard | None = None
        if config.breaker_enabled:
            self.breakers = BreakerBoard(config.breaker_config(), clock=time.monotonic)
        self.capacity = Capacity(self.view, make_policy(config.routing, router), self.breakers)
        self.admission: Admission[Ticket] = Admission(self.capacity.try_acquire, self.capacity.give_back,
                                                      max_waiters=config.queue_size,
                                                      timeout_s=config.queue_timeout_s)
        # Replicas an operator or a rolling update took out of routing; every admin front shares this one set.
        self.drains = RoutingDrains(on_undrain=self.admission.capacity_changed)
        self.capacity.exclusion_sources.append(self.drains.excluded)
        self.limits = limits or StaticLimits(config.first_token_timeout_s, config.inter_token_timeout_s)
        self.hedger = HedgePolicy(config.hedge_config())
        self.path = RequestPath(config, self.capacity, self.admission, transport, self.limits, self.hedger)
        # API keys and per-tenant limits; open (no key file) until the composition root sets one (set_tenancy).
        self.tenancy = TenancyGate(config.gateway_id)
        self.path.tenancy = self.tenancy
        # Adaptive stall deadlines and stall races; the configured timeouts (self.limits) stay the hard limits.
        self.stall_guard: StallGuard | None = None
        if config.adaptive_deadlines:
            self.stall_guard = StallGuard(StallDeadlines(config.deadline_config()), self.capacity, transport,
                                          self.limits, admission=self.admission,
                                          listeners=self.path.listeners)
            self.capacity.exclusion_sources.append(self.stall_guard.excluded)
            self.path.stall_guard = self.stall_guard
        self._unsubscribe: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # OpenAI-compatible model servers (llmgw.gateway.upstreams.UpstreamTable; the transport must reach their
        # http(s) addresses, e.g. http_transport.MixedTransport): replicas of the view, routed to by model.
        self.upstreams = upstreams
        if upstreams is not None:
            upstreams.attach(self)
            self.path.route_filter = upstreams.excluded_for

    # ---- requests -------------------------------------------------------------------------------------------
    def infer(self, request: InferenceRequest) -> AsyncGenerator[TokenEvent, None]:
        """Every token of the answer, one event each: indices 0, 1, ... exactly once, the last with is_final."""
        return self.path.infer(request)

    def infer_batches(self, request: InferenceRequest) -> AsyncGenerator[list[TokenEvent], None]:
        """Like infer(), grouped as the tokens arrived from the replica (front-ends that coalesce use this)."""
        return self.path.infer_batches(request)

    def set_tenancy(self, gate: TenancyGate) -> None:
        """Use `gate` (llmgw.gateway.tenancy_gate) for API keys and limits from the next request on."""
        self.tenancy = gate
        self.path.tenancy = gate

    def add_listener(self, listener: RequestListener) -> None:
        self.path.listeners.append(listener)

    def remove_listener(self, listener: RequestListener) -> None:
        if listener in self.path.listeners:
            self.path.listeners.remove(listener)

    # ---- lifecycle ------------------------------------------------------------------------------------------
    async def start(self, membership=None) -> None:
        """Follow `membership` (or the one given at construction) from now on."""
        if membership is not None:
            self.membership = membership
        self._loop = asyncio.get_running_loop()
        if self.upstreams is not None:
            await self.upstreams.start()
        if self.membership is None:
            return
        self._unsubscribe = self.membership.subscribe(self._from_source_thread)
        for member in self.membership.members():
            self._apply(member, member.state)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.admission.close()
        if self.upstreams is not None:
            await self.upstreams.stop()
        await self.transport.close()

    # ---- membership, driven in ------------------------------------------------------------------------------
    def _from_source_thread(self, event) -> None:
        # With threaded gossip this runs on the gossip thread: all state is owned by the event loop.
        loop = self._loop
        if loop is None:
            return
        kind = "removed" if event.kind == "removed" else event.member.state
        try:
            loop.call_soon_threadsafe(self._apply, event.member, kind)
        except RuntimeError:  # the loop closed under us: the gateway is shutting down
            pass

    def apply_member(self, member, state: str) -> None:
        """One update from a source other than the membership (the upstream table's model servers)."""
        self._apply(member, state)

    def _apply(self, member, state: str) -> None:
        """One membership update: the view first, then what follows from it."""
        if self.upstreams is not None and is_upstream_agent(member):  # an agent advertising a model server
            self.upstreams.agent_changed(member, state)
            return
        gone = self.view.apply(member, state)
        if self.stall_guard is not None:
            self.stall_guard.replicas_changed(frozenset(self.view.addresses))
        for address in gone:
            if address not in self.view.addresses.values():
                self.transport.forget(address)
        if getattr(member, "member_id", None) in self.view.addresses:  # a routable replica was (re)stated
            self.capacity.replicas_changed()
            self.admission.capacity_changed()

    # ---- status ---------------------------------------------------------------------------------------------
    def members(self) -> list:
        """The member table as this gateway sees it (itself included when gossip runs)."""
        if self.membership is None:
            return []
        try:
            return list(self.membership.members(include_self=True))
        except TypeError:  # a membership source without the include_self switch
            return list(self.membership.members())

    @property
    def draining(self) -> bool:
        """Shutting down (llmgw.gateway.shutdown): new requests are refused and the gateway reports not ready."""
        return self.path.refusing is not None

    @property
    def queued(self) -> int:
        return len(self.admission)

    @property
    def in_flight(self) -> dict[str, int]:
        return self.capacity.in_flight

    @property
    def stats(self) -> GatewayStats:
        return self.path.stats

    @property
    def exclusion_sources(self) -> list[Callable[[], Iterable[str]]]:
        return self.capacity.exclusion_sources

    def routable(self) -> set[str]:
        """Replicas a request could be sent to now (full or not): known, not draining, not excluded."""
        return self.capacity.routable()

    def breaker_states(self) -> dict[str, str]:
        """replica id -> "closed" | "open" | "half_open", for every routable replica."""
        return self.capacity.breaker_states()

    def hedge_stats(self) -> dict:
        return self.path.hedge_stats()
