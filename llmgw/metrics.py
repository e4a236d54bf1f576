"""Prometheus metrics for the gateway and the replica, each on its own ``CollectorRegistry``.

A per-instance registry (never prometheus-client's global one) lets tests and several gateways share a process.
Request-path code updates plain prometheus-client objects (``metrics.ttft.observe(s)``) or the few helpers below
that keep label values to a known set. Gossip counters are not pushed: :class:`GossipCollector` calls the gossip
node's ``stats()`` (and ``members()``) at scrape time, so the hot gossip loop never touches a metric.

Exposition: :func:`render` for any HTTP framework, :func:`aiohttp_handler` for the gateway's aiohttp front, and
:func:`start_metrics_server` for a process without one (the replica).

Several worker processes (``gateway --workers N``) use prometheus-client's multiprocess mode: the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` (llmgw.workers) before the workers start, every worker's values live in files there,
and any worker's /metrics is the aggregate of all (MultiProcessCollector). Counters and histograms add up. Each
gauge has a merge rule (``multiprocess_mode``, ignored in a single process), listed in :data:`GAUGE_MERGE_RULES`.
What a single process reads at scrape time (on_scrape refreshers, gauges bound to a function, the gossip
collector) is invisible in the files, so in that mode every worker copies it in on a short timer
(llmgw.workers.MetricsPublisher) and before its own scrapes; process/GC collectors and Info are per process and
are not exported then (``llmgw_build_info`` becomes a gauge, one series per worker).
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import warnings
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import prometheus_client
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "BREAKER_STATES",
    "E2E_BUCKETS",
    "FINISH_REASONS",
    "FRONTS",
    "GAUGE_MERGE_RULES",
    "HEDGE_RESULTS",
    "LATENCY_BUCKETS",
    "MEMBER_STATES",
    "MULTIPROC_DIR_ENV",
    "OUTCOMES",
    "GatewayMetrics",
    "GossipCollector",
    "MetricsServer",
    "ReplicaMetrics",
    "aiohttp_handler",
    "multiprocess_dir",
    "render",
    "start_metrics_server",
]

log = logging.getLogger("llmgw.metrics")

# 1-2-5 steps from 1 ms to 30 s: TTFT on a warm loopback is a few ms, a queued request can wait the full 30 s.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Histogram(prometheus_client.Histogram):
    """prometheus_client's Histogram, observed in fewer steps: the bucket found by bisection instead of a scan of
    every bound (a gateway observes per streamed batch and several times per request). Records exactly what the
    base class records: the amount added to the sum, one count in the first bucket whose bound holds it (none
    for NaN); with an exemplar, the base class does it all."""

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar:
            super().observe(amount, exemplar)
            return
        try:
            total = self._sum
        except AttributeError:  # a parent with labels: the base class says what is missing
            self._raise_if_not_observable()
            raise
        total.inc(amount)
        bounds = self._upper_bounds
        index = bisect.bisect_left(bounds, amount)
        if index < len(bounds) and amount <= bounds[index]:
            self._buckets[index].inc(1)


def observe_zeros(histogram: Any, count: int) -> None:
    """`count` observations of 0 s, recorded as `count` calls of histogram.observe(0.0) record them: the sum does
    not change and the first bucket that holds 0 counts them all -- one increment instead of two locked ones per
    token (under load, tokens that arrived together are a large share of all tokens). A histogram without
    prometheus_client's bucket layout gets the plain calls."""
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    if buckets is not None and bounds is not None:
        for index, bound in enumerate(bounds):
            if bound >= 0.0:
                buckets[index].inc(count)
                return
    for _ in range(count):
        histogram.observe(0.0)


# gRPC status code names, lower-cased: the outcome of a request is the status its stream ended with.
OUTCOMES = ("ok", "cancelled", "unknown", "invalid_argument", "deadline_exceeded", "not_found", "already_exists",
            "permission_denied", "resource_exhausted", "failed_precondition", "aborted", "out_of_range",
            "unimplemented", "internal", "unavailable", "data_loss", "unauthenticated")
# Created up front so dashboards see a 0 rather than a missing series before the first occurrence.
_COMMON_OUTCOMES = ("ok", "cancelled", "invalid_argument", "deadline_exceeded", "resource_exhausted", "internal",
                    "unavailable")
