"""Simulated replica: model functions and the gRPC server in-process (no gossip)."""

import asyncio
import time

import grpc
import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from llmgw import client
from llmgw._proto import llmgateway_pb2 as pb
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc
from llmgw.replica import Faults, Limits, PrefixCache, Replica, ReplicaConfig, model


# ---- model ---------------------------------------------------------------------------------------------
@settings(max_examples=examples(50), deadline=None)
@given(st.text(alphabet="abc xyz\u00e9\u4e2d", min_size=1, max_size=50), st.integers(0, 10_000))
def test_token_is_a_pure_function_of_prompt_and_index(prompt, i):
    assert model.token_for(prompt, i) == model.token_for(prompt, i) == f"token_{i}"


@pytest.mark.parametrize("prompt,max_tokens,already,problem", [
    ("", 5, 0, "prompt must not be empty"),
    ("p", 0, 0, "max_tokens must be positive"),
    ("p", -3, 0, "max_tokens must be positive"),
    ("p", 11, 0, "exceeds the cap of 10"),
    ("p", 5, -1, "must not be negative"),
    ("p", 5, 6, "exceeds max_tokens"),
    ("x" * 101, 5, 0, "over the cap of 100"),
])
def test_check_generate_rejects(prompt, max_tokens, already, problem):
    msg = model.check_generate(prompt, max_tokens, already, Limits(max_tokens_cap=10, max_prompt_bytes=100))
    assert msg is not None and problem in msg


def test_check_generate_accepts_edges():
    limits = Limits(max_tokens_cap=10, max_prompt_bytes=100)
    assert model.check_generate("x" * 100, 10, 10, limits) is None


def test_prefix_cache_costs_time_linear_in_prompt_length():
    # Hashing every prefix whole made a 1 MiB prompt cost seconds of the replica's loop; chained block keys do not.
    cache = PrefixCache(capacity=1 << 20)
    long_prompt = "x" * (1 << 20)
    start = time.perf_counter()
    assert cache.lookup_and_insert(long_prompt) == 0
    assert cache.lookup_and_insert(long_prompt + "different tail") == len(long_prompt)
    assert time.perf_counter() - start < 2.0  # O(n^2) took 10+ s here
    # Same text in another position is another prefix: a block's key depends on everything before it.
    assert cache.lookup_and_insert("y" * 64 + long_prompt[:64]) == 0


def test_prefix_cache_counts_shared_blocks_and_evicts_lru():
    cache = PrefixCache(capacity=4)
    base = "a" * 128
    assert cache.lookup_and_insert(base + "tail one") == 0
    assert cache.lookup_and_insert(base + "tail two") == 128
    assert cache.hits == 1
    assert cache.lookup_and_insert("b" * 64) == 0  # different first block: a miss
    for i in range(4):  # push everything else out
        cache.lookup_and_insert(chr(ord("c") + i) * 64)
    assert len(cache) == 4
    assert cache.lookup_and_insert(base) == 0


def test_prefill_and_failure_position():
    assert model.prefill_seconds(2000, 0, 10.0) == pytest.approx(0.02)
    assert model.prefill_seconds(2000, 1500, 10.0) == pytest.approx(0.005)
    assert model.failure_position(0.5, 0.0, 0, 10, 0.3) is None
    assert model.failure_position(0.5, 0.4, 0, 10, 0.3) is None
    assert model.failure_position(0.1, 0.4, 0, 10, 0.3) == 3
    assert model.failure_position(0.1, 0.4, 8, 10, 0.99) == 1


