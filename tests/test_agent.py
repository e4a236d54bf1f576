"""The agent (llmgw/agent.py) against the deterministic mock server: what it advertises, and when."""

import asyncio

import pytest

from inprocess import run_bounded as run
from llmgw.agent import Agent
from llmgw.cluster import free_port
from llmgw.testing.mock_openai import MockOpenAIServer
from llmgw.upstream.backends import HealthState, ServerLoad
from llmgw.upstream.capabilities import BackendKind
from llmgw.upstream.client import Endpoint, UpstreamClient
from llmgw.upstream.metadata import MetadataTooLarge, decode_backend


class Recorder:
    """A publish callable that keeps (time, decoded advertisement)."""

    def __init__(self):
        self.adverts = []

    def __call__(self, metadata):
        assert isinstance(metadata, bytes)
        self.adverts.append((asyncio.get_running_loop().time(), decode_backend(metadata)))

    @property
    def last(self):
        return self.adverts[-1][1] if self.adverts else None

    async def wait_for(self, predicate, timeout):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (self.adverts and predicate(self.last)):
            assert loop.time() < deadline, f"no such advertisement within {timeout}s; last: {self.last}"
            await asyncio.sleep(0.01)
        return self.adverts[-1][0]


def test_models_load_and_health_are_advertised_kill_and_restart():
    async def scenario():
        mock = MockOpenAIServer(models=("served-model",), token_delay=0.02)
        await mock.start()
        port, url = mock.port, mock.base_url
        published = Recorder()
        try:
            # The default probe interval, timeout and K: the 2 s bound below is the one the defaults promise.
            async with Agent(url, "vllm", publish=published, capacity=8, load_publish_interval_s=0.1):
                await published.wait_for(lambda b: b.health is HealthState.HEALTHY, 2)
                first = published.last
                assert first.base_url == url and first.kind is BackendKind.VLLM and first.capacity == 8
                assert first.models == ("served-model",)  # learnt from /v1/models
                assert first.load == ServerLoad(0, 0, 0.0)  # read from /metrics
                # A request in flight shows in the advertised load.
                async with UpstreamClient() as client:
                    stream = await client.open_stream(url, Endpoint.COMPLETIONS,
                                                      {"prompt": "hi", "max_tokens": 200, "stream": True})
                    try:
                        await published.wait_for(lambda b: b.load is not None and b.load.running == 1, 2)
                    finally:
                        stream.cancel()
                await published.wait_for(lambda b: b.load == ServerLoad(0, 0, 0.0), 2)
                # Kill the server: unhealthy is published within 2 s.
                await mock.stop()
                killed_at = asyncio.get_running_loop().time()
                unhealthy_at = await published.wait_for(lambda b: b.health is HealthState.UNHEALTHY, 2)
                assert unhealthy_at - killed_at <= 2.0
                assert published.last.load is None and published.last.models == ("served-model",)
                # Restart on the same port: healthy again.
                mock = MockOpenAIServer(models=("served-model",), port=port)
                await mock.start()
                await published.wait_for(lambda b: b.health is HealthState.HEALTHY, 2)
                assert published.last.load == ServerLoad(0, 0, 0.0)
        finally:
            await mock.stop()
        states = [advert.health for _, advert in published.adverts]
        assert states[0] is HealthState.HEALTHY  # the first round already answered
        assert HealthState.UNHEALTHY in states and states[-1] is HealthState.HEALTHY
    run(scenario())


def test_a_server_down_from_the_start_is_advertised_unhealthy_never_unknown():
    async def scenario():
        port = free_port()  # nothing listens here
        published = Recorder()
        async with Agent(f"http://127.0.0.1:{port}", "vllm", publish=published, probe_interval_s=0.05,
                         unhealthy_after=3) as agent:
            await published.wait_for(lambda b: b.health is HealthState.UNHEALTHY, 2)
            assert agent.backend.health is HealthState.UNHEALTHY
            assert agent.settings.models_retry_max_s == 5.0
        assert [advert.health for _, advert in published.adverts] == [HealthState.UNHEALTHY]
        assert published.last.models == () and published.last.load is None
    run(scenario())


def test_a_server_without_health_endpoint_is_judged_by_v1_models():
    async def scenario():
        async with MockOpenAIServer(models=("a", "b")) as mock:
            mock.healthy = False  # /health would say 503; llama.cpp has no /health, so it is never asked
            published = Recorder()
            async with Agent(mock.base_url, "llamacpp", publish=published, probe_interval_s=0.05) as agent:
                await published.wait_for(lambda b: b.health is HealthState.HEALTHY, 2)
                await asyncio.sleep(0.3)
                assert agent.backend.health is HealthState.HEALTHY
            assert published.last.models == ("a", "b") and published.last.load is None
            assert len(published.adverts) == 1  # nothing changed after the first round
            assert {r.path for r in mock.requests} == {"/v1/models"}
    run(scenario())


