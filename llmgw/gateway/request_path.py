"""The request path, top to bottom: route -> admit -> stream -> fail over (and the hedge race on the first token).

`RequestPath.infer_batches(request)` yields each token index exactly once, in order, ending with an is_final
event, or raises a GatewayError; it never ends quietly on a partial answer. Routing happens inside admission
(capacity.py: a pick and a slot in one synchronous step), one replica's try is an Attempt (attempt.py), the race
of a primary against a hedge is hedging.py's. What happened is reported to the registered listeners (events.py).
This module knows no transport: replicas are reached through a replica_stream.Transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncGenerator, Callable

from llmgw.gateway.admission import Admission, QueueFull, QueueTimeout
from llmgw.gateway.api import (
    DeadlineExceeded,
    GatewayConfig,
    GatewayError,
    InferenceRequest,
    ResourceExhausted,
    TokenEvent,
    Unavailable,
    check_request,
    one_event_each,
)
from llmgw.gateway.attempt import Attempt, Job, Limits
from llmgw.gateway.capacity import Capacity, Ticket
from llmgw.gateway.events import AttemptOutcome, Listeners, RequestOutcome, RequestRecord
from llmgw.gateway.hedging import Leg, RaceFailed, race_first_token
from llmgw.gateway.replica_stream import AttemptError, AttemptErrorKind, Transport
from llmgw.gateway.stall_race import StallGuard
from llmgw.gateway.tenancy_gate import TenancyGate
from llmgw.policy import HEDGE_CANCELLED, HEDGE_LOST, HEDGE_WON, HedgePolicy
from llmgw.policy.breaker import FAILURE_ERROR, FAILURE_TIMEOUT, FAILURE_UNAVAILABLE
from llmgw.tracing import (
    ADMIT_SPAN,
    ATTEMPT_SPAN,
    FAILOVER_EVENT,
    HEDGE_EVENT,
    NOOP_SPAN,
    REQUEST_SPAN,
    ROUTE_SPAN,
    Span,
    get_tracing,
)

log = logging.getLogger("llmgw.gateway")

# Refusals (replica full or draining) do not use up attempts, but a request may not bounce around forever.
MAX_REFUSALS = 20

# An attempt's failure as the listeners and the breaker see it.
OUTCOME_OF_FAILURE = {AttemptErrorKind.STALL: AttemptOutcome.STALL, AttemptErrorKind.BUSY: AttemptOutcome.BUSY,
                      AttemptErrorKind.DRAINING: AttemptOutcome.DRAINING}
BREAKER_FAILURE = {AttemptErrorKind.STALL: FAILURE_TIMEOUT, AttemptErrorKind.UNAVAILABLE: FAILURE_UNAVAILABLE}
HEDGE_OUTCOMES = {HEDGE_WON: AttemptOutcome.HEDGE_WON, HEDGE_LOST: AttemptOutcome.HEDGE_LOST,
                  HEDGE_CANCELLED: AttemptOutcome.HEDGE_CANCELLED}


@dataclasses.dataclass
class GatewayStats:
    served_total: int = 0
    failovers_total: int = 0
    rejected_total: int = 0
    failed_total: int = 0


class _RaceLost(Exception):
    """Every leg of a hedge race failed (each already counted); `hedge_decided`: the hedge chance was used."""

    def __init__(self, hedge_decided: bool) -> None:
        super().__init__("every leg of the hedge race failed")
        self.hedge_decided = hedge_decided


class _Request:
    """One request's state across attempts."""

    __slots__ = ("attempts", "excluded", "failures", "job", "reasons", "record", "refusals", "spans", "trace")

    def __init__(self, job: Job, record: RequestRecord) -> None:
        self.job = job
        self.record = record
        self.excluded: set[str] = set()  # the request ticket's exclude set (shared, not copied)
        self.failures = 0
        self.refusals = 0
        self.reasons: list[str] = []
        # Tracing (only when the request span records): attempts opened, and the span of each open attempt.
        self.trace: Span = record.trace
        self.attempts = 0
        self.spans: dict[Attempt, Span] = {}


