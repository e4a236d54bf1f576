"""`replica --backend openai`: a replica serving Generate by streaming from an OpenAI-compatible server.

End to end with real processes: the upstream is a second llmgw gateway's HTTP front (with its own simulated
replica, in its own gossip cluster); the openai-backed replica joins the first gateway's cluster. The error
mapping and resume rules are also checked in process against a scripted backend."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import grpc
import pytest

from harness import Cluster, free_tcp_port
from llmgw import client
from llmgw.backends.openai_upstream import UpstreamError
from llmgw.replica import Replica, ReplicaConfig


def _post(url: str, body: dict | None = None) -> int:
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status


def test_openai_backed_replica_behind_a_gateway_streams_from_another_gateway_and_fails_over(tmp_path):
    upstream_http, front_http = free_tcp_port(), free_tcp_port()
    with Cluster(tmp_path / "upstream") as up, Cluster(tmp_path / "front") as front:
        up.start_replica("sim-up", token_delay_ms=40)
        gw_up = up.start_gateway("gateway-up", extra=["--http-port", str(upstream_http)])
        up.wait_converged([gw_up], {"gateway-up": "alive", "sim-up": "alive"})

        openai_replica = front.start_replica("openai-1", seeds="", extra=[
            "--backend", "openai", "--upstream", f"http://127.0.0.1:{upstream_http}/v1", "--model", "llmgw",
            "--max-capacity", "3", "--upstream-timeout-s", "5"])
        _fallback = front.start_replica("sim-fallback", token_delay_ms=5, seeds=openai_replica.gossip_address)
        gw = front.start_gateway("gateway-1", seeds=openai_replica.gossip_address,
                                 extra=["--http-port", str(front_http)])
        front.wait_converged([gw], {"gateway-1": "alive", "openai-1": "alive", "sim-fallback": "alive"})
        members = front.members(gw)
        assert members["openai-1"].max_capacity == 3  # gossip carries the adapter's own capacity
        admin = f"http://127.0.0.1:{front_http}/admin/replicas"
        assert _post(f"{admin}/sim-fallback/drain") == 200  # first: only the openai-backed replica serves

        plain = front.infer(gw, "through two gateways", 6)
        assert plain.ok, plain.details
        assert plain.texts == [f"token_{i}" for i in range(6)] and plain.replicas == {"openai-1"}

        # Mid-stream, the upstream gateway dies: the adapter's stream breaks (UNAVAILABLE) and the front gateway
        # resumes on the simulated replica at the next index -- every token exactly once.
        async def interrupted():
            tokens = []
            async with grpc.aio.insecure_channel(gw.grpc_address) as channel:
                async for tok in client.stream_infer(channel, "interrupted", 30, timeout_s=30):
                    tokens.append(tok)
                    if len(tokens) == 5:
                        assert _post(f"{admin}/sim-fallback/undrain") == 200
                        up.kill(gw_up)
            return tokens

        tokens = asyncio.run(asyncio.wait_for(interrupted(), 45))
        assert [t.index for t in tokens] == list(range(30))
        assert [t.token for t in tokens] == [f"token_{i}" for i in range(30)]
        assert {t.replica_id for t in tokens[:5]} == {"openai-1"}
        assert tokens[-1].replica_id == "sim-fallback" and tokens[-1].is_final
        assert "upstream failed at token" in openai_replica.log_tail(200)


# ---- in process: error mapping and resume ------------------------------------------------------------------
class ScriptedBackend:
    """Stands in for OpenAIUpstreamBackend: yields `tokens`, then raises `error` (if any); records its calls."""

    def __init__(self, tokens, error=None) -> None:
        self.tokens, self.error = tokens, error
        self.calls: list[tuple[str, int, list[str]]] = []
        self.closed = False

    async def generate(self, prompt, max_tokens, already):
        self.calls.append((prompt, max_tokens, list(already)))
        for tok in self.tokens[: max_tokens - len(already)]:
            await asyncio.sleep(0)
            yield tok
        if self.error is not None:
            raise self.error

    async def close(self):
        self.closed = True


def _generate(backend, *, max_tokens=4, already=(), tokens_already=None):
    from llmgw._proto import llmgateway_pb2 as pb
    from llmgw._proto import llmgateway_pb2_grpc as pb_grpc

    async def scenario():
        replica = Replica(ReplicaConfig(replica_id="r", port=0, gossip_port=None, backend=backend))
        await replica.start()
        try:
            async with grpc.aio.insecure_channel(replica.grpc_address) as channel:
                call = pb_grpc.LLMReplicaStub(channel).Generate(pb.GenerateRequest(
                    prompt="p", max_tokens=max_tokens, generated_tokens=list(already),
                    tokens_already_generated=len(already) if tokens_already is None else tokens_already),
                    timeout=10)
                messages, code = [], grpc.StatusCode.OK
                try:
                    async for msg in call:
                        messages.append(msg)
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
            return messages, code, replica.active
        finally:
            await replica.stop(0.1)

    return asyncio.run(asyncio.wait_for(scenario(), 20))


def test_upstream_tokens_become_indexed_messages_with_the_last_one_final():
    backend = ScriptedBackend(["a", "b", "c", "d", "e"])
    messages, code, active = _generate(backend, max_tokens=4)
    assert code == grpc.StatusCode.OK and active == 0
    assert [(m.index, m.token, m.is_final) for m in messages] == [(0, "a", False), (1, "b", False), (2, "c", False),
                                                                   (3, "d", True)]
    assert backend.closed  # stop() closes the upstream session


def test_resume_sends_the_text_so_far_and_continues_at_the_next_index():
    backend = ScriptedBackend(["c", "d"])
    messages, code, _ = _generate(backend, max_tokens=4, already=["a", "b"])
    assert code == grpc.StatusCode.OK
    assert backend.calls == [("p", 4, ["a", "b"])]
    assert [(m.index, m.token) for m in messages] == [(2, "c"), (3, "d")] and messages[-1].is_final


def test_resume_without_the_generated_text_is_invalid():
    backend = ScriptedBackend(["c"])
    messages, code, _ = _generate(backend, max_tokens=4, already=[], tokens_already=2)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and not messages and not backend.calls


def test_an_upstream_that_stops_early_ends_with_an_empty_stop_message():
    from llmgw._proto import llmgateway_pb2 as pb

    messages, code, _ = _generate(ScriptedBackend(["a"]), max_tokens=4)
    assert code == grpc.StatusCode.OK
    assert [(m.index, m.token, m.is_final) for m in messages] == [(0, "a", False), (1, "", True)]
    assert messages[-1].finish_reason == pb.STOP


@pytest.mark.parametrize("kind, code", [
    ("invalid", grpc.StatusCode.INVALID_ARGUMENT),
    ("busy", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("unavailable", grpc.StatusCode.UNAVAILABLE),
])
def test_upstream_error_kinds_map_to_grpc_status(kind, code):
    messages, got, active = _generate(ScriptedBackend(["a"], UpstreamError("boom", kind=kind)), max_tokens=4)
    assert got == code and [m.token for m in messages] == ["a"] and active == 0
