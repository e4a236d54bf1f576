"""Prometheus metrics for the gateway and the replica, each on its own ``CollectorRegistry``.

A per-instance registry (never prometheus-client's global one) lets tests and several gateways share a process.
Request-path code updates plain prometheus-client objects (``metrics.ttft.observe(s)``) or the few helpers below
that keep label values to a known set. Gossip counters are not pushed: :class:`GossipCollector` calls the gossip
node's ``stats()`` (and ``members()``) at scrape time, so the hot gossip loop never touches a metric.

Exposition: :func:`render` for any HTTP framework, :func:`aiohttp_handler` for the gateway's aiohttp front, and
:func:`start_metrics_server` for a process without one (the replica).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

__all__ = [
    "BREAKER_STATES",
    "HEDGE_RESULTS",
    "LATENCY_BUCKETS",
    "MEMBER_STATES",
    "OUTCOMES",
    "GatewayMetrics",
    "GossipCollector",
    "MetricsServer",
    "ReplicaMetrics",
    "aiohttp_handler",
    "render",
    "start_metrics_server",
]

log = logging.getLogger("llmgw.metrics")

# 1-2-5 steps from 1 ms to 30 s: TTFT on a warm loopback is a few ms, a queued request can wait the full 30 s.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

# gRPC status code names, lower-cased: the outcome of a request is the status its stream ended with.
OUTCOMES = ("ok", "cancelled", "unknown", "invalid_argument", "deadline_exceeded", "not_found", "already_exists",
            "permission_denied", "resource_exhausted", "failed_precondition", "aborted", "out_of_range",
            "unimplemented", "internal", "unavailable", "data_loss", "unauthenticated")
# Created up front so dashboards see a 0 rather than a missing series before the first occurrence.
_COMMON_OUTCOMES = ("ok", "cancelled", "invalid_argument", "deadline_exceeded", "resource_exhausted", "internal",
                    "unavailable")
HEDGE_RESULTS = ("won", "lost", "cancelled", "denied")
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
MEMBER_STATES = ("alive", "suspect", "dead", "left")


def _outcome(value: Any) -> str:
    # Accept a grpc.StatusCode (its .name is "RESOURCE_EXHAUSTED") without importing grpc here.
    name = str(getattr(value, "name", value)).lower()
    if name not in OUTCOMES:
        raise ValueError(f"unknown request outcome {value!r}; use a gRPC status code name such as 'ok'")
    return name


class _ChildCache:
    """Label children by raw key (a name or a grpc.StatusCode), validated and resolved once per distinct key."""

    def __init__(self, family, normalise: Callable[[Any], str], initial: Iterable[str]) -> None:
        self._family = family
        self._normalise = normalise
        self._children: dict[Any, Any] = {}
        for name in initial:
            self.get(name)

    def get(self, key: Any):
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


def _build_info(registry: CollectorRegistry, component: str, instance_id: str) -> None:
    from llmgw import __version__ as version

    Info("llmgw_build", "llmgw version and this process's role", registry=registry).info(
        {"version": str(version), "component": component, "id": instance_id})


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

    _DROP_REASONS = {"malformed": "malformed", "auth_rejected": "auth", "replays_rejected": "replay",
                     "misdirected": "misdirected", "implausible": "implausible"}

    def __init__(self, stats_fn: Callable[[], Mapping[str, Any]],
                 members_fn: Callable[[], Iterable[Any]] | None = None) -> None:
        self._stats_fn = stats_fn
        self._members_fn = members_fn

    def describe(self) -> list:
        # Called once at registration (auto_describe): must not call into the gossip node, which may not run yet.
        return []

    def collect(self):
        try:
            stats = dict(self._stats_fn())
        except Exception:  # noqa: BLE001 - a broken stats source must not fail /metrics as a whole
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
            except Exception:  # noqa: BLE001 - see above
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

    def _from_stats(self, stats: Mapping[str, Any]):
        num = lambda key: self._number(stats, key)  # noqa: E731
        for name, doc, keys in (("llmgw_gossip_messages", "Gossip datagrams", ("messages_in", "messages_out")),
                                ("llmgw_gossip_bytes", "Gossip bytes", ("bytes_in", "bytes_out"))):
            values = [num(k) for k in keys]
            if any(v is not None for v in values):
                family = CounterMetricFamily(name, f"{doc} received (in) and sent (out)", labels=["direction"])
                for direction, v in zip(("in", "out"), values):
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
            except Exception:  # noqa: BLE001 - see on_scrape
                log.warning("metrics refresher %r failed", refresh, exc_info=True)

    def watch_gossip(self, stats_fn: Callable[[], Mapping[str, Any]],
                     members_fn: Callable[[], Iterable[Any]] | None = None) -> GossipCollector:
        """Export gossip counters and members by state, read at scrape time (replaces an earlier binding)."""
        if self._gossip is not None:
            self.registry.unregister(self._gossip)
        self._gossip = GossipCollector(stats_fn, members_fn)
        self.registry.register(self._gossip)
        return self._gossip

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape body and its Content-Type, after running the :meth:`on_scrape` refreshers."""
        self.refresh()
        return render(self.registry, accept)


