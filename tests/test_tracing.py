"""llmgw.tracing: no-op when off (nothing imported), OTel spans, traceparent in and out, trace id in log lines."""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import logging
import subprocess
import sys
import threading
from typing import ClassVar

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llmgw import tracing
from llmgw.logs import request_log, setup_logging
from llmgw.tracing import NOOP_SPAN, NOOP_TRACING, parse_traceparent, setup_tracing, shutdown_tracing

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


@pytest.fixture(autouse=True)
def _tracing_off_after(monkeypatch):
    for name in ("LLMGW_OTEL", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER",
                 "OTEL_TRACES_SAMPLER_ARG", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_PROPAGATORS"):
        monkeypatch.delenv(name, raising=False)
    yield
    shutdown_tracing()
    assert tracing.get_tracing() is NOOP_TRACING


@pytest.fixture
def exporter():
    memory = InMemorySpanExporter()
    setup_tracing(True, service_name="llmgw-test", span_processor=SimpleSpanProcessor(memory))
    return memory


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def hex_trace(span: ReadableSpan) -> str:
    return format(span.context.trace_id, "032x")


def test_off_by_default_everything_is_the_shared_noop():
    t = setup_tracing()  # LLMGW_OTEL unset
    assert t is NOOP_TRACING and tracing.get_tracing() is NOOP_TRACING and not t.enabled
    span = t.request(front="http", carrier={"traceparent": CALLER_TRACEPARENT}, attributes={"llmgw.model": "m"})
    assert span is NOOP_SPAN
    assert span.child("llmgw.attempt", {"llmgw.replica": "r1"}, kind="client") is NOOP_SPAN
    headers = {"content-type": "application/json"}
    span.inject(headers)
    assert headers == {"content-type": "application/json"}
    assert span.grpc_metadata() == ()
    assert span.trace_id == "" and tracing.current_trace_id() == ""
    span.event("llmgw.failover", {"from": "r1"})
    span.set("llmgw.replica", "r1")
    span.end("ok")


def test_off_imports_nothing_from_opentelemetry():
    # A fresh interpreter: the request path's modules and a full no-op request must not load any opentelemetry
    # module (the extra need not even be installed).
    code = """
import sys
from llmgw import logs, metrics, tracing
t = tracing.setup_tracing()
for _ in range(3):
    span = t.request(front="grpc", carrier=(("traceparent", "00-%s-%s-01"),))
    span.child("llmgw.admit").end("admitted")
    attempt = span.child("llmgw.attempt", {"llmgw.replica": "r1"}, kind="client")
    metadata = (("x", "y"),) + attempt.grpc_metadata()
    attempt.end("ok")
    span.end("ok")
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
print(len(loaded), loaded[:5])
""".replace("%s-%s", f"{CALLER_TRACE}-{CALLER_SPAN}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0 []"


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("true", True), ("ON", True), (" yes ", True),
                                               ("", False), ("0", False), ("off", False), ("False", False)])
def test_enable_switch_from_the_environment(raw, expected):
    assert tracing.tracing_enabled_by_env({"LLMGW_OTEL": raw}) is expected


def test_a_garbled_switch_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="LLMGW_OTEL='maybe'"):
        tracing.tracing_enabled_by_env({"LLMGW_OTEL": "maybe"})
    monkeypatch.setenv("LLMGW_OTEL", "maybe")
    with pytest.raises(ValueError, match="LLMGW_OTEL"):
        setup_tracing()


def test_env_switch_turns_tracing_on(monkeypatch):
    monkeypatch.setenv("LLMGW_OTEL", "1")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    t = setup_tracing()
    assert t.enabled and tracing.get_tracing() is t
    span = t.request()
    assert len(span.trace_id) == 32
    span.end()


def test_parse_traceparent():
    assert parse_traceparent(CALLER_TRACEPARENT) == (CALLER_TRACE, CALLER_SPAN, True)
    assert parse_traceparent(f"00-{CALLER_TRACE.upper()}-{CALLER_SPAN}-00") == (CALLER_TRACE, CALLER_SPAN, False)
    for bad in ("", "garbage", f"00-{CALLER_TRACE}-{CALLER_SPAN}", f"00-{'0' * 32}-{CALLER_SPAN}-01",
                f"00-{CALLER_TRACE}-{'0' * 16}-01", f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01",
                f"00-{CALLER_TRACE}-{CALLER_SPAN}-01-extra", f"00-{'x' * 32}-{CALLER_SPAN}-01"):
        assert parse_traceparent(bad) is None, bad
    # A later version may append fields; its first four still read.
    assert parse_traceparent(f"01-{CALLER_TRACE}-{CALLER_SPAN}-01-what") == (CALLER_TRACE, CALLER_SPAN, True)


