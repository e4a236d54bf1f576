"""Gateway request path in-process: real replicas and gRPC, a fake membership source instead of gossip."""

import asyncio
import dataclasses
import time

import grpc
import pytest
from conftest import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inprocess import FakeMember, ReplicaPool, run_with, wait_for
from llmgw import client
from llmgw._proto import llmgateway_pb2 as pb
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc
from llmgw.gateway import GatewayConfig, InferenceRequest, InvalidArgument
from llmgw.gateway.server import GatewayServer
from llmgw.replica import Faults


class Stack(ReplicaPool):
    """Replicas + a GatewayServer (gRPC) over the test-driven membership."""

    def __init__(self):
        super().__init__()
        self.server: GatewayServer | None = None

    async def start_gateway(self, **kw):
        cfg = GatewayConfig(port=0, gossip_port=None, **kw)
        self.server = GatewayServer(cfg, membership=self.membership)
        await self.server.start()
        return self.server

    @property
    def gateway(self):
        return self.server.gateway

    async def infer(self, prompt="hello", n=5, timeout=20.0):
        async with grpc.aio.insecure_channel(self.server.grpc_address) as ch:
            return await client.collect(client.stream_infer(ch, prompt, n, timeout_s=timeout))

    async def close(self):
        if self.server is not None:
            await self.server.stop(0.1)
        await super().close()


def run(scenario, timeout=60.0):
    return run_with(Stack, scenario, timeout)


def assert_exactly_once(res, n):
    assert res.ok, (res.code, res.details)
    assert [t.index for t in res.tokens] == list(range(n))
    assert [t.token for t in res.tokens] == [f"token_{i}" for i in range(n)]
    assert [t.is_final for t in res.tokens] == [False] * (n - 1) + [True]


def test_streams_every_index_once_with_replica_and_final():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=2)
        await s.add_replica("r2", token_delay_ms=2)
        await s.start_gateway()
        res = await s.infer("hello", 6)
        assert_exactly_once(res, 6)
        assert len(res.replicas) == 1 and res.replicas <= {"r1", "r2"}
        async with grpc.aio.insecure_channel(s.server.grpc_address) as ch:
            msgs = [m async for m in pb_grpc.InferenceGatewayStub(ch).Infer(
                pb.InferRequest(prompt="x", max_tokens=2, request_id="req-7"), timeout=10)]
        assert [m.request_id for m in msgs] == ["req-7", "req-7"]
        assert msgs[-1].finish_reason == pb.LENGTH and msgs[0].finish_reason == pb.FINISH_UNSPECIFIED
        assert s.gateway.stats.served_total == 2 and s.gateway.in_flight == {}

    run(scenario)


def test_invalid_requests_get_invalid_argument():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start_gateway(max_tokens_cap=100, max_prompt_bytes=1000)
        for prompt, n, text in [("", 3, "empty"), ("p", 0, "positive"), ("p", 101, "cap"),
                                ("x" * 1001, 2, "over the cap")]:
            res = await s.infer(prompt, n)
            assert res.code == grpc.StatusCode.INVALID_ARGUMENT and text in res.details
        raw = b"\x12\x02\xc3\x28\x18\x05"  # prompt = invalid UTF-8, max_tokens = 5
        async with grpc.aio.insecure_channel(s.server.grpc_address) as ch:
            call = ch.unary_stream("/llmgateway.InferenceGateway/Infer", request_serializer=lambda b: b,
                                   response_deserializer=pb.InferResponse.FromString)(raw, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in err.value.details()
        with pytest.raises(InvalidArgument):  # the Python API checks too (lone surrogate)
            async for _ in s.gateway.infer(InferenceRequest("bad \ud800", 2)):
                pass

    run(scenario)


def test_stall_mid_stream_fails_over_token_exact():
    async def scenario(s):
        # Every replica stalls after 3 tokens of a stream: the resumed stream on the next replica starts at 3.
        stall = Faults(stall_after=3)
        await s.add_replica("r1", token_delay_ms=10, faults=stall)
        await s.add_replica("r2", token_delay_ms=10, faults=stall)
        await s.start_gateway(inter_token_timeout_s=0.3)
        start = time.perf_counter()
        res = await s.infer("stall me", 6)
        assert_exactly_once(res, 6)
        assert {t.replica_id for t in res.tokens[:3]} != {t.replica_id for t in res.tokens[3:]}
        assert res.replicas == {"r1", "r2"}
        assert time.perf_counter() - start < 3.0
        assert s.gateway.stats.failovers_total == 1

    run(scenario)


def test_first_token_stall_fails_over():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=5, faults=Faults(stall_after=0))
        await s.add_replica("r2", token_delay_ms=5, faults=Faults(stall_after=0))
        await s.add_replica("r3", token_delay_ms=5)
        await s.start_gateway(first_token_timeout_s=0.3)
        # A prompt whose preferred replica stalls, so the first-token timeout must fire for it to complete.
        prompt = next(p for p in (f"first {i}" for i in range(100)) if s.gateway.router.route(p).member != "r3")
        start = time.perf_counter()
        res = await s.infer(prompt, 4)
        assert_exactly_once(res, 4)
        assert res.replicas == {"r3"}
        assert s.gateway.stats.failovers_total >= 1
        assert time.perf_counter() - start < 3.0

    run(scenario)