def test_configured_models_are_advertised_and_not_asked_for():
    async def scenario():
        async with MockOpenAIServer(models=("server-name",)) as mock:
            published = Recorder()
            async with Agent(mock.base_url, "vllm", publish=published, models=["server-name"],
                             aliases={"friendly": "server-name"}, weight=2, probe_interval_s=0.05):
                await published.wait_for(lambda b: b.health is HealthState.HEALTHY, 2)
            advert = published.last
            assert advert.models == ("server-name",) and advert.weight == 2.0
            assert advert.server_model("friendly") == "server-name"
            assert not any(r.path == "/v1/models" for r in mock.requests)
    run(scenario())


def test_load_alone_is_published_at_most_every_load_publish_interval():
    async def scenario():
        async with MockOpenAIServer(token_delay=0.02) as mock, UpstreamClient() as client:
            published = Recorder()
            async with Agent(mock.base_url, "vllm", publish=published, probe_interval_s=0.05,
                             load_publish_interval_s=60) as agent:
                await published.wait_for(lambda b: b.health is HealthState.HEALTHY, 2)
                stream = await client.open_stream(mock.base_url, Endpoint.COMPLETIONS,
                                                  {"prompt": "hi", "max_tokens": 200, "stream": True})
                try:
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + 2
                    while not (agent.backend.load and agent.backend.load.running == 1):
                        assert loop.time() < deadline
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(0.2)
                    assert len(published.adverts) == 1  # the load moved, but was published a moment ago
                    # A health change is published at once, whatever the load interval.
                    mock.healthy = False
                    await published.wait_for(lambda b: b.health is HealthState.UNHEALTHY, 2)
                finally:
                    stream.cancel()
            assert len(published.adverts) == 2
    run(scenario())


def test_a_publish_that_fails_is_retried():
    async def scenario():
        async with MockOpenAIServer() as mock:
            recorder = Recorder()
            calls = []

            def flaky(metadata):
                calls.append(metadata)
                if len(calls) < 3:
                    raise ConnectionError("gossip not ready")
                recorder(metadata)

            async with Agent(mock.base_url, "vllm", publish=flaky, probe_interval_s=0.05) as agent:
                await recorder.wait_for(lambda b: b.health is HealthState.HEALTHY, 2)
                assert agent.publishes == 1 and agent.published == calls[-1]
            assert len(calls) == 3 and calls[0] == calls[2]
    run(scenario())


def test_learnt_models_that_do_not_fit_are_cut_to_what_fits():
    async def scenario():
        names = tuple(f"org/model-{i:02d}-with-a-rather-long-name" for i in range(30))
        async with MockOpenAIServer(models=names) as mock:
            published = Recorder()
            async with Agent(mock.base_url, "llamacpp", publish=published, probe_interval_s=0.05) as agent:
                await published.wait_for(lambda b: b.health is HealthState.HEALTHY, 2)
                assert agent.backend.models == names
            advertised = published.last.models
            assert 0 < len(advertised) < len(names) and advertised == names[:len(advertised)]
    run(scenario())


def test_bad_settings_fail_at_construction():
    def publish(metadata):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="unknown backend kind"):
        Agent("http://h:1", "triton", publish=publish)
    with pytest.raises(ValueError, match="http:// or https://"):
        Agent("h:1", publish=publish)
    with pytest.raises(TypeError, match="publish must be callable"):
        Agent("http://h:1", publish=None)
    with pytest.raises(ValueError, match="interval_s"):
        Agent("http://h:1", publish=publish, probe_interval_s=0)
    with pytest.raises(ValueError, match="alias target"):
        Agent("http://h:1", publish=publish, models=["a"], aliases={"x": "b"})
    with pytest.raises(MetadataTooLarge):
        Agent("http://h:1", publish=publish, models=[f"model-{i}-" + "x" * 40 for i in range(20)])


def test_stop_without_start_and_double_start():
    async def scenario():
        agent = Agent("http://127.0.0.1:9", publish=lambda m: None)
        await agent.stop()
        await agent.start()
        assert [t.get_name() for t in asyncio.all_tasks()].count("agent http://127.0.0.1:9") == 1
        with pytest.raises(RuntimeError, match="already running"):
            await agent.start()
        await agent.stop()
        await agent.stop()  # idempotent
        assert [t for t in asyncio.all_tasks() if t.get_name().startswith("agent ")] == []  # the loop is gone
    run(scenario())
