"""Issue 5 acceptance: hedging, circuit breaking and rolling updates on real replica processes (loopback).

Replicas are subprocesses (tests/harness.py, or llmgw.cluster.LocalCluster for the rolling updates, whose restart
hook is the cluster's control socket). The gateway under test runs in the test's event loop as a full
GatewayServer with its own gossip member, so each test sets its resilience knobs through GatewayConfig directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time

import grpc
import pytest

import inprocess
from harness import Cluster, free_udp_port
from llmgw import client
from llmgw._proto import llmgateway_pb2 as pb
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc
from llmgw.gateway import GatewayConfig
from llmgw.gateway.server import GatewayServer


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path, log_level="WARNING") as c:
        yield c


@contextlib.asynccontextmanager
async def gateway(seeds: list[str], replica_ids: list[str], **settings):
    """An in-process gateway joined to the replicas' gossip; yields once it routes to every replica."""
    cfg = GatewayConfig(gateway_id="gateway-under-test", port=0, gossip_port=free_udp_port(), seeds=tuple(seeds),
                        gossip_config="local", **settings)
    server = GatewayServer(cfg)
    await server.start()
    try:
        async with asyncio.timeout(20):
            while not set(replica_ids) <= set(server.gateway.view.addresses):
                await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            server.channel = channel
            yield server
    finally:
        await server.stop(0.2)


async def infer(server, prompt: str, n: int, *, hedge: bool = False, timeout_s: float = 20.0):
    return await client.collect(client.stream_infer(server.channel, prompt, n, hedge=hedge, timeout_s=timeout_s))


def assert_complete(res, n: int) -> None:
    assert res.ok, (res.code, res.details)
    assert [t.index for t in res.tokens] == list(range(n))
    assert [t.token for t in res.tokens] == [f"token_{i}" for i in range(n)]
    assert res.tokens[-1].is_final


wait_for = functools.partial(inprocess.wait_for, interval=0.05)  # the replicas answer status RPCs: poll gently


class RequestLoop:
    """Steady background traffic: `workers` clients each sending short requests back to back."""

    def __init__(self, server, *, workers: int = 3, tokens: int = 4, prefix: str = "loop") -> None:
        self.server = server
        self.workers = workers
        self.tokens = tokens
        self.prefix = prefix
        self.results: list = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _worker(self, w: int) -> None:
        i = 0
        while not self._stop.is_set():
            res = await infer(self.server, f"{self.prefix}-{w}-{i}", self.tokens, timeout_s=30.0)
            self.results.append(res)
            i += 1

    async def __aenter__(self) -> RequestLoop:
        self._tasks = [asyncio.create_task(self._worker(w)) for w in range(self.workers)]
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        async with asyncio.timeout(40):
            await asyncio.gather(*self._tasks)

    def failures(self) -> list:
        return [(r.code, r.details) for r in self.results if not r.ok or len(r.tokens) != self.tokens]


def run(coro, timeout_s: float = 90.0):
    async def bounded():
        async with asyncio.timeout(timeout_s):
            return await coro

    return asyncio.run(bounded())


# ---- 2. circuit breaker: a gossip-ALIVE replica that rejects everything --------------------------------------
def test_breaker_opens_on_reject_all_replica_routes_around_it_and_closes_after_healing(cluster):
    replicas = [cluster.start_replica(f"replica-{i}", token_delay_ms=10) for i in (1, 2, 3)]
    cluster.wait_converged(replicas)
    bad = replicas[2]

    async def scenario():
        async with gateway([r.gossip_address for r in replicas], [r.name for r in replicas]) as server:
            gw = server.gateway
            admin = pb_grpc.GatewayAdminStub(server.channel)
            cluster.set_faults(bad, reject_all=True)
            t0 = time.monotonic()
            results = await asyncio.gather(*(infer(server, f"burst-{i}", 5) for i in range(50)))
            for res in results:
                assert_complete(res, 5)
            await wait_for(lambda: gw.breakers.state(bad.name) == "open", 5.0 - (time.monotonic() - t0),
                           "the breaker to open")
            members = {m.member_id: m for m in (await admin.Members(pb.MembersRequest(), timeout=5)).members}
            assert members[bad.name].breaker == "open"
            assert members[bad.name].state == "alive", "the breaker must not touch gossip membership"
            assert {members[r.name].breaker for r in replicas[:2]} == {"closed"}
            status = await admin.GetStatus(pb.GatewayStatusRequest(), timeout=5)
            assert status.breaker_by_replica[bad.name] == "open" and status.failed_total == 0

            rejected_before = cluster.replica_status(bad).rejected_total
            later = await asyncio.gather(*(infer(server, f"later-{i}", 3) for i in range(20)))
            for res in later:
                assert_complete(res, 3)
                assert bad.name not in res.replicas
            assert cluster.replica_status(bad).rejected_total == rejected_before, "requests still reached it"

            cluster.set_faults(bad, reject_all=False)
            healed_at = time.monotonic()
            async with RequestLoop(server, workers=3, tokens=2, prefix="heal") as loop:
                await wait_for(lambda: gw.breakers.state(bad.name) == "closed", 15.0, "the breaker to close")
            closed_after = time.monotonic() - healed_at
            assert closed_after < 15.0
            assert loop.failures() == []
            assert cluster.replica_status(bad).served_total > 0

    run(scenario())


