"""Optional OpenTelemetry tracing of requests: off by default, and then free.

The request path holds one :class:`Tracing` (``tracing.get_tracing()`` at composition time) and calls it for every
request; what it gets back depends on whether tracing was switched on:

- off (the default): :data:`NOOP_TRACING` hands out the one :data:`NOOP_SPAN`, whose methods do nothing and return
  constants. No span object, context manager or dict is allocated per request or per token, and nothing is imported
  from ``opentelemetry`` (it need not even be installed).
- on (``--otel`` or ``LLMGW_OTEL=1``, then :func:`setup_tracing`; needs ``pip install 'llmgw[otel]'``): an SDK
  ``TracerProvider`` configured by the standard ``OTEL_*`` environment through the SDK's own handling
  (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` / ``_ARG``, ``OTEL_BSP_*``,
  ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` / ``_HEADERS`` / ``_TIMEOUT``, ``OTEL_PROPAGATORS``); spans go to the
  OTLP/HTTP exporter, or per ``OTEL_TRACES_EXPORTER`` to ``console`` or ``none``.

Shape of a request's trace (names and attributes are what tests and dashboards rely on)::

    llmgw.request   SERVER  parent = the caller's W3C traceparent, if any; llmgw.front, llmgw.request_id, ...
      llmgw.admit    INTERNAL  the wait in the admission queue (llmgw.outcome: admitted / refused / timeout)
      llmgw.route    INTERNAL  the routing decision (llmgw.replica)
      llmgw.attempt  CLIENT    one per replica attempt (llmgw.replica, llmgw.attempt, llmgw.hedge, llmgw.outcome);
                               its traceparent is what goes to the replica / upstream server
      events on llmgw.request: llmgw.failover (from, to, reason), llmgw.hedge (result)

Usage on the request path (explicit span passing: no contextvars lookups per token)::

    span = tracing.request("llmgw.request", front="http", carrier=request.headers, attributes={...})
    attempt = span.child("llmgw.attempt", {"llmgw.replica": rid}, kind="client")
    metadata = base_metadata + attempt.grpc_metadata()      # or attempt.inject(http_headers)
    ...
    attempt.end("ok"); span.end("ok")

While a request span is open in a task, log records carry ``trace_id`` / ``span_id`` (a context field of
llmgw.logs) and :func:`current_trace_id` returns it.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

__all__ = [
    "ADMIT_SPAN",
    "ATTEMPT_SPAN",
    "FAILOVER_EVENT",
    "HEDGE_EVENT",
    "NOOP_SPAN",
    "NOOP_TRACING",
    "OTEL_ENV",
    "REQUEST_SPAN",
    "ROUTE_SPAN",
    "OtelTracing",
    "Span",
    "Tracing",
    "TracingUnavailable",
    "current_trace_id",
    "get_tracing",
    "parse_traceparent",
    "setup_tracing",
    "shutdown_tracing",
    "tracing_enabled_by_env",
]

log = logging.getLogger("llmgw.tracing")

OTEL_ENV = "LLMGW_OTEL"  # "1"/"true"/"yes"/"on" switches tracing on, like the --otel flag
DEFAULT_SERVICE_NAME = "llmgw"
# The names of the module docstring, for the request path to use rather than spell.
REQUEST_SPAN = "llmgw.request"
ADMIT_SPAN = "llmgw.admit"
ROUTE_SPAN = "llmgw.route"
ATTEMPT_SPAN = "llmgw.attempt"
FAILOVER_EVENT = "llmgw.failover"
HEDGE_EVENT = "llmgw.hedge"
# The W3C trace-context keys a caller may send (gRPC metadata keys are lower-case; HTTP headers are not).
_PROPAGATION_KEYS = ("traceparent", "tracestate", "baggage")
_KINDS = ("internal", "server", "client")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


class TracingUnavailable(RuntimeError):
    """Tracing was asked for but the OpenTelemetry packages are not installed."""


def tracing_enabled_by_env(environ: Mapping[str, str] | None = None) -> bool:
    """``LLMGW_OTEL`` read as a boolean; anything but a clear yes/no is a ValueError naming the variable."""
    raw = (os.environ if environ is None else environ).get(OTEL_ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{OTEL_ENV}={raw!r}: use 1/true/on to trace requests or 0/false/off (the default)")


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """``(trace_id, parent_span_id, sampled)`` of a W3C ``traceparent`` (version 00), or None when it is not one:
    a malformed header is ignored (a new trace starts), never an error for the request."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    version, trace_id, span_id, flags = parts[0].lower(), parts[1].lower(), parts[2].lower(), parts[3].lower()
    try:
        int(version, 16), int(trace_id, 16), int(span_id, 16), int(flags, 16)
    except ValueError:
        return None
    if version == "ff" or (version == "00" and len(parts) != 4):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


# --------------------------------------------------------------------------------------------------------------
# The interface, and its free implementation