# --------------------------------------------------------------------------------------------------------------
# Gateway


class GatewayMetrics(_GossipBinding):
    """Every gateway metric, on ``self.registry`` (a new per-instance registry unless one is passed)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, gateway_id: str = "",
                 process_metrics: bool = True) -> None:
        self.registry = _new_registry(registry, process_metrics)
        r = self.registry
        _build_info(r, "gateway", gateway_id)
        self.requests = Counter("llmgw_gateway_requests", "Finished requests, by outcome (gRPC status name)",
                                ["outcome"], registry=r)
        self.ttft = Histogram("llmgw_gateway_ttft_seconds", "Time from request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("llmgw_gateway_inter_token_seconds", "Time between consecutive tokens",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("llmgw_gateway_tokens_streamed", "Tokens streamed to clients", registry=r)
        self.queue_depth = Gauge("llmgw_gateway_queue_depth", "Requests waiting in the admission queue",
                                 registry=r)
        self.queue_wait = Histogram("llmgw_gateway_queue_wait_seconds",
                                    "Time requests spent in the admission queue (admitted or not)",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("llmgw_gateway_inflight", "Streams this gateway has open to each replica",
                              ["replica"], registry=r)
        self.breaker_state = Gauge("llmgw_gateway_breaker_state",
                                   "Circuit breaker per replica: 0 closed, 1 half-open, 2 open", ["replica"],
                                   registry=r)
        self.failovers = Counter("llmgw_gateway_failovers", "Streams continued on another replica", registry=r)
        self.hedges = Counter("llmgw_gateway_hedges",
                              "Hedged attempts by result: won/lost the race, cancelled, denied by the budget",
                              ["result"], registry=r)
        # labels() costs ~4 us (lock, tuple, dict); these per-request paths use the children resolved up front.
        self._requests_by_outcome = _ChildCache(self.requests, _outcome, _COMMON_OUTCOMES)
        self._hedges_by_result = {result: self.hedges.labels(result) for result in HEDGE_RESULTS}
        self._inflight_by_replica: dict[str, Any] = {}

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

    def inflight_gauge(self, replica: str):
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
        """Drop a removed replica's series so the member table's GC is reflected in /metrics."""
        self._inflight_by_replica.pop(replica, None)
        for family in (self.inflight, self.breaker_state):
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


def aiohttp_handler(source):
    """An aiohttp request handler serving ``source``: ``app.router.add_get("/metrics", aiohttp_handler(m))``.

    ``source`` is a ``CollectorRegistry``, or a GatewayMetrics/ReplicaMetrics (then its refreshers run first)."""
    from aiohttp import web

    render_source = source.render if hasattr(source, "refresh") else (
        lambda accept: render(source, accept))

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = render_source(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    return metrics


class MetricsServer:
    """A stand-alone /metrics HTTP server on its own thread (prometheus-client's WSGI server)."""

    def __init__(self, server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return self._server.server_port

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