# ---- 3. explicit hedging: the fast replica's TTFT, the slow one cancelled at once -----------------------------
def test_hedged_requests_stream_the_fast_replica_and_cancel_the_slow_one(cluster):
    fast = cluster.start_replica("replica-fast", token_delay_ms=30)
    slow = cluster.start_replica("replica-slow", token_delay_ms=500, extra=["--stall-before-first-ms", "500"])
    cluster.wait_converged([fast, slow])

    async def scenario():
        async with gateway([fast.gossip_address, slow.gossip_address], [fast.name, slow.name]) as server:
            for i in range(5):
                res = await infer(server, f"hedged prompt {i}", 10, hedge=True)
                ended = time.monotonic()
                assert_complete(res, 10)
                assert res.replicas == {fast.name}
                assert res.total_s < 0.6, f"request {i} took {res.total_s:.3f} s"
                assert res.ttft_s < 0.15, f"request {i} TTFT {res.ttft_s:.3f} s"
                await wait_for(lambda: cluster.replica_status(slow).active_requests == 0,
                               1.0 - (time.monotonic() - ended), "the slow replica's stream to be cancelled")
            stats = server.gateway.hedge_stats()
            assert stats["explicit_hedges"] == 5 and stats["hedges_started"] == 5
            assert stats["won"] + stats["lost"] == 5 and stats["cancelled"] == 0
            assert stats["policy_hedges_issued"] == 0, "explicit hedges do not spend the policy budget"
            assert server.gateway.in_flight == {}

    run(scenario())


# ---- 4. policy hedging with a budget: one replica stalls before its first token ------------------------------
def test_policy_hedging_bounds_ttft_and_respects_the_budget(cluster):
    replicas = [cluster.start_replica(f"replica-{i}", token_delay_ms=10) for i in (1, 2, 3)]
    cluster.wait_converged(replicas)
    staller = replicas[0]
    requests = 200

    async def scenario():
        async with gateway([r.gossip_address for r in replicas], [r.name for r in replicas],
                           hedge_delay_ms=100.0) as server:
            healthy = [await infer(server, f"warm-{i}", 2) for i in range(20)]
            for res in healthy:
                assert_complete(res, 2)
            healthy_ttft = max(r.ttft_s for r in healthy)
            cluster.set_faults(staller, stall_before_first_ms=60_000)
            gw = server.gateway
            before = gw.hedge_stats()
            ejected = False
            results = []
            for i in range(requests):
                res = await infer(server, f"policy-{i}", 2)
                results.append(res)
                ejected = ejected or gw.breakers.state(staller.name) != "closed"
            for i, res in enumerate(results):
                assert_complete(res, 2)
                assert res.ttft_s <= 0.100 + healthy_ttft + 0.020, \
                    f"request {i}: TTFT {res.ttft_s * 1000:.1f} ms (healthy {healthy_ttft * 1000:.1f} ms)"
                assert staller.name not in res.replicas
            stats = gw.hedge_stats()
            issued = stats["policy_hedges_issued"] - before["policy_hedges_issued"]
            total_requests = stats["requests"]  # warm-up included: it deposited budget too
            assert 1 <= issued <= gw.config.hedge_budget_burst + gw.config.hedge_budget * total_requests
            assert stats["won"] >= 1
            assert ejected, "the stalling replica was never ejected: the budget alone would not have covered it"
            assert gw.stats.failed_total == 0 and gw.in_flight == {}

    run(scenario(), timeout_s=120)


# ---- 5. slow but alive: ejected with no errors, taken back after recovery ------------------------------------
def test_slow_but_alive_replica_is_ejected_without_errors_and_taken_back(cluster):
    replicas = [cluster.start_replica(f"replica-{i}", token_delay_ms=20) for i in (1, 2, 3)]
    cluster.wait_converged(replicas)
    slow = replicas[1]
    changes = []

    async def scenario():
        async with gateway([r.gossip_address for r in replicas], [r.name for r in replicas],
                           breaker_cooldown_s=2.0) as server:
            gw = server.gateway
            original = gw.breakers._on_change
            gw.breakers._on_change = lambda rid, old, new, reason: changes.append((rid, old, new, reason))
            assert original is None
            cluster.set_faults(slow, slow_factor=10.0)
            async with RequestLoop(server, workers=6, tokens=6, prefix="slow") as loop:
                await wait_for(lambda: gw.breakers.state(slow.name) != "closed", 30.0, "the slow replica's ejection")
                cluster.set_faults(slow, slow_factor=1.0)
                await wait_for(lambda: gw.breakers.state(slow.name) == "closed", 20.0, "the replica's return")
                served = cluster.replica_status(slow).served_total
                await wait_for(lambda: cluster.replica_status(slow).served_total > served, 10.0,
                               "traffic on the recovered replica")
            assert loop.failures() == []
            assert gw.stats.failed_total == 0 and gw.stats.failovers_total == 0, "no errors may be involved"
            opened = [c for c in changes if c[0] == slow.name and c[2] == "open"]
            assert opened and opened[0][3] in ("slow_itl", "slow_ttft")
            assert all(c[0] == slow.name for c in changes), f"healthy replicas were ejected: {changes}"

    run(scenario())


