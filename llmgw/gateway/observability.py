"""Metrics and the per-request log line for a running Gateway, attached from the outside.

`ObservedGateway(gateway, metrics)` is what the gRPC and HTTP fronts are handed instead of the bare Gateway: its
`infer()` / `infer_batches()` record each request once (outcome, TTFT, inter-token gaps, tokens) and write the one
info line per request (id, replica(s), outcome, TTFT, tokens); every other attribute is the Gateway's own. Since
both fronts go through it, the HTTP front is started with `record_requests=False` so nothing is counted twice.

The rest is read, not pushed: queue depth, in-flight per replica, breaker states and the gateway's failover and
hedge counters are copied into the metrics at scrape time (GatewayMetrics.on_scrape), so the request path pays
nothing for them and needs no hook of its own (the Gateway's `attempt_listeners` stay free for policies). Queue
wait is timed around this gateway's admission queue `acquire` (an instance attribute, removed by detach()).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import uuid
from typing import Any, AsyncIterator

from llmgw.gateway.api import GatewayError, InferenceRequest, TokenEvent, one_event_each
from llmgw.logs import request_log

log = logging.getLogger("llmgw.gateway.requests")

# Hedge race results as llmgw.metrics labels them, from Gateway.hedge_stats(). "denied" is every hedge that was
# wanted but not started: refused by the policy budget, or for want of a free replica to race against.
_HEDGE_RESULTS = {"won": ("won",), "lost": ("lost",), "cancelled": ("cancelled",),
                  "denied": ("policy_hedges_denied", "denied_no_capacity")}


@dataclasses.dataclass
class _Request:
    started: float
    outcome: str = "ok"
    tokens: int = 0
    ttft_s: float | None = None
    last_token_at: float = 0.0
    replicas: list[str] = dataclasses.field(default_factory=list)
    complete: bool = False


class ObservedGateway:
    """A Gateway whose requests are measured and logged; attribute access falls through to the Gateway.

    `metrics` is a llmgw.metrics.GatewayMetrics; `detach()` removes the scrape-time refreshers and the queue-wait
    timer (the Gateway itself is left as it was)."""

    def __init__(self, gateway, metrics, *, logger: logging.Logger = log) -> None:
        object.__setattr__(self, "_gateway", gateway)
        object.__setattr__(self, "metrics", metrics)
        object.__setattr__(self, "_log", logger)
        object.__setattr__(self, "_counters_seen", {})
        object.__setattr__(self, "_inflight_known", set())
        metrics.queue_depth.set_function(lambda: gateway.queued)
        remove = metrics.on_scrape(self.refresh_metrics)
        object.__setattr__(self, "_remove_refresher", remove)
        object.__setattr__(self, "_original_acquire", None)
        self._time_admission()

    # ---- delegation -----------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        return getattr(self._gateway, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._gateway, name, value)

    @property
    def gateway(self):
        return self._gateway

    def detach(self) -> None:
        self._remove_refresher()
        original = self._original_acquire
        if original is not None:
            admission = self._gateway.admission
            if admission.__dict__.get("acquire") is not None:
                del admission.acquire  # back to the class's own method
            object.__setattr__(self, "_original_acquire", None)

    # ---- requests -------------------------------------------------------------------------------------------
    def infer(self, request: InferenceRequest) -> AsyncIterator[TokenEvent]:
        return one_event_each(self.infer_batches(request))

    async def infer_batches(self, request: InferenceRequest) -> AsyncIterator[list[TokenEvent]]:
        if not request.request_id:
            # Named here so the log line and the replicas' logs carry the same id.
            request = dataclasses.replace(request, request_id=uuid.uuid4().hex)
        loop = asyncio.get_running_loop()
        state = _Request(started=loop.time())
        metrics = self.metrics
        try:
            async with contextlib.aclosing(self._gateway.infer_batches(request)) as batches:
                async for batch in batches:
                    now = loop.time()
                    for event in batch:
                        if state.ttft_s is None:
                            state.ttft_s = now - state.started
                            metrics.ttft.observe(state.ttft_s)
                        else:
                            # Tokens that arrived in one message reach the client together: a 0 gap is the truth.
                            metrics.inter_token.observe(now - state.last_token_at)
                        state.last_token_at = now
                        if event.token or not event.is_final:
                            state.tokens += 1
                        if not state.replicas or state.replicas[-1] != event.replica_id:
                            state.replicas.append(event.replica_id)
                        if event.is_final:
                            state.complete = True
                    yield batch
        except GatewayError as exc:
            state.outcome = exc.code.name.lower()
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # A consumer that stops after the final token closes us at the last yield: that is a success.
            if not state.complete:
                state.outcome = "cancelled"
            raise
        except Exception:
            state.outcome = "internal"
            raise
        finally:
            if state.outcome == "ok" and not state.complete:
                state.outcome = "internal"  # ended without a final token: never report a partial answer as OK
            metrics.request_finished(state.outcome, tokens=state.tokens)
            fields: dict[str, Any] = dict(id=request.request_id, replicas=state.replicas, outcome=state.outcome,
                                          tokens=state.tokens)
            if state.ttft_s is not None:
                fields["ttft_ms"] = round(state.ttft_s * 1000, 3)
            fields["duration_ms"] = round((loop.time() - state.started) * 1000, 3)
            if request.client_id:
                fields["client"] = request.client_id
            if request.hedge:
                fields["hedge"] = True
            request_log(self._log, **fields)

    # ---- read at scrape time --------------------------------------------------------------------------------
    def refresh_metrics(self) -> None:
        gw, metrics = self._gateway, self.metrics
        in_flight = dict(gw.in_flight)
        view = getattr(gw, "view", None)
        # Every replica the gateway can route to gets a series (0 when idle); one that left loses its series.
        current = set(in_flight) | set(getattr(view, "addresses", {}) or {})
        for replica in self._inflight_known - current:
            metrics.forget_replica(replica)
        for replica in current:
            metrics.inflight_gauge(replica).set(in_flight.get(replica, 0))
        self._inflight_known.clear()
        self._inflight_known.update(current)
        self._count_delta("failovers", getattr(gw.stats, "failovers_total", None), metrics.failovers.inc)
        for result, value in self._hedge_counts().items():
            self._count_delta(f"hedge_{result}", value, functools.partial(self._inc_hedge, result))
        breakers = self._breaker_board()
        if breakers is not None:
            for replica, entry in breakers.snapshot().get("replicas", {}).items():
                state = entry.get("state") if isinstance(entry, dict) else entry
                try:
                    metrics.set_breaker_state(replica, state)
                except ValueError:
                    log.debug("breaker of %s in unknown state %r", replica, state)

    def _inc_hedge(self, result: str, amount: float) -> None:
        self.metrics.hedges.labels(result).inc(amount)

    def _count_delta(self, key: str, value, inc) -> None:
        """Counters the gateway keeps as plain totals become Prometheus counters by adding what is new."""
        if value is None:
            return
        previous = self._counters_seen.get(key, 0)
        if value > previous:
            inc(value - previous)
        self._counters_seen[key] = value

    def _breaker_board(self):
        return getattr(self._gateway, "breakers", None)

    def _hedge_counts(self) -> dict[str, int]:
        try:
            stats = self._gateway.hedge_stats()
        except Exception:  # noqa: BLE001 - a broken source costs its own series only, never the scrape
            log.debug("hedge stats unavailable", exc_info=True)
            return {}
        return {result: sum(int(stats.get(key, 0)) for key in keys) for result, keys in _HEDGE_RESULTS.items()}

    # ---- queue wait -----------------------------------------------------------------------------------------
    def _time_admission(self) -> None:
        admission = getattr(self._gateway, "admission", None)
        if admission is None or not hasattr(admission, "acquire"):
            return
        original = admission.acquire
        histogram = self.metrics.queue_wait

        @functools.wraps(original)
        async def timed_acquire(*args, **kwargs):
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                return await original(*args, **kwargs)
            finally:
                histogram.observe(loop.time() - started)

        # An instance attribute shadows the method for this gateway only; detach() deletes it again.
        admission.acquire = timed_acquire
        object.__setattr__(self, "_original_acquire", original)
