"""Ops wired into the real servers: one gateway process serving gRPC + HTTP with shared metrics and one log line
per request, the replica's /metrics and health while draining, and the metrics listener on its own."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.request

import grpc
import pytest
from replica_fakes import answer, chunk, fake_gateway, healthy

from harness import Cluster, free_tcp_port
from llmgw.gateway.api import GatewayError, InferenceRequest
from llmgw.gateway.events import AttemptOutcome, RequestListener, RequestOutcome
from llmgw.gateway.observability import MetricsListener
from llmgw.gateway.replica_stream import AttemptError, AttemptErrorKind
from llmgw.metrics import GatewayMetrics


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} for the samples (comments dropped)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def http_json(url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def request_lines(log_text: str, logger: str) -> list[dict]:
    out = []
    for line in log_text.splitlines():
        if line.startswith("{"):
            obj = json.loads(line)
            if obj.get("logger") == logger and obj.get("msg") == "request":
                out.append(obj)
    return out


def test_gateway_process_counts_and_logs_each_request_once_across_grpc_and_http(tmp_path):
    http_port, metrics_port = free_tcp_port(), free_tcp_port()
    with Cluster(tmp_path) as c:
        rep = c.start_replica("replica-1", token_delay_ms=2, extra=["--metrics-port", str(metrics_port)])
        gw = c.start_gateway("gateway-1", extra=["--http-port", str(http_port), "--log-json",
                                                 "--http-body-timeout-s", "1"])
        c.wait_converged([gw], {"gateway-1": "alive", "replica-1": "alive"})
        base = f"http://127.0.0.1:{http_port}"
        assert http_json(base + "/readyz")[0] == 200 and http_json(base + "/healthz")[0] == 200

        grpc_result = c.infer(gw, "hello over grpc", 5)
        assert grpc_result.ok and grpc_result.texts == [f"token_{i}" for i in range(5)]
        status, body = http_json(base + "/v1/completions", {"model": "m", "prompt": "hello over http",
                                                              "max_tokens": 4})
        assert status == 200, body
        assert json.loads(body)["choices"][0]["text"] == "token_0token_1token_2token_3"
        status, _ = http_json(base + "/v1/completions", {"model": "m", "prompt": 42})
        assert status == 400

        m = scrape(base + "/metrics")
        assert m['llmgw_gateway_requests_total{outcome="ok"}'] == 2  # once each, not once per front
        assert m['llmgw_gateway_requests_total{outcome="invalid_argument"}'] == 1  # refused by the HTTP front
        assert m["llmgw_gateway_tokens_streamed_total"] == 9
        assert m["llmgw_gateway_ttft_seconds_count"] == 2
        assert m["llmgw_gateway_inter_token_seconds_count"] == 7
        assert m["llmgw_gateway_queue_wait_seconds_count"] == 2
        assert m['llmgw_gateway_inflight{replica="replica-1"}'] == 0
        assert m["llmgw_gateway_queue_depth"] == 0
        assert m['llmgw_gossip_members{state="alive"}'] == 2
        assert m['llmgw_gossip_messages_total{direction="in"}'] > 0

        rm = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert rm['llmgw_replica_requests_total{outcome="ok"}'] == 2
        assert rm["llmgw_replica_tokens_generated_total"] == 9
        assert rm["llmgw_replica_capacity"] == 32 and rm["llmgw_replica_active_requests"] == 0

        log_text = gw.log_path.read_text()
        lines = request_lines(log_text, "llmgw.gateway.requests")
        assert len(lines) == 2, log_text[-3000:]
        assert {tuple(line["replicas"]) for line in lines} == {("replica-1",)}
        assert sorted(line["tokens"] for line in lines) == [4, 5]
        assert all(line["outcome"] == "ok" and line["level"] == "info" and line["ttft_ms"] > 0
                   and re.fullmatch(r"[0-9a-f]{32}", line["id"]) for line in lines)
        refused = request_lines(log_text, "llmgw.http.openai")
        assert [(line["outcome"], line["status"]) for line in refused] == [("invalid_argument", 400)]
        assert rep.alive()

        # --http-body-timeout-s reaches the front: a body that never finishes gets 408 after ~1 s.
        with socket.create_connection(("127.0.0.1", http_port), timeout=10) as slow:
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")
            started = time.monotonic()
            answer = slow.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
            assert time.monotonic() - started < 5.0


def test_replica_reports_not_serving_on_grpc_health_while_draining():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from llmgw._proto import llmgateway_pb2 as pb
    from llmgw._proto import llmgateway_pb2_grpc as pb_grpc
    from llmgw.replica import Replica, ReplicaConfig

    async def scenario():
        replica = Replica(ReplicaConfig(replica_id="r1", port=0, gossip_port=None, token_delay_ms=1))
        await replica.start()
        try:
            async with grpc.aio.insecure_channel(replica.grpc_address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                serving = health_pb2.HealthCheckResponse.SERVING
                assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == serving
                drained = await pb_grpc.LLMReplicaStub(channel).Drain(pb.DrainRequest(), timeout=5)
                assert drained.success
                for service in ("", "llmgateway.LLMReplica"):
                    answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                    assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING, service
        finally:
            await replica.stop(0.1)

    asyncio.run(asyncio.wait_for(scenario(), 20))


# ---- the metrics listener, in process -------------------------------------------------------------------------
def _value(metrics, name, labels=None):
    return metrics.registry.get_sample_value(name, labels or {})


def _observed(scripts, **config):
    """A started Gateway over scripted replicas with a MetricsListener registered, as the composition root does."""

    async def build():
        gateway, transport = await fake_gateway(scripts, **config)
        metrics = GatewayMetrics(process_metrics=False)
        listener = MetricsListener(gateway, metrics)
        gateway.add_listener(listener)
        return gateway, transport, metrics, listener

    return build()


async def _collect(gateway, request, stop_after=None):
    got = []
    stream = gateway.infer(request)
    try:
        async for event in stream:
            got.append(event)
            if stop_after is not None and len(got) >= stop_after:
                break
    except GatewayError:
        pass
    finally:
        await stream.aclose()
    return got


def _fails_first_time_at(index):
    """A script whose first stream breaks after token index-1; later streams answer in full."""
    opened = []

    def script(resume, max_tokens):
        opened.append(resume)
        if len(opened) == 1:
            return [*(chunk(i) for i in range(resume, index)),
                    AttemptError(AttemptErrorKind.UNAVAILABLE, "UNAVAILABLE: gone")]
        return answer(resume, max_tokens, per_chunk=2)

    return script


def test_metrics_listener_counts_outcomes_tokens_queue_waits_and_failover_replicas(caplog):
    async def scenario():
        breaking = _fails_first_time_at(2)
        gateway, transport, metrics, _ = await _observed({"r1": breaking, "r2": breaking}, max_attempts=3)
        with caplog.at_level("INFO", logger="llmgw.gateway.requests"):
            got = await _collect(gateway, InferenceRequest(prompt="p", max_tokens=4, client_id="c1"))
        assert [e.index for e in got] == [0, 1, 2, 3] and [e.token for e in got] == [f"token_{i}" for i in range(4)]
        first, second = transport.opened[0][0], transport.opened[1][0]
        assert transport.opened == [(first, 0), (second, 2)] and first != second
        assert _value(metrics, "llmgw_gateway_requests_total", {"outcome": "ok"}) == 1
        assert _value(metrics, "llmgw_gateway_tokens_streamed_total") == 4
        assert _value(metrics, "llmgw_gateway_ttft_seconds_count") == 1
        assert _value(metrics, "llmgw_gateway_inter_token_seconds_count") == 3
        assert _value(metrics, "llmgw_gateway_queue_wait_seconds_count") == 2  # admitted, then again on failover
        (record,) = [r for r in caplog.records if r.name == "llmgw.gateway.requests"]
        assert record.replicas == [first, second] and record.outcome == "ok" and record.tokens == 4
        assert record.client == "c1" and len(record.id) == 32 and record.ttft_ms >= 0
        await gateway.stop()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_queue_wait_is_measured_by_the_request_path():
    async def scenario():
        slow = lambda resume, max_tokens: [0.05, *answer(resume, max_tokens)]  # noqa: E731
        gateway, _, metrics, _ = await _observed({"r1": slow}, capacity=1)
        results = await asyncio.gather(*(_collect(gateway, InferenceRequest(prompt=f"p{i}", max_tokens=2))
                                         for i in range(2)))
        assert [[e.index for e in r] for r in results] == [[0, 1], [0, 1]]
        assert _value(metrics, "llmgw_gateway_queue_wait_seconds_count") == 2
        assert _value(metrics, "llmgw_gateway_queue_wait_seconds_sum") >= 0.04  # the second waited for the first
        await gateway.stop()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_metrics_listener_error_internal_and_cancel_outcomes():
    async def scenario():
        def broken(resume, max_tokens):  # one more token, then an error
            return [chunk(resume), AttemptError(AttemptErrorKind.ERROR, "boom")]

        gateway, _, metrics, _ = await _observed({"r1": broken, "r2": broken}, max_attempts=2)
        assert [e.index for e in await _collect(gateway, InferenceRequest(prompt="p", max_tokens=4))] == [0, 1]
        assert _value(metrics, "llmgw_gateway_requests_total", {"outcome": "unavailable"}) == 1
        assert _value(metrics, "llmgw_gateway_tokens_streamed_total") == 2
        await _collect(gateway, InferenceRequest(prompt="", max_tokens=4))
        assert _value(metrics, "llmgw_gateway_requests_total", {"outcome": "invalid_argument"}) == 1
        # A bug below the request path (not a replica failure) is reported as internal, never as a success.
        gateway.transport.scripts = {"r1": lambda r, m: [chunk(0), RuntimeError("bug")]}
        gateway.transport.scripts["r2"] = gateway.transport.scripts["r1"]
        with pytest.raises(RuntimeError):
            async for _ in gateway.infer(InferenceRequest(prompt="p", max_tokens=4)):
                pass
        assert _value(metrics, "llmgw_gateway_requests_total", {"outcome": "internal"}) == 1
        # The consumer walking away mid-stream is a cancellation; closing after the final token is not.
        gateway.transport.scripts = {rid: healthy(gap_s=0.01) for rid in ("r1", "r2")}
        await _collect(gateway, InferenceRequest(prompt="p", max_tokens=4), stop_after=1)
        assert _value(metrics, "llmgw_gateway_requests_total", {"outcome": "cancelled"}) == 1
        await _collect(gateway, InferenceRequest(prompt="p", max_tokens=2), stop_after=2)
        assert _value(metrics, "llmgw_gateway_requests_total", {"outcome": "ok"}) == 1
        assert _value(metrics, "llmgw_gateway_requests_total", {"outcome": "cancelled"}) == 1
        await gateway.stop()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_a_failing_listener_does_not_break_requests(caplog):
    class Broken(RequestListener):
        def attempt_event(self, replica_id, outcome, ttft_s):
            raise RuntimeError("listener bug")

        def tokens_delivered(self, record, batch, now):
            raise RuntimeError("listener bug")

    async def scenario():
        gateway, _ = await fake_gateway({"r1": healthy()})
        events = []

        class Events(RequestListener):
            def attempt_event(self, replica_id, outcome, ttft_s):
                events.append((replica_id, outcome))

            def request_finished(self, record):
                events.append(("finished", record.outcome))

        gateway.add_listener(Broken())
        gateway.add_listener(Events())
        assert [e.index for e in await _collect(gateway, InferenceRequest(prompt="p", max_tokens=3))] == [0, 1, 2]
        assert events == [("r1", AttemptOutcome.FIRST_TOKEN), ("r1", AttemptOutcome.OK),
                          ("finished", RequestOutcome.OK)]
        await gateway.stop()

    with caplog.at_level("ERROR", logger="llmgw.gateway"):
        asyncio.run(asyncio.wait_for(scenario(), 10))
    assert any("request listener failed" in r.getMessage() for r in caplog.records)


class _Stats:
    def __init__(self) -> None:
        self.failovers_total = 0
        self.served_total = 0


class StatusSurface:
    """Just what the metrics listener reads at scrape time."""

    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}
        self.queued = 0
        self.stats = _Stats()
        self.breakers = None
        # Gateway.hedge_stats()'s keys that the hedges{result} metric reads.
        self.hedges = {"won": 0, "lost": 0, "cancelled": 0, "policy_hedges_denied": 0, "denied_no_capacity": 0}

    def hedge_stats(self) -> dict:
        return dict(self.hedges)


def test_metrics_listener_reads_inflight_failovers_hedges_and_breakers_at_scrape_time():
    class Board:
        def __init__(self):
            self.states = {"r1": "closed", "r2": "open"}

        def snapshot(self):
            return {"replicas": {r: {"state": s} for r, s in self.states.items()}}

    metrics = GatewayMetrics(process_metrics=False)
    gw = StatusSurface()
    gw.breakers = Board()
    listener = MetricsListener(gw, metrics)
    gw.in_flight = {"r1": 2, "r2": 1}
    gw.stats.failovers_total = 3
    gw.hedges.update(won=2, lost=1, policy_hedges_denied=4, denied_no_capacity=3)
    gw.queued = 5
    body = metrics.render()[0].decode()
    assert 'llmgw_gateway_inflight{replica="r1"} 2.0' in body
    assert "llmgw_gateway_failovers_total 3.0" in body and "llmgw_gateway_queue_depth 5.0" in body
    assert 'llmgw_gateway_hedges_total{result="won"} 2.0' in body
    # Denied = refused by the budget + refused for want of a free replica.
    assert 'llmgw_gateway_hedges_total{result="denied"} 7.0' in body
    assert 'llmgw_gateway_breaker_state{replica="r2"} 2.0' in body
    # Totals become counter increments: scraping again adds only what is new; a finished replica drops to 0.
    gw.in_flight = {"r2": 1}
    gw.view = type("View", (), {"addresses": {"r1": "127.0.0.1:1", "r2": "127.0.0.1:2"}})()
    gw.stats.failovers_total = 4
    gw.breakers.states["r2"] = "half_open"
    gw.hedges["denied_no_capacity"] = 5
    body = metrics.render()[0].decode()
    assert 'llmgw_gateway_inflight{replica="r1"} 0.0' in body
    assert 'llmgw_gateway_hedges_total{result="denied"} 9.0' in body
    assert "llmgw_gateway_failovers_total 4.0" in body
    assert 'llmgw_gateway_hedges_total{result="won"} 2.0' in body
    assert 'llmgw_gateway_breaker_state{replica="r2"} 1.0' in body
    listener.detach()
    gw.stats.failovers_total = 9
    body = metrics.render()[0].decode()  # no refresher left: values stay where they were
    assert "llmgw_gateway_failovers_total 4.0" in body


def test_inflight_series_of_a_replica_that_left_is_removed():
    metrics = GatewayMetrics(process_metrics=False)
    gw = StatusSurface()
    gw.view = type("View", (), {"addresses": {"r1": "a", "r2": "b"}})()
    MetricsListener(gw, metrics)
    assert 'llmgw_gateway_inflight{replica="r2"} 0.0' in metrics.render()[0].decode()
    gw.view.addresses = {"r1": "a"}
    body = metrics.render()[0].decode()
    assert 'replica="r2"' not in body and 'llmgw_gateway_inflight{replica="r1"} 0.0' in body


def test_the_composition_root_registers_one_metrics_listener_and_removes_it_on_stop():
    from inprocess import FakeMembership
    from llmgw.gateway import GatewayConfig, app

    async def scenario():
        server = app.build_server(GatewayConfig(port=0, gossip_port=None), membership=FakeMembership())
        gateway = server.gateway
        assert gateway.path.listeners == [server.metrics_listener]
        assert server.metrics_listener.gateway is gateway  # the fronts get the Gateway itself, no wrapper
        front = await app.start_gateway(server, app.HttpSettings(port=0))
        assert front is None  # HTTP port 0: gRPC only
        await app.stop_gateway(server, front)
        assert gateway.path.listeners == []

    asyncio.run(asyncio.wait_for(scenario(), 20))


@pytest.mark.parametrize("argv, fragment", [
    (["gateway", "--log-level", "chatty"], "invalid log level 'chatty'"),
    (["gateway", "--http-body-timeout-s", "0"], "--http-body-timeout-s must be > 0"),
    (["gateway", "--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"],
     "cannot read TLS certificate /nonexistent/cert.pem"),
    (["gateway", "--tls-cert", "/nonexistent/cert.pem"], "TLS needs both --tls-cert and --tls-key"),
    (["gateway", "--restart-command", "restart {replica} now"], "unknown placeholders"),
    (["gateway", "--upstream", "ftp://x"], "must start with http:// or https://"),
    (["gateway", "--upstream", "http://x:8000,modle=m"], "unknown option 'modle'"),
    (["replica", "--gossip-key-file", "/nonexistent/gossip.key"],
     "cannot read gossip key file /nonexistent/gossip.key"),
    (["gateway", "--gossip-key-file", "/nonexistent/gossip.key"],
     "cannot read gossip key file /nonexistent/gossip.key"),
])
def test_bad_startup_settings_fail_fast_with_a_clear_message(argv, fragment):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "llmgw", *argv, "--port", "0"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert fragment in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_taken_http_port_stops_the_gateway_with_a_clear_error():
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "llmgw", "gateway", "--port", "0", "--http-port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"gateway: cannot serve HTTP on 127.0.0.1:{port}" in proc.stderr and "--http-port 0" in proc.stderr
    assert "Traceback" not in proc.stderr and "READY" not in proc.stdout


def test_gossip_key_admits_members_with_the_same_key_and_no_one_else(tmp_path, monkeypatch):
    key, other_key = tmp_path / "gossip.key", tmp_path / "other.key"
    key.write_text("correct horse battery staple\n")
    other_key.write_bytes(b"0123456789abcdef-another-cluster")
    with Cluster(tmp_path) as c:
        r1 = c.start_replica("replica-1", token_delay_ms=2, extra=["--gossip-key-file", str(key)])
        # The same setting through the environment (LLMGW_REPLICA_*), as a container would get it.
        monkeypatch.setenv("LLMGW_REPLICA_GOSSIP_KEY_FILE", str(key))
        r2 = c.start_replica("replica-2", token_delay_ms=2)
        monkeypatch.delenv("LLMGW_REPLICA_GOSSIP_KEY_FILE")
        gw = c.start_gateway("gateway-1", extra=["--gossip-key-file", str(key)])
        members = {"gateway-1": "alive", "replica-1": "alive", "replica-2": "alive"}
        c.wait_converged([gw, r1, r2], members)
        results = asyncio.run(c.infer_many(gw, [(f"keyed {i}", 3) for i in range(6)], timeout_s=20))
        assert all(r.ok for r in results) and set().union(*(r.replicas for r in results)) <= {"replica-1",
                                                                                                "replica-2"}
        # Seeded with every member, but signing with another key: it never gets in, and never sees them.
        rogue = c.start_replica("replica-rogue", token_delay_ms=2, seeds=f"{gw.gossip_address},{r1.gossip_address}",
                                extra=["--gossip-key-file", str(other_key)])
        unkeyed = c.start_replica("replica-unkeyed", token_delay_ms=2, seeds=gw.gossip_address)
        deadline = time.monotonic() + 3.0  # many protocol periods of the "local" preset
        while time.monotonic() < deadline:
            assert set(c.members(gw)) == set(members)
            time.sleep(0.1)
        assert set(c.members(rogue)) <= {"replica-rogue"} and set(c.members(unkeyed)) <= {"replica-unkeyed"}
        assert all(r.replicas <= {"replica-1", "replica-2"}
                   for r in asyncio.run(c.infer_many(gw, [(f"after {i}", 2) for i in range(6)], timeout_s=20)))
