"""Health and load probing of one model server (llmgw/upstream/probe.py) and the monitor that keeps a Backend
current (llmgw/upstream/monitor.py)."""

import asyncio
import contextlib
import math

import pytest
from aiohttp import web

from inprocess import run_bounded as run
from inprocess import wait_for
from llmgw.cluster import free_port
from llmgw.testing.mock_openai import MockOpenAIServer
from llmgw.upstream.backends import Backend, HealthState, ServerLoad
from llmgw.upstream.capabilities import BackendKind
from llmgw.upstream.client import Endpoint, UpstreamClient
from llmgw.upstream.monitor import BackendMonitor
from llmgw.upstream.probe import HealthTracker, MetricsError, Prober, ProbeSettings, parse_load_metrics

FAST = ProbeSettings(interval_s=0.05, timeout_s=0.5, unhealthy_after=2, models_refresh_s=0.2,
                     models_retry_max_s=0.4)


# --- metrics parsing ---------------------------------------------------------------------------------------

VLLM_TWO_ENGINES_TWO_MODELS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
vllm:num_requests_running{engine="0",model_name="qwen"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 4.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 0.0
vllm:num_requests_waiting{engine="0",model_name="qwen"} 7.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.75
vllm:kv_cache_usage_perc{engine="0",model_name="qwen"} 0.5
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="llama"} 0.99
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{model_name="llama"} 12345.0
"""


def test_vllm_counts_are_summed_per_model_and_kv_usage_is_the_fullest_cache():
    load = parse_load_metrics(VLLM_TWO_ENGINES_TWO_MODELS, BackendKind.VLLM)
    assert load.by_model == {"llama": ServerLoad(running=5, waiting=4, kv_cache_usage=0.75),
                             "qwen": ServerLoad(running=1, waiting=7, kv_cache_usage=0.5)}
    # The newer kv_cache_usage_perc is used; the deprecated gpu_cache_usage_perc beside it is not mixed in.
    assert load.total == ServerLoad(running=6, waiting=11, kv_cache_usage=0.75)


def test_older_vllm_reports_kv_usage_as_gpu_cache_usage_perc():
    text = ('vllm:num_requests_running{model_name="m"} 2\nvllm:num_requests_waiting{model_name="m"} 1\n'
            'vllm:gpu_cache_usage_perc{model_name="m"} 0.4\n')
    assert parse_load_metrics(text, BackendKind.VLLM).total == ServerLoad(2, 1, 0.4)


def test_sglang_metric_names_with_rank_labels():
    text = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0",dp_rank="0"} 8.0
sglang:num_running_reqs{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0",dp_rank="1"} 6.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0",dp_rank="0"} 4.0
sglang:num_queue_reqs{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0",dp_rank="1"} 1.0
# TYPE sglang:token_usage gauge
sglang:token_usage{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0",dp_rank="0"} 0.52
sglang:token_usage{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0",dp_rank="1"} 0.31
"""
    load = parse_load_metrics(text, BackendKind.SGLANG)
    assert load.total == ServerLoad(running=14, waiting=5, kv_cache_usage=0.52)
    assert load.by_model == {"qwen": load.total}
    # vLLM's names mean nothing to an SGLang server and the other way round.
    assert parse_load_metrics(text, BackendKind.VLLM) is None


def test_tgi_metrics_have_no_model_label_and_no_kv_usage():
    text = ("# TYPE tgi_queue_size gauge\ntgi_queue_size 3\n"
            "# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 9\n")
    load = parse_load_metrics(text, BackendKind.TGI)
    assert load.total == ServerLoad(running=9, waiting=3, kv_cache_usage=None)
    assert load.by_model == {}


def test_no_load_metrics_means_unknown_load():
    unrelated = "# TYPE process_cpu_seconds counter\nprocess_cpu_seconds_total 12.5\n"
    assert parse_load_metrics(unrelated, BackendKind.VLLM) is None
    assert parse_load_metrics("", BackendKind.SGLANG) is None
    # Kinds without load metrics never report one, whatever the text says.
    assert parse_load_metrics(VLLM_TWO_ENGINES_TWO_MODELS, BackendKind.LLAMACPP) is None
    assert parse_load_metrics(VLLM_TWO_ENGINES_TWO_MODELS, BackendKind.OPENAI_COMPATIBLE) is None