# ---- 1 and 6. rolling updates through GatewayAdmin.StartRollout on a supervised local cluster ------------------
@contextlib.asynccontextmanager
async def local_cluster(tmp_path, replicas: int = 3):
    from llmgw.cluster import ClusterConfig, LocalCluster

    # Short log dir: the control socket's path must fit a Unix socket address.
    cluster = LocalCluster(ClusterConfig(replicas=replicas, token_delay_ms=10, max_capacity=16, http_port=0,
                                         log_dir=str(tmp_path / "c"), restart=False))
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.stop()


async def start_rollout(server, **fields) -> list[pb.RolloutEvent]:
    stub = pb_grpc.GatewayAdminStub(server.channel)
    return [ev async for ev in stub.StartRollout(pb.RolloutRequest(**fields), timeout=60)]


def replica_versions(server) -> dict[str, tuple[str, str]]:
    return {m.member_id: (str(m.state).lower(), m.model_version) for m in server.gateway.members()
            if m.role == "replica"}


def test_rolling_update_v1_to_v2_under_steady_load_drops_nothing(tmp_path):
    async def scenario():
        async with local_cluster(tmp_path) as lc:
            ids = lc.replica_ids()
            seeds = [lc.gossip_address(m) for m in lc.replicas.values()]
            async with gateway(seeds, ids, restart_command=lc.restart_command_template()) as server:
                assert set(replica_versions(server).values()) == {("alive", "v1")}
                async with RequestLoop(server, workers=3, tokens=4, prefix="rollout") as loop:
                    events = await start_rollout(server, version="v2")
                    await asyncio.sleep(0.3)  # traffic on the updated cluster too
                state = await pb_grpc.GatewayAdminStub(server.channel).GetRollout(pb.GetRolloutRequest(), timeout=5)
                assert state.state == "succeeded", (state.error, [(e.kind, e.detail) for e in events])
                assert [r.step for r in state.replicas] == ["done"] * 3
                assert all(r.new_incarnation > r.old_incarnation >= 0 for r in state.replicas)
                assert [e.replica_id for e in events if e.kind == "replica_done"] == sorted(ids)
                assert events[-1].kind == "finished" and events[-1].state == "succeeded"
                await wait_for(lambda: replica_versions(server) == dict.fromkeys(ids, ("alive", "v2")), 5.0,
                               "every replica alive on v2")
                assert len(loop.results) >= 20
                assert loop.failures() == []
                assert server.gateway.drains.drained == set()

    run(scenario(), timeout_s=120)


def test_rolling_update_aborts_when_a_replica_does_not_come_back_on_the_new_version(tmp_path):
    async def scenario():
        async with local_cluster(tmp_path) as lc:
            ids = lc.replica_ids()
            seeds = [lc.gossip_address(m) for m in lc.replicas.values()]
            # The restart hook brings the replica back on the old version: the rejoin check must time out.
            wrong_version = lc.restart_command_template().replace("{version}", "v1")
            async with gateway(seeds, ids, restart_command=wrong_version) as server:
                async with RequestLoop(server, workers=3, tokens=4, prefix="abort") as loop:
                    events = await start_rollout(server, version="v2", rejoin_timeout_s=3.0)
                    # Routing restored: the replica that failed takes traffic again.
                    first = ids[0]
                    served = lambda: sum(1 for r in loop.results if first in r.replicas)  # noqa: E731
                    before = served()
                    await wait_for(lambda: served() > before, 10.0, f"traffic on {first} after the abort")
                state = await pb_grpc.GatewayAdminStub(server.channel).GetRollout(pb.GetRolloutRequest(), timeout=5)
                assert state.state == "failed" and state.failed_replica == first and state.restored
                assert "v2" in state.error and first in state.error, state.error
                assert [r.step for r in state.replicas] == ["failed", "pending", "pending"]
                assert events[-1].kind == "finished" and events[-1].state == "failed"
                assert any(e.kind == "restore" for e in events)
                assert server.gateway.drains.drained == set()
                assert first in server.gateway.view.routable()
                assert set(replica_versions(server).values()) == {("alive", "v1")}
                assert loop.failures() == []

    run(scenario(), timeout_s=90)
