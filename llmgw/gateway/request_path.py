"""The gateway's request path, top to bottom: route -> admit -> stream -> fail over.

`Gateway.infer(request)` is the one entry point every front-end uses. It yields each token index exactly once, in
order, ending with an is_final event, or raises a GatewayError; it never ends quietly on a partial answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import uuid
from typing import AsyncIterator, Callable, Iterable

import grpc

from llmgw._proto import llmgateway_pb2 as pb
from llmgw.gateway.admission import Admission, QueueFull, QueueTimeout
from llmgw.gateway.api import (DeadlineExceeded, GatewayConfig, InferenceRequest, InvalidArgument,
                               ResourceExhausted, TokenEvent, Unavailable, check_request, one_event_each)
from llmgw.gateway.hedging import Leg, RaceFailed, race_first_token
from llmgw.gateway.membership import MembershipView
from llmgw.gateway.operations import RoutingDrains
from llmgw.gateway.pool import ChannelPool
from llmgw.policy import HEDGE_CANCELLED, HEDGE_LOST, HEDGE_WON, BreakerBoard, HedgePolicy
from llmgw.policy.breaker import HALF_OPEN, FAILURE_ERROR, FAILURE_TIMEOUT, FAILURE_UNAVAILABLE

log = logging.getLogger("llmgw.gateway")

# Refusals (replica full or draining) do not use up attempts, but a request may not bounce around forever.
MAX_REFUSALS = 20

FINISH_REASONS = {pb.LENGTH: "length", pb.STOP: "stop"}


@dataclasses.dataclass(eq=False)
class _Ticket:
    """One request's claim on replica capacity, as seen by admission (a hedge leg has its own)."""

    prompt: str
    exclude: set[str]
    replica_id: str | None = None
    address: str = ""
    # Per attempt, set when capacity is taken: the breaker clock then (its started_at), whether allow() gave this
    # attempt the half-open probe slot, and whether its outcome has been reported to the breaker.
    sent_at: float = 0.0
    probe: bool = False
    reported: bool = False

    def take_over(self, other: "_Ticket") -> None:
        """Become the owner of `other`'s capacity (a hedge that won); `other` no longer owns anything."""
        self.replica_id, self.address = other.replica_id, other.address
        self.sent_at, self.probe, self.reported = other.sent_at, other.probe, other.reported
        other.replica_id = None


class _AttemptFailed(Exception):
    """One replica could not continue the stream; `kind` says whether to count it as a failed attempt."""

    def __init__(self, kind: str, detail: str, breaker_kind: str = FAILURE_ERROR) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind  # "error" | "stall" | "busy" | "draining"
        self.detail = detail
        self.breaker_kind = FAILURE_TIMEOUT if kind == "stall" else breaker_kind


class _RaceLost(Exception):
    """Every leg of a hedge race failed (each already counted); `hedge_decided`: the hedge chance was used."""

    def __init__(self, hedge_decided: bool) -> None:
        super().__init__("every leg of the hedge race failed")
        self.hedge_decided = hedge_decided


@dataclasses.dataclass
class _Opened:
    """A replica call that produced its first message."""

    call: grpc.aio.UnaryStreamCall
    first: pb.GenerateResponse
    ttft: float  # seconds from sending the request to the first message


@dataclasses.dataclass
class GatewayStats:
    served_total: int = 0
    failovers_total: int = 0
    rejected_total: int = 0
    failed_total: int = 0