def test_nan_values_are_skipped_and_kv_usage_is_clamped():
    text = ('vllm:num_requests_running{model_name="m"} NaN\nvllm:num_requests_running{model_name="m"} 2\n'
            'vllm:num_requests_waiting{model_name="m"} 0\nvllm:kv_cache_usage_perc{model_name="m"} 1.0000001\n')
    assert parse_load_metrics(text, BackendKind.VLLM).total == ServerLoad(2, 0, 1.0)


@pytest.mark.parametrize("text", ['vllm:num_requests_running{model_name="m" 2\n', "vllm:num_requests_running x\n",
                                  "vllm:num_requests_running{model_name=m} 2\n", "{}\n"])
def test_text_that_is_not_prometheus_format_is_an_error(text):
    with pytest.raises(MetricsError):
        parse_load_metrics(text, BackendKind.VLLM)


# --- health rule -------------------------------------------------------------------------------------------

def test_unhealthy_after_k_consecutive_failures_healthy_after_one_success():
    tracker = HealthTracker(unhealthy_after=3)
    assert tracker.state is HealthState.UNKNOWN
    assert tracker.failure("a") is HealthState.UNKNOWN
    assert tracker.failure("b") is HealthState.UNKNOWN
    assert tracker.failure("c") is HealthState.UNHEALTHY
    assert tracker.last_error == "c"
    assert tracker.success() is HealthState.HEALTHY
    assert tracker.consecutive_failures == 0 and tracker.last_error is None
    # A success in between starts the count again.
    tracker.failure("x")
    tracker.failure("y")
    tracker.success()
    tracker.failure("z")
    tracker.failure("z")
    assert tracker.state is HealthState.HEALTHY
    assert tracker.failure("z") is HealthState.UNHEALTHY
    assert (tracker.failures, tracker.successes) == (8, 2)


@pytest.mark.parametrize("field,value", [("interval_s", 0), ("timeout_s", -1), ("timeout_s", math.inf),
                                         ("unhealthy_after", 0), ("unhealthy_after", 1.5), ("models_refresh_s", 0)])
def test_probe_settings_refuse_unusable_values(field, value):
    with pytest.raises(ValueError, match=field):
        ProbeSettings(**{field: value})


# --- against a server --------------------------------------------------------------------------------------

def test_vllm_kind_is_probed_at_health_and_its_load_read_from_metrics():
    async def scenario():
        async with MockOpenAIServer(token_delay=0.05) as mock, UpstreamClient() as client:
            prober = Prober(client, mock.base_url, BackendKind.VLLM, FAST)
            result = await prober.health()
            assert result.ok and result.models is None
            assert [r.path for r in mock.requests] == []  # /health is not recorded; /v1/models was not asked
            assert (await prober.load()).total == ServerLoad(0, 0, 0.0)
            stream = await client.open_stream(mock.base_url, Endpoint.COMPLETIONS,
                                              {"prompt": "x", "max_tokens": 50, "stream": True})
            try:
                await stream.read()
                load = await prober.load()
                assert load.total.running == 1 and load.by_model["mock-model"].running == 1
                assert load.total.kv_cache_usage == pytest.approx(1 / mock.max_running)
            finally:
                stream.cancel()
            mock.healthy = False
            result = await prober.health()
            assert not result.ok and "HTTP 503" in result.detail
    run(scenario())


def test_a_server_without_health_endpoint_is_probed_at_v1_models():
    async def scenario():
        async with MockOpenAIServer(models=("a", "b")) as mock, UpstreamClient() as client:
            prober = Prober(client, mock.base_url, BackendKind.LLAMACPP, FAST)
            result = await prober.health()
            assert result.ok and result.models == ("a", "b")
            assert [r.path for r in mock.requests] == ["/v1/models"]
            assert prober.metrics_path is None and await prober.load() is None
            # The health flag is /health's business; /v1/models still answers.
            mock.healthy = False
            assert (await prober.health()).ok
    run(scenario())


def test_metrics_without_the_kinds_names_leave_the_load_unknown():
    async def scenario():
        async with MockOpenAIServer() as mock, UpstreamClient() as client:
            prober = Prober(client, mock.base_url, BackendKind.TGI, FAST)  # the mock exports vLLM names
            assert (await prober.health()).ok
            assert await prober.load() is None
    run(scenario())