def test_request_spans_follow_the_caller_and_propagate_to_the_replica(exporter):
    t = tracing.get_tracing()
    # HTTP headers arrive in any case: "Traceparent" is the same header.
    request = t.request(front="http", carrier={"Traceparent": CALLER_TRACEPARENT, "Content-Type": "x"},
                        attributes={"llmgw.request_id": "req-1", "llmgw.model": "m1", "ignored": None})
    assert request.trace_id == CALLER_TRACE
    request.child("llmgw.admit").end("admitted")
    route = request.child("llmgw.route")
    route.set("llmgw.replica", "r1")
    route.end()
    first = request.child("llmgw.attempt", {"llmgw.replica": "r1", "llmgw.attempt": 0}, kind="client")
    metadata = first.grpc_metadata()
    first.end("error", error="replica r1 went away")
    request.event("llmgw.failover", {"from": "r1", "to": "r2", "reason": "error"})
    second = request.child("llmgw.attempt", {"llmgw.replica": "r2", "llmgw.attempt": 1}, kind="client")
    headers: dict[str, str] = {}
    second.inject(headers)
    request.event("llmgw.hedge", {"result": "denied"})
    second.end("ok")
    request.end("ok")

    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == ["llmgw.admit", "llmgw.attempt", "llmgw.attempt", "llmgw.request",
                                             "llmgw.route"]
    (root,) = by_name(spans, "llmgw.request")
    assert root.kind is SpanKind.SERVER
    assert root.parent is not None and format(root.parent.span_id, "016x") == CALLER_SPAN and root.parent.is_remote
    assert {hex_trace(s) for s in spans} == {CALLER_TRACE}
    for s in spans:
        if s is not root:
            assert s.parent is not None and s.parent.span_id == root.context.span_id, s.name
    assert root.attributes["llmgw.front"] == "http"
    assert root.attributes["llmgw.request_id"] == "req-1" and root.attributes["llmgw.model"] == "m1"
    assert "ignored" not in root.attributes and root.attributes["llmgw.outcome"] == "ok"
    assert [(e.name, dict(e.attributes)) for e in root.events] == [
        ("llmgw.failover", {"from": "r1", "to": "r2", "reason": "error"}), ("llmgw.hedge", {"result": "denied"})]
    assert by_name(spans, "llmgw.route")[0].attributes["llmgw.replica"] == "r1"
    assert by_name(spans, "llmgw.admit")[0].attributes["llmgw.outcome"] == "admitted"
    failed, ok = sorted(by_name(spans, "llmgw.attempt"), key=lambda s: s.attributes["llmgw.attempt"])
    assert failed.kind is SpanKind.CLIENT and failed.attributes["llmgw.replica"] == "r1"
    assert failed.status.status_code is StatusCode.ERROR and failed.status.description == "replica r1 went away"
    assert ok.status.status_code is StatusCode.UNSET and ok.attributes["llmgw.outcome"] == "ok"
    # What goes to each replica names that attempt's span as the parent, in the caller's trace.
    assert metadata == (("traceparent", f"00-{CALLER_TRACE}-{format(failed.context.span_id, '016x')}-01"),)
    assert headers == {"traceparent": f"00-{CALLER_TRACE}-{format(ok.context.span_id, '016x')}-01"}


def test_grpc_metadata_carries_the_callers_trace(exporter):
    t = tracing.get_tracing()
    metadata = (("user-agent", "grpc-python"), ("traceparent", CALLER_TRACEPARENT), ("tracestate", "vendor=1"))
    span = t.request(front="grpc", carrier=metadata)
    attempt = span.child("llmgw.attempt", kind="client")
    out = dict(attempt.grpc_metadata())
    assert out["traceparent"].startswith(f"00-{CALLER_TRACE}-") and out["tracestate"] == "vendor=1"
    attempt.end("ok")
    span.end("ok")
    root = by_name(exporter.get_finished_spans(), "llmgw.request")[0]
    assert hex_trace(root) == CALLER_TRACE and root.attributes["llmgw.front"] == "grpc"


@pytest.mark.parametrize("carrier", [None, {}, {"traceparent": "not-a-traceparent"}, [("traceparent", 7)],
                                     [("broken",)], "junk"])