def test_errors_exhaust_attempts_then_unavailable_never_ok():
    async def scenario(s):
        for rid in ("r1", "r2", "r3"):
            await s.add_replica(rid, token_delay_ms=5, faults=Faults(stall_after=2))
        await s.start_gateway(inter_token_timeout_s=0.2, max_attempts=3)
        res = await s.infer("doomed", 10)  # 2 tokens per replica x 3 attempts = 6 < 10
        assert res.code == grpc.StatusCode.UNAVAILABLE
        assert "3 attempts" in res.details
        assert [t.index for t in res.tokens] == [0, 1, 2, 3, 4, 5]
        assert not any(t.is_final for t in res.tokens)
        assert s.gateway.stats.failed_total == 1 and s.gateway.in_flight == {}

    run(scenario)


def test_injected_errors_are_survived_with_exact_tokens():
    async def scenario(s):
        await s.add_replica("bad1", token_delay_ms=2, faults=Faults(error_rate=1.0), seed=1)
        await s.add_replica("bad2", token_delay_ms=2, faults=Faults(error_rate=1.0), seed=2)
        await s.add_replica("good", token_delay_ms=2)
        await s.start_gateway(max_attempts=3)
        results = await asyncio.gather(*(s.infer(f"prompt_{i}", 8) for i in range(6)))
        for res in results:
            assert_exactly_once(res, 8)
            assert res.tokens[-1].replica_id == "good"

    run(scenario)


def test_replica_at_capacity_answers_busy_and_gateway_routes_elsewhere():
    async def scenario(s):
        full = await s.add_replica("full", capacity=1, token_delay_ms=50)
        await s.add_replica("free", capacity=1, token_delay_ms=5)
        await s.start_gateway()
        # Occupy "full" behind the gateway's back (another gateway, say): gossip has not reported it yet.
        async with grpc.aio.insecure_channel(full.grpc_address) as ch:
            hog = asyncio.create_task(client.collect(client.stream_generate(ch, "hog", 20)))
            while full.active == 0:
                await asyncio.sleep(0.005)
            results = await asyncio.gather(*(s.infer(f"q{i}", 3) for i in range(4)))
            for res in results:
                assert_exactly_once(res, 3)
                assert res.replicas == {"free"}
            assert full.rejected_total >= 1
            hog.cancel()
            with pytest.raises(asyncio.CancelledError):
                await hog

    run(scenario)


def test_busy_single_replica_request_waits_instead_of_failing():
    async def scenario(s):
        only = await s.add_replica("only", capacity=1, token_delay_ms=20)
        await s.start_gateway()
        async with grpc.aio.insecure_channel(only.grpc_address) as ch:
            hog = asyncio.create_task(client.collect(client.stream_generate(ch, "hog", 10)))  # ~200 ms
            while only.active == 0:
                await asyncio.sleep(0.005)
            res = await s.infer("patient", 3)
            assert_exactly_once(res, 3)
            assert (await hog).ok

    run(scenario)