def test_refused_and_silent_servers_fail_within_the_timeout():
    async def scenario():
        accepted = []

        async def never_answer(reader, writer):
            accepted.append(writer)
            await reader.read(65536)

        silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        silent_port = silent.sockets[0].getsockname()[1]
        settings = ProbeSettings(timeout_s=0.3)
        loop = asyncio.get_running_loop()
        try:
            async with UpstreamClient() as client:
                for kind in (BackendKind.VLLM, BackendKind.LLAMACPP):
                    refused = Prober(client, f"http://127.0.0.1:{free_port()}", kind, settings)
                    result = await refused.health()
                    assert not result.ok and "connect" in result.detail
                    hung = Prober(client, f"http://127.0.0.1:{silent_port}", kind, settings)
                    started = loop.time()
                    result = await hung.health()
                    assert not result.ok
                    assert loop.time() - started < 1.0
                    started = loop.time()
                    assert await hung.load() is None
                    assert loop.time() - started < 1.0
        finally:
            for writer in accepted:
                writer.close()
            silent.close()
            await silent.wait_closed()
        assert accepted  # the silent server was really reached
    run(scenario())


def test_monitor_backs_off_until_a_url_alone_server_answers_then_learns_and_refreshes_models():
    async def scenario():
        port = free_port()
        changes = []
        async with UpstreamClient() as client:
            monitor = BackendMonitor(Backend(f"http://127.0.0.1:{port}", BackendKind.VLLM), client, FAST,
                                     changes.append)
            delays = []
            for _ in range(5):
                await monitor.probe_once()
                delays.append(monitor.next_delay())
            assert not monitor.models_known
            assert delays == [0.1, 0.2, 0.4, 0.4, 0.4]  # doubling from the interval up to models_retry_max_s
            assert monitor.backend.health is HealthState.UNHEALTHY
            mock = MockOpenAIServer(models=("m1",), port=port)
            await mock.start()
            try:
                task = asyncio.ensure_future(monitor.run())
                try:
                    await wait_for(lambda: monitor.models_known)
                    assert monitor.backend.models == ("m1",)
                    assert monitor.backend.health is HealthState.HEALTHY
                    assert monitor.backend.load == ServerLoad(0, 0, 0.0)
                    assert monitor.next_delay() == FAST.interval_s
                    # Learnt models are read again every models_refresh_s.
                    mock.models = ("m1", "m2")
                    await wait_for(lambda: monitor.backend.models == ("m1", "m2"))
                    assert changes[-1] == monitor.backend
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            finally:
                await mock.stop()
    run(scenario())


def test_monitor_keeps_configured_models_and_reports_only_changes():
    async def scenario():
        async with MockOpenAIServer(models=("served",)) as mock, UpstreamClient() as client:
            changes = []
            backend = Backend(mock.base_url, BackendKind.VLLM, models=("configured",), models_configured=True)
            monitor = BackendMonitor(backend, client, FAST, changes.append)
            assert monitor.models_known
            await monitor.probe_once()
            await monitor.probe_once()
            assert len(changes) == 1  # UNKNOWN -> HEALTHY with load; the second round changed nothing
            assert changes[0].models == ("configured",) and changes[0].health is HealthState.HEALTHY
            assert not any(r.path == "/v1/models" for r in mock.requests)
            mock.healthy = False
            await monitor.probe_once()
            assert monitor.backend.health is HealthState.HEALTHY  # one failure is not enough (K = 2)
            await monitor.probe_once()
            assert monitor.backend.health is HealthState.UNHEALTHY and monitor.backend.load is None
            assert monitor.tracker.last_error and "503" in monitor.tracker.last_error
            mock.healthy = True
            await monitor.probe_once()
            assert monitor.backend.health is HealthState.HEALTHY  # one success is enough
            assert [c.health for c in changes] == [HealthState.HEALTHY, HealthState.UNHEALTHY, HealthState.HEALTHY]
    run(scenario())


def test_monitor_does_not_ask_for_models_every_round_when_only_health_answers():
    async def scenario():
        calls = {"models": 0}
        answer_models = asyncio.Event()

        async def health(request):
            return web.Response(status=200)

        async def models(request):
            calls["models"] += 1
            if not answer_models.is_set():
                return web.json_response({"error": {"message": "warming up"}}, status=503)
            return web.json_response({"object": "list", "data": [{"id": "late", "object": "model"}]})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with UpstreamClient() as client:
                monitor = BackendMonitor(Backend(url, BackendKind.VLLM), client, FAST, lambda b: None)
                for _ in range(10):
                    await monitor.probe_once()
                assert monitor.backend.health is HealthState.HEALTHY and not monitor.models_known
                assert calls["models"] == 1  # the next attempt waits for the backoff, not the next round
                answer_models.set()
                task = asyncio.ensure_future(monitor.run())
                try:
                    await wait_for(lambda: monitor.models_known)
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                assert monitor.backend.models == ("late",)
        finally:
            await runner.cleanup()
    run(scenario())