HEDGE_RESULTS = ("won", "lost", "cancelled", "denied")
# Up to this many configured tenants get their per-tenant series created at 0 when the key file is loaded.
PRECREATED_TENANTS = 100
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
MEMBER_STATES = ("alive", "suspect", "dead", "left")

# Whole requests, vLLM's e2e_request_latency_seconds style: a long generation or a queued one runs for minutes.
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 240.0,
               300.0)
# TTFT per model: the 1 ms resolution of LATENCY_BUCKETS, then on to the same 300 s ceiling.
TTFT_BUCKETS = (*LATENCY_BUCKETS[:-1], 20.0, 30.0, 60.0, 120.0, 300.0)
FRONTS = ("grpc", "http")
# vLLM's finished_reason values: stop/length as the model ended, abort when the client went away; an upstream's
# other reasons (tool_calls, content_filter) are kept, anything else is "other" (bounded label values).
FINISH_REASONS = ("stop", "length", "abort", "tool_calls", "content_filter", "other")
UNSPECIFIED_MODEL = "unspecified"  # the request named no model (the gRPC front has no model field)
OTHER_MODEL = "other"  # a model outside the configured set
MAX_MODELS = 64
_ABORTED = frozenset({"cancelled"})  # outcomes vLLM counts as finished with finished_reason "abort"

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How each gateway gauge merges across worker processes ("live": a dead worker's value is dropped once the
# supervisor calls mark_process_dead). In-flight and queue depth add up; a breaker or gossip state reports the
# worst (highest) any live worker sees; build info keeps one series per worker (their ids differ).
MergeRule = Literal["livesum", "livemax"]
GAUGE_MERGE_RULES: dict[str, MergeRule] = {
    "llmgw_gateway_queue_depth": "livesum",
    "llmgw_gateway_inflight": "livesum",
    "llmgw_gateway_breaker_state": "livemax",
    "llmgw_gateway_inter_token_deadline_seconds": "livemax",
    "llmgw_gateway_first_token_deadline_seconds": "livemax",
    "llmgw_build_info": "livemax",
    "llmgw_gossip_members": "livemax",
    "llmgw_gossip_awareness": "livemax",
    "llmgw_gossip_incarnation": "livemax",
}


def multiprocess_dir() -> str | None:
    """The multiprocess directory this process writes metric values to, or None (single process).

    prometheus-client picks its value storage when first imported, so the variable must be set before that (the
    supervisor sets it in the workers' environment); set or unset later, it is a RuntimeError here rather than
    a /metrics that silently misses every worker but one."""
    from prometheus_client import values

    path = os.environ.get(MULTIPROC_DIR_ENV) or None
    file_backed = values.ValueClass is not values.MutexValue
    if bool(path) != file_backed:
        raise RuntimeError(f"{MULTIPROC_DIR_ENV} must be set before prometheus_client is first imported "
                           f"(it is {'set' if path else 'unset'} now, but was not then)")
    if path is not None and not os.path.isdir(path):
        raise RuntimeError(f"{MULTIPROC_DIR_ENV}={path!r} is not a directory")
    return path


def _outcome(value: Any) -> str:
    # Accept a grpc.StatusCode (its .name is "RESOURCE_EXHAUSTED") without importing grpc here.
    name = str(getattr(value, "name", value)).lower()
    if name not in OUTCOMES:
        raise ValueError(f"unknown request outcome {value!r}; use a gRPC status code name such as 'ok'")
    return name


class _ChildCache:
    """Label children by raw key (a name or a grpc.StatusCode), validated and resolved once per distinct key."""

    def __init__(self, family: Any, normalise: Callable[[Any], str], initial: Iterable[str]) -> None:
        self._family = family
        self._normalise = normalise
        self._children: dict[Any, Any] = {}
        for name in initial:
            self.get(name)

    def get(self, key: Any) -> Any:
        child = self._children.get(key)
        if child is None:
            child = self._family.labels(self._normalise(key))
            if len(self._children) < 256:  # keys are a small closed set; the bound only guards against misuse
                self._children[key] = child
        return child


def _new_registry(registry: CollectorRegistry | None, process_metrics: bool) -> CollectorRegistry:
    if registry is not None:
        return registry
    registry = CollectorRegistry(auto_describe=True)
    if process_metrics:
        # CPU seconds, RSS, open fds, GC: the first things to check when latency moves.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def _build_info(registry: CollectorRegistry, component: str, instance_id: str, multiprocess: bool = False) -> None:
    from llmgw import __version__ as version

    labels = {"version": str(version), "component": component, "id": instance_id}
    if multiprocess:  # Info has no multiprocess storage; the same sample, one per worker
        Gauge("llmgw_build_info", "llmgw version and this process's role", list(labels), registry=registry,
              multiprocess_mode=GAUGE_MERGE_RULES["llmgw_build_info"]).labels(**labels).set(1)
        return
    Info("llmgw_build", "llmgw version and this process's role", registry=registry).info(labels)


class _CollectorMirror:
    """Copies what a scrape-time collector yields into prometheus-client metrics on this registry, whose values
    multiprocess mode does write to the shared files. Counters advance by what is new since the last copy (a
    value that went down means the source restarted: it is counted again from 0); gauges are set, merged by
    GAUGE_MERGE_RULES (default livemax)."""

    def __init__(self, collector: Any, registry: CollectorRegistry) -> None:
        self._collector = collector
        self._registry = registry
        self._metrics: dict[str, Any] = {}
        self._seen: dict[tuple[str, tuple[str, ...]], float] = {}

    def _metric(self, family: Any, labelnames: list[str]) -> Any:
        metric = self._metrics.get(family.name)
        if metric is None:
            if family.type == "counter":
                metric = Counter(family.name, family.documentation, labelnames, registry=self._registry)
            else:
                metric = Gauge(family.name, family.documentation, labelnames, registry=self._registry,
                               multiprocess_mode=GAUGE_MERGE_RULES.get(family.name, "livemax"))
            self._metrics[family.name] = metric
        return metric

    def refresh(self) -> None:
        for family in self._collector.collect():
            if family.type not in ("counter", "gauge") or not family.samples:
                continue
            labelnames = sorted(family.samples[0].labels)
            metric = self._metric(family, labelnames)
            for sample in family.samples:
                if family.type == "counter" and not sample.name.endswith("_total"):
                    continue  # _created
                values = tuple(sample.labels.get(name, "") for name in labelnames)
                child = metric.labels(*values) if labelnames else metric
                if family.type == "gauge":
                    child.set(sample.value)
                    continue
                key = (family.name, values)
                previous = self._seen.get(key, 0.0)
                increase = sample.value - previous if sample.value >= previous else sample.value
                if increase > 0:
                    child.inc(increase)
                self._seen[key] = sample.value


# --------------------------------------------------------------------------------------------------------------
# Gossip: read lazily at scrape time


class GossipCollector:
    """Exports a gossip node's counters and member table, read at scrape time.

    ``stats_fn()`` returns the node's stats mapping (``GossipNode.stats()``); the keys used are ``messages_in``,
    ``messages_out``, ``bytes_in``, ``bytes_out``, ``suspicions_raised`` (or ``suspicions``), ``refutations``,
    ``probes_failed``, the drop counters ``malformed``, ``auth_rejected``, ``replays_rejected``, ``misdirected``,
    ``implausible``, and the gauges ``awareness`` and ``incarnation``. Missing keys are simply not exported.
    ``members_fn()`` returns members with a ``.state`` (``GossipNode.members(include_self=True)``).
    A failing callback costs the gossip series of that scrape, never the whole scrape.
    """

    _DROP_REASONS: ClassVar[dict[str, str]] = {
        "malformed": "malformed", "auth_rejected": "auth", "replays_rejected": "replay", "misdirected": "misdirected",
        "implausible": "implausible",
    }

    def __init__(self, stats_fn: Callable[[], Mapping[str, Any]],
                 members_fn: Callable[[], Iterable[Any]] | None = None) -> None:
        self._stats_fn = stats_fn
        self._members_fn = members_fn

    def describe(self) -> list:
        # Called once at registration (auto_describe): must not call into the gossip node, which may not run yet.
        return []

    def collect(self) -> Iterator[Any]:
        try:
            stats = dict(self._stats_fn())
        except Exception:  # a broken stats source must not fail /metrics as a whole (logged below)
            log.warning("gossip stats unavailable for this scrape", exc_info=True)
            stats = None
        if stats is not None:
            yield from self._from_stats(stats)
        if self._members_fn is not None:
            try:
                counts = dict.fromkeys(MEMBER_STATES, 0)
                for member in self._members_fn():
                    state = str(getattr(member, "state", "")).lower()
                    if state in counts:
                        counts[state] += 1
            except Exception:  # see above
                log.warning("gossip member table unavailable for this scrape", exc_info=True)
            else:
                family = GaugeMetricFamily("llmgw_gossip_members", "Members known to this node, by SWIM state",
                                           labels=["state"])
                for state, n in counts.items():
                    family.add_metric([state], n)
                yield family

    @staticmethod
    def _number(stats: Mapping[str, Any], key: str) -> float | None:
        value = stats.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value)

    def _from_stats(self, stats: Mapping[str, Any]) -> Iterator[Any]:
        num = lambda key: self._number(stats, key)  # noqa: E731
        for name, doc, keys in (("llmgw_gossip_messages", "Gossip datagrams", ("messages_in", "messages_out")),
                                ("llmgw_gossip_bytes", "Gossip bytes", ("bytes_in", "bytes_out"))):
            values = [num(k) for k in keys]
            if any(v is not None for v in values):
                family = CounterMetricFamily(name, f"{doc} received (in) and sent (out)", labels=["direction"])
                for direction, v in zip(("in", "out"), values, strict=True):
                    if v is not None:
                        family.add_metric([direction], v)
                yield family
        suspicions = num("suspicions_raised")
        if suspicions is None:
            suspicions = num("suspicions")
        for name, doc, value in (
                ("llmgw_gossip_suspicions", "Suspicions this node raised against members", suspicions),
                ("llmgw_gossip_refutations", "Times this node refuted a suspicion of itself", num("refutations")),
                ("llmgw_gossip_probes_failed", "Probes with neither a direct nor an indirect ack",
                 num("probes_failed"))):
            if value is not None:
                yield CounterMetricFamily(name, doc, value=value)
        drops = [(reason, num(key)) for key, reason in self._DROP_REASONS.items()]
        if any(v is not None for _, v in drops):
            family = CounterMetricFamily("llmgw_gossip_dropped", "Gossip datagrams dropped, by reason",
                                         labels=["reason"])
            for reason, v in drops:
                if v is not None:
                    family.add_metric([reason], v)
            yield family
        for name, doc, key in (("llmgw_gossip_awareness", "Lifeguard local health score (0 = healthy)", "awareness"),
                               ("llmgw_gossip_incarnation", "This node's incarnation number", "incarnation")):
            value = num(key)
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)