def test_queue_full_is_rejected_at_once_and_fifo_order_holds():
    async def scenario(s):
        await s.add_replica("r1", capacity=1, token_delay_ms=100)  # each request holds the slot 0.4 s
        await s.start_gateway(queue_size=2)
        async with grpc.aio.insecure_channel(s.server.grpc_address) as ch:
            finish_order = []

            async def one(i):
                res = await client.collect(client.stream_infer(ch, f"q{i}", 4, timeout_s=20))
                finish_order.append(i)
                return res

            tasks = []
            for i in range(5):
                tasks.append(asyncio.create_task(one(i)))
                await asyncio.sleep(0.02)
            results = await asyncio.gather(*tasks)
        codes = [r.code for r in results]
        assert codes[:3] == [grpc.StatusCode.OK] * 3
        assert codes[3:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        assert all(r.total_s < 0.5 for r in results[3:])
        assert finish_order[-3:] == [0, 1, 2]
        assert s.gateway.stats.rejected_total == 2

    run(scenario)


def test_cancelled_client_leaves_the_queue():
    async def scenario(s):
        await s.add_replica("r1", capacity=1, token_delay_ms=40)
        await s.start_gateway(queue_size=5)
        async with grpc.aio.insecure_channel(s.server.grpc_address) as ch:
            running = asyncio.create_task(client.collect(client.stream_infer(ch, "run", 10)))
            while not s.gateway.in_flight:
                await asyncio.sleep(0.005)
            impatient = await client.collect(client.stream_infer(ch, "wait", 2, timeout_s=0.2))
            assert impatient.code == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(100):
                if s.gateway.queued == 0:
                    break
                await asyncio.sleep(0.01)
            assert s.gateway.queued == 0
            assert (await running).ok
        assert s.gateway.in_flight == {}

    run(scenario)


def test_membership_changes_dead_draining_and_gateways_are_respected():
    async def scenario(s):
        r1 = await s.add_replica("r1", token_delay_ms=1)
        r2 = await s.add_replica("r2", token_delay_ms=1)
        s.membership.set(FakeMember("gateway-2", "127.0.0.1:1", role="gateway"))  # never routed to
        await s.start_gateway()
        s.server.transport.pool.generate(r1.grpc_address)  # make sure r1 has a pooled channel
        assert r1.grpc_address in s.server.transport
        s.membership.set(FakeMember("r1", r1.grpc_address, state="dead"), "dead")
        await asyncio.sleep(0.05)
        assert r1.grpc_address not in s.server.transport  # channel closed with the member
        results = await asyncio.gather(*(s.infer(f"p{i}", 2) for i in range(8)))
        assert all(r.ok and r.replicas == {"r2"} for r in results)
        s.membership.set(FakeMember("r1", r1.grpc_address), "alive")
        s.membership.set(FakeMember("r2", r2.grpc_address, draining=True), "updated")
        await asyncio.sleep(0.05)
        results = await asyncio.gather(*(s.infer(f"p{i}", 2) for i in range(8)))
        assert all(r.ok and r.replicas == {"r1"} for r in results)
        s.membership.set(FakeMember("r1", r1.grpc_address, state="left"), "left")
        await asyncio.sleep(0.05)
        res = await s.infer("nobody", 2)
        assert res.code == grpc.StatusCode.UNAVAILABLE and "no replica" in res.details

    run(scenario)


def test_replica_declared_dead_mid_stream_fails_over_instead_of_cancelling_the_client():
    """Gossip declares the serving replica DEAD while its stream is open: the gateway closes that replica's channel,
    which cancels the pending read. That must be a failover (token-exact, on the other replica), not a cancellation
    that leaves the client with no status."""

    async def scenario(s):
        r1 = await s.add_replica("r1", token_delay_ms=50)
        r2 = await s.add_replica("r2", token_delay_ms=50)
        await s.start_gateway(first_token_timeout_s=30, inter_token_timeout_s=30)
        task = asyncio.ensure_future(s.infer("declared dead", 12, timeout=20.0))
        await wait_for(lambda: sum(r.active for r in (r1, r2)) == 1, what="the stream to start")
        serving = r1 if r1.active else r2
        await asyncio.sleep(0.2)  # a few tokens out
        s.membership.set(FakeMember(serving.config.replica_id, serving.grpc_address, state="dead"), "dead")
        start = time.perf_counter()
        res = await task
        assert_exactly_once(res, 12)
        assert res.replicas == {"r1", "r2"}
        assert time.perf_counter() - start < 5.0  # not held until a 30 s timeout
        assert s.gateway.stats.failovers_total == 1

    run(scenario)


def test_gossip_reported_load_counts_against_capacity():
    async def scenario(s):
        r1 = await s.add_replica("r1", capacity=2, token_delay_ms=1)
        await s.add_replica("r2", capacity=2, token_delay_ms=1)
        await s.start_gateway()
        # Another gateway fills r1 (as gossip reports): every request must go to r2.
        s.membership.set(FakeMember("r1", r1.grpc_address, max_capacity=2, active_requests=2))
        await asyncio.sleep(0.05)
        results = await asyncio.gather(*(s.infer(f"p{i}", 2) for i in range(6)))
        assert all(r.ok and r.replicas == {"r2"} for r in results)
        assert r1.served_total == 0

    run(scenario)


def test_request_deadline_is_enforced():
    async def scenario(s):
        await s.add_replica("slow", token_delay_ms=200)
        await s.start_gateway()
        res = await s.infer("slow", 20, timeout=0.5)
        assert res.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(res.tokens) <= 3
        await asyncio.sleep(0.1)
        assert s.gateway.in_flight == {}

    run(scenario)


def test_admin_members_and_status():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1, capacity=7)
        await s.start_gateway()
        assert (await s.infer("x", 2)).ok
        async with grpc.aio.insecure_channel(s.server.grpc_address) as ch:
            admin = pb_grpc.GatewayAdminStub(ch)
            members = await admin.Members(pb.MembersRequest(), timeout=5)
            status = await admin.GetStatus(pb.GatewayStatusRequest(), timeout=5)
        assert members.self_id == "gateway-1"
        assert [(m.member_id, m.state, m.max_capacity, m.role) for m in members.members] == [
            ("r1", "alive", 7, "replica")]
        assert status.served_total == 1 and status.in_flight == 0 and status.queued == 0
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async with grpc.aio.insecure_channel(s.server.grpc_address) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="llmgateway.InferenceGateway"), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    run(scenario)