class Span:
    """A span of a request, or the no-op one. Methods never raise for the request path's inputs."""

    __slots__ = ()
    recording = False
    trace_id = ""  # 32 hex digits, or "" when not tracing
    span_id = ""  # 16 hex digits, or ""

    def child(self, name: str, attributes: Mapping[str, Any] | None = None, *, kind: str = "internal") -> Span:
        """A span under this one (route, admit, attempt: see the module docstring)."""
        return self

    def event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        """A point in time on this span (failover, hedge)."""

    def set(self, key: str, value: Any) -> None:
        """One attribute (str, bool, int, float); None is skipped."""

    def end(self, outcome: str | None = None, error: str | None = None) -> None:
        """Close the span. ``outcome`` becomes ``llmgw.outcome``; ``error`` (a message) marks the span failed."""

    def inject(self, carrier: MutableMapping[str, str]) -> None:
        """Add this span's ``traceparent`` (+ ``tracestate``) to outgoing HTTP headers."""

    def grpc_metadata(self) -> tuple[tuple[str, str], ...]:
        """This span's ``traceparent`` (+ ``tracestate``) as gRPC metadata pairs; ``()`` when not tracing."""
        return ()


NOOP_SPAN = Span()


class Tracing:
    """Hands out request spans; this base is the disabled one (:data:`NOOP_TRACING`)."""

    enabled = False

    def request(self, name: str = "llmgw.request", *, front: str = "", carrier: Any = None,
                attributes: Mapping[str, Any] | None = None) -> Span:
        """The span of one incoming request, child of the caller's ``traceparent`` found in ``carrier`` (HTTP
        headers, a mapping, or gRPC invocation metadata, a sequence of (key, value) pairs); a root span when
        there is none or it is malformed."""
        return NOOP_SPAN

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        return True

    def shutdown(self) -> None:
        """Flush and stop exporting (idempotent)."""


NOOP_TRACING = Tracing()

# The request span open in this task, for log lines (set by OtelTracing.request, reset by its end()).
_CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("llmgw_request_span", default=None)


def current_trace_id() -> str:
    """The trace id of the request span open in this task (32 hex digits), or "" (always "" when off)."""
    span = _CURRENT.get()
    return span.trace_id if span is not None and not span.ended else ""


def _log_fields() -> Mapping[str, Any] | None:
    span = _CURRENT.get()
    if span is None or span.ended:  # e.g. a span ended from another task than its own
        return None
    return {"trace_id": span.trace_id, "span_id": span.span_id}


# --------------------------------------------------------------------------------------------------------------
# OpenTelemetry


def _carrier_dict(carrier: Any) -> dict[str, str]:
    """The trace-context entries of HTTP headers (a mapping or multidict, keys in any case) or of gRPC metadata
    (a sequence of (key, value) pairs, or grpc.aio.Metadata), as a lower-case dict."""
    found: dict[str, str] = {}
    if carrier is None:
        return found
    items: Iterable[Any] = carrier.items() if hasattr(carrier, "items") else carrier
    for item in items:
        try:
            key, value = item
        except (TypeError, ValueError):
            continue
        if isinstance(key, str) and isinstance(value, str):
            key = key.lower()
            if key in _PROPAGATION_KEYS and key not in found:
                found[key] = value
    return found


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not attributes:
        return None
    return {k: (v if isinstance(v, (str, bool, int, float)) else str(v)) for k, v in attributes.items()
            if v is not None}


class _OtelSpan(Span):
    __slots__ = ("_otel", "_span", "_token", "ended", "span_id", "trace_id")
    recording = True

    def __init__(self, otel: OtelTracing, span: Any, token: contextvars.Token[Any] | None = None) -> None:
        self._otel = otel
        self._span = span
        self._token = token
        self.ended = False
        ctx = span.get_span_context()
        self.trace_id = format(ctx.trace_id, "032x")
        self.span_id = format(ctx.span_id, "016x")

    def child(self, name: str, attributes: Mapping[str, Any] | None = None, *, kind: str = "internal") -> Span:
        otel = self._otel
        span = otel.tracer.start_span(name, context=otel.set_span_in_context(self._span), kind=otel.kind(kind),
                                      attributes=_clean(attributes))
        return _OtelSpan(otel, span)

    def event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        self._span.add_event(name, _clean(attributes) or {})

    def set(self, key: str, value: Any) -> None:
        if value is not None:
            self._span.set_attribute(key, value if isinstance(value, (str, bool, int, float)) else str(value))

    def end(self, outcome: str | None = None, error: str | None = None) -> None:
        self.ended = True
        span = self._span
        if span.is_recording():
            if outcome is not None:
                span.set_attribute("llmgw.outcome", str(outcome))
            if error is not None:
                span.set_status(self._otel.error_status(error))
            span.end()
        token, self._token = self._token, None
        if token is not None:
            try:
                _CURRENT.reset(token)
            except ValueError:  # ended from another task/context than the one it started in: nothing to restore
                pass

    def inject(self, carrier: MutableMapping[str, str]) -> None:
        otel = self._otel
        otel.propagate.inject(carrier, context=otel.set_span_in_context(self._span))

    def grpc_metadata(self) -> tuple[tuple[str, str], ...]:
        headers: dict[str, str] = {}
        self.inject(headers)
        return tuple((key.lower(), value) for key, value in headers.items())