class RequestPath:
    """Serves requests over the parts it is given; owns only its statistics and hedge counters."""

    def __init__(self, config: GatewayConfig, capacity: Capacity, admission: Admission[Ticket],
                 transport: Transport, limits: Limits, hedger: HedgePolicy) -> None:
        self.config = config
        self.capacity = capacity
        self.admission = admission
        self.transport = transport
        self.limits = limits
        self.hedger = hedger
        self.listeners = Listeners()
        # Replicas a request must not go to, given the request (the upstream table's model routing); None = any.
        self.route_filter: Callable[[InferenceRequest], set[str]] | None = None
        # API keys and per-tenant limits (llmgw.gateway.tenancy_gate); the Gateway sets it, None = open.
        self.tenancy: TenancyGate | None = None
        # Adaptive stall deadlines and stall races (llmgw.gateway.stall_race); the Gateway sets it, None = off.
        self.stall_guard: StallGuard | None = None
        self.stats = GatewayStats()
        self.hedge_counts = {"started": 0, "denied_no_capacity": 0}
        # llmgw.tracing's process-wide Tracing as it was when the gateway was built (NOOP_TRACING: off and free).
        self.tracing = get_tracing()
        # Graceful shutdown (llmgw.gateway.shutdown): requests in progress; what a new request is refused with
        # while the gateway drains (`refusing`), and what any further admission or failover is refused with once
        # the shutdown grace ran out (`closing`).
        self.open_requests = 0
        self.refusing: str | None = None
        self.closing: str | None = None

    def infer(self, request: InferenceRequest) -> AsyncGenerator[TokenEvent, None]:
        """Every token of the answer, one event each: indices 0, 1, ... exactly once, the last with is_final."""
        return one_event_each(self.infer_batches(request))

    async def infer_batches(self, request: InferenceRequest) -> AsyncGenerator[list[TokenEvent], None]:
        """Like infer(), grouped as the tokens arrived from the replica (front-ends that coalesce use this)."""
        loop = asyncio.get_running_loop()
        record = RequestRecord(request.request_id or uuid.uuid4().hex, request.client_id, bool(request.hedge),
                               loop.time(), request.tenant, request.key_id)
        record.front, record.model = request.front, request.model
        tracing = self.tracing
        if tracing.enabled:
            record.trace = tracing.request(REQUEST_SPAN, front=request.front, carrier=request.trace_carrier,
                                           attributes={"llmgw.request_id": record.request_id,
                                                       "llmgw.model": request.model or None,
                                                       "llmgw.max_tokens": request.max_tokens,
                                                       "llmgw.hedge": bool(request.hedge)})
        listeners = self.listeners
        self.open_requests += 1
        try:
            serve = self._serve if not request.tenant or self.tenancy is None else self._serve_tenant
            async with contextlib.aclosing(serve(request, record)) as batches:
                async for batch in batches:
                    now = loop.time()
                    if record.ttft_s is None:
                        record.ttft_s = now - record.started
                    record.batches += 1
                    last = batch[-1]
                    record.tokens += len(batch) if last.token or not last.is_final else len(batch) - 1
                    replicas = record.replicas
                    if not replicas or replicas[-1] != last.replica_id:
                        replicas.append(last.replica_id)
                    if last.is_final:
                        record.complete = True
                        record.finish_reason = last.finish_reason
                    for listener in listeners:
                        try:
                            listener.tokens_delivered(record, batch, now)
                        except Exception:  # a faulty listener must not break the request path
                            log.exception("request listener failed")
                    record.last_token_at = now
                    yield batch
        except GatewayError as exc:
            record.outcome = RequestOutcome.of_error(exc.kind)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # A consumer that stops after the final token closes us at the last yield: that is a success.
            if not record.complete:
                record.outcome = RequestOutcome.CANCELLED
            raise
        except Exception:
            record.outcome = RequestOutcome.INTERNAL
            raise
        finally:
            if record.outcome is RequestOutcome.OK and not record.complete:
                record.outcome = RequestOutcome.INTERNAL  # never report a partial answer as OK
            record.finished = loop.time()
            self.open_requests -= 1
            if request.prompt_tokens is not None:
                record.prompt_tokens = request.prompt_tokens
            elif isinstance(request.prompt, str):
                record.prompt_tokens = len(request.prompt.split())  # the HTTP front's usage count: words
            for listener in listeners:
                try:
                    listener.request_finished(record)
                except Exception:
                    log.exception("request listener failed")
            span = record.trace
            if span.recording:  # after the listeners, so that the request's log line carries its trace id
                span.set("llmgw.tokens", record.tokens)
                span.set("llmgw.replicas", ",".join(record.replicas))
                span.set("llmgw.finish_reason", record.finish_reason)
                outcome = record.outcome
                span.end(outcome.value, None if outcome in (RequestOutcome.OK, RequestOutcome.CANCELLED)
                         else outcome.value)

    # ---- the tenant's limits around the whole request -----------------------------------------------------
    async def _serve_tenant(self, request: InferenceRequest, record: RequestRecord
                            ) -> AsyncGenerator[list[TokenEvent], None]:
        """_serve within the tenant's limits: counted once valid, refused (ResourceExhausted with the delay) when
        over a limit; when it ends, however it ends, its stream slot is freed and its tokens are counted: the
        model server's usage where it reported one (record.usage), else the prompt's as the front counted them
        (else its words, as the HTTP front's usage does) + the tokens delivered."""
        tenancy = self.tenancy
        assert tenancy is not None
        check_request(request, self.config)  # an invalid request costs the tenant nothing
        loop = asyncio.get_running_loop()
        admitted = tenancy.admit(request.tenant, loop.time())
        try:
            async with contextlib.aclosing(self._serve(request, record)) as batches:
                async for batch in batches:
                    yield batch
        finally:
            if admitted:
                if record.usage is not None:
                    tokens = record.usage.total
                else:
                    prompt_tokens = request.prompt_tokens
                    if prompt_tokens is None:
                        prompt_tokens = len(request.prompt.split())
                    tokens = prompt_tokens + record.tokens
                tenancy.finished(request.tenant, tokens, loop.time())

    # ---- route -> admit -> stream -> fail over --------------------------------------------------------------
    async def _serve(self, request: InferenceRequest, record: RequestRecord) -> AsyncGenerator[list[TokenEvent], None]:
        cfg = self.config
        check_request(request, cfg)
        loop = asyncio.get_running_loop()
        timeout = request.timeout_s if request.timeout_s and request.timeout_s > 0 else cfg.request_timeout_s
        deadline = loop.time() + min(timeout, cfg.request_timeout_s)
        req = _Request(Job(request, record.request_id, deadline), record)
        if self.route_filter is not None:
            req.excluded.update(self.route_filter(request))
        ticket = Ticket(request.prompt, req.excluded)
        # Called once per request: it also credits the hedge budget. None = this request never hedges.
        hedge_delay = self.hedger.delay_for(bool(request.hedge))
        hedge_decided = False
        served = False  # the final batch is on its way to the caller, the success booked
        while True:
            # 1. route + admit (routing happens inside admission, atomically with taking the capacity)
            await self._admit(ticket, deadline, resumed=bool(req.failures or req.refusals), reasons=req.reasons,
                              tenant=request.tenant, trace=req.trace)
            try:
                # 2. stream: the first chunk -- raced against a hedge while the caller has nothing yet
                if req.job.forwarded or hedge_delay is None or hedge_decided:
                    attempt = await self._open(
                        Attempt(req.job, ticket, self.transport, self.limits, self.stall_guard), req)
                    if not req.job.forwarded:
                        self.hedger.observe_ttft(attempt.ttft_s)
                else:
                    attempt, hedge_decided = await self._race(req, ticket, hedge_delay,
                                                              explicit=bool(request.hedge))
                async with contextlib.aclosing(attempt.relay()) as relay:
                    async for batch in relay:
                        if attempt.finished:
                            # The success is booked, once, before the caller gets the final batch: a front may
                            # stop reading right there (aclose() at this yield), and then nothing after it runs.
                            served = True
                            self.capacity.report_success(ticket, attempt.ttft_s, attempt.mean_itl_s)
                            self._attempt_event(ticket.replica_id, AttemptOutcome.OK, None)
                            if req.spans:
                                _end_attempt_span(req, attempt, "ok")
                            self.stats.served_total += 1
                            record.usage = req.job.usage  # the server's count, if its transport saw one
                        yield batch
                return
            # 3. fail over
            except _RaceLost as lost:
                hedge_decided = hedge_decided or lost.hedge_decided
                self._check_attempts(req)
            except AttemptError as failure:
                if req.spans:  # a failure while relaying (one while opening ended its span in _open)
                    _end_attempt_span(req, attempt, _failure_outcome(failure), failure.detail)
                self._attempt_failed(req, ticket, failure)
                self._check_attempts(req)
            except (asyncio.CancelledError, GeneratorExit):
                if not served:  # closed at the final batch: served, already reported OK
                    self._attempt_event(ticket.replica_id, AttemptOutcome.CANCELLED, None)
                raise
            except DeadlineExceeded:
                self.stats.failed_total += 1
                raise
            finally:
                if req.spans:  # the request ended otherwise (client gone, deadline): its attempt with it
                    for span in req.spans.values():
                        span.end("abandoned")
                    req.spans.clear()
                self._give_back(ticket)

    async def _admit(self, ticket: Ticket, deadline: float, *, resumed: bool, reasons: list[str],
                     tenant: str = "", trace: Span = NOOP_SPAN) -> None:
        # Shutting down: no new request; once the grace ran out, no failover either (llmgw.gateway.shutdown).
        refusal = self.closing if resumed else self.refusing
        if refusal is not None:
            self.stats.rejected_total += 1
            raise Unavailable(refusal)
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            self.stats.failed_total += 1
            raise DeadlineExceeded("request deadline passed before a replica was found")
        if not (self.capacity.routable() - ticket.exclude):
            self.stats.failed_total += 1
            tail = (": " + "; ".join(reasons[-4:])) if reasons else ""
            raise Unavailable("no replica available" + tail)
        started = loop.time()
        admit = trace.child(ADMIT_SPAN, {"llmgw.resumed": resumed}) if trace.recording else NOOP_SPAN
        admit_outcome = "refused"
        try:
            # A resumed request already waited its turn once: it goes to the head of the queue.
            # Across tenants by weight, FIFO within one (a single tenant without a key file: plain FIFO).
            weight = self.tenancy.weight(tenant) if tenant and self.tenancy is not None else 1.0
            await self.admission.acquire(ticket, front=resumed, timeout_s=remaining, tenant=tenant, weight=weight)
            admit_outcome = "admitted"
        except QueueFull as exc:
            self.stats.rejected_total += 1
            raise ResourceExhausted(str(exc), retry_after_s=1.0) from None
        except QueueTimeout as exc:
            admit_outcome = "timeout"
            if self.closing is not None:  # the admission queue was closed by the shutdown
                self.stats.rejected_total += 1
                raise Unavailable(self.closing) from None
            if loop.time() >= deadline:
                self.stats.failed_total += 1
                raise DeadlineExceeded("request deadline passed while queued") from None
            self.stats.rejected_total += 1
            raise ResourceExhausted(str(exc), retry_after_s=1.0) from None
        finally:
            waited = loop.time() - started
            for listener in self.listeners:
                try:
                    listener.queue_waited(waited)
                except Exception:
                    log.exception("request listener failed")
            if admit.recording:
                admit.end(admit_outcome)
        if trace.recording:  # the pick is made inside admission, atomically with the slot: its result
            trace.child(ROUTE_SPAN, {"llmgw.replica": ticket.replica_id, "llmgw.resumed": resumed,
                                     "llmgw.excluded": len(ticket.exclude)}).end("routed")

    async def _open(self, attempt: Attempt, req: _Request | None = None, *, hedge: bool = False) -> Attempt:
        """An attempt's first chunk (an Attempt is opened here, in a race leg's task or the request's own).
        When the request is traced, the attempt gets its span (kept in `req.spans` once open)."""
        if req is None or not req.trace.recording:
            await attempt.open()
            self._attempt_event(attempt.replica_id, AttemptOutcome.FIRST_TOKEN, attempt.ttft_s)
            return attempt
        req.attempts += 1
        span = req.trace.child(ATTEMPT_SPAN, {"llmgw.replica": attempt.replica_id, "llmgw.attempt": req.attempts,
                                              "llmgw.hedge": hedge, "llmgw.resume_from": len(req.job.forwarded)},
                               kind="client")
        attempt.job.trace = span  # read synchronously by transport.open() inside attempt.open()
        try:
            await attempt.open()
        except AttemptError as failure:
            span.end(_failure_outcome(failure), failure.detail)
            raise
        except GatewayError as exc:
            span.end(exc.kind.value, exc.message)
            raise
        except BaseException:
            span.end("cancelled")
            raise
        span.set("llmgw.ttft_s", attempt.ttft_s)
        req.spans[attempt] = span
        self._attempt_event(attempt.replica_id, AttemptOutcome.FIRST_TOKEN, attempt.ttft_s)
        return attempt

    def _check_attempts(self, req: _Request) -> None:
        if self.closing is not None:  # the shutdown grace ran out: no failover (llmgw.gateway.shutdown)
            self.stats.failed_total += 1
            raise Unavailable(self.closing) from None
        if req.failures >= self.config.max_attempts or req.refusals > MAX_REFUSALS:
            self.stats.failed_total += 1
            raise Unavailable(f"request {req.job.request_id} failed after {req.failures} attempts and "
                              f"{req.refusals} refusals, {len(req.job.forwarded)} of {req.job.max_tokens} tokens "
                              "sent: " + "; ".join(req.reasons[-4:])) from None
        self.stats.failovers_total += 1
        if req.trace.recording:
            req.trace.event(FAILOVER_EVENT, {"llmgw.reason": req.reasons[-1] if req.reasons else "",
                                             "llmgw.tokens_sent": len(req.job.forwarded)})

    def _attempt_failed(self, req: _Request, ticket: Ticket, failure: AttemptError) -> None:
        """Bookkeeping for one replica that could not continue: counts, breaker, listeners, where not to go next."""
        replica_id = ticket.replica_id
        kind = failure.kind
        req.reasons.append(f"{replica_id}: {_reason(failure)}")
        self._attempt_event(replica_id, OUTCOME_OF_FAILURE.get(kind, AttemptOutcome.ERROR), None)
        if kind is AttemptErrorKind.BUSY:
            req.refusals += 1
            if replica_id is not None:
                loop = asyncio.get_running_loop()
                # The server's own Retry-After (a model server's 429) where it gave one.
                backoff = failure.retry_after_s if failure.retry_after_s is not None else self.config.busy_backoff_s
                self.capacity.mark_busy(replica_id, loop.time() + backoff)
                loop.call_later(backoff, self.admission.capacity_changed)
        elif kind is AttemptErrorKind.DRAINING:
            req.refusals += 1
            _avoid(req, replica_id)
        else:
            req.failures += 1
            _avoid(req, replica_id)
            self.capacity.report_failure(ticket, BREAKER_FAILURE.get(kind, FAILURE_ERROR))
        log.info("request %s: %s failed at token %d (%s)", req.job.request_id, replica_id, len(req.job.forwarded),
                 _reason(failure))

    def _give_back(self, ticket: Ticket) -> None:
        self.admission.give_back(ticket)

    # ---- the hedge race -------------------------------------------------------------------------------------
    async def _race(self, req: _Request, ticket: Ticket, delay_s: float, *, explicit: bool
                    ) -> tuple[Attempt, bool]:
        """The first chunk, raced against a hedge. Returns (the winning attempt, whether the hedge was decided
        on). Afterwards `ticket` holds the winner and every other leg is accounted for and given back; raises
        _RaceLost when every leg failed (each counted in `req`)."""
        loop = asyncio.get_running_loop()
        legs: list[Leg] = []
        decided = False
        hedge_replica: str | None = None  # kept: a given-back ticket forgets its replica
        race_started = loop.time()

        def start_hedge() -> Ticket | None:
            nonlocal decided, hedge_replica
            decided = True
            hedge = self._start_hedge(ticket, explicit=explicit)
            hedge_replica = hedge.replica_id if hedge is not None else None
            if req.trace.recording:
                req.trace.event(HEDGE_EVENT, {"llmgw.result": "started" if hedge is not None else "denied",
                                              "llmgw.replica": hedge_replica})
            return hedge

        def open_leg(leg_ticket: Ticket):
            return self._open(Attempt(req.job, leg_ticket, self.transport, self.limits, self.stall_guard), req,
                              hedge=leg_ticket is not ticket)

        winner: Leg | None = None
        try:
            winner = await race_first_token(open_leg, ticket, delay_s=delay_s, start_hedge=start_hedge,
                                            recoverable=AttemptError, legs=legs,
                                            discard=lambda surplus: surplus.cancel())
        except RaceFailed:
            pass
        finally:
            hedged = len(legs) > 1
            if hedged and winner is None:  # cancelled client, deadline, every leg failed: nobody won
                self._hedge_outcome(hedge_replica, HEDGE_CANCELLED)
            for leg in legs:
                failure = leg.failure
                if isinstance(failure, AttemptError):
                    self._attempt_failed(req, leg.ticket, failure)
            for leg in legs[1:]:  # the primary's capacity is the request's ticket: the caller gives it back
                if leg is not winner:
                    self._give_back(leg.ticket)
            if req.spans:  # legs that opened but lost the race (the winner's span goes on with the request)
                kept = winner.task.result() if winner is not None else None
                for leg_attempt in [a for a in req.spans if a is not kept]:
                    req.spans.pop(leg_attempt).end("hedge_lost" if kept is not None else "cancelled")
        if hedged and req.trace.recording:
            result = "cancelled" if winner is None else "won" if winner is legs[1] else "lost"
            req.trace.event(HEDGE_EVENT, {"llmgw.result": result, "llmgw.replica": hedge_replica})
        if winner is None:
            raise _RaceLost(decided)
        attempt: Attempt = winner.task.result()
        self.hedger.observe_ttft(loop.time() - race_started)
        if hedged:
            hedge_leg = legs[1]
            self._hedge_outcome(hedge_replica, HEDGE_WON if winner is hedge_leg else HEDGE_LOST)
            if winner is hedge_leg:
                primary = legs[0]
                if primary.failure is None:
                    # The primary was still silent when the hedge answered: a lower bound on its TTFT.
                    self.capacity.report_slow_start(ticket, loop.time() - primary.started)
                self._give_back(ticket)
                ticket.take_over(hedge_leg.ticket)
                attempt.ticket = ticket
        return attempt, decided

    def _start_hedge(self, primary: Ticket, *, explicit: bool) -> Ticket | None:
        """A second replica for a hedge, or None. Never queues: waiters keep their turn and a hedge that would
        wait is no hedge. A policy hedge also needs budget (asked for only once a replica is free, so the budget
        is not spent on a hedge that cannot run)."""
        assert primary.replica_id is not None
        hedge = Ticket(primary.prompt, primary.exclude | {primary.replica_id})
        if self.admission.queue or not self.capacity.try_acquire(hedge):
            self.hedge_counts["denied_no_capacity"] += 1
            self._attempt_event(primary.replica_id, AttemptOutcome.HEDGE_DENIED, None)
            return None
        if not explicit and not self.hedger.try_acquire():
            self._give_back(hedge)
            self._attempt_event(primary.replica_id, AttemptOutcome.HEDGE_DENIED, None)
            return None
        self.hedge_counts["started"] += 1
        self._attempt_event(hedge.replica_id, AttemptOutcome.HEDGE_STARTED, None)
        return hedge

    def _hedge_outcome(self, hedge_replica: str | None, outcome: str) -> None:
        self.hedger.record_outcome(outcome)
        self._attempt_event(hedge_replica, HEDGE_OUTCOMES[outcome], None)

    def hedge_stats(self) -> dict:
        """HedgePolicy.stats() plus the race counters: hedges started, and policy or explicit hedges denied for
        want of a free replica (`policy_hedges_denied` counts only the budget's refusals)."""
        stats = self.hedger.stats()
        stats["hedges_started"] = self.hedge_counts["started"]
        stats["denied_no_capacity"] = self.hedge_counts["denied_no_capacity"]
        return stats

    # ---- reporting ------------------------------------------------------------------------------------------
    def _attempt_event(self, replica_id: str | None, outcome: AttemptOutcome, ttft_s: float | None) -> None:
        self.listeners.attempt_event(replica_id, outcome, ttft_s)


def _failure_outcome(failure: AttemptError) -> str:
    """An attempt's failure as its span's llmgw.outcome (stall, busy, draining, error)."""
    return OUTCOME_OF_FAILURE.get(failure.kind, AttemptOutcome.ERROR).value


def _end_attempt_span(req: _Request, attempt: Attempt | None, outcome: str, error: str | None = None) -> None:
    span = req.spans.pop(attempt, None) if attempt is not None else None
    if span is not None:
        span.end(outcome, error)


def _avoid(req: _Request, replica_id: str | None) -> None:
    if replica_id is not None:
        req.excluded.add(replica_id)


def _reason(failure: AttemptError) -> str:
    """A failure as the request's error message lists it ("busy: ...", "stall: ...", "error: ...")."""
    outcome = OUTCOME_OF_FAILURE.get(failure.kind, AttemptOutcome.ERROR)
    return f"{outcome.value}: {failure.detail}"
