"""Health and load of one model server, asked the way each kind of server answers.

Health: the server's readiness endpoint where it has one (vLLM, SGLang, TGI: `/health`), otherwise `GET /v1/models`
(llama.cpp, Ollama, anything OpenAI-compatible) -- a 2xx within the timeout is a success, anything else a failure.
Load: the server's Prometheus metrics where it has them, read with prometheus_client's text parser:

- vLLM: running `vllm:num_requests_running`, waiting `vllm:num_requests_waiting`, KV cache usage (0..1)
  `vllm:kv_cache_usage_perc` (older versions: `vllm:gpu_cache_usage_perc`);
- SGLang (`--enable-metrics`): `sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:token_usage`;
- TGI: `tgi_batch_current_size`, `tgi_queue_size`, no KV usage.

Counts are summed over label sets (one per engine / data-parallel rank) per `model_name`, and over models for the
server's total; KV usage is the largest value (each rank has its own cache, and the fullest one is what stalls).
A load read that fails leaves the load unknown; it never counts against health.

`HealthTracker` is the rule that turns probe results into a state: a server is UNHEALTHY after `unhealthy_after`
consecutive failures and HEALTHY again after one success (a server that answers is worth trying at once; one
dropped probe is not worth evicting it for). Every call has a timeout (`ProbeSettings.timeout_s`, an absolute
bound on the whole call).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

from llmgw.upstream.backends import HealthState, ServerLoad
from llmgw.upstream.capabilities import BackendKind, capabilities_for
from llmgw.upstream.client import UpstreamClient, UpstreamTimeouts
from llmgw.upstream.errors import FailureKind, UpstreamError

log = logging.getLogger("llmgw.upstream.probe")

MODEL_LABEL = "model_name"  # the label vLLM and SGLang put on every per-model series


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    interval_s: float = 1.0  # between the starts of two probes
    timeout_s: float = 1.0  # the whole of one call (connect, answer and body)
    unhealthy_after: int = 2  # consecutive failures that make a server UNHEALTHY
    models_refresh_s: float = 30.0  # how often a server's learnt model list is read again
    models_retry_max_s: float = 5.0  # the longest wait between attempts to learn a server's models

    def __post_init__(self) -> None:
        for name in ("interval_s", "timeout_s", "models_refresh_s", "models_retry_max_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"ProbeSettings.{name} must be a number > 0, got {value!r}")
        if isinstance(self.unhealthy_after, bool) or not isinstance(self.unhealthy_after, int) \
                or self.unhealthy_after < 1:
            raise ValueError(f"ProbeSettings.unhealthy_after must be an integer >= 1, got {self.unhealthy_after!r}")

    @property
    def timeouts(self) -> UpstreamTimeouts:
        return UpstreamTimeouts(connect=self.timeout_s, first_byte=self.timeout_s, idle=self.timeout_s)


class HealthTracker:
    """Probe results in, a health state out (sans-IO: the caller probes)."""

    def __init__(self, unhealthy_after: int) -> None:
        if unhealthy_after < 1:
            raise ValueError(f"unhealthy_after must be >= 1, got {unhealthy_after!r}")
        self.unhealthy_after = unhealthy_after
        self.state = HealthState.UNKNOWN
        self.consecutive_failures = 0
        self.failures = 0  # since creation
        self.successes = 0
        self.last_error: str | None = None

    def success(self) -> HealthState:
        self.successes += 1
        self.consecutive_failures = 0
        self.last_error = None
        self.state = HealthState.HEALTHY
        return self.state

    def failure(self, detail: str) -> HealthState:
        self.failures += 1
        self.consecutive_failures += 1
        self.last_error = detail
        if self.consecutive_failures >= self.unhealthy_after:
            self.state = HealthState.UNHEALTHY
        return self.state


# --- load from Prometheus metrics ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoadMetricNames:
    running: tuple[str, ...]  # summed
    waiting: tuple[str, ...]  # summed
    kv_cache_usage: tuple[str, ...]  # the first name the server exports is used (newer name first)


LOAD_METRICS: dict[BackendKind, LoadMetricNames] = {
    BackendKind.VLLM: LoadMetricNames(("vllm:num_requests_running",), ("vllm:num_requests_waiting",),
                                      ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")),
    BackendKind.SGLANG: LoadMetricNames(("sglang:num_running_reqs",), ("sglang:num_queue_reqs",),
                                        ("sglang:token_usage",)),
    BackendKind.TGI: LoadMetricNames(("tgi_batch_current_size",), ("tgi_queue_size",), ()),
}


@dataclasses.dataclass(frozen=True)
class MetricsLoad:
    total: ServerLoad
    by_model: Mapping[str, ServerLoad]  # per `model_name` label; series without the label count in `total` only


class MetricsError(ValueError):
    """A metrics page that cannot be read as Prometheus text."""


def parse_load_metrics(text: str, kind: BackendKind) -> MetricsLoad | None:
    """The load a server's metrics page reports, or None when it reports neither running nor waiting requests
    (a kind without load metrics, or metrics turned off). Raises MetricsError for text that is not Prometheus
    exposition format."""
    names = LOAD_METRICS.get(kind)
    if names is None:
        return None
    wanted = {*names.running, *names.waiting, *names.kv_cache_usage}
    values: dict[str, list[tuple[str | None, float]]] = {name: [] for name in wanted}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted and math.isfinite(sample.value):
                    values[sample.name].append((sample.labels.get(MODEL_LABEL), sample.value))
    except (ValueError, TypeError, IndexError) as exc:
        raise MetricsError(f"not Prometheus text exposition format: {exc}") from None
    if not any(values[name] for name in (*names.running, *names.waiting)):
        return None
    kv_name = next((name for name in names.kv_cache_usage if values[name]), None)
    models = sorted({model for series in values.values() for model, _ in series if model is not None})

    def load_for(model: str | None) -> ServerLoad:
        def chosen(series_names: tuple[str, ...]) -> list[float]:
            return [value for name in series_names for label, value in values[name]
                    if model is None or label == model]
        usage = chosen((kv_name,)) if kv_name else []
        return ServerLoad(running=_count(sum(chosen(names.running))), waiting=_count(sum(chosen(names.waiting))),
                          kv_cache_usage=min(1.0, max(0.0, max(usage))) if usage else None)

    return MetricsLoad(total=load_for(None), by_model={model: load_for(model) for model in models})


def _count(value: float) -> int:
    return max(0, round(value))


# --- one server ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HealthResult:
    ok: bool
    detail: str  # why it failed, or what answered
    models: tuple[str, ...] | None = None  # when the health check was a /v1/models call that answered


class Prober:
    """Asks one server about its health, models and load; every call is bounded by `settings.timeout_s` and
    returns a result instead of raising for anything the server (or the network) does."""

    def __init__(self, client: UpstreamClient, base_url: str, kind: BackendKind, settings: ProbeSettings) -> None:
        self.client = client
        self.base_url = base_url
        self.kind = kind
        self.settings = settings
        capabilities = capabilities_for(kind)
        self.health_path = capabilities.health_path
        self.metrics_path = capabilities.metrics_path if kind in LOAD_METRICS else None

    async def health(self) -> HealthResult:
        if self.health_path is None:
            try:
                models = await self.models()
            except UpstreamError as exc:
                return HealthResult(False, str(exc))
            return HealthResult(True, "/v1/models answered", models)
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                status, body = await self.client.get(self.base_url, self.health_path,
                                                     timeouts=self.settings.timeouts)
        except UpstreamError as exc:
            return HealthResult(False, str(exc))
        except TimeoutError:
            return HealthResult(False, f"{self.health_path}: no answer within {self.settings.timeout_s}s")
        if 200 <= status < 300:
            return HealthResult(True, f"{self.health_path} answered {status}")
        excerpt = body[:200].decode("utf-8", errors="replace").strip()
        return HealthResult(False, f"{self.health_path} answered HTTP {status}" + (f": {excerpt}" if excerpt else ""))

    async def models(self) -> tuple[str, ...]:
        """The ids in the server's /v1/models, in its order. Raises UpstreamError."""
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                answer = await self.client.list_models(self.base_url, timeouts=self.settings.timeouts)
        except TimeoutError:
            raise UpstreamError(FailureKind.TIMEOUT_FIRST_BYTE,
                                f"{self.base_url}: /v1/models gave no answer within {self.settings.timeout_s}s")\
                from None
        names: list[str] = []
        for model in answer.data["data"]:  # list_models checked the shape
            if model["id"] not in names:
                names.append(model["id"])
        return tuple(names)

    async def load(self) -> MetricsLoad | None:
        """The server's load from its metrics page, or None where it has none or the read failed."""
        if self.metrics_path is None:
            return None
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                status, body = await self.client.get(self.base_url, self.metrics_path,
                                                     timeouts=self.settings.timeouts)
        except (UpstreamError, TimeoutError) as exc:
            log.debug("%s%s: %s", self.base_url, self.metrics_path, exc or "timed out")
            return None
        if status != 200:
            log.debug("%s%s answered HTTP %d", self.base_url, self.metrics_path, status)
            return None
        try:
            return parse_load_metrics(body.decode("utf-8", errors="replace"), self.kind)
        except MetricsError as exc:
            log.debug("%s%s: %s", self.base_url, self.metrics_path, exc)
            return None