class OtelTracing(Tracing):
    """Request spans from an SDK TracerProvider of our own (not the process-global one, so that several can
    coexist in tests; the composition root may still install it globally for other instrumented libraries)."""

    enabled = True

    def __init__(self, provider: Any) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        from llmgw import __version__

        self.provider = provider
        self.tracer = provider.get_tracer("llmgw", str(__version__))
        self.propagate = propagate
        self.set_span_in_context = trace.set_span_in_context
        self._kinds = {"internal": SpanKind.INTERNAL, "server": SpanKind.SERVER, "client": SpanKind.CLIENT}
        self._status = (Status, StatusCode.ERROR)
        self._closed = False

    def kind(self, name: str) -> Any:
        try:
            return self._kinds[name]
        except KeyError:
            raise ValueError(f"unknown span kind {name!r}; use one of {', '.join(_KINDS)}") from None

    def error_status(self, message: str) -> Any:
        status, error = self._status
        return status(error, message)

    def request(self, name: str = "llmgw.request", *, front: str = "", carrier: Any = None,
                attributes: Mapping[str, Any] | None = None) -> Span:
        found = _carrier_dict(carrier)
        parent = self.propagate.extract(found) if found else None
        attrs = _clean(attributes) or {}
        if front:
            attrs["llmgw.front"] = front
        span = self.tracer.start_span(name, context=parent, kind=self._kinds["server"], attributes=attrs)
        result = _OtelSpan(self, span)
        result._token = _CURRENT.set(result)
        return result

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        return bool(self.provider.force_flush(int(timeout_s * 1000)))

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.provider.shutdown()


def _exporter_from_env() -> Any:
    """The span exporter ``OTEL_TRACES_EXPORTER`` names (default otlp = OTLP over HTTP/protobuf), or None."""
    choice = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if choice == "none":
        return None
    if choice == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if choice in ("otlp", "otlp_proto_http"):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise TracingUnavailable("the OTLP exporter is missing: pip install 'llmgw[otel]'") from exc
        # Endpoint, headers, timeout, compression and certificates all come from OTEL_EXPORTER_OTLP_*.
        return OTLPSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER={choice!r}: llmgw supports otlp, console or none")


_active: Tracing = NOOP_TRACING
_remove_log_fields: Callable[[], None] | None = None


def get_tracing() -> Tracing:
    """The process's tracing (NOOP_TRACING until :func:`setup_tracing` switched it on)."""
    return _active


def setup_tracing(enabled: bool | None = None, *, service_name: str = DEFAULT_SERVICE_NAME,
                  span_processor: Any = None) -> Tracing:
    """Switch tracing on (``enabled`` True, or None and ``LLMGW_OTEL`` says so) and return the process's Tracing;
    otherwise return NOOP_TRACING and import nothing. ``service_name`` is used unless ``OTEL_SERVICE_NAME`` (or
    ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``) names the service. ``span_processor`` replaces the
    exporter chosen by the environment (tests pass a SimpleSpanProcessor over an InMemorySpanExporter).
    Calling it again shuts the previous provider down first."""
    global _active, _remove_log_fields
    if enabled is None:
        enabled = tracing_enabled_by_env()
    shutdown_tracing()
    if not enabled:
        return _active
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable("tracing (--otel / LLMGW_OTEL) needs OpenTelemetry: pip install 'llmgw[otel]'"
                                 ) from exc
    attributes: dict[str, Any] = {}
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["service.name"] = service_name
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME; TracerProvider reads the sampler and
    # span limits from OTEL_TRACES_SAMPLER(_ARG) and OTEL_SPAN_*; BatchSpanProcessor reads OTEL_BSP_*.
    provider = TracerProvider(resource=Resource.create(attributes))
    if span_processor is None:
        exporter = _exporter_from_env()
        if exporter is not None:
            span_processor = BatchSpanProcessor(exporter)
    if span_processor is not None:
        provider.add_span_processor(span_processor)
    _active = OtelTracing(provider)
    from llmgw.logs import add_context_fields

    _remove_log_fields = add_context_fields(_log_fields)
    log.info("tracing on: service %s", attributes.get("service.name") or os.environ.get("OTEL_SERVICE_NAME"))
    return _active


def shutdown_tracing() -> None:
    """Flush and stop the active tracing (if any) and go back to NOOP_TRACING."""
    global _active, _remove_log_fields
    previous, _active = _active, NOOP_TRACING
    if _remove_log_fields is not None:
        _remove_log_fields()
        _remove_log_fields = None
    previous.shutdown()
