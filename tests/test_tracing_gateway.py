"""Tracing through a real gateway (gRPC and HTTP fronts, real replicas over gRPC), spans caught in memory.

Checks the shape llmgw.tracing documents -- llmgw.request (child of the caller's traceparent) with admit, route
and one attempt per replica try, failover as an event -- that the attempt's traceparent reaches the replica (in
GenerateRequest.traceparent on a session, and also as gRPC metadata on a Generate call), and that the request's
log line carries the trace id.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging

import aiohttp
import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from upstream_stack import UpstreamStack, start_mocks

from harness import free_tcp_port
from inprocess import FakeMember, FakeMembership, wait_for
from llmgw import client
from llmgw._proto import llmgateway_pb2 as pb
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc
from llmgw.gateway import GatewayConfig, app
from llmgw.logs import setup_logging
from llmgw.replica import Replica, ReplicaConfig
from llmgw.tracing import (
    ADMIT_SPAN,
    ATTEMPT_SPAN,
    FAILOVER_EVENT,
    REQUEST_SPAN,
    ROUTE_SPAN,
    parse_traceparent,
    setup_tracing,
    shutdown_tracing,
)
from llmgw.upstream.backends import Backend
from llmgw.upstream.capabilities import BackendKind

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


@pytest.fixture
def exporter():
    spans = InMemorySpanExporter()
    setup_tracing(True, span_processor=SimpleSpanProcessor(spans))
    try:
        yield spans
    finally:
        shutdown_tracing()


@pytest.fixture
def request_log_lines():
    """The JSON log lines the gateway writes at INFO (as `gateway --log-json --log-level info` would)."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = setup_logging("info", json=True, stream=stream)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


class Stack:
    """Real replicas whose received trace context is recorded, and a gateway built by the composition root."""

    def __init__(self) -> None:
        self.membership = FakeMembership()
        self.replicas: dict[str, Replica] = {}
        self.seen_traceparent: dict[str, list[str]] = {}  # GenerateRequest.traceparent, per replica
        self.seen_metadata: dict[str, list[str]] = {}  # traceparent gRPC metadata of Generate calls
        self.server = self.front = None

    async def add_replica(self, rid: str, *, sessions: bool = True, **kw) -> Replica:
        rep = Replica(ReplicaConfig(replica_id=rid, port=0, gossip_port=None, max_capacity=4, sessions=sessions,
                                    **kw))
        fields, metadata = self.seen_traceparent.setdefault(rid, []), self.seen_metadata.setdefault(rid, [])
        serve, generate = rep._serve, rep.Generate

        def recording_serve(request):  # every stream, whichever RPC carried it
            fields.append(request.traceparent)
            return serve(request)

        async def recording_generate(request, context):
            metadata.extend(v for k, v in context.invocation_metadata() if k == "traceparent")
            async for response in generate(request, context):
                yield response

        rep._serve, rep.Generate = recording_serve, recording_generate
        await rep.start()
        self.replicas[rid] = rep
        self.membership.set(FakeMember(rid, rep.grpc_address, max_capacity=4), "joined")
        return rep

    async def start(self, **config) -> None:
        self.server = app.build_server(GatewayConfig(port=0, gossip_port=None, **config),
                                       membership=self.membership)
        self.front = await app.start_gateway(self.server, app.HttpSettings(port=free_tcp_port()))

    async def close(self) -> None:
        if self.server is not None:
            await app.stop_gateway(self.server, self.front, grace_s=5.0)
        for rep in self.replicas.values():
            await rep.stop(0.1)


def run(scenario, timeout: float = 60.0) -> Stack:
    """Run `scenario(stack)`; returns the stack (closed), whose replicas' records stay readable."""
    async def main() -> Stack:
        stack = Stack()
        try:
            await asyncio.wait_for(scenario(stack), timeout)
        finally:
            await asyncio.wait_for(stack.close(), 20.0)
        return stack

    return asyncio.run(main())


def by_name(spans, name):
    return [s for s in spans if s.name == name]


def assert_child_of(span, parent) -> None:
    assert span.context.trace_id == parent.context.trace_id
    assert span.parent is not None and span.parent.span_id == parent.context.span_id


def assert_received_context_of(traceparent: str, attempt) -> None:
    """The replica got the attempt span's context: its trace, the attempt as the parent."""
    parsed = parse_traceparent(traceparent)
    assert parsed is not None, traceparent
    trace_id, parent_id, sampled = parsed
    assert trace_id == format(attempt.context.trace_id, "032x")
    assert parent_id == format(attempt.context.span_id, "016x")
    assert sampled