def test_no_or_malformed_traceparent_starts_a_new_trace(exporter, carrier):
    span = tracing.get_tracing().request(front="http", carrier=carrier)
    span.end("ok")
    (root,) = exporter.get_finished_spans()
    assert root.parent is None and hex_trace(root) == span.trace_id != CALLER_TRACE


def test_unknown_span_kind_is_a_clear_error(exporter):
    span = tracing.get_tracing().request()
    with pytest.raises(ValueError, match="unknown span kind 'consumer'"):
        span.child("x", kind="consumer")
    span.end()


def test_log_lines_carry_the_trace_id_while_the_request_span_is_open(exporter):
    stream = io.StringIO()
    handler = setup_logging("info", stream=stream)
    try:
        log = logging.getLogger("llmgw.gateway.requests")
        span = tracing.get_tracing().request(front="http", carrier={"traceparent": CALLER_TRACEPARENT})
        assert tracing.current_trace_id() == CALLER_TRACE
        request_log(log, id="req-1", outcome="ok")
        span.end("ok")
        request_log(log, id="req-2", outcome="ok")
        first, second = stream.getvalue().splitlines()
        assert f"trace_id={CALLER_TRACE}" in first and f"span_id={span.span_id}" in first and "id=req-1" in first
        assert "trace_id" not in second and tracing.current_trace_id() == ""
        setup_logging("info", json=True, stream=stream)
        span = tracing.get_tracing().request()
        log.warning("slow replica")
        span.end()
        assert json.loads(stream.getvalue().splitlines()[-1])["trace_id"] == span.trace_id
    finally:
        logging.getLogger().removeHandler(handler)
        for h in list(logging.getLogger().handlers):
            if getattr(h, "_llmgw_handler", False):
                logging.getLogger().removeHandler(h)


def test_concurrent_requests_each_log_their_own_trace(exporter):
    seen: dict[str, str] = {}

    async def handle(name: str) -> str:
        span = tracing.get_tracing().request()
        await asyncio.sleep(0.01)  # interleave with the other request
        seen[name] = tracing.current_trace_id()
        span.end("ok")
        return span.trace_id

    async def main() -> list[str]:
        return await asyncio.wait_for(asyncio.gather(handle("a"), handle("b")), 10)

    a, b = asyncio.run(main())
    assert a != b and seen == {"a": a, "b": b}


def test_sampler_from_the_standard_environment(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    memory = InMemorySpanExporter()
    t = setup_tracing(True, span_processor=SimpleSpanProcessor(memory))
    span = t.request(carrier={"traceparent": CALLER_TRACEPARENT.replace("-01", "-00")})
    attempt = span.child("llmgw.attempt", kind="client")
    # Not sampled: nothing is exported, but the trace still flows on to the replica (flag 00).
    assert dict(attempt.grpc_metadata())["traceparent"].startswith(f"00-{CALLER_TRACE}-")
    assert dict(attempt.grpc_metadata())["traceparent"].endswith("-00")
    attempt.end("ok")
    span.end("ok")
    assert memory.get_finished_spans() == ()


def test_missing_opentelemetry_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # import fails as if not installed
    with pytest.raises(tracing.TracingUnavailable, match=r"pip install 'llmgw\[otel\]'"):
        setup_tracing(True)
    assert tracing.get_tracing() is NOOP_TRACING


def test_unknown_exporter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER='zipkin'"):
        setup_tracing(True)


class _Collector(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args) -> None:  # quiet
        pass


def test_otlp_exporter_is_configured_by_the_standard_environment(monkeypatch):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    _Collector.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-east")
        t = setup_tracing(True, service_name="ignored-when-env-names-it")
        span = t.request(front="grpc", carrier={"traceparent": CALLER_TRACEPARENT})
        span.child("llmgw.route").end()
        span.end("ok")
        assert t.force_flush(10)
    finally:
        shutdown_tracing()
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert _Collector.received, "no OTLP export reached the collector"
    path, content_type, body = _Collector.received[0]
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    export = ExportTraceServiceRequest.FromString(body)
    (resource_spans,) = export.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
    assert service == "gateway-east"
    names = sorted(s.name for scope in resource_spans.scope_spans for s in scope.spans)
    assert names == ["llmgw.request", "llmgw.route"]
    assert {s.trace_id.hex() for scope in resource_spans.scope_spans for s in scope.spans} == {CALLER_TRACE}
