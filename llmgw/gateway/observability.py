"""Metrics and the per-request log line of a running Gateway: a listener of its request path.

`MetricsListener(gateway, metrics)` is registered with `gateway.add_listener` by the composition root
(llmgw.gateway.app): both fronts call the Gateway directly, and every request is recorded once (outcome, TTFT,
inter-token gaps, tokens, queue wait) and gets the one info line (id, replica(s), outcome, TTFT, tokens), whichever
front it came in on; the HTTP front is then started with `record_requests=False` so nothing is counted twice.

The rest is read, not pushed: queue depth, in-flight per replica, breaker states and the gateway's failover and
hedge counters are copied into the metrics at scrape time (GatewayMetrics.on_scrape), so the request path pays
nothing for them.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from llmgw.gateway.api import TokenEvent
from llmgw.gateway.events import RequestListener, RequestRecord
from llmgw.logs import request_log
from llmgw.metrics import MAX_MODELS, observe_zeros

log = logging.getLogger("llmgw.gateway.requests")

# Hedge race results as llmgw.metrics labels them, from Gateway.hedge_stats(). "denied" is every hedge that was
# wanted but not started: refused by the policy budget, or for want of a free replica to race against.
_HEDGE_RESULTS = {"won": ("won",), "lost": ("lost",), "cancelled": ("cancelled",),
                  "denied": ("policy_hedges_denied", "denied_no_capacity")}


class MetricsListener(RequestListener):
    """Records a Gateway's requests in `metrics` (a llmgw.metrics.GatewayMetrics) and logs one line per request;
    reads the rest of the gateway's state at scrape time. `detach()` removes the scrape-time refreshers (the
    composition root also removes the listener from the gateway)."""

    def __init__(self, gateway, metrics, *, logger: logging.Logger = log) -> None:
        self.gateway = gateway
        self.metrics = metrics
        self._log = logger
        self._counters_seen: dict[str, float] = {}
        self._inflight_known: set[str] = set()
        self._models: tuple[str, ...] = ()
        # Read at scrape time (copied into the shared files by the refreshers with --workers N).
        metrics.gauge_from(metrics.queue_depth, lambda: gateway.queued)
        self._remove_refresher = metrics.on_scrape(self.refresh_metrics)

    def detach(self) -> None:
        self._remove_refresher()

    # ---- pushed by the request path ---------------------------------------------------------------------------
    def queue_waited(self, seconds: float) -> None:
        self.metrics.queue_wait.observe(seconds)

    def tokens_delivered(self, record: RequestRecord, batch: list[TokenEvent], now: float) -> None:
        metrics = self.metrics
        if record.batches == 1:
            metrics.ttft.observe(record.ttft_s)
        else:
            metrics.inter_token.observe(now - record.last_token_at)
        # Tokens that arrived in one message reach the client together: a 0 gap is the truth.
        together = len(batch) - 1
        if together:
            observe_zeros(metrics.inter_token, together)

    def request_finished(self, record: RequestRecord) -> None:
        outcome = record.outcome.value
        # Counts the request (outcome, tokens) and the per-front, per-model series a vLLM operator expects.
        self.metrics.request_done(front=record.front, model=record.model, outcome=outcome,
                                  finish_reason=record.finish_reason, prompt_tokens=record.prompt_tokens,
                                  completion_tokens=record.tokens, e2e_s=record.duration_s, ttft_s=record.ttft_s)
        if record.tenant:
            self.metrics.tenant_request(record.tenant, outcome, tokens=record.tokens)
        if not self._log.isEnabledFor(logging.INFO):  # (request_log's own check, before the line is put together)
            return
        fields: dict[str, Any] = dict(id=record.request_id, front=record.front, replicas=record.replicas,
                                      outcome=outcome, tokens=record.tokens)
        if record.model:
            fields["model"] = record.model
        if record.ttft_s is not None:
            fields["ttft_ms"] = round(record.ttft_s * 1000, 3)
        fields["duration_ms"] = round(record.duration_s * 1000, 3)
        if record.client_id:
            fields["client"] = record.client_id
        if record.tenant:
            fields["tenant"] = record.tenant
            fields["key_id"] = record.key_id
        if record.hedge:
            fields["hedge"] = True
        request_log(self._log, **fields)

    # ---- read at scrape time --------------------------------------------------------------------------------
    def refresh_metrics(self) -> None:
        gw, metrics = self.gateway, self.metrics
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
        self._follow_models()
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
        guard = getattr(gw, "stall_guard", None)
        if guard is not None:
            self._refresh_stall_metrics(guard.snapshot())

    def _refresh_stall_metrics(self, snapshot: dict[str, Any]) -> None:
        """Adaptive stall deadlines (llmgw.gateway.stall_race): per-replica limits, suspicions and races."""
        metrics = self.metrics
        for replica, entry in snapshot["replicas"].items():
            if replica in self._inflight_known:  # a replica that left keeps no series
                metrics.inter_token_deadline.labels(replica).set(entry["inter_token_deadline_s"])
                metrics.first_token_deadline.labels(replica).set(entry["first_token_deadline_s"])
        events = snapshot["events"]
        self._count_delta("stall_suspected", events["suspected"], metrics.stall_suspicions.inc)
        self._count_delta("stall_failovers", events["continuation_started"], metrics.stall_failovers.inc)
        for result in ("continuation_won", "original_won", "continuation_failed", "no_replica"):
            self._count_delta(f"stall_{result}", events[result], metrics.stall_races.labels(result).inc)

    def _follow_models(self) -> None:
        """The served models (the model versions routable replicas advertise, what /v1/models lists) get their
        own `model` label; a request naming another is counted as "other"."""
        gw = self.gateway
        try:
            routable = gw.routable()
            served: set[str] = set()
            for member in gw.members():
                version = getattr(member, "model_version", "")
                if member.member_id in routable and isinstance(version, str) and version:
                    served.add(version)
            models = tuple(sorted(served))
        except Exception:  # a membership source without these details: keep the labels as they are
            log.debug("served models unavailable", exc_info=True)
            return
        if models and models != self._models:
            self._models = models
            self.metrics.set_models(models[:MAX_MODELS])

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
        return getattr(self.gateway, "breakers", None)

    def _hedge_counts(self) -> dict[str, int]:
        try:
            stats = self.gateway.hedge_stats()
        except Exception:
            log.debug("hedge stats unavailable", exc_info=True)
            return {}
        return {result: sum(int(stats.get(key, 0)) for key in keys) for result, keys in _HEDGE_RESULTS.items()}