async def infer_grpc(address: str, prompt: str, max_tokens: int, request_id: str):
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_stream("/llmgateway.InferenceGateway/Infer",
                                    request_serializer=client.pb.InferRequest.SerializeToString,
                                    response_deserializer=client.pb.InferResponse.FromString)
        return [r async for r in call(client.pb.InferRequest(prompt=prompt, max_tokens=max_tokens,
                                                              request_id=request_id),
                                      metadata=(("traceparent", CALLER_TRACEPARENT),), timeout=20)]


def test_grpc_request_is_traced_from_the_callers_traceparent_to_the_replica(exporter, request_log_lines):
    async def scenario(s: Stack):
        rep = await s.add_replica("r1", token_delay_ms=1)
        await s.start()
        # The first request may go on a Generate call while the session opens; wait for the session so this
        # one shows the session carrying the context in GenerateRequest.traceparent.
        warm = await infer_grpc(s.server.grpc_address, "warm up", 2, "warm-1")
        assert warm[-1].is_final
        await wait_for(lambda: rep.sessions_open == 1, 10, "the gateway's session to r1")
        exporter.clear()
        s.seen_traceparent["r1"].clear()
        responses = await infer_grpc(s.server.grpc_address, "hello traced world", 5, "traced-1")
        assert len(responses) == 5 and responses[-1].is_final

    stack = run(scenario)
    spans = exporter.get_finished_spans()
    (request,) = by_name(spans, REQUEST_SPAN)
    # The caller's trace goes on: same trace id, the caller's span as parent, a SERVER span.
    assert format(request.context.trace_id, "032x") == CALLER_TRACE
    assert request.parent is not None and format(request.parent.span_id, "016x") == CALLER_SPAN
    assert request.kind is SpanKind.SERVER
    assert request.attributes["llmgw.front"] == "grpc"
    assert request.attributes["llmgw.request_id"] == "traced-1"
    assert request.attributes["llmgw.outcome"] == "ok"
    assert request.attributes["llmgw.tokens"] == 5
    (admit,), (route,), (attempt,) = (by_name(spans, n) for n in (ADMIT_SPAN, ROUTE_SPAN, ATTEMPT_SPAN))
    for child in (admit, route, attempt):
        assert_child_of(child, request)
    assert admit.attributes["llmgw.outcome"] == "admitted"
    assert route.attributes["llmgw.replica"] == "r1"
    assert attempt.kind is SpanKind.CLIENT
    assert attempt.attributes["llmgw.replica"] == "r1" and attempt.attributes["llmgw.outcome"] == "ok"
    assert attempt.attributes["llmgw.attempt"] == 1 and attempt.attributes["llmgw.hedge"] is False
    # On the session, the trace context travels in the request itself.
    (received,) = stack.seen_traceparent["r1"]
    assert_received_context_of(received, attempt)
    # The request's one log line carries its trace id.
    lines = [line for line in request_log_lines() if line["logger"] == "llmgw.gateway.requests"
             and line.get("msg") == "request" and line.get("id") == "traced-1"]
    assert len(lines) == 1
    assert lines[0]["trace_id"] == CALLER_TRACE
    assert lines[0]["span_id"] == format(request.context.span_id, "016x")
    # So does the replica's line for the stream: the trace goes on into the replica's log, under the attempt.
    (replica_line,) = [line for line in request_log_lines()
                       if line["logger"] == "llmgw.replica" and line.get("id") == "traced-1"]
    assert replica_line["msg"] == "request" and replica_line["outcome"] == "ok" and replica_line["tokens"] == 5
    assert replica_line["trace_id"] == CALLER_TRACE
    assert replica_line["parent_span_id"] == format(attempt.context.span_id, "016x")


def test_http_request_traceparent_goes_to_the_replica_as_grpc_metadata_on_a_generate_call(exporter):
    async def scenario(s: Stack):
        await s.add_replica("r1", token_delay_ms=1, sessions=False)  # Generate calls only
        await s.start()
        async with aiohttp.ClientSession(base_url=s.front.url, timeout=aiohttp.ClientTimeout(total=20)) as http:
            body = {"model": "v1", "prompt": "hello over http", "max_tokens": 4, "stream": True}
            async with http.post("/v1/completions", json=body, headers={"traceparent": CALLER_TRACEPARENT}) as resp:
                assert resp.status == 200
                text = await resp.text()
        assert text.rstrip().endswith("data: [DONE]")

    stack = run(scenario)
    spans = exporter.get_finished_spans()
    (request,) = by_name(spans, REQUEST_SPAN)
    assert format(request.context.trace_id, "032x") == CALLER_TRACE
    assert request.attributes["llmgw.front"] == "http"
    assert request.attributes["llmgw.model"] == "v1"
    (attempt,) = by_name(spans, ATTEMPT_SPAN)
    assert_child_of(attempt, request)
    (metadata,) = stack.seen_metadata["r1"]
    assert_received_context_of(metadata, attempt)
    (field,) = stack.seen_traceparent["r1"]
    assert field == metadata