class _GossipBinding:
    registry: CollectorRegistry
    _gossip: GossipCollector | None = None
    _refreshers: list[Callable[[], None]]
    _multiprocess_dir: str | None = None
    _exposition: CollectorRegistry | None = None
    _remove_gossip_mirror: Callable[[], None] | None = None

    @property
    def multiprocess(self) -> bool:
        """True when several worker processes share these metrics (see the module docstring)."""
        return self._multiprocess_dir is not None

    @property
    def exposition_registry(self) -> CollectorRegistry:
        """What /metrics serves: ``registry``, or in multiprocess mode the aggregate of every worker's files."""
        if self._multiprocess_dir is None:
            return self.registry
        if self._exposition is None:
            self._exposition = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(self._exposition, path=self._multiprocess_dir)
        return self._exposition

    def gauge_from(self, gauge: Any, read: Callable[[], float]) -> None:
        """Keep ``gauge`` (a label-less Gauge or a child) equal to ``read()``: read at scrape time in a single
        process (``set_function``); copied by the refreshers in multiprocess mode, where a function gauge
        would not reach the shared files."""
        if self._multiprocess_dir is None:
            gauge.set_function(read)
        else:
            self.on_scrape(lambda: gauge.set(read()))

    def on_scrape(self, refresh: Callable[[], None]) -> Callable[[], None]:
        """Call ``refresh()`` before every :meth:`render`, to copy state that is cheaper to read than to push
        (in-flight per replica, breaker states, counters kept elsewhere). Returns a function that removes it.
        A failing refresher is logged and skipped: one broken source must not fail the whole scrape."""
        if not hasattr(self, "_refreshers"):
            self._refreshers = []
        self._refreshers.append(refresh)

        def remove() -> None:
            try:
                self._refreshers.remove(refresh)
            except ValueError:
                pass

        return remove

    def refresh(self) -> None:
        for refresh in list(getattr(self, "_refreshers", ())):
            try:
                refresh()
            except Exception:  # see on_scrape
                log.warning("metrics refresher %r failed", refresh, exc_info=True)

    def watch_gossip(self, stats_fn: Callable[[], Mapping[str, Any]],
                     members_fn: Callable[[], Iterable[Any]] | None = None) -> GossipCollector:
        """Export gossip counters and members by state, read at scrape time (replaces an earlier binding); in
        multiprocess mode copied into file-backed metrics by the refreshers instead."""
        if self._remove_gossip_mirror is not None:
            self._remove_gossip_mirror()
            self._remove_gossip_mirror = None
        elif self._gossip is not None:
            self.registry.unregister(self._gossip)
        self._gossip = GossipCollector(stats_fn, members_fn)
        if self._multiprocess_dir is None:
            self.registry.register(self._gossip)
        else:
            mirror = getattr(self, "_gossip_mirror", None)
            if mirror is None:  # one mirror per instance: the metric objects it creates are registered once
                mirror = self._gossip_mirror = _CollectorMirror(self._gossip, self.registry)
            mirror._collector = self._gossip
            self._remove_gossip_mirror = self.on_scrape(mirror.refresh)
        return self._gossip

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape body and its Content-Type, after running the :meth:`on_scrape` refreshers."""
        self.refresh()
        return render(self.exposition_registry, accept)


# --------------------------------------------------------------------------------------------------------------
# Gateway


class GatewayMetrics(_GossipBinding):
    """Every gateway metric, on ``self.registry`` (a new per-instance registry unless one is passed)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, gateway_id: str = "",
                 process_metrics: bool = True, models: Iterable[str] = ()) -> None:
        self._multiprocess_dir = multiprocess_dir()
        # Process and GC collectors describe one process: in multiprocess mode only the files are exported.
        self.registry = _new_registry(registry, process_metrics and self._multiprocess_dir is None)
        r = self.registry
        _build_info(r, "gateway", gateway_id, self.multiprocess)
        self.requests = Counter("llmgw_gateway_requests", "Finished requests, by outcome (gRPC status name)",
                                ["outcome"], registry=r)
        self.ttft = Histogram("llmgw_gateway_ttft_seconds", "Time from request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("llmgw_gateway_inter_token_seconds", "Time between consecutive tokens",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("llmgw_gateway_tokens_streamed", "Tokens streamed to clients", registry=r)
        self.queue_depth = Gauge("llmgw_gateway_queue_depth", "Requests waiting in the admission queue",
                                 registry=r, multiprocess_mode=GAUGE_MERGE_RULES["llmgw_gateway_queue_depth"])
        self.queue_wait = Histogram("llmgw_gateway_queue_wait_seconds",
                                    "Time requests spent in the admission queue (admitted or not)",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("llmgw_gateway_inflight", "Streams this gateway has open to each replica",
                              ["replica"], registry=r,
                              multiprocess_mode=GAUGE_MERGE_RULES["llmgw_gateway_inflight"])
        self.breaker_state = Gauge("llmgw_gateway_breaker_state",
                                   "Circuit breaker per replica: 0 closed, 1 half-open, 2 open", ["replica"],
                                   registry=r, multiprocess_mode=GAUGE_MERGE_RULES["llmgw_gateway_breaker_state"])
        self.failovers = Counter("llmgw_gateway_failovers", "Streams continued on another replica", registry=r)
        self.hedges = Counter("llmgw_gateway_hedges",
                              "Hedged attempts by result: won/lost the race, cancelled, denied by the budget",
                              ["result"], registry=r)
        # Adaptive stall deadlines (llmgw.gateway.stall_race): each replica's current limits, and what they caught.
        self.inter_token_deadline = Gauge(
            "llmgw_gateway_inter_token_deadline_seconds",
            "Current adaptive inter-token deadline per replica (a silence this long is a suspected stall)",
            ["replica"], registry=r,
            multiprocess_mode=GAUGE_MERGE_RULES["llmgw_gateway_inter_token_deadline_seconds"])
        self.first_token_deadline = Gauge(
            "llmgw_gateway_first_token_deadline_seconds",
            "Current adaptive first-token deadline per replica, for a short prompt", ["replica"], registry=r,
            multiprocess_mode=GAUGE_MERGE_RULES["llmgw_gateway_first_token_deadline_seconds"])
        self.stall_suspicions = Counter("llmgw_gateway_stall_suspicions",
                                        "Replica silences past their adaptive deadline (suspected stalls)",
                                        registry=r)
        self.stall_failovers = Counter("llmgw_gateway_stall_failovers",
                                       "Continuations started on another replica after a suspected stall",
                                       registry=r)
        self.stall_races = Counter("llmgw_gateway_stall_races",
                                   "Suspected stalls by how they ended: continuation_won, original_won, "
                                   "continuation_failed, no_replica (no free replica to race)", ["result"],
                                   registry=r)
        # labels() costs ~4 us (lock, tuple, dict); these per-request paths use the children resolved up front.
        self._requests_by_outcome = _ChildCache(self.requests, _outcome, _COMMON_OUTCOMES)
        self._hedges_by_result = {result: self.hedges.labels(result) for result in HEDGE_RESULTS}
        self._inflight_by_replica: dict[str, Any] = {}
        # What a vLLM operator looks for, per front and model (names as vLLM's where the meaning is the same).
        per_model = ["front", "model"]
        self.e2e_latency = Histogram("llmgw_gateway_e2e_request_latency_seconds",
                                     "Whole requests, arrival to last byte, by front and model",
                                     per_model, buckets=E2E_BUCKETS, registry=r)
        self.model_ttft = Histogram("llmgw_gateway_time_to_first_token_seconds",
                                    "Time from request arrival to its first token, by front and model",
                                    per_model, buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llmgw_gateway_prompt_tokens", "Prompt tokens of finished requests",
                                     per_model, registry=r)
        self.generation_tokens = Counter("llmgw_gateway_generation_tokens",
                                         "Tokens generated for finished requests (delivered to the client)",
                                         per_model, registry=r)
        self.request_success = Counter("llmgw_gateway_request_success",
                                       "Requests that finished (stop, length...) or that the client aborted, "
                                       "by finished_reason", [*per_model, "finished_reason"], registry=r)
        self.request_failure = Counter("llmgw_gateway_request_failure",
                                       "Requests that ended with an error, by outcome (gRPC status name)",
                                       [*per_model, "outcome"], registry=r)
        self._model_labels: dict[str, str] = {}
        self._per_model: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        self._per_reason: dict[tuple[str, str, str], Any] = {}
        self.set_models(models)
        # Tenancy (docs/tenancy.md): the tenant label takes only the key file's tenants (bounded cardinality).
        self.tenant_requests = Counter("llmgw_gateway_tenant_requests",
                                       "Finished requests of each configured tenant, by outcome",
                                       ["tenant", "outcome"], registry=r)
        self.tenant_tokens = Counter("llmgw_gateway_tenant_tokens", "Tokens streamed to each configured tenant",
                                     ["tenant"], registry=r)
        self.tenant_refusals = Counter("llmgw_gateway_tenant_refusals",
                                       "Requests refused for a tenant's limit, by limit", ["tenant", "limit"],
                                       registry=r)
        self.auth_failures = Counter("llmgw_gateway_auth_failures",
                                     "Requests refused for their API key: missing, malformed, too_large, unknown, "
                                     "forbidden (a model the key may not use)", ["reason"], registry=r)
        self._tenants: frozenset[str] = frozenset()
        self._per_tenant: dict[tuple[str, str], Any] = {}

    def set_tenants(self, tenants: Iterable[str]) -> None:
        """The tenants that get their own ``tenant`` label value (the key file's); requests of any other are not
        counted per tenant. Called again after a key file reload."""
        self._tenants = frozenset(tenants)
        if len(self._tenants) > PRECREATED_TENANTS:  # thousands of tenants: series appear with their first request
            return
        for tenant in self._tenants:  # known series start at 0, so a rate() sees the first request
            for outcome in ("ok", "resource_exhausted"):
                self._tenant_child(tenant, outcome)
            self.tenant_tokens.labels(tenant)

    def _tenant_child(self, tenant: str, outcome: str) -> Any:
        child = self._per_tenant.get((tenant, outcome))
        if child is None:
            child = self._per_tenant[(tenant, outcome)] = self.tenant_requests.labels(tenant, _outcome(outcome))
        return child

    def tenant_request(self, tenant: str, outcome: Any, *, tokens: int = 0) -> None:
        """One finished request of `tenant` (ignored unless it is a configured tenant, see set_tenants)."""
        if tenant not in self._tenants:
            return
        self._tenant_child(tenant, _outcome(outcome)).inc()
        if tokens:
            self.tenant_tokens.labels(tenant).inc(tokens)

    def set_models(self, models: Iterable[str]) -> None:
        """The model names that get their own ``model`` label value (the served or configured models); any
        other name is counted as "other", a request without one as "unspecified". At most MAX_MODELS."""
        names = [m for m in dict.fromkeys(models) if isinstance(m, str) and m]
        if len(names) > MAX_MODELS:
            raise ValueError(f"{len(names)} models is more than the {MAX_MODELS} that may have their own series")
        self._model_labels = {name: name for name in names}
        for front in FRONTS:  # known series start at 0, so a rate() sees the first request
            for model in names:
                self._series(front, model)

    def model_label(self, model: str | None) -> str:
        if not model:
            return UNSPECIFIED_MODEL
        return self._model_labels.get(model, OTHER_MODEL)

    def _series(self, front: str, model: str) -> tuple[Any, Any, Any, Any]:
        key = (front, model)
        series = self._per_model.get(key)
        if series is None:
            if front not in FRONTS:
                raise ValueError(f"unknown front {front!r}; use one of {', '.join(FRONTS)}")
            series = (self.e2e_latency.labels(front, model), self.model_ttft.labels(front, model),
                      self.prompt_tokens.labels(front, model), self.generation_tokens.labels(front, model))
            self._per_model[key] = series
        return series

    def request_done(self, *, front: str, model: str | None, outcome: Any, finish_reason: str | None = None,
                     prompt_tokens: int = 0, completion_tokens: int = 0, e2e_s: float | None = None,
                     ttft_s: float | None = None) -> None:
        """Everything about one finished request, once, from the front that served it ("grpc" or "http"):
        ``llmgw_gateway_requests_total{outcome}`` and ``tokens_streamed`` as :meth:`request_finished` counts them,
        plus the per-model series: e2e latency, TTFT, prompt and generated tokens, and success by
        ``finished_reason`` (ok: the model's reason, "stop"/"length"...; cancelled: "abort") or failure by
        outcome. ``completion_tokens`` are the tokens the client received. Unknown ``front`` or ``outcome``
        names are a ValueError (a typo would invent series); an unknown model or finish reason is bounded to
        "other"."""
        self.request_finished(outcome, tokens=completion_tokens)
        label = self._model_labels.get(model, OTHER_MODEL) if model else UNSPECIFIED_MODEL
        e2e, ttft, prompt, generated = self._series(front, label)
        if e2e_s is not None:
            e2e.observe(e2e_s)
        if ttft_s is not None:
            ttft.observe(ttft_s)
        if prompt_tokens:
            prompt.inc(prompt_tokens)
        if completion_tokens:
            generated.inc(completion_tokens)
        name = _outcome(outcome)
        if name == "ok":
            reason = finish_reason if finish_reason in FINISH_REASONS else "other"
            key = (front, label, reason)
            child = self._per_reason.get(key)
            if child is None:
                child = self._per_reason[key] = self.request_success.labels(front, label, reason)
        elif name in _ABORTED:
            key = (front, label, "abort")
            child = self._per_reason.get(key)
            if child is None:
                child = self._per_reason[key] = self.request_success.labels(front, label, "abort")
        else:
            key = (front, label, "!" + name)
            child = self._per_reason.get(key)
            if child is None:
                child = self._per_reason[key] = self.request_failure.labels(front, label, name)
        child.inc()

    def request_finished(self, outcome: Any, *, tokens: int = 0) -> None:
        """Count one finished request. ``outcome`` is a gRPC status name ("ok", "unavailable"...) or a
        ``grpc.StatusCode``; an unknown name is a ValueError (a typo would otherwise invent a new series).
        ``tokens`` is what the client received; pass 0 when tokens are counted as they stream."""
        self._requests_by_outcome.get(outcome).inc()
        if tokens:
            self.tokens.inc(tokens)

    def hedge(self, result: str) -> None:
        child = self._hedges_by_result.get(result)
        if child is None:
            raise ValueError(f"unknown hedge result {result!r}; use one of {', '.join(HEDGE_RESULTS)}")
        child.inc()

    def inflight_gauge(self, replica: str) -> Any:
        """The replica's in-flight gauge child, cached (``.inc()`` / ``.dec()`` it around each stream)."""
        child = self._inflight_by_replica.get(replica)
        if child is None:
            child = self._inflight_by_replica[replica] = self.inflight.labels(replica)
        return child

    def set_breaker_state(self, replica: str, state: str | int) -> None:
        """``state`` is "closed" / "half_open" (or "half-open") / "open", or its number 0 / 1 / 2."""
        if isinstance(state, str):
            value = BREAKER_STATES.get(state.lower().replace("-", "_"))
        else:
            value = state if state in BREAKER_STATES.values() else None
        if value is None:
            raise ValueError(f"unknown breaker state {state!r}; use closed, half_open or open")
        self.breaker_state.labels(replica).set(value)

    def forget_replica(self, replica: str) -> None:
        """Drop a removed replica's series so the member table's GC is reflected in /metrics. In multiprocess
        mode the files keep a series once written: it is set to 0 (in-flight none, breaker closed) instead."""
        self._inflight_by_replica.pop(replica, None)
        for family in (self.inflight, self.breaker_state, self.inter_token_deadline, self.first_token_deadline):
            if self._multiprocess_dir is not None:
                if (replica,) in family._metrics:
                    family.labels(replica).set(0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "removal not implemented in multi-process"
                    family.remove(replica)
                continue
            try:
                family.remove(replica)
            except KeyError:
                pass


# --------------------------------------------------------------------------------------------------------------
# Replica


class ReplicaMetrics(_GossipBinding):
    """Every replica metric, on ``self.registry``. For ``active``, either ``inc()``/``dec()`` it or hand it the
    replica's own counter: ``metrics.active.set_function(lambda: replica.active)``."""

    def __init__(self, registry: CollectorRegistry | None = None, *, replica_id: str = "",
                 process_metrics: bool = True) -> None:
        self.registry = _new_registry(registry, process_metrics)
        r = self.registry
        _build_info(r, "replica", replica_id)
        self.active = Gauge("llmgw_replica_active_requests", "Generate streams in progress", registry=r)
        self.capacity = Gauge("llmgw_replica_capacity", "Concurrent streams accepted before RESOURCE_EXHAUSTED",
                              registry=r)
        self.served = Counter("llmgw_replica_requests", "Finished Generate streams, by outcome (gRPC status name)",
                              ["outcome"], registry=r)
        self.tokens = Counter("llmgw_replica_tokens_generated", "Tokens generated", registry=r)
        self.prefix_cache_hits = Counter("llmgw_replica_prefix_cache_hits", "Prompts whose prefix was cached",
                                         registry=r)
        self.prefix_cache_misses = Counter("llmgw_replica_prefix_cache_misses", "Prompts with no cached prefix",
                                           registry=r)
        self._served_by_outcome = _ChildCache(self.served, _outcome, _COMMON_OUTCOMES)

    def request_finished(self, outcome: Any, *, tokens: int = 0) -> None:
        self._served_by_outcome.get(outcome).inc()
        if tokens:
            self.tokens.inc(tokens)

    def prefix_cache(self, hit: bool) -> None:
        (self.prefix_cache_hits if hit else self.prefix_cache_misses).inc()


# --------------------------------------------------------------------------------------------------------------
# Exposition


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """The scrape body and its Content-Type. Without ``accept``: the Prometheus text format; given the request's
    Accept header, OpenMetrics when the scraper asks for it (Prometheus does, by default)."""
    if accept:
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type
    return generate_latest(registry), CONTENT_TYPE_LATEST


def aiohttp_handler(source: CollectorRegistry | _GossipBinding) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp request handler serving ``source``: ``app.router.add_get("/metrics", aiohttp_handler(m))``.

    ``source`` is a ``CollectorRegistry``, or a GatewayMetrics/ReplicaMetrics (then its refreshers run first)."""
    from aiohttp import web

    render_source = source.render if isinstance(source, _GossipBinding) else (
        lambda accept: render(source, accept))

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = render_source(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    return metrics


class MetricsServer:
    """A stand-alone /metrics HTTP server on its own thread (prometheus-client's WSGI server)."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread: threading.Thread | None = thread

    @property
    def port(self) -> int:
        port: int = self._server.server_port
        return port

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and join the thread; idempotent."""
        if self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)
        self._thread = None


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> MetricsServer:
    """Serve ``registry`` over HTTP on ``host:port`` (0 = any free port; read it back from ``.port``)."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)