class Gateway:
    """Routes, admits and streams requests to replicas; failover is token-exact.

    `membership` is any object with `members(include_self=False)` and `subscribe(cb) -> unsubscribe` yielding
    llmgw.gossip.Member / MemberEvent values; when omitted, start() runs a threaded GossipNode.

    Resilience (docs/resilience.md): `breakers` (a BreakerBoard, None with breaker_enabled=False) is one of the
    exclusion sources and gets every attempt's outcome; `hedger` (a HedgePolicy) decides when a request's first
    attempt is raced against a second replica (gateway/hedging.py).

    `replica_credentials` (grpc.ChannelCredentials) reaches replicas over TLS. `drains` is the gateway's one set
    of replicas taken out of routing by an operator or a rolling update (llmgw.gateway.operations).

    Extension seams: `exclusion_sources` (callables returning replica ids to skip, e.g. open circuit breakers) and
    `attempt_listeners` (called with (replica_id, outcome, ttft_s) after every replica attempt; outcome is "first_token"
    (with the time to first token), "ok", "error", "stall", "busy", "draining" or "cancelled"; hedge races add
    "hedge_started", "hedge_won", "hedge_lost", "hedge_cancelled" (on the hedge's replica) and "hedge_denied"
    (on the primary's)).
    """

    def __init__(self, config: GatewayConfig, *, membership=None, router=None,
                 replica_credentials: grpc.ChannelCredentials | None = None) -> None:
        config.validate()
        self.config = config
        if router is None:
            from llmgw.routing import Router

            router = Router(vnodes=config.vnodes, balance=config.balance, prefix_chars=config.prefix_chars)
        self.router = router
        self.membership = membership
        self.gossip = None
        self.pool = ChannelPool(replica_credentials, sessions=config.replica_sessions)
        self.view = MembershipView(router, _NoMembers(), on_change=self._membership_changed,
                                   on_removed=self._replica_removed)
        self.admission: Admission[_Ticket] = Admission(self._try_acquire, self._give_back,
                                                       max_waiters=config.queue_size,
                                                       timeout_s=config.queue_timeout_s)
        self.in_flight: dict[str, int] = {}
        self.stats = GatewayStats()
        self.exclusion_sources: list[Callable[[], Iterable[str]]] = []
        self.attempt_listeners: list[Callable[[str, str, float | None], None]] = []
        self.hedger = HedgePolicy(config.hedge_config())
        self.hedge_counts = {"started": 0, "denied_no_capacity": 0}
        self.breakers: BreakerBoard | None = None
        if config.breaker_enabled:
            self.breakers = BreakerBoard(config.breaker_config(), clock=time.monotonic)
            self.exclusion_sources.append(self._breaker_exclusions)
        # Replicas an operator or a rolling update took out of routing; every admin front shares this one set.
        self.drains = RoutingDrains(self)
        self._known_replicas: frozenset[str] = frozenset()
        self._started = False
        self._rng = random.Random()

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def start(self, grpc_address: str = "") -> None:
        if self.membership is None:
            self.gossip = await self._start_gossip(grpc_address)
            self.membership = self.gossip
        self.view.source = self.membership
        self.view.start()
        self._started = True

    async def _start_gossip(self, grpc_address: str):
        from llmgw.gossip import GossipConfig, GossipNode

        cfg = self.config
        port = cfg.gossip_port
        if not port:
            port = int(grpc_address.rsplit(":", 1)[1]) + 10000
        advertise = f"{cfg.advertise}:{port}" if cfg.advertise else None
        node = GossipNode(cfg.gateway_id, bind=f"{cfg.host}:{port}", advertise=advertise, seeds=tuple(cfg.seeds),
                          role="gateway", grpc_address=grpc_address,
                          config=GossipConfig.preset(cfg.gossip_config), key=cfg.gossip_key, threaded=True)
        await node.start()
        return node

    async def stop(self) -> None:
        self.view.stop()
        self.admission.close()
        if self.gossip is not None:
            try:
                await asyncio.wait_for(self.gossip.stop(leave=True), timeout=5.0)
            except Exception:  # a failed leave must not keep channels open
                log.exception("gossip stop failed")
        await self.pool.close()

    def members(self) -> list:
        """The member table as this gateway sees it (itself included when gossip runs)."""
        if self.membership is None:
            return []
        try:
            return list(self.membership.members(include_self=True))
        except TypeError:  # a membership source without the include_self switch
            return list(self.membership.members())

    @property
    def queued(self) -> int:
        return len(self.admission)

    # ---- the request path ------------------------------------------------------------------------------
    def infer(self, request: InferenceRequest) -> AsyncIterator[TokenEvent]:
        """Every token of the answer, one event each: indices 0, 1, ... exactly once, the last with is_final."""
        return one_event_each(self.infer_batches(request))

    async def infer_batches(self, request: InferenceRequest) -> AsyncIterator[list[TokenEvent]]:
        """Like infer(), grouped as the tokens arrived from the replica (front-ends that coalesce use this)."""
        check_request(request, self.config)
        loop = asyncio.get_running_loop()
        timeout = request.timeout_s if request.timeout_s and request.timeout_s > 0 else self.config.request_timeout_s
        deadline = loop.time() + min(timeout, self.config.request_timeout_s)
        req = _Request(self, request, request.request_id or uuid.uuid4().hex, deadline)
        ticket = _Ticket(request.prompt, req.excluded)
        # Called once per request: it also credits the hedge budget. None = this request never hedges.
        hedge_delay = self.hedger.delay_for(bool(request.hedge))
        hedge_decided = False
        while True:
            # 1. route + admit (routing happens inside admission, atomically with taking the capacity)
            await self._admit(ticket, deadline, resumed=bool(req.failures or req.refusals), reasons=req.reasons)
            try:
                # 2. stream: the first message -- raced against a hedge while the caller has nothing yet
                if req.forwarded:
                    opened = None  # a resumed stream: the stream itself bounds the wait for the next token
                elif hedge_delay is not None and not hedge_decided:
                    opened, hedge_decided = await self._race(req, ticket, hedge_delay, explicit=bool(request.hedge))
                else:
                    opened = await req.open(ticket)
                    self.hedger.observe_ttft(opened.ttft)
                async with contextlib.aclosing(req.stream(ticket, opened)) as stream:
                    async for batch in stream:
                        yield batch
                self.stats.served_total += 1
                return
            # 3. fail over
            except _RaceLost as lost:
                hedge_decided = hedge_decided or lost.hedge_decided
                self._check_attempts(req)
            except _AttemptFailed as failure:
                self._attempt_failed(req, ticket, failure)
                self._check_attempts(req)
            except (asyncio.CancelledError, GeneratorExit):
                self._notify(ticket.replica_id, "cancelled", None)
                raise
            except DeadlineExceeded:
                self.stats.failed_total += 1
                raise
            finally:
                self._give_back(ticket)

    def _check_attempts(self, req: "_Request") -> None:
        if req.failures >= self.config.max_attempts or req.refusals > MAX_REFUSALS:
            self.stats.failed_total += 1
            raise Unavailable(f"request {req.request_id} failed after {req.failures} attempts and {req.refusals} "
                              f"refusals, {len(req.forwarded)} of {req.request.max_tokens} tokens sent: "
                              + "; ".join(req.reasons[-4:])) from None
        self.stats.failovers_total += 1

    def _attempt_failed(self, req: "_Request", ticket: _Ticket, failure: "_AttemptFailed") -> None:
        """Bookkeeping for one replica that could not continue: counts, breaker, listeners, where not to go next."""
        replica_id = ticket.replica_id
        loop = asyncio.get_running_loop()
        req.reasons.append(f"{replica_id}: {failure}")
        self._notify(replica_id, failure.kind, None)
        if failure.kind == "busy":
            req.refusals += 1
            self.view.mark_busy(replica_id, loop.time() + self.config.busy_backoff_s)
            loop.call_later(self.config.busy_backoff_s, self._capacity_changed)
        elif failure.kind == "draining":
            req.refusals += 1
            req.avoid(ticket)
        else:
            req.failures += 1
            req.avoid(ticket)
            if self.breakers is not None and not ticket.reported:
                ticket.reported = True
                self.breakers.record_failure(replica_id, failure.breaker_kind, started_at=ticket.sent_at)
        log.info("request %s: %s failed at token %d (%s)", req.request_id, replica_id, len(req.forwarded), failure)

    async def _race(self, req: "_Request", ticket: _Ticket, delay_s: float, *, explicit: bool
                    ) -> tuple["_Opened", bool]:
        """The first message, raced against a hedge. Returns (the winner's first message, whether the hedge was
        decided on). Afterwards `ticket` holds the winner and every other leg is accounted for and given back;
        raises _RaceLost when every leg failed (each counted in `req`)."""
        loop = asyncio.get_running_loop()
        legs: list[Leg] = []
        decided = False
        hedge_replica: str | None = None  # kept: a given-back ticket forgets its replica
        race_started = loop.time()

        def start_hedge() -> _Ticket | None:
            nonlocal decided, hedge_replica
            decided = True
            hedge = self._start_hedge(ticket, explicit=explicit)
            hedge_replica = hedge.replica_id if hedge is not None else None
            return hedge

        winner: Leg | None = None
        try:
            winner = await race_first_token(req.open, ticket, delay_s=delay_s, start_hedge=start_hedge,
                                            recoverable=_AttemptFailed, legs=legs,
                                            discard=lambda surplus: surplus.call.cancel())
        except RaceFailed:
            pass
        finally:
            hedged = len(legs) > 1
            if hedged and winner is None:  # cancelled client, deadline, every leg failed: nobody won
                self._hedge_outcome(hedge_replica, HEDGE_CANCELLED)
            for leg in legs:
                failure = leg.failure
                if isinstance(failure, _AttemptFailed):
                    self._attempt_failed(req, leg.ticket, failure)
            for leg in legs[1:]:  # the primary's capacity is the request's ticket: the caller gives it back
                if leg is not winner:
                    self._give_back(leg.ticket)
        if winner is None:
            raise _RaceLost(decided)
        opened: _Opened = winner.task.result()
        self.hedger.observe_ttft(loop.time() - race_started)
        if hedged:
            hedge_leg = legs[1]
            self._hedge_outcome(hedge_replica, HEDGE_WON if winner is hedge_leg else HEDGE_LOST)
            if winner is hedge_leg:
                primary = legs[0]
                if primary.failure is None and self.breakers is not None and not ticket.reported:
                    # The primary was still silent when the hedge answered: a lower bound on its TTFT.
                    ticket.reported = True
                    self.breakers.record_slow_start(ticket.replica_id, loop.time() - primary.started,
                                                    started_at=ticket.sent_at)
                self._give_back(ticket)
                ticket.take_over(hedge_leg.ticket)
        return opened, decided

    def _start_hedge(self, primary: _Ticket, *, explicit: bool) -> _Ticket | None:
        """A second replica for a hedge, or None. Never queues: waiters keep their turn and a hedge that would
        wait is no hedge. A policy hedge also needs budget (asked for only once a replica is free, so the budget
        is not spent on a hedge that cannot run)."""
        hedge = _Ticket(primary.prompt, primary.exclude | {primary.replica_id})
        if self.admission.queue or not self._try_acquire(hedge):
            self.hedge_counts["denied_no_capacity"] += 1
            self._notify(primary.replica_id, "hedge_denied", None)
            return None
        if not explicit and not self.hedger.try_acquire():
            self._give_back(hedge)
            self._notify(primary.replica_id, "hedge_denied", None)
            return None
        self.hedge_counts["started"] += 1
        self._notify(hedge.replica_id, "hedge_started", None)
        return hedge

    def _hedge_outcome(self, hedge_replica: str | None, outcome: str) -> None:
        self.hedger.record_outcome(outcome)
        self._notify(hedge_replica, f"hedge_{outcome}", None)

    def hedge_stats(self) -> dict:
        """HedgePolicy.stats() plus the gateway's race counters: hedges started, and policy or explicit hedges
        denied for want of a free replica (`policy_hedges_denied` counts only the budget's refusals)."""
        stats = self.hedger.stats()
        stats["hedges_started"] = self.hedge_counts["started"]
        stats["denied_no_capacity"] = self.hedge_counts["denied_no_capacity"]
        return stats

    async def _admit(self, ticket: _Ticket, deadline: float, *, resumed: bool, reasons: list[str]) -> None:
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            self.stats.failed_total += 1
            raise DeadlineExceeded("request deadline passed before a replica was found")
        if not (self.view.routable() - ticket.exclude - self._policy_exclusions()):
            self.stats.failed_total += 1
            tail = (": " + "; ".join(reasons[-4:])) if reasons else ""
            raise Unavailable("no replica available" + tail)
        try:
            # A resumed request already waited its turn once: it goes to the head of the queue.
            await self.admission.acquire(ticket, front=resumed, timeout_s=remaining)
        except QueueFull as exc:
            self.stats.rejected_total += 1
            raise ResourceExhausted(str(exc), retry_after_s=1.0) from None
        except QueueTimeout as exc:
            if loop.time() >= deadline:
                self.stats.failed_total += 1
                raise DeadlineExceeded("request deadline passed while queued") from None
            self.stats.rejected_total += 1
            raise ResourceExhausted(str(exc), retry_after_s=1.0) from None

    # ---- capacity bookkeeping (synchronous: atomic on the event loop) ----------------------------------
    def _try_acquire(self, ticket: _Ticket) -> bool:
        blocked = self.view.unavailable(asyncio.get_running_loop().time())
        blocked |= ticket.exclude
        blocked |= self._policy_exclusions()
        breakers = self.breakers
        while True:
            replica_id = self._pick(ticket.prompt, blocked)
            if replica_id is None:
                return False
            address = self.view.addresses.get(replica_id)
            if address is None:
                return False
            # available() (the exclusion source) reserves nothing; allow() takes the half-open probe slot.
            if breakers is None or breakers.allow(replica_id):
                break
            blocked.add(replica_id)
        self.view.acquired(replica_id)
        self.in_flight[replica_id] = self.in_flight.get(replica_id, 0) + 1
        ticket.replica_id, ticket.address = replica_id, address
        ticket.sent_at = time.monotonic()
        ticket.probe = breakers is not None and breakers.state(replica_id) == HALF_OPEN
        ticket.reported = False
        return True

    def _pick(self, prompt: str, blocked: set[str]) -> str | None:
        policy = self.config.routing
        if policy == "affinity":
            return self.router.route(prompt, exclude=blocked).member
        candidates = [m for m in self.view.routable() if m not in blocked]
        if not candidates:
            return None
        if policy == "random":
            return self._rng.choice(candidates)
        return min(candidates, key=lambda m: (self.router.load(m) / self.router.info(m).weight, self._rng.random()))

    def _give_back(self, ticket: _Ticket) -> None:
        replica_id = ticket.replica_id
        if replica_id is None:
            return
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
        self._capacity_changed()

    def _capacity_changed(self) -> None:
        if self.admission.queue:
            self.admission.capacity_changed()

    def _membership_changed(self) -> None:
        known = frozenset(self.view.addresses)
        if known != self._known_replicas and self.breakers is not None:
            # New replicas start CLOSED; ones that left are forgotten (a rejoined one starts afresh).
            self._known_replicas = known
            self.breakers.set_replicas(known)
        self._capacity_changed()

    def _breaker_exclusions(self) -> list[str]:
        breakers = self.breakers
        return [rid for rid in self.view.addresses if not breakers.available(rid)]

    def breaker_states(self) -> dict[str, str]:
        """replica id -> "closed" | "open" | "half_open", for every routable replica."""
        if self.breakers is None:
            return {}
        return {rid: self.breakers.state(rid) for rid in sorted(self.view.addresses)}

    def _replica_removed(self, replica_id: str, address: str) -> None:
        if address not in self.view.addresses.values():
            self.pool.discard(address)

    def _policy_exclusions(self) -> set[str]:
        out: set[str] = set()
        for source in self.exclusion_sources:
            out.update(source())
        return out

    def _notify(self, replica_id: str | None, outcome: str, ttft_s: float | None) -> None:
        if replica_id is None:
            return
        for listener in self.attempt_listeners:
            try:
                listener(replica_id, outcome, ttft_s)
            except Exception:  # a faulty policy must not break the request path
                log.exception("attempt listener failed")