def test_failover_is_an_event_and_each_replica_try_its_own_attempt_span(exporter):
    async def scenario(s: Stack):
        broken = await s.add_replica("r1", token_delay_ms=1, sessions=False)
        await s.add_replica("r2", token_delay_ms=1, sessions=False)
        broken.faults.stall_after = 2  # alive but silent after two tokens: the inter-token limit fails it over
        await s.start(inter_token_timeout_s=0.3, breaker_enabled=False)
        # r2 is held back until the request's stream started on r1, so that it starts there and fails over.
        hold_back = {"r2"}
        gateway = s.server.gateway
        gateway.exclusion_sources.append(lambda: hold_back)

        async def release_when_started() -> None:
            await wait_for(lambda: len(s.seen_traceparent["r1"]) == 1, 10, "the stream on r1")
            hold_back.clear()

        release = asyncio.get_running_loop().create_task(release_when_started())
        responses = await infer_grpc(s.server.grpc_address, "fail over please", 6, "fo-1")
        await release
        assert [r.index for r in responses] == list(range(6)) and responses[-1].is_final
        assert [r.replica_id for r in responses] == ["r1", "r1", "r2", "r2", "r2", "r2"]

    stack = run(scenario)
    spans = exporter.get_finished_spans()
    (request,) = by_name(spans, REQUEST_SPAN)
    (failover,) = [e for e in request.events if e.name == FAILOVER_EVENT]
    assert failover.attributes["llmgw.tokens_sent"] == 2
    assert "stall" in failover.attributes["llmgw.reason"]
    attempts = sorted(by_name(spans, ATTEMPT_SPAN), key=lambda a: a.attributes["llmgw.attempt"])
    for attempt in attempts:
        assert_child_of(attempt, request)
    assert [a.attributes["llmgw.replica"] for a in attempts] == ["r1", "r2"]
    assert [a.attributes["llmgw.outcome"] for a in attempts] == ["stall", "ok"]
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert attempts[1].attributes["llmgw.resume_from"] == 2
    # Each try carried its own attempt's context to its replica.
    (to_r1,), (to_r2,) = stack.seen_metadata["r1"], stack.seen_metadata["r2"]
    assert_received_context_of(to_r1, attempts[0])
    assert_received_context_of(to_r2, attempts[1])
    assert request.attributes["llmgw.outcome"] == "ok"
    assert request.attributes["llmgw.replicas"] == "r1,r2"


# ---- OpenAI-compatible model servers behind the HTTP transport ----------------------------------------------


def run_upstreams(scenario, mocks: int = 1, timeout: float = 60.0, **mock_options):
    """Run `scenario(gateway, servers)` with a gateway (tests/upstream_stack.py) in front of recording mock
    servers; returns the servers (stopped), whose recorded requests stay readable."""
    async def main():
        servers = await start_mocks(mocks, **mock_options)
        gateway = UpstreamStack([Backend(m.base_url, kind=BackendKind.VLLM) for m in servers])
        try:
            await gateway.start()
            await asyncio.wait_for(scenario(gateway, servers), timeout)
        finally:
            await gateway.close()
            for server in servers:
                await server.stop()
        return servers

    return asyncio.run(main())


def received_traceparent(server) -> list[str]:
    """The traceparent header of each generation request the mock server received (None when absent)."""
    return [{k.lower(): v for k, v in seen.headers.items()}.get("traceparent")
            for seen in server.generation_requests()]