def test_coalesced_streams_fail_over_token_exact_and_client_opt_in_coalesces():
    async def scenario(s):
        stall = Faults(stall_after=5)
        await s.add_replica("r1", token_delay_ms=0, faults=stall)
        await s.add_replica("r2", token_delay_ms=0, faults=stall)
        await s.add_replica("r3", token_delay_ms=0, faults=stall)
        await s.start_gateway(inter_token_timeout_s=0.3)
        res = await s.infer("batched", 12)  # 5 + 5 + 2 tokens over three replicas, batched upstream
        assert_exactly_once(res, 12)
        assert len(res.replicas) == 3
        async with grpc.aio.insecure_channel(s.server.grpc_address) as ch:
            msgs = [m async for m in pb_grpc.InferenceGatewayStub(ch).Infer(
                pb.InferRequest(prompt="coalesce me", max_tokens=12, max_tokens_per_message=4), timeout=10)]
        tokens = [t for m in msgs for t in (m.token, *m.more_tokens)]
        assert tokens == [f"token_{i}" for i in range(12)]
        assert all(1 + len(m.more_tokens) <= 4 for m in msgs)
        assert len(msgs) < 12  # ready tokens really travelled together
        assert [m.is_final for m in msgs] == [False] * (len(msgs) - 1) + [True]
        idx = 0
        for m in msgs:
            assert m.index == idx
            idx += 1 + len(m.more_tokens)

    run(scenario)


def test_replica_restarted_at_a_new_address_gets_a_new_channel():
    async def scenario(s):
        old = await s.add_replica("r1", token_delay_ms=1)
        new = await s.add_replica("r1-restarted", token_delay_ms=1, publish=False)
        await s.start_gateway()
        assert (await s.infer("before", 2)).ok
        assert old.grpc_address in s.server.transport
        s.membership.set(FakeMember("r1", new.grpc_address, incarnation=2), "updated")
        await asyncio.sleep(0.05)
        assert old.grpc_address not in s.server.transport
        res = await s.infer("after", 2)
        assert res.ok and res.replicas == {"r1"}
        assert (old.served_total, new.served_total) == (1, 1)

    run(scenario)


def test_load_rule_own_plus_others_with_peak_window():
    """own + max(0, reported - peak own since the previous report): stale reports never double count."""
    from llmgw.gateway.membership import MembershipView
    from llmgw.routing import Router

    router = Router(seed=1)
    view = MembershipView(router)
    member = FakeMember("r", "127.0.0.1:1", max_capacity=4)
    assert view.apply(member, "alive") == []
    view.acquired("r")
    view.acquired("r")
    assert router.load("r") == 2
    # A report that already includes our two requests: nobody else is there.
    view.apply(dataclasses.replace(member, active_requests=2), "alive")
    assert router.load("r") == 2 and view.loads["r"].others == 0
    # Ours finish; a stale report still says 2 (they ran during the window): still nobody else.
    view.released("r")
    view.released("r")
    view.apply(dataclasses.replace(member, active_requests=2), "alive")
    assert router.load("r") == 0
    # Another gateway puts 3 requests there: the next report shows them, and the replica is nearly full.
    view.apply(dataclasses.replace(member, active_requests=3), "alive")
    assert router.load("r") == 3
    view.acquired("r")
    assert router.load("r") == 4 and "r" in view.unavailable(now=0.0)
    view.released("r")
    assert "r" not in view.unavailable(now=0.0)
    view.mark_busy("r", until=10.0)
    assert "r" in view.unavailable(now=5.0) and "r" not in view.unavailable(now=10.0)
    assert view.apply(dataclasses.replace(member, state="dead"), "dead") == ["127.0.0.1:1"]  # its address is gone
    assert "r" not in router and view.routable() == set()
    view.released("r")  # a request that outlived its replica: harmless


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rates=st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=1, max_size=3),
       seeds=st.lists(st.integers(0, 1000), min_size=3, max_size=3),
       max_tokens=st.integers(1, 30), upstream_batch=st.sampled_from([1, 4, 64]),
       per_message=st.sampled_from([0, 3]))
