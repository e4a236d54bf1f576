"""llmgw.metrics: per-instance registries, label discipline, lazy gossip collector, exposition."""

from __future__ import annotations

import asyncio
import urllib.request
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from llmgw import metrics
from llmgw.metrics import GatewayMetrics, ReplicaMetrics, render


def scrape(registry) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} parsed back from the text exposition."""
    body, content_type = render(registry)
    assert content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def test_each_instance_has_its_own_registry():
    a, b = GatewayMetrics(process_metrics=False), GatewayMetrics(process_metrics=False)
    a.request_finished("ok", tokens=5)
    assert value(scrape(a.registry), "llmgw_gateway_requests_total", outcome="ok") == 1
    assert value(scrape(b.registry), "llmgw_gateway_requests_total", outcome="ok") == 0
    assert value(scrape(a.registry), "llmgw_gateway_tokens_streamed_total") == 5


def test_process_metrics_are_included_by_default():
    names = {name for name, _ in scrape(GatewayMetrics(gateway_id="g1").registry)}
    assert "process_cpu_seconds_total" in names or "python_info" in names
    info = value(scrape(GatewayMetrics(gateway_id="g1", process_metrics=False).registry), "llmgw_build_info",
                 component="gateway", id="g1", version=__import__("llmgw").__version__)
    assert info == 1


def test_request_outcomes_accept_names_and_grpc_status_codes():
    m = GatewayMetrics(process_metrics=False)
    m.request_finished("ok")
    m.request_finished(grpc.StatusCode.RESOURCE_EXHAUSTED)
    m.request_finished("UNAVAILABLE", tokens=3)
    m.request_finished(grpc.StatusCode.DATA_LOSS)  # rare codes are created on first use
    s = scrape(m.registry)
    assert value(s, "llmgw_gateway_requests_total", outcome="ok") == 1
    assert value(s, "llmgw_gateway_requests_total", outcome="resource_exhausted") == 1
    assert value(s, "llmgw_gateway_requests_total", outcome="unavailable") == 1
    assert value(s, "llmgw_gateway_requests_total", outcome="data_loss") == 1
    assert value(s, "llmgw_gateway_requests_total", outcome="deadline_exceeded") == 0  # pre-created at 0
    assert value(s, "llmgw_gateway_tokens_streamed_total") == 3
    with pytest.raises(ValueError, match="unknown request outcome 'okay'"):
        m.request_finished("okay")


def test_latency_histograms_cover_1ms_to_30s():
    m = GatewayMetrics(process_metrics=False)
    for seconds in (0.0005, 0.0015, 0.012, 0.7, 29.0, 45.0):
        m.ttft.observe(seconds)
    m.inter_token.observe(0.02)
    m.queue_wait.observe(3.0)
    s = scrape(m.registry)
    bucket = lambda le: value(s, "llmgw_gateway_ttft_seconds_bucket", le=le)  # noqa: E731
    assert (bucket("0.001"), bucket("0.002"), bucket("0.02"), bucket("1.0"), bucket("30.0"), bucket("+Inf")) == (
        1, 2, 3, 4, 5, 6)
    assert value(s, "llmgw_gateway_ttft_seconds_count") == 6
    assert value(s, "llmgw_gateway_inter_token_seconds_bucket", le="0.02") == 1
    assert value(s, "llmgw_gateway_inter_token_seconds_bucket", le="0.01") == 0
    assert value(s, "llmgw_gateway_queue_wait_seconds_bucket", le="5.0") == 1
    assert metrics.LATENCY_BUCKETS[0] == 0.001 and metrics.LATENCY_BUCKETS[-1] == 30.0


def test_per_replica_series_and_forgetting_them():
    m = GatewayMetrics(process_metrics=False)
    m.inflight_gauge("r1").inc()
    m.inflight_gauge("r1").inc()
    m.inflight.labels("r2").inc()
    assert m.inflight_gauge("r1") is m.inflight_gauge("r1")
    m.set_breaker_state("r1", "half-open")
    m.set_breaker_state("r2", 2)
    m.queue_depth.set(4)
    m.failovers.inc()
    s = scrape(m.registry)
    assert value(s, "llmgw_gateway_inflight", replica="r1") == 2
    assert value(s, "llmgw_gateway_breaker_state", replica="r1") == 1
    assert value(s, "llmgw_gateway_breaker_state", replica="r2") == 2
    assert value(s, "llmgw_gateway_queue_depth") == 4
    assert value(s, "llmgw_gateway_failovers_total") == 1
    m.forget_replica("r1")
    m.forget_replica("never-seen")
    s = scrape(m.registry)
    assert ("llmgw_gateway_inflight", (("replica", "r1"),)) not in s
    assert ("llmgw_gateway_breaker_state", (("replica", "r1"),)) not in s
    assert value(s, "llmgw_gateway_inflight", replica="r2") == 1
    m.inflight_gauge("r1").inc()  # a replica that comes back starts from a fresh series, not the forgotten one
    assert value(scrape(m.registry), "llmgw_gateway_inflight", replica="r1") == 1
    with pytest.raises(ValueError, match="unknown breaker state"):
        m.set_breaker_state("r2", "ajar")
    with pytest.raises(ValueError, match="unknown breaker state"):
        m.set_breaker_state("r2", 3)


def test_hedge_results():
    m = GatewayMetrics(process_metrics=False)
    for result in ("won", "won", "lost", "cancelled", "denied"):
        m.hedge(result)
    s = scrape(m.registry)
    assert [value(s, "llmgw_gateway_hedges_total", result=r) for r in metrics.HEDGE_RESULTS] == [2, 1, 1, 1]
    with pytest.raises(ValueError, match="unknown hedge result"):
        m.hedge("tie")


class FakeGossip:
    """The stats()/members() surface of llmgw.gossip.GossipNode, with counters the test moves."""

    def __init__(self):
        self.counters = {"messages_in": 10, "messages_out": 12, "bytes_in": 1000, "bytes_out": 1300,
                         "suspicions_raised": 1, "refutations": 0, "probes_failed": 2, "malformed": 3,
                         "auth_rejected": 0, "awareness": 0, "incarnation": 7, "pings_sent": 99}
        self.table = ["alive", "alive", "suspect", "dead"]
        self.stats_calls = 0

    def stats(self):
        self.stats_calls += 1
        return dict(self.counters)

    def members(self, include_self=False):
        return [SimpleNamespace(member_id=f"m{i}", state=state) for i, state in enumerate(self.table)]


def test_gossip_counters_are_read_at_scrape_time():
    node = FakeGossip()
    m = GatewayMetrics(process_metrics=False)
    m.watch_gossip(node.stats, lambda: node.members(include_self=True))
    assert node.stats_calls == 0  # registering does not call into the node
    s = scrape(m.registry)
    assert node.stats_calls == 1
    assert value(s, "llmgw_gossip_messages_total", direction="in") == 10
    assert value(s, "llmgw_gossip_bytes_total", direction="out") == 1300
    assert value(s, "llmgw_gossip_suspicions_total") == 1
    assert value(s, "llmgw_gossip_refutations_total") == 0
    assert value(s, "llmgw_gossip_probes_failed_total") == 2
    assert value(s, "llmgw_gossip_dropped_total", reason="malformed") == 3
    assert value(s, "llmgw_gossip_incarnation") == 7
    assert [value(s, "llmgw_gossip_members", state=st) for st in metrics.MEMBER_STATES] == [2, 1, 1, 0]

    node.counters["messages_in"] = 25
    node.counters["refutations"] = 4
    node.table = ["alive"]
    s = scrape(m.registry)
    assert value(s, "llmgw_gossip_messages_total", direction="in") == 25
    assert value(s, "llmgw_gossip_refutations_total") == 4
    assert value(s, "llmgw_gossip_members", state="suspect") == 0


def test_broken_gossip_source_costs_only_its_own_series(caplog):
    m = GatewayMetrics(process_metrics=False)

    def broken():
        raise RuntimeError("node stopped")

    m.watch_gossip(broken, broken)
    m.request_finished("ok")
    s = scrape(m.registry)
    assert value(s, "llmgw_gateway_requests_total", outcome="ok") == 1
    assert not any(name.startswith("llmgw_gossip_") for name, _ in s)
    assert "gossip stats unavailable" in caplog.text


def test_watch_gossip_replaces_the_previous_source():
    first, second = FakeGossip(), FakeGossip()
    second.counters["messages_in"] = 77
    m = ReplicaMetrics(process_metrics=False)
    m.watch_gossip(first.stats)
    m.watch_gossip(second.stats)
    assert value(scrape(m.registry), "llmgw_gossip_messages_total", direction="in") == 77
    assert first.stats_calls == 0


def test_replica_metrics():
    m = ReplicaMetrics(replica_id="r1", process_metrics=False)
    active = {"n": 3}
    m.active.set_function(lambda: active["n"])
    m.capacity.set(4)
    m.request_finished("ok", tokens=20)
    m.request_finished(grpc.StatusCode.RESOURCE_EXHAUSTED)
    m.prefix_cache(True)
    m.prefix_cache(True)
    m.prefix_cache(False)
    s = scrape(m.registry)
    assert value(s, "llmgw_replica_active_requests") == 3
    assert value(s, "llmgw_replica_capacity") == 4
    assert value(s, "llmgw_replica_requests_total", outcome="ok") == 1
    assert value(s, "llmgw_replica_requests_total", outcome="resource_exhausted") == 1
    assert value(s, "llmgw_replica_tokens_generated_total") == 20
    assert value(s, "llmgw_replica_prefix_cache_hits_total") == 2
    assert value(s, "llmgw_replica_prefix_cache_misses_total") == 1
    active["n"] = 1
    assert value(scrape(m.registry), "llmgw_replica_active_requests") == 1


def test_render_negotiates_openmetrics():
    m = GatewayMetrics(process_metrics=False)
    m.request_finished("ok")
    body, content_type = render(m.registry, "application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    families = {f.name: f for f in parse_openmetrics(body.decode())}
    assert any(s.labels == {"outcome": "ok"} and s.value == 1 for s in families["llmgw_gateway_requests"].samples)
    body, content_type = m.render()
    assert content_type.startswith("text/plain; version=") and b"# EOF" not in body


def test_aiohttp_handler_serves_the_registry():
    from aiohttp import ClientSession, ClientTimeout, web

    m = GatewayMetrics(process_metrics=False)
    m.request_finished("cancelled")

    async def main():
        app = web.Application()
        app.router.add_get("/metrics", metrics.aiohttp_handler(m.registry))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = runner.addresses[0][1]
            async with (ClientSession(timeout=ClientTimeout(total=10)) as session,
                        session.get(f"http://127.0.0.1:{port}/metrics") as resp):
                return resp.status, resp.headers["Content-Type"], await resp.text()
        finally:
            await runner.cleanup()

    status, content_type, text = asyncio.run(asyncio.wait_for(main(), 20))
    assert status == 200 and content_type.startswith("text/plain")
    samples = {(s.name, tuple(s.labels.items())): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("llmgw_gateway_requests_total", (("outcome", "cancelled"),))] == 1


@pytest.fixture
def metrics_server():
    m = ReplicaMetrics(process_metrics=False)
    server = metrics.start_metrics_server(m.registry, 0, host="127.0.0.1")
    yield m, server
    server.close()


def test_standalone_metrics_server(metrics_server):
    m, server = metrics_server
    m.request_finished("ok", tokens=2)
    assert server.port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {(s.name, tuple(s.labels.items())): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("llmgw_replica_tokens_generated_total", ())] == 2
    server.close()
    server.close()  # idempotent


# ---- what a vLLM operator expects: per front and model -------------------------------------------------------


def test_request_done_counts_per_front_and_model_like_vllm():
    m = GatewayMetrics(process_metrics=False, models=["llama-3-8b", "qwen-7b"])
    m.request_done(front="http", model="llama-3-8b", outcome="ok", finish_reason="stop", prompt_tokens=12,
                   completion_tokens=30, e2e_s=1.2, ttft_s=0.05)
    m.request_done(front="http", model="llama-3-8b", outcome="ok", finish_reason="length", prompt_tokens=8,
                   completion_tokens=16, e2e_s=250.0, ttft_s=45.0)
    m.request_done(front="grpc", model=None, outcome=grpc.StatusCode.OK, finish_reason="stop",
                   completion_tokens=4, e2e_s=0.02)
    m.request_done(front="http", model="qwen-7b", outcome="cancelled", prompt_tokens=5, completion_tokens=2,
                   e2e_s=3.0)
    m.request_done(front="http", model="qwen-7b", outcome="unavailable", prompt_tokens=5, e2e_s=0.5)
    s = scrape(m.registry)
    llama = dict(front="http", model="llama-3-8b")
    assert value(s, "llmgw_gateway_prompt_tokens_total", **llama) == 20
    assert value(s, "llmgw_gateway_generation_tokens_total", **llama) == 46
    assert value(s, "llmgw_gateway_request_success_total", finished_reason="stop", **llama) == 1
    assert value(s, "llmgw_gateway_request_success_total", finished_reason="length", **llama) == 1
    assert value(s, "llmgw_gateway_e2e_request_latency_seconds_count", **llama) == 2
    assert value(s, "llmgw_gateway_e2e_request_latency_seconds_bucket", le="240.0", **llama) == 1
    assert value(s, "llmgw_gateway_e2e_request_latency_seconds_bucket", le="300.0", **llama) == 2
    assert value(s, "llmgw_gateway_time_to_first_token_seconds_bucket", le="0.05", **llama) == 1
    assert value(s, "llmgw_gateway_time_to_first_token_seconds_bucket", le="30.0", **llama) == 1
    assert value(s, "llmgw_gateway_time_to_first_token_seconds_bucket", le="60.0", **llama) == 2
    grpc_front = dict(front="grpc", model="unspecified")
    assert value(s, "llmgw_gateway_request_success_total", finished_reason="stop", **grpc_front) == 1
    assert value(s, "llmgw_gateway_generation_tokens_total", **grpc_front) == 4
    assert value(s, "llmgw_gateway_time_to_first_token_seconds_count", **grpc_front) == 0  # no ttft_s given
    qwen = dict(front="http", model="qwen-7b")
    assert value(s, "llmgw_gateway_request_success_total", finished_reason="abort", **qwen) == 1
    assert value(s, "llmgw_gateway_request_failure_total", outcome="unavailable", **qwen) == 1
    assert value(s, "llmgw_gateway_prompt_tokens_total", **qwen) == 10
    # The series of before are counted too, so request_done replaces request_finished on the request path.
    assert value(s, "llmgw_gateway_requests_total", outcome="ok") == 3
    assert value(s, "llmgw_gateway_requests_total", outcome="cancelled") == 1
    assert value(s, "llmgw_gateway_requests_total", outcome="unavailable") == 1
    assert value(s, "llmgw_gateway_tokens_streamed_total") == 52
    # Configured models have series (at 0) on both fronts before their first request.
    assert value(s, "llmgw_gateway_prompt_tokens_total", front="grpc", model="qwen-7b") == 0
    assert metrics.E2E_BUCKETS[-1] == 300.0


def test_model_and_finish_reason_labels_stay_bounded():
    m = GatewayMetrics(process_metrics=False, models=["known"])
    for i in range(50):  # clients may send any model name: they all land in "other"
        m.request_done(front="http", model=f"made-up-{i}", outcome="ok", finish_reason=f"reason-{i}",
                       completion_tokens=1, e2e_s=0.1)
    m.request_done(front="http", model="known", outcome="ok", finish_reason="tool_calls", e2e_s=0.1)
    s = scrape(m.registry)
    models = {dict(labels).get("model") for name, labels in s if name.startswith("llmgw_gateway_request_success")}
    assert models == {"other", "known"}
    assert value(s, "llmgw_gateway_request_success_total", front="http", model="other",
                 finished_reason="other") == 50
    assert value(s, "llmgw_gateway_request_success_total", front="http", model="known",
                 finished_reason="tool_calls") == 1
    m.set_models(["known", "new-model"])
    m.request_done(front="grpc", model="new-model", outcome="ok", finish_reason="stop", e2e_s=0.1)
    assert value(scrape(m.registry), "llmgw_gateway_request_success_total", front="grpc", model="new-model",
                 finished_reason="stop") == 1
    assert m.model_label("made-up-1") == "other" and m.model_label("") == "unspecified"
    with pytest.raises(ValueError, match="more than the 64"):
        m.set_models(f"m{i}" for i in range(65))


def test_request_done_rejects_unknown_fronts_and_outcomes():
    m = GatewayMetrics(process_metrics=False)
    with pytest.raises(ValueError, match="unknown front 'websocket'"):
        m.request_done(front="websocket", model=None, outcome="ok", e2e_s=0.1)
    with pytest.raises(ValueError, match="unknown request outcome 'fine'"):
        m.request_done(front="http", model=None, outcome="fine", e2e_s=0.1)


def test_gauge_from_reads_at_scrape_time_in_a_single_process():
    m = GatewayMetrics(process_metrics=False)
    queued = {"n": 2}
    m.gauge_from(m.queue_depth, lambda: queued["n"])
    assert value(scrape(m.registry), "llmgw_gateway_queue_depth") == 2
    queued["n"] = 5
    assert value(scrape(m.registry), "llmgw_gateway_queue_depth") == 5
    assert not m.multiprocess and m.exposition_registry is m.registry


def test_collector_mirror_turns_scrape_time_counters_into_pushed_ones():
    # The mechanism multiprocess mode uses for gossip, checked here on a plain registry.
    node = FakeGossip()
    source = metrics.GossipCollector(node.stats, lambda: node.members(include_self=True))
    target = GatewayMetrics(process_metrics=False)
    mirror = metrics._CollectorMirror(source, target.registry)
    mirror.refresh()
    node.counters["messages_in"] = 15
    node.table = ["alive"]
    mirror.refresh()
    s = scrape(target.registry)
    assert value(s, "llmgw_gossip_messages_total", direction="in") == 15
    assert value(s, "llmgw_gossip_messages_total", direction="out") == 12
    assert value(s, "llmgw_gossip_members", state="alive") == 1
    assert value(s, "llmgw_gossip_members", state="dead") == 0
    node.counters["messages_in"] = 4  # the gossip node restarted: its 4 new messages are added, nothing lost
    mirror.refresh()
    assert value(scrape(target.registry), "llmgw_gossip_messages_total", direction="in") == 19


def test_multiprocess_dir_must_be_set_before_prometheus_client_is_imported(monkeypatch, tmp_path):
    assert metrics.multiprocess_dir() is None
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="must be set before prometheus_client is first imported"):
        GatewayMetrics(process_metrics=False)