def _cancelled_by_caller() -> bool:
    """Whether a CancelledError out of a replica call is a real cancellation of this task (the client went away, a
    lost hedge leg). If nobody cancelled the task, grpc cancelled the call because its channel was closed under it
    -- the replica was declared DEAD and its channel discarded -- and that is a failed attempt to fail over from,
    not a reason to leave the client without a status."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


class _CallState:
    """Whether an attempt finished its replica call (then it must not be cancelled on the way out)."""

    __slots__ = ("finished",)

    def __init__(self) -> None:
        self.finished = False


class _Request:
    """One request's state across attempts, and the two halves of an attempt: open() waits for the first message
    (raced by a hedge, so it is a plain coroutine that can run in its own task), stream() relays the rest in the
    request's own task."""

    def __init__(self, gateway: Gateway, request: InferenceRequest, request_id: str, deadline: float) -> None:
        self.gateway = gateway
        self.request = request
        self.request_id = request_id
        self.deadline = deadline
        self.forwarded: list[str] = []  # tokens the caller already has: the resume point on failover
        self.excluded: set[str] = set()  # the request ticket's exclude set (shared, not copied)
        self.failures = 0
        self.refusals = 0
        self.reasons: list[str] = []

    def avoid(self, ticket: _Ticket) -> None:
        self.excluded.add(ticket.replica_id)

    async def open(self, ticket: _Ticket) -> _Opened:
        """Send the request to the ticket's replica and wait (bounded) for its first message."""
        loop = asyncio.get_running_loop()
        cfg = self.gateway.config
        deadline = self.deadline
        forwarded = self.forwarded
        request = self.request
        started = loop.time()
        call = self.gateway.pool.generate(ticket.address)(
            pb.GenerateRequest(request_id=self.request_id, prompt=request.prompt, max_tokens=request.max_tokens,
                               tokens_already_generated=len(forwarded), generated_tokens=forwarded,
                               max_tokens_per_message=cfg.upstream_batch),
            timeout=max(0.001, deadline - started))
        with self._replica_call(ticket, call, lambda: f"no first token within {cfg.first_token_timeout_s:g} s"
                                ) as attempt:
            async with asyncio.timeout_at(min(deadline, started + cfg.first_token_timeout_s)):
                msg = await call.read()
            if msg is grpc.aio.EOF:
                raise _AttemptFailed("error", "stream ended before the first token")
            attempt.finished = True  # the call lives on in the returned _Opened
            ttft = loop.time() - started
            self.gateway._notify(ticket.replica_id, "first_token", ttft)
            return _Opened(call, msg, ttft)

    @contextlib.contextmanager
    def _replica_call(self, ticket: _Ticket, call, stall_detail: Callable[[], str]):
        """How a replica call can end early, in the request path's terms: a stall (timeout), a failed RPC or a
        closed channel is a failed attempt to fail over from; the request's own deadline and a real cancellation
        stay what they are. A call the attempt did not finish is cancelled, so the replica frees its slot."""
        attempt = _CallState()
        try:
            yield attempt
        except TimeoutError:
            if asyncio.get_running_loop().time() >= self.deadline:
                raise DeadlineExceeded(f"request deadline passed after {len(self.forwarded)} tokens") from None
            raise _AttemptFailed("stall", stall_detail()) from None
        except grpc.aio.AioRpcError as exc:
            raise self._rpc_failure(ticket, exc) from None
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            raise _AttemptFailed("error", "replica connection closed (replica removed from membership)") from None
        finally:
            # After the final token the replica is only sending its OK status: cancelling then would make a
            # completed stream look abandoned on the replica side.
            if not attempt.finished and not call.done():
                call.cancel()

    async def stream(self, ticket: _Ticket, opened: _Opened | None) -> AsyncIterator[list[TokenEvent]]:
        """Relay an attempt's tokens (opening it first unless `opened`), ending with the final one; reports the
        attempt's outcome and latencies to the breaker."""
        if opened is None:
            opened = await self.open(ticket)
        gateway = self.gateway
        loop = asyncio.get_running_loop()
        cfg = gateway.config
        deadline = self.deadline
        forwarded = self.forwarded
        max_tokens = self.request.max_tokens
        replica_id = ticket.replica_id
        call = opened.call
        msg = opened.first
        expected = len(forwarded)
        first_at = loop.time()
        later_tokens = 0  # tokens after the first message's first one: the inter-token latency's denominator
        with self._replica_call(ticket, call, lambda: f"no token {expected} within {cfg.inter_token_timeout_s:g} s"
                                ) as attempt:
            async with asyncio.timeout(None) as watchdog:
                while True:
                    # Reference replicas leave index unset (0): then order is the only index there is.
                    if msg.index != expected and msg.index != 0:
                        raise _AttemptFailed("error", f"replica sent index {msg.index}, expected {expected}")
                    more = msg.more_tokens
                    if msg.is_final and not msg.token and not more:  # a final message with no token
                        attempt.finished = True
                        self._succeeded(ticket, opened, first_at, later_tokens)
                        yield [TokenEvent(expected, "", replica_id, True,
                                          FINISH_REASONS.get(msg.finish_reason, "length"))]
                        gateway._notify(replica_id, "ok", None)
                        return
                    count = 1 + len(more)
                    if expected + count > max_tokens or (not msg.is_final and expected + count >= max_tokens):
                        raise _AttemptFailed("error", "replica sent more tokens than max_tokens")
                    if count == 1:
                        batch = [TokenEvent(expected, msg.token, replica_id)]
                        forwarded.append(msg.token)
                    else:
                        tokens = [msg.token, *more]
                        batch = [TokenEvent(expected + k, tok, replica_id) for k, tok in enumerate(tokens)]
                        forwarded.extend(tokens)
                    later_tokens += count if msg is not opened.first else count - 1
                    expected += count
                    if msg.is_final:
                        batch[-1].is_final = True
                        batch[-1].finish_reason = FINISH_REASONS.get(msg.finish_reason, "length")
                        attempt.finished = True
                        self._succeeded(ticket, opened, first_at, later_tokens)
                        yield batch
                        gateway._notify(replica_id, "ok", None)
                        return
                    yield batch
                    watchdog.reschedule(min(deadline, loop.time() + cfg.inter_token_timeout_s))
                    msg = await call.read()
                    watchdog.reschedule(None)  # never fire while the caller holds the event
                    if msg is grpc.aio.EOF:
                        raise _AttemptFailed("error", "stream ended before the final token")

    def _succeeded(self, ticket: _Ticket, opened: _Opened, first_at: float, later_tokens: int) -> None:
        breakers = self.gateway.breakers
        if breakers is None or ticket.reported:
            return
        ticket.reported = True
        mean_itl = (asyncio.get_running_loop().time() - first_at) / later_tokens if later_tokens else None
        breakers.record_success(ticket.replica_id, opened.ttft, mean_itl, started_at=ticket.sent_at)

    def _rpc_failure(self, ticket: _Ticket, exc: grpc.aio.AioRpcError) -> Exception:
        code = exc.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(f"replica {ticket.replica_id}: {exc.details()}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and \
                asyncio.get_running_loop().time() >= self.deadline - 0.005:
            return DeadlineExceeded(f"request deadline passed after {len(self.forwarded)} tokens")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return _AttemptFailed("busy", exc.details() or "replica at capacity")
        if code == grpc.StatusCode.UNAVAILABLE and (exc.details() or "").startswith("draining"):
            return _AttemptFailed("draining", "replica is draining")
        kind = FAILURE_UNAVAILABLE if code == grpc.StatusCode.UNAVAILABLE else FAILURE_ERROR
        return _AttemptFailed("error", f"{code.name}: {exc.details()}", kind)


class _NoMembers:
    def members(self, include_self: bool = False):
        return []

    def subscribe(self, cb):
        return lambda: None
