"""Ops wired into the real servers: one gateway process serving gRPC + HTTP with shared metrics and one log line
per request, the replica's /metrics and health while draining, and the ObservedGateway wrapper on its own."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.request

import grpc
import pytest

from harness import Cluster, free_tcp_port
from llmgw.gateway.api import InferenceRequest, TokenEvent, Unavailable
from llmgw.gateway.observability import ObservedGateway
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


# ---- ObservedGateway, in process ------------------------------------------------------------------------------
class _Stats:
    def __init__(self) -> None:
        self.failovers_total = 0
        self.served_total = 0


class _Admission:
    async def acquire(self, waiter, *, front=False, timeout_s=None):
        await asyncio.sleep(0.02)


class ScriptedGateway:
    """Just the surface ObservedGateway reads; infer_batches plays a script of batches and an optional error."""

    def __init__(self, batches, error=None) -> None:
        self.batches = batches
        self.error = error
        self.in_flight: dict[str, int] = {}
        self.queued = 0
        self.stats = _Stats()
        self.admission = _Admission()
        self.config = object()
        self.breakers = None
        # Gateway.hedge_stats()'s keys that the hedges{result} metric reads.
        self.hedges = {"won": 0, "lost": 0, "cancelled": 0, "policy_hedges_denied": 0, "denied_no_capacity": 0}

    def hedge_stats(self) -> dict:
        return dict(self.hedges)

    async def infer_batches(self, request):
        await self.admission.acquire(request)
        for batch in self.batches:
            await asyncio.sleep(0.001)
            yield batch
        if self.error is not None:
            raise self.error


def _events(replica, start, count, final_at=None):
    return [TokenEvent(i, f"token_{i}", replica, is_final=i == final_at, finish_reason="length" if i == final_at
                       else None) for i in range(start, start + count)]


def _drain(observed, request, stop_after=None):
    async def run():
        got = []
        stream = observed.infer(request)
        try:
            async for event in stream:
                got.append(event)
                if stop_after is not None and len(got) >= stop_after:
                    break
        except Unavailable:
            pass
        finally:
            await stream.aclose()
        return got

    return asyncio.run(asyncio.wait_for(run(), 10))


def _value(metrics, name, labels=None):
    return metrics.registry.get_sample_value(name, labels or {})


def test_observed_gateway_counts_outcomes_tokens_and_failover_replicas(caplog):
    metrics = GatewayMetrics(process_metrics=False)
    gw = ScriptedGateway([_events("r1", 0, 2), _events("r2", 2, 2, final_at=3)])
    observed = ObservedGateway(gw, metrics)
    with caplog.at_level("INFO", logger="llmgw.gateway.requests"):
        got = _drain(observed, InferenceRequest(prompt="p", max_tokens=4, client_id="c1"))
    assert [e.index for e in got] == [0, 1, 2, 3]
    assert _value(metrics, "llmgw_gateway_requests_total", {"outcome": "ok"}) == 1
    assert _value(metrics, "llmgw_gateway_tokens_streamed_total") == 4
    assert _value(metrics, "llmgw_gateway_ttft_seconds_count") == 1
    assert _value(metrics, "llmgw_gateway_inter_token_seconds_count") == 3
    assert _value(metrics, "llmgw_gateway_queue_wait_seconds_count") == 1
    assert _value(metrics, "llmgw_gateway_queue_wait_seconds_sum") >= 0.015
    (record,) = [r for r in caplog.records if r.name == "llmgw.gateway.requests"]
    assert record.replicas == ["r1", "r2"] and record.outcome == "ok" and record.tokens == 4
    assert record.client == "c1" and len(record.id) == 32


def test_observed_gateway_error_partial_and_cancel_outcomes():
    metrics = GatewayMetrics(process_metrics=False)
    failing = ObservedGateway(ScriptedGateway([_events("r1", 0, 2)], Unavailable("all replicas failed")), metrics)
    _drain(failing, InferenceRequest(prompt="p", max_tokens=4))
    assert _value(metrics, "llmgw_gateway_requests_total", {"outcome": "unavailable"}) == 1
    # A stream that just stops without its final token is never reported as a success.
    partial = ObservedGateway(ScriptedGateway([_events("r1", 0, 2)]), metrics)
    _drain(partial, InferenceRequest(prompt="p", max_tokens=4))
    assert _value(metrics, "llmgw_gateway_requests_total", {"outcome": "internal"}) == 1
    # The consumer walking away mid-stream is a cancellation; closing after the final token is not.
    walker = ObservedGateway(ScriptedGateway([_events("r1", 0, 1), _events("r1", 1, 3, final_at=3)]), metrics)
    _drain(walker, InferenceRequest(prompt="p", max_tokens=4), stop_after=1)
    assert _value(metrics, "llmgw_gateway_requests_total", {"outcome": "cancelled"}) == 1
    done = ObservedGateway(ScriptedGateway([_events("r1", 0, 2, final_at=1)]), metrics)
    _drain(done, InferenceRequest(prompt="p", max_tokens=2), stop_after=2)
    assert _value(metrics, "llmgw_gateway_requests_total", {"outcome": "ok"}) == 1
    assert _value(metrics, "llmgw_gateway_requests_total", {"outcome": "cancelled"}) == 1


def test_observed_gateway_reads_inflight_failovers_hedges_and_breakers_at_scrape_time():
    class Board:
        def __init__(self):
            self.states = {"r1": "closed", "r2": "open"}

        def snapshot(self):
            return {"replicas": {r: {"state": s} for r, s in self.states.items()}}

    metrics = GatewayMetrics(process_metrics=False)
    gw = ScriptedGateway([])
    gw.breakers = Board()
    observed = ObservedGateway(gw, metrics)
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
    observed.detach()
    assert "acquire" not in vars(gw.admission)  # the queue-wait timer is gone
    body = metrics.render()[0].decode()  # no refresher left: values stay where they were
    assert "llmgw_gateway_failovers_total 4.0" in body


def test_inflight_series_of_a_replica_that_left_is_removed():
    metrics = GatewayMetrics(process_metrics=False)
    gw = ScriptedGateway([])
    gw.view = type("View", (), {"addresses": {"r1": "a", "r2": "b"}})()
    ObservedGateway(gw, metrics)
    assert 'llmgw_gateway_inflight{replica="r2"} 0.0' in metrics.render()[0].decode()
    gw.view.addresses = {"r1": "a"}
    body = metrics.render()[0].decode()
    assert 'replica="r2"' not in body and 'llmgw_gateway_inflight{replica="r1"} 0.0' in body


def test_observed_gateway_delegates_everything_else_to_the_gateway():
    gw = ScriptedGateway([])
    observed = ObservedGateway(gw, GatewayMetrics(process_metrics=False))
    assert observed.config is gw.config and observed.gateway is gw
    observed.pool = "replaced"  # e.g. a TLS channel pool, set after wrapping
    assert gw.pool == "replaced"
    with pytest.raises(AttributeError):
        observed.no_such_attribute


@pytest.mark.parametrize("argv, fragment", [
    (["gateway", "--log-level", "chatty"], "invalid log level 'chatty'"),
    (["gateway", "--http-body-timeout-s", "0"], "--http-body-timeout-s must be > 0"),
    (["gateway", "--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"],
     "cannot read TLS certificate /nonexistent/cert.pem"),
    (["gateway", "--tls-cert", "/nonexistent/cert.pem"], "TLS needs both --tls-cert and --tls-key"),
    (["gateway", "--restart-command", "restart {replica} now"], "unknown placeholders"),
    (["replica", "--backend", "openai"], "--backend openai needs --upstream URL and --model NAME"),
    (["replica", "--backend", "openai", "--upstream", "ftp://x", "--model", "m"], "must be an http(s) URL"),
    (["replica", "--model", "m"], "--upstream and --model need --backend openai"),
    (["replica", "--gossip-key-file", "/nonexistent/gossip.key"], "cannot read gossip key file /nonexistent/gossip.key"),
    (["gateway", "--gossip-key-file", "/nonexistent/gossip.key"], "cannot read gossip key file /nonexistent/gossip.key"),
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
