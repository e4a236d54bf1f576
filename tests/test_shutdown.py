"""Graceful shutdown of a gateway process (llmgw.gateway.shutdown), streams longer than the old 1-2 s grace.

On SIGTERM the gateway must report not ready at once (HTTP /readyz 503, gRPC health NOT_SERVING), refuse new
requests (gRPC UNAVAILABLE "gateway shutting down", HTTP 503 in OpenAI's error shape), let the open streams of both
fronts finish within --shutdown-grace-s, end whatever is left after it with an error the client can retry on
(never a silent truncation), exit 0 and leave gossip.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from replica_fakes import ScriptedTransport, fake_gateway, healthy

from harness import Cluster, free_tcp_port, wait_until
from llmgw import client
from llmgw.gateway.api import InferenceRequest, Unavailable
from llmgw.gateway.replica_stream import AttemptError, AttemptErrorKind
from llmgw.gateway.shutdown import SHUTTING_DOWN, drain

STREAM_TOKENS = 40


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path) as c:
        yield c


def start(c: Cluster, *, token_delay_ms: float, grace_s: float):
    replica = c.start_replica("replica-1", token_delay_ms=token_delay_ms, max_capacity=32)
    http_port = free_tcp_port()
    gateway = c.start_gateway("gateway-1", extra=["--http-port", str(http_port), "--shutdown-grace-s",
                                                  str(grace_s)])
    c.wait_converged([gateway, replica])
    url = f"http://127.0.0.1:{http_port}"
    return replica, gateway, url


class SseStream:
    """One streamed /v1/completions: the token texts, the error event (if any) and whether [DONE] came."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.error: dict | None = None
        self.done = False
        self.first = asyncio.Event()

    async def run(self, http: aiohttp.ClientSession, url: str, prompt: str) -> SseStream:
        body = {"model": "v1", "prompt": prompt, "max_tokens": STREAM_TOKENS, "stream": True}
        async with http.post(f"{url}/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    self.done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    self.error = event["error"]
                    continue
                self.texts.append(event["choices"][0]["text"])
                self.first.set()
        return self


class GrpcStream:
    def __init__(self) -> None:
        self.first = asyncio.Event()

    async def run(self, channel: grpc.aio.Channel, prompt: str) -> client.StreamResult:
        async def tokens():
            async for token in client.stream_infer(channel, prompt, STREAM_TOKENS, timeout_s=60):
                self.first.set()
                yield token

        return await client.collect(tokens())


async def open_streams(http, channel, url, n_grpc: int, n_http: int):
    grpc_streams = [GrpcStream() for _ in range(n_grpc)]
    sse_streams = [SseStream() for _ in range(n_http)]
    tasks = [asyncio.create_task(s.run(channel, f"grpc stream {i}")) for i, s in enumerate(grpc_streams)]
    tasks += [asyncio.create_task(s.run(http, url, f"http stream {i}")) for i, s in enumerate(sse_streams)]
    # Every stream is open (has its first token) before the signal.
    await asyncio.wait_for(asyncio.gather(*(s.first.wait() for s in (*grpc_streams, *sse_streams))), 20)
    return tasks, n_grpc


async def readiness(http, url, channel) -> tuple[int, dict, int]:
    async with http.get(f"{url}/readyz") as resp:
        ready_status, ready_body = resp.status, await resp.json()
    health = health_pb2_grpc.HealthStub(channel)
    serving = (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)).status
    return ready_status, ready_body, serving


def assert_whole_grpc_answer(result: client.StreamResult) -> None:
    assert result.ok, (result.code, result.details)
    assert [t.index for t in result.tokens] == list(range(STREAM_TOKENS))
    assert [t.token for t in result.tokens] == [f"token_{i}" for i in range(STREAM_TOKENS)]


def wait_exit(c: Cluster, gateway, replica, timeout: float) -> int:
    """The gateway's exit code (it must exit by itself within `timeout`), after checking it left gossip."""
    wait_until(lambda: not gateway.alive(), timeout, 0.05, "the gateway to exit")
    wait_until(lambda: c.states(replica).get("gateway-1") in ("left", None), 10, 0.05, "the gateway's leave")
    return gateway.process.returncode


def test_sigterm_lets_open_streams_finish_and_refuses_new_requests(cluster):
    c = cluster
    # 40 tokens, 100 ms apart: 4 s streams, signalled about 1 s in -- ~3 s more than the old 1-2 s grace.
    replica, gateway, url = start(c, token_delay_ms=100, grace_s=10)

    async def scenario():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http, \
                grpc.aio.insecure_channel(gateway.grpc_address) as channel:
            assert (await readiness(http, url, channel))[0] == 200
            tasks, n_grpc = await open_streams(http, channel, url, n_grpc=4, n_http=2)
            await asyncio.sleep(0.8)
            os.kill(gateway.pid, signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.2)
            # Not ready at once, on both fronts.
            ready_status, ready_body, serving = await readiness(http, url, channel)
            assert ready_status == 503 and ready_body["ready"] is False and ready_body["shutting_down"] is True
            assert serving == health_pb2.HealthCheckResponse.NOT_SERVING
            # New requests are refused, retryably: UNAVAILABLE / 503 in OpenAI's error shape.
            refused = await client.collect(client.stream_infer(channel, "too late", 3, timeout_s=10))
            assert refused.code == grpc.StatusCode.UNAVAILABLE and refused.details == "gateway shutting down"
            assert refused.tokens == []
            body = {"model": "v1", "prompt": "too late", "max_tokens": 3}
            async with http.post(f"{url}/v1/completions", json=body) as resp:
                assert resp.status == 503
                error = (await resp.json())["error"]
            assert error["message"] == "gateway shutting down"
            assert error["type"] == "service_unavailable" and error["code"] == "unavailable"
            assert gateway.alive()  # still draining: the open streams are not done
            results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            finished = time.monotonic() - signalled
            return results[:n_grpc], results[n_grpc:], finished

    grpc_results, sse_results, finished_s = asyncio.run(scenario())
    # Every stream ran to completion: all 40 tokens exactly once, none cut.
    for result in grpc_results:
        assert_whole_grpc_answer(result)
    for sse in sse_results:
        assert sse.error is None and sse.done
        assert sse.texts == [f"token_{i}" for i in range(STREAM_TOKENS)]
    assert finished_s > 2.0, f"the streams ended {finished_s:.1f} s after SIGTERM: not longer than the old grace"
    assert wait_exit(c, gateway, replica, timeout=15) == 0
    log = gateway.log_path.read_text()
    assert "drained: 6 open request(s), 0 ended by the shutdown grace" in log