@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "whole"])
def test_model_server_request_carries_the_attempt_spans_traceparent(exporter, streamed):
    async def scenario(gw, servers):
        body = {"model": "mock-model", "prompt": "hello upstream", "max_tokens": 4, "stream": streamed}
        status, _, raw = await gw.post("/v1/completions", body, headers={"traceparent": CALLER_TRACEPARENT})
        assert status == 200, raw
        assert (b"data: [DONE]" in raw) is streamed

    (server,) = run_upstreams(scenario)
    spans = exporter.get_finished_spans()
    (request,) = by_name(spans, REQUEST_SPAN)
    assert format(request.context.trace_id, "032x") == CALLER_TRACE  # the caller's trace goes on
    assert request.parent is not None and format(request.parent.span_id, "016x") == CALLER_SPAN
    assert request.attributes["llmgw.front"] == "http" and request.attributes["llmgw.outcome"] == "ok"
    (attempt,) = by_name(spans, ATTEMPT_SPAN)
    assert_child_of(attempt, request)
    assert attempt.attributes["llmgw.replica"] == Backend(server.base_url).id
    assert attempt.attributes["llmgw.outcome"] == "ok"  # ended when the answer did, though the front stops there
    (sent,) = received_traceparent(server)
    assert sent is not None and sent != CALLER_TRACEPARENT  # the gateway's attempt, not the caller's span
    assert_received_context_of(sent, attempt)


def test_each_hedge_leg_sends_its_own_attempts_traceparent_to_its_model_server(exporter):
    async def scenario(gw, servers):
        body = {"model": "mock-model", "prompt": "race me", "max_tokens": 3, "stream": True}
        headers = {"traceparent": CALLER_TRACEPARENT, "X-LLMGW-Hedge": "1"}  # hedge at once: both legs open
        status, _, raw = await gw.post("/v1/completions", body, headers=headers)
        assert status == 200 and raw.rstrip().endswith(b"data: [DONE]"), raw

    # Both servers hold the first token long enough for both legs' requests to arrive.
    servers = run_upstreams(scenario, mocks=2, first_token_delay=0.3)
    spans = exporter.get_finished_spans()
    (request,) = by_name(spans, REQUEST_SPAN)
    attempts = {a.attributes["llmgw.replica"]: a for a in by_name(spans, ATTEMPT_SPAN)}
    assert sorted(a.attributes["llmgw.hedge"] for a in attempts.values()) == [False, True]
    winner, loser = sorted(attempts.values(), key=lambda a: a.attributes["llmgw.outcome"] != "ok")
    assert winner.attributes["llmgw.outcome"] == "ok"
    # The loser was stopped while still waiting for its first token, or had it a moment too late.
    assert loser.attributes["llmgw.outcome"] in ("cancelled", "hedge_lost")
    for server in servers:
        attempt = attempts[Backend(server.base_url).id]
        assert_child_of(attempt, request)
        (sent,) = received_traceparent(server)
        assert_received_context_of(sent, attempt)


# ---- the replica's own log line ---------------------------------------------------------------------------


def test_replica_logs_the_trace_id_from_the_field_or_from_grpc_metadata(request_log_lines):
    """Without a gateway: whoever calls Generate, the replica's line names the trace of the traceparent it got --
    in GenerateRequest.traceparent, or as gRPC metadata only -- and a malformed or missing one names none."""
    other_trace, other_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"

    async def generate(address: str, request_id: str, *, field: str = "", metadata=()) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.LLMReplicaStub(channel).Generate(
                pb.GenerateRequest(request_id=request_id, prompt="p", max_tokens=2, traceparent=field),
                metadata=metadata, timeout=10)
            responses = [r async for r in call]
        assert responses[-1].is_final

    async def scenario(s: Stack):
        rep = await s.add_replica("r1", token_delay_ms=1, sessions=False)
        address = rep.grpc_address
        await generate(address, "by-field", field=CALLER_TRACEPARENT)
        await generate(address, "by-metadata", metadata=(("traceparent", f"00-{other_trace}-{other_span}-01"),))
        # The field wins over metadata when both came (the gateway sends the same value in both).
        await generate(address, "both", field=CALLER_TRACEPARENT,
                       metadata=(("traceparent", f"00-{other_trace}-{other_span}-01"),))
        await generate(address, "malformed", field="00-not-a-trace-01")
        await generate(address, "untraced")

    run(scenario)
    lines = {line["id"]: line for line in request_log_lines()
             if line["logger"] == "llmgw.replica" and line["msg"] == "request"}
    assert set(lines) == {"by-field", "by-metadata", "both", "malformed", "untraced"}
    assert (lines["by-field"]["trace_id"], lines["by-field"]["parent_span_id"]) == (CALLER_TRACE, CALLER_SPAN)
    assert (lines["by-metadata"]["trace_id"], lines["by-metadata"]["parent_span_id"]) == (other_trace, other_span)
    assert lines["both"]["trace_id"] == CALLER_TRACE
    for untraced in ("malformed", "untraced"):
        assert "trace_id" not in lines[untraced] and "parent_span_id" not in lines[untraced]
    for line in lines.values():
        assert line["replica"] == "r1" and line["outcome"] == "ok" and line["tokens"] == 2