def test_property_every_index_once_in_order_or_unavailable_with_a_clean_prefix(rates, seeds, max_tokens,
                                                                                 upstream_batch, per_message):
    """Whatever the replicas' injected errors, the caller sees 0..n-1 once and in order with is_final, or an
    UNAVAILABLE after a clean prefix -- never a duplicate, a gap, or OK on a partial answer."""
    async def scenario(s):
        for i, rate in enumerate(rates):
            await s.add_replica(f"r{i}", token_delay_ms=0, faults=Faults(error_rate=rate), seed=seeds[i])
        await s.start_gateway(upstream_batch=upstream_batch, max_attempts=3)
        async with grpc.aio.insecure_channel(s.server.grpc_address) as ch:
            return await client.collect(client.stream_infer(ch, "property", max_tokens, timeout_s=20,
                                                            max_tokens_per_message=per_message))

    res = run(scenario)
    if 0.0 in rates:  # 3 attempts reach every replica, and a healthy one must finish the answer
        assert res.ok, (rates, res.code, res.details)
    assert [t.index for t in res.tokens] == list(range(len(res.tokens)))
    assert [t.token for t in res.tokens] == [f"token_{i}" for i in range(len(res.tokens))]
    if res.ok:
        assert len(res.tokens) == max_tokens
        assert [t.is_final for t in res.tokens] == [False] * (max_tokens - 1) + [True]
    else:
        assert res.code == grpc.StatusCode.UNAVAILABLE, (res.code, res.details)
        assert len(res.tokens) < max_tokens and not any(t.is_final for t in res.tokens)
        assert any(rate > 0 for rate in rates)


def test_stopping_the_gateway_ends_in_flight_and_queued_requests_promptly():
    async def scenario(s):
        await s.add_replica("r1", capacity=1, token_delay_ms=100)
        await s.start_gateway()
        async with grpc.aio.insecure_channel(s.server.grpc_address) as ch:
            running = asyncio.create_task(client.collect(client.stream_infer(ch, "long", 50)))
            queued = asyncio.create_task(client.collect(client.stream_infer(ch, "waiting", 5)))
            while not (s.gateway.in_flight and s.gateway.queued):
                await asyncio.sleep(0.01)
            start = time.perf_counter()
            await s.server.stop(0.2)
            s.server = None  # already stopped
            results = await asyncio.wait_for(asyncio.gather(running, queued), 5)
            assert time.perf_counter() - start < 3.0
        assert all(not r.ok for r in results)
        assert len(results[0].tokens) < 50

    run(scenario)


def test_cli_config_worker_ids_ports_and_validation():
    import argparse

    from llmgw.cli import gateway as gateway_cli
    from llmgw.cli.gateway import config_from_args

    def build_parser():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        gateway_cli.add_arguments(sub.add_parser("gateway"))
        return parser

    args = build_parser().parse_args(["gateway", "--id", "gateway-a", "--port", "7000", "--workers", "3",
                                      "--seeds", "h:1, h:2", "--routing", "random"])
    single = config_from_args(args)
    assert (single.gateway_id, single.gossip_port, single.seeds, single.routing) == (
        "gateway-a", 0, ("h:1", "h:2"), "random")
    w2 = config_from_args(args, worker=2)
    assert (w2.gateway_id, w2.gossip_port, w2.reuse_port) == ("gateway-a-w2", 17002, True)
    bad = build_parser().parse_args(["gateway", "--max-attempts", "0"])
    with pytest.raises(SystemExit, match="max_attempts"):
        config_from_args(bad)