# ---- server -----------------------------------------------------------------------------------------------
def run(coro, timeout=30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def started(**kw):
    cfg = ReplicaConfig(replica_id="r-test", port=0, gossip_port=None, **kw)
    rep = Replica(cfg)
    await rep.start()
    return rep


async def generate(rep, prompt="hello", n=5, already=0, timeout=10.0):
    async with grpc.aio.insecure_channel(rep.grpc_address) as ch:
        return await client.collect(client.stream_generate(ch, prompt, n, already=already, timeout_s=timeout))


def test_generate_streams_tokens_with_indices_and_final():
    async def scenario():
        rep = await started(token_delay_ms=5)
        try:
            res = await generate(rep, n=4)
            assert res.ok
            assert [(t.index, t.token, t.is_final) for t in res.tokens] == [
                (0, "token_0", False), (1, "token_1", False), (2, "token_2", False), (3, "token_3", True)]
            resumed = await generate(rep, n=4, already=2)
            assert [(t.index, t.token) for t in resumed.tokens] == [(2, "token_2"), (3, "token_3")]
            assert resumed.tokens[-1].is_final
            nothing_left = await generate(rep, n=4, already=4)
            assert [(t.token, t.is_final) for t in nothing_left.tokens] == [("", True)]
        finally:
            await rep.stop()

    run(scenario())


def test_invalid_requests_get_invalid_argument_with_message():
    async def scenario():
        rep = await started(token_delay_ms=1, limits=Limits(max_tokens_cap=50, max_prompt_bytes=64))
        try:
            for prompt, n, text in [("", 3, "empty"), ("p", 0, "positive"), ("p", 51, "cap"),
                                    ("x" * 65, 3, "over the cap")]:
                res = await generate(rep, prompt, n)
                assert res.code == grpc.StatusCode.INVALID_ARGUMENT
                assert text in res.details
            # Invalid UTF-8 in the prompt: hand-encoded bytes (field 2, length-delimited), field 3 = 5.
            raw = b"\x12\x03\xff\xfe\x41\x18\x05"
            async with grpc.aio.insecure_channel(rep.grpc_address) as ch:
                call = ch.unary_stream("/llmgateway.LLMReplica/Generate", request_serializer=lambda b: b,
                                       response_deserializer=pb.GenerateResponse.FromString)(raw, timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in call:
                        pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "UTF-8" in err.value.details()
        finally:
            await rep.stop()

    run(scenario())


def test_capacity_is_enforced_and_freed():
    async def scenario():
        rep = await started(token_delay_ms=30, max_capacity=2)
        try:
            results = await asyncio.gather(*(generate(rep, f"p{i}", 5) for i in range(3)))
            codes = sorted(r.code.name for r in results)
            assert codes == ["OK", "OK", "RESOURCE_EXHAUSTED"]
            assert rep.active == 0
            assert (await generate(rep, "again", 2)).ok
            assert rep.rejected_total == 1
        finally:
            await rep.stop()

    run(scenario())


def test_prefill_grows_with_prompt_and_shrinks_on_cache_hit():
    async def scenario():
        rep = await started(token_delay_ms=1, prefill_ms_per_kchar=40.0)  # 8k chars -> 320 ms cold
        try:
            prompt = "s" * 8000
            cold = await generate(rep, prompt, 1)
            warm = await generate(rep, prompt + " another question", 1)
            short = await generate(rep, "tiny", 1)
            assert cold.ttft_s > 0.25
            assert warm.ttft_s < 0.15
            assert short.ttft_s < 0.15
            assert rep.cache.hits == 1
        finally:
            await rep.stop()

    run(scenario())


def test_faults_at_run_time_reject_error_stall_slow():
    async def scenario():
        rep = await started(token_delay_ms=5)
        try:
            async with grpc.aio.insecure_channel(rep.grpc_address) as ch:
                admin = pb_grpc.ReplicaAdminStub(ch)
                out = await admin.SetFaults(pb.Faults(reject_all=True, set_reject_all=True), timeout=5)
                assert out.reject_all
                res = await generate(rep)
                assert res.code == grpc.StatusCode.UNAVAILABLE and "fault injection" in res.details
                await admin.SetFaults(pb.Faults(reject_all=False, set_reject_all=True, error_rate=1.0,
                                                set_error_rate=True), timeout=5)
                res = await generate(rep, n=10)
                assert res.code == grpc.StatusCode.INTERNAL and len(res.tokens) < 10
                await admin.SetFaults(pb.Faults(error_rate=0.0, set_error_rate=True, stall_after=3,
                                                set_stall_after=True), timeout=5)
                res = await generate(rep, n=10, timeout=0.5)
                assert res.code == grpc.StatusCode.DEADLINE_EXCEEDED
                assert [t.index for t in res.tokens] == [0, 1, 2]
                await admin.SetFaults(pb.Faults(stall_after=-1, set_stall_after=True, slow_factor=10.0,
                                                set_slow_factor=True), timeout=5)
                start = time.perf_counter()
                assert (await generate(rep, n=3)).ok
                assert time.perf_counter() - start > 0.14  # 3 tokens x 50 ms
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await admin.SetFaults(pb.Faults(error_rate=2.0, set_error_rate=True), timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                status = await admin.GetStatus(pb.StatusRequest(), timeout=5)
                assert status.replica_id == "r-test" and status.active_requests == 0
        finally:
            await rep.stop()

    run(scenario())


def test_drain_refuses_new_finishes_in_flight_then_answers():
    async def scenario():
        rep = await started(token_delay_ms=40)
        try:
            long_one = asyncio.create_task(generate(rep, "long", 8))
            while rep.active == 0:
                await asyncio.sleep(0.005)
            async with grpc.aio.insecure_channel(rep.grpc_address) as ch:
                async def call_drain():
                    return await pb_grpc.LLMReplicaStub(ch).Drain(pb.DrainRequest(), timeout=10)

                drain = asyncio.create_task(call_drain())
                await asyncio.sleep(0.05)
                refused = await generate(rep, "new", 2)
                assert refused.code == grpc.StatusCode.UNAVAILABLE and refused.details == "draining"
                assert not drain.done()
                answer = await drain
            assert answer.success
            finished = await long_one
            assert finished.ok and len(finished.tokens) == 8
        finally:
            await rep.stop()

    run(scenario())


def test_health_and_reflection_are_served():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def scenario():
        rep = await started(token_delay_ms=1)
        try:
            async with grpc.aio.insecure_channel(rep.grpc_address) as ch:
                health = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service="llmgateway.LLMReplica"), timeout=5)
            # The reflection client is synchronous: run it off the loop that serves it.
            services = await asyncio.to_thread(_list_services, rep.grpc_address)
            return health.status, services
        finally:
            await rep.stop()

    status, services = run(scenario())
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert "llmgateway.LLMReplica" in services and "llmgateway.ReplicaAdmin" in services


def _list_services(address):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(address) as ch:
        return ProtoReflectionDescriptorDatabase(ch).get_services()


def test_ready_tokens_are_coalesced_only_when_asked_and_never_past_a_fault():
    async def scenario():
        rep = await started(token_delay_ms=0)
        try:
            async with grpc.aio.insecure_channel(rep.grpc_address) as ch:
                stub = pb_grpc.LLMReplicaStub(ch)
                msgs = [m async for m in stub.Generate(
                    pb.GenerateRequest(prompt="p", max_tokens=10, max_tokens_per_message=4), timeout=5)]
                assert [(m.index, 1 + len(m.more_tokens), m.is_final) for m in msgs] == [
                    (0, 4, False), (4, 4, False), (8, 2, True)]
                assert [t for m in msgs for t in (m.token, *m.more_tokens)] == [f"token_{i}" for i in range(10)]
                one_each = [m async for m in stub.Generate(pb.GenerateRequest(prompt="p", max_tokens=5), timeout=5)]
                assert [len(m.more_tokens) for m in one_each] == [0] * 5
                rep.faults = Faults(stall_after=3)
                call = stub.Generate(pb.GenerateRequest(prompt="p", max_tokens=10, max_tokens_per_message=8),
                                     timeout=0.5)
                got = []
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for m in call:
                        got.extend((m.token, *m.more_tokens))
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert got == ["token_0", "token_1", "token_2"]
        finally:
            await rep.stop()

    run(scenario())


# ---- the composition root (llmgw.replica.app, what `llmgw replica` runs) --------------------------------------
def test_replica_app_starts_serves_announces_and_stops():
    import urllib.request

    from llmgw.replica.app import start_replica

    async def main():
        running = await start_replica(ReplicaConfig(replica_id="r-app", port=0, gossip_port=0, max_capacity=3),
                                      metrics_port=0)
        try:
            replica = running.replica
            line = running.ready_line()
            assert line.startswith(f"READY replica r-app grpc=127.0.0.1:{replica.port} "
                                   f"gossip={replica.gossip.address} metrics=127.0.0.1:")
            async with grpc.aio.insecure_channel(replica.grpc_address) as channel:
                result = await client.collect(client.stream_generate(channel, "app", 3))
            assert result.ok and len(result.tokens) == 3
            url = f"http://127.0.0.1:{running.metrics_server.port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
            assert "llmgw_replica" in body and "llmgw_gossip" in body  # replica metrics and its gossip counters
        finally:
            await running.stop()
        assert running.metrics_server is None

    asyncio.run(asyncio.wait_for(main(), 30))


def test_replica_app_start_error_names_the_port_and_leaves_nothing_running():
    import socket

    from llmgw.replica.app import ReplicaStartError, start_replica

    async def main():
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(ReplicaStartError, match=f"127.0.0.1:{port}"):
                await start_replica(ReplicaConfig(replica_id="r-busy", port=port, gossip_port=None))
        with pytest.raises(ValueError, match="metrics port"):
            await start_replica(ReplicaConfig(replica_id="r-bad", port=0, gossip_port=None), metrics_port=70000)

    asyncio.run(asyncio.wait_for(main(), 30))