def test_streams_still_open_when_the_grace_runs_out_end_with_a_retryable_error(cluster):
    c = cluster
    # 40 tokens, 150 ms apart: 6 s streams; the grace (1.5 s) runs out long before they finish.
    replica, gateway, url = start(c, token_delay_ms=150, grace_s=1.5)

    async def scenario():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http, \
                grpc.aio.insecure_channel(gateway.grpc_address) as channel:
            tasks, n_grpc = await open_streams(http, channel, url, n_grpc=3, n_http=2)
            os.kill(gateway.pid, signal.SIGTERM)
            signalled = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            return results[:n_grpc], results[n_grpc:], time.monotonic() - signalled

    grpc_results, sse_results, ended_s = asyncio.run(scenario())
    assert 1.5 <= ended_s < 6.0, ended_s
    for result in grpc_results:
        # Not OK and not a silent end: UNAVAILABLE, which gRPC clients retry, after a clean prefix of the answer.
        assert result.code == grpc.StatusCode.UNAVAILABLE, (result.code, result.details)
        assert result.details.startswith("gateway shutting down: the request did not finish within the 1.5 s")
        count = len(result.tokens)
        assert 0 < count < STREAM_TOKENS
        assert [t.index for t in result.tokens] == list(range(count))
        assert not any(t.is_final for t in result.tokens)
    for sse in sse_results:
        # One error event, and no [DONE]: the client knows the answer is truncated and may retry.
        assert not sse.done
        assert sse.error is not None and sse.error["code"] == "unavailable"
        assert sse.error["type"] == "service_unavailable"
        assert sse.error["message"].startswith("gateway shutting down")
        assert 0 < len(sse.texts) < STREAM_TOKENS
        assert sse.texts == [f"token_{i}" for i in range(len(sse.texts))]
    assert wait_exit(c, gateway, replica, timeout=15) == 0
    assert "shutdown grace of 1.5 s ran out: ending 5 open request(s) with UNAVAILABLE" in gateway.log_path.read_text()


# ---- the request path's part, over scripted replicas ----------------------------------------------------------
class ClosingTransport(ScriptedTransport):
    """Closing it breaks every open stream at its next read, as closing gRPC channels does."""

    async def close(self) -> None:
        self.closed = True
        for stream in self.streams:
            if not stream.done():
                stream._steps.clear()
                stream._steps.append(AttemptError(AttemptErrorKind.CLOSED, "connection closed by the gateway"))


async def consume(gateway, prompt: str, max_tokens: int, seen: list[int]) -> None:
    async for event in gateway.infer(InferenceRequest(prompt=prompt, max_tokens=max_tokens)):
        seen.append(event.index)


def test_drain_refuses_new_requests_and_ends_the_rest_with_unavailable_when_the_grace_runs_out():
    async def scenario():
        gateway, transport = await fake_gateway({"r1": healthy(gap_s=0.02)}, capacity=1)
        transport.__class__ = ClosingTransport
        try:
            streamed: list[int] = []
            running = asyncio.create_task(consume(gateway, "long answer", 200, streamed))  # 4 s of tokens
            await asyncio.sleep(0.1)
            queued_seen: list[int] = []
            queued = asyncio.create_task(consume(gateway, "waits for the slot", 5, queued_seen))
            await asyncio.sleep(0.05)
            assert gateway.queued == 1 and streamed
            draining = asyncio.create_task(drain(gateway, 0.4))
            await asyncio.sleep(0.05)
            assert gateway.draining
            with pytest.raises(Unavailable) as refused:
                await consume(gateway, "new", 3, [])
            assert refused.value.message == SHUTTING_DOWN
            report = await asyncio.wait_for(draining, 10)
            assert (report.open_at_start, report.cut, report.left) == (2, 2, 0)
            assert 0.4 <= report.seconds < 2.0
            for task in (running, queued):
                with pytest.raises(Unavailable) as cut:
                    await task
                assert cut.value.message.startswith("gateway shutting down: the request did not finish within the "
                                                    "0.4 s shutdown grace")
            # The cut stream had a clean prefix of its answer, the queued one nothing.
            assert streamed == list(range(len(streamed))) and 0 < len(streamed) < 200
            assert queued_seen == []
            assert gateway.path.open_requests == 0
        finally:
            await gateway.stop()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_drain_with_nothing_open_returns_at_once_and_rejects_a_negative_grace():
    async def scenario():
        gateway, _ = await fake_gateway({"r1": healthy()})
        try:
            with pytest.raises(ValueError, match="shutdown grace"):
                await drain(gateway, -1.0)
            report = await drain(gateway, 30.0)
            assert (report.open_at_start, report.cut, report.left) == (0, 0, 0) and report.seconds < 1.0
        finally:
            await gateway.stop()

    asyncio.run(asyncio.wait_for(scenario(), 30))
