"""The data plane end to end: multi-process clusters on loopback (gateway + replicas as subprocesses).

Each test starts its own cluster through tests/harness.py and asserts exact counts.
"""

import asyncio
import collections
import threading
import time

import grpc
import pytest

from harness import Cluster, wait_until
from llmgw import client
from llmgw._proto import llmgateway_pb2 as pb
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path, gossip_config="local")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def lan_cluster(tmp_path):
    c = Cluster(tmp_path, gossip_config="lan")
    try:
        yield c
    finally:
        c.close()


def assert_exactly_once(res, n):
    assert res.ok, (res.code, res.details)
    assert [t.index for t in res.tokens] == list(range(n))
    assert [t.token for t in res.tokens] == [f"token_{i}" for i in range(n)]
    assert [t.is_final for t in res.tokens] == [False] * (n - 1) + [True]


def replica_of(res) -> str:
    assert len(res.replicas) == 1, res.replicas
    return next(iter(res.replicas))


def mapping(c, gw, prompts):
    """Which replica serves each prompt when requests are sequential (no load effects)."""
    out = {}
    for p in prompts:
        res = c.infer(gw, p, 1)
        assert_exactly_once(res, 1)
        out[p] = replica_of(res)
    return out


# ---- routing: spread, affinity, minimal remapping --------------------------------------------------------
def test_routing_spreads_keeps_affinity_and_remaps_minimally(cluster):
    c = cluster
    replicas = [c.start_replica(f"replica-{i}", token_delay_ms=50, max_capacity=32) for i in range(3)]
    gw = c.start_gateway("gateway-1")
    c.wait_converged([gw, *replicas])

    prompts = [f"prompt_{i}" for i in range(30)]
    results = asyncio.run(c.infer_many(gw, [(p, 5) for p in prompts]))
    for res in results:
        assert_exactly_once(res, 5)
    served = collections.Counter(replica_of(r) for r in results)
    assert sum(served.values()) == 30
    assert set(served) == {r.name for r in replicas}
    assert all(7 <= n <= 13 for n in served.values()), served

    fixed = "The quick brown fox jumps over the lazy dog while the cat sleeps"  # 64 characters
    assert len(fixed) == 64
    sticky = {replica_of(c.infer(gw, fixed, 3)) for _ in range(10)}
    assert len(sticky) == 1
    affinity = sticky.pop()

    before = mapping(c, gw, prompts)
    victim = next(r for r in replicas if r.name != affinity)
    c.kill(victim)
    wait_until(lambda: c.states(gw).get(victim.name) in ("suspect", "dead", None), 15, what="gateway notices")
    assert {replica_of(c.infer(gw, fixed, 3)) for _ in range(5)} == {affinity}
    after = mapping(c, gw, prompts)
    assert victim.name not in after.values()
    remapped = [p for p in prompts if before[p] != victim.name and after[p] != before[p]]
    assert len(remapped) <= 2, remapped


# ---- failure detection at LAN defaults, newcomer joins -----------------------------------------------------
def test_dead_replica_is_detected_and_a_newcomer_joins_at_lan_defaults(lan_cluster):
    c = lan_cluster
    replicas = [c.start_replica(f"replica-{i}", token_delay_ms=20, max_capacity=32) for i in range(5)]
    gw = c.start_gateway("gateway-1")
    c.wait_converged([gw, *replicas], timeout=30)

    victim = replicas[0]
    survivors = replicas[1:]
    killed_at = time.monotonic()
    c.kill(victim)
    for obs in [gw, *survivors]:
        wait_until(lambda obs=obs: c.states(obs).get(victim.name) == "dead",
                   15 - (time.monotonic() - killed_at), 0.1, f"{obs.name} to see {victim.name} dead")
    assert time.monotonic() - killed_at < 15
    results = asyncio.run(c.infer_many(gw, [(f"prompt_{i}", 5) for i in range(12)]))
    for res in results:
        assert_exactly_once(res, 5)
        assert victim.name not in res.replicas

    dead = [victim, survivors[0], survivors[1]]
    c.kill(survivors[0])
    c.kill(survivors[1])
    alive = survivors[2:]
    newcomer = c.start_replica("replica-new", token_delay_ms=20, seeds=",".join(n.gossip_address for n in alive))
    joined_at = time.monotonic()
    observers = [gw, *alive, newcomer]
    for obs in observers:
        wait_until(lambda obs=obs: c.states(obs).get("replica-new") == "alive", 60, 0.1,
                   f"{obs.name} to see the newcomer alive")
    join_s = time.monotonic() - joined_at
    assert join_s < 60
    for obs in observers:  # the dead stay dead (or are already garbage-collected)
        wait_until(lambda obs=obs: all(c.states(obs).get(d.name) in ("dead", None) for d in dead), 15, 0.1,
                   f"{obs.name} to see the killed replicas dead")
    res = c.infer(gw, "after churn", 5)
    assert_exactly_once(res, 5)
    assert res.replicas <= {"replica-new", *(a.name for a in alive)}


# ---- token-exact mid-stream failover -----------------------------------------------------------------------
async def _stream_and_sabotage(c, gw, prompt, sabotage_after, sabotage):
    """Stream a 20-token request; once `sabotage_after` tokens arrived, call sabotage(replica_id)."""
    tokens = []
    start = time.monotonic()
    async with grpc.aio.insecure_channel(gw.grpc_address) as ch:
        async for tok in client.stream_infer(ch, prompt, 20, timeout_s=30):
            tokens.append(tok)
            if len(tokens) == sabotage_after:
                await asyncio.to_thread(sabotage, tok.replica_id)
    return tokens, time.monotonic() - start


def _failover_cluster(c, carrier):
    """3 replicas at 100 ms/token and a gateway whose replica streams travel on `carrier`: "sessions" (the
    default; opened to every replica before the test so the stream under test really is on one) or "calls"
    (--no-replica-sessions: one Generate call per request). Returns (replicas by id, gateway, a check that the
    replica serving the stream under test carries it the expected way)."""
    replicas = {f"replica-{i}": c.start_replica(f"replica-{i}", token_delay_ms=100) for i in range(3)}
    gw = c.start_gateway("gateway-1", extra=[] if carrier == "sessions" else ["--no-replica-sessions"])
    c.wait_converged([gw, *replicas.values()])
    if carrier == "sessions":
        served, i = set(), 0
        while served != set(replicas):  # a request to every replica opens the gateway's session to it
            assert i < 300, f"only {sorted(served)} got requests"
            res = c.infer(gw, f"warm {i}", 1)
            assert res.ok, res.details
            served |= res.replicas
            i += 1
        wait_until(lambda: all(c.replica_status(r).sessions_open == 1 for r in replicas.values()), 10,
                   what="a session from the gateway to every replica")
    before = {rid: c.replica_status(r).session_streams_total for rid, r in replicas.items()}

    def check_carrier(rid):
        on_session = c.replica_status(replicas[rid]).session_streams_total - before[rid]
        assert on_session == (1 if carrier == "sessions" else 0), (carrier, on_session)

    return replicas, gw, check_carrier


@pytest.mark.parametrize("carrier", ["sessions", "calls"])
def test_failover_after_sigkill_is_token_exact(cluster, carrier):
    c = cluster
    replicas, gw, check_carrier = _failover_cluster(c, carrier)

    def kill(rid):
        check_carrier(rid)
        c.kill(replicas[rid])

    tokens, elapsed = asyncio.run(_stream_and_sabotage(c, gw, "kill me mid-stream", 10, kill))
    assert [t.index for t in tokens] == list(range(20))
    assert [t.token for t in tokens] == [f"token_{i}" for i in range(20)]
    assert [t.is_final for t in tokens] == [False] * 19 + [True]
    assert len({t.replica_id for t in tokens}) >= 2
    assert {t.replica_id for t in tokens[:10]}.isdisjoint({t.replica_id for t in tokens[10:]})
    assert elapsed < 15


@pytest.mark.parametrize("carrier", ["sessions", "calls"])
def test_failover_after_silent_stall_is_token_exact(cluster, carrier):
    c = cluster
    replicas, gw, check_carrier = _failover_cluster(c, carrier)  # default inter-token timeout (5 s)

    def stall(rid):
        check_carrier(rid)
        # The serving replica goes silent right after its 10th token (it stays alive in gossip).
        c.set_faults(replicas[rid], stall_after=10)

    tokens, elapsed = asyncio.run(_stream_and_sabotage(c, gw, "stall me mid-stream", 1, stall))
    assert [t.index for t in tokens] == list(range(20))
    assert [t.is_final for t in tokens] == [False] * 19 + [True]
    assert len({t.replica_id for t in tokens}) >= 2
    assert elapsed < 15


# ---- FIFO backpressure -----------------------------------------------------------------------------------
def _burst(c, gw, n=8):
    async def go():
        finished = []
        async with grpc.aio.insecure_channel(gw.grpc_address) as ch:
            async def one(i):
                await asyncio.sleep(i * 0.010)
                res = await client.collect(client.stream_infer(ch, f"burst_{i}", 10, timeout_s=30))
                finished.append(i)
                return res

            start = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 40)
            return results, finished, time.monotonic() - start

    return asyncio.run(go())


def test_fifo_backpressure_with_a_bounded_queue(cluster):
    c = cluster
    replicas = [c.start_replica(f"replica-{i}", token_delay_ms=100, max_capacity=2) for i in range(2)]
    gw = c.start_gateway("gateway-1")
    small = c.start_gateway("gateway-2", extra=["--queue-size", "2"])
    c.wait_converged([gw, small, *replicas])

    results, finished, total = _burst(c, gw)
    for res in results:
        assert_exactly_once(res, 10)
    assert 1.5 <= total <= 5.0, total
    assert set(finished[:4]) == {0, 1, 2, 3}, finished
    assert all(c.replica_status(r).peak_active <= 2 for r in replicas)

    # Let the replicas' load reports fall back to zero before the second burst.
    wait_until(lambda: all(m.active_requests == 0 for m in c.members(small).values()), 10, what="idle reports")
    results, finished, total = _burst(c, small)
    codes = collections.Counter(r.code for r in results)
    assert codes == {grpc.StatusCode.OK: 6, grpc.StatusCode.RESOURCE_EXHAUSTED: 2}, codes
    for res in results:
        if res.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert res.total_s < 0.5 and not res.tokens
        else:
            assert_exactly_once(res, 10)


# ---- suspicion refutation --------------------------------------------------------------------------------
def test_suspected_replica_refutes_and_is_never_declared_dead(lan_cluster):
    c = lan_cluster
    replicas = [c.start_replica(f"replica-{i}", token_delay_ms=20) for i in range(4)]
    gw = c.start_gateway("gateway-1")
    c.wait_converged([gw, *replicas], timeout=30)
    target = replicas[0]
    observers = [gw, *replicas[1:]]
    seen = collections.Counter()
    stop = threading.Event()
    errors = []

    def watch():
        while not stop.is_set():
            for obs in observers:
                try:
                    state = c.states(obs).get(target.name)
                except grpc.RpcError as exc:
                    errors.append(exc)
                    continue
                seen[state] += 1
            time.sleep(0.03)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        # Freeze the target for a little less than the minimum suspicion timeout (2 s at LAN defaults):
        # peers suspect it, then it wakes up, reads the rumour about itself and refutes.
        for _ in range(4):
            c.pause(target)
            time.sleep(1.2)
            c.resume(target)
            wait_until(lambda: all(c.states(o).get(target.name) == "alive" for o in observers), 15, 0.05,
                       "everyone to see the target alive again")
            if seen["suspect"]:
                break
        time.sleep(1.0)
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert seen["suspect"] > 0, seen  # the scenario really produced a suspicion
    assert seen["dead"] == 0, seen
    assert not errors
    assert c.states(target)[target.name] == "alive"


# ---- replica-enforced capacity ---------------------------------------------------------------------------
def test_full_replica_answers_resource_exhausted_and_the_gateway_goes_elsewhere(cluster):
    c = cluster
    full = c.start_replica("replica-full", token_delay_ms=50, max_capacity=1)
    spare = c.start_replica("replica-spare", token_delay_ms=20, max_capacity=1)
    gw = c.start_gateway("gateway-1")
    c.wait_converged([gw, full, spare])

    async def go():
        async with grpc.aio.insecure_channel(full.grpc_address) as direct:
            hog = asyncio.create_task(client.collect(client.stream_generate(direct, "hog", 200, timeout_s=30)))
            await asyncio.sleep(0.2)
            refused = await client.collect(client.stream_generate(direct, "one more", 2, timeout_s=5))
            via_gateway = await c.infer_many(gw, [(f"elsewhere_{i}", 4) for i in range(4)])
            hog.cancel()
            with pytest.raises(asyncio.CancelledError):
                await hog
            return refused, via_gateway

    refused, via_gateway = asyncio.run(go())
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "capacity" in refused.details
    for res in via_gateway:
        assert_exactly_once(res, 4)
        assert res.replicas == {"replica-spare"}
    assert c.replica_status(spare).peak_active == 1


# ---- --workers: several gateway processes on one port ---------------------------------------------------
def test_gateway_workers_share_the_port_and_do_not_overfill(cluster):
    c = cluster
    replicas = [c.start_replica(f"replica-{i}", token_delay_ms=50, max_capacity=2) for i in range(2)]
    gw = c.start_gateway("gateway-1", extra=["--workers", "2"], wait_ready=False)
    wait_until(lambda: gw.log_path.read_text().count("READY") == 2, 30, what="both workers ready")
    wait_until(lambda: {"gateway-1-w0", "gateway-1-w1"} <= {
        mid for mid, st in c.states(replicas[0]).items() if st == "alive"}, 20, what="workers in gossip")
    results = asyncio.run(c.infer_many(gw, [(f"w_{i}", 6) for i in range(12)], timeout_s=30))
    for res in results:
        assert_exactly_once(res, 6)
    assert all(c.replica_status(r).peak_active <= 2 for r in replicas)
    assert sum(c.replica_status(r).served_total for r in replicas) == 12


# ---- graceful leave and the client CLI ----------------------------------------------------------------
def test_graceful_stop_announces_leave_and_client_cli_streams(cluster):
    import subprocess
    import sys

    c = cluster
    keep = c.start_replica("replica-keep", token_delay_ms=5)
    leaving = c.start_replica("replica-leaving", token_delay_ms=5)
    gw = c.start_gateway("gateway-1")
    c.wait_converged([gw, keep, leaving])

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "llmgw", "client", *args], capture_output=True, text=True,
                              timeout=60, cwd=str(c.workdir))

    out = cli("--target", gw.grpc_address, "--prompt", "cli prompt", "--max-tokens", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [["0", "token_0"], ["1", "token_1"], ["2", "token_2"]]
    assert "(final)" in lines[2] and lines[3].startswith("3 tokens, TTFT")
    direct = cli("--direct", "--target", keep.grpc_address, "--max-tokens", "2")
    assert direct.returncode == 0 and direct.stdout.splitlines()[-1].startswith("2 tokens")
    bad = cli("--target", gw.grpc_address, "--max-tokens", "0")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr

    # Drain "leaving" while one of its streams is in flight through the gateway: the stream completes, the
    # Drain answer waits for it, gossip carries draining=true and the gateway stops routing new requests there.
    async def drain_during_stream():
        async with grpc.aio.insecure_channel(gw.grpc_address) as g, \
                grpc.aio.insecure_channel(leaving.grpc_address) as r:
            started = asyncio.Event()

            async def long_stream():
                tokens = []
                # Try prompts until one lands on "leaving" (affinity decides; a handful always suffices).
                for i in range(40):
                    tokens = []
                    async for tok in client.stream_infer(g, f"drain_probe_{i}", 30, timeout_s=30):
                        tokens.append(tok)
                        if tok.replica_id != "replica-leaving":
                            break
                        started.set()
                    if started.is_set():
                        return tokens
                raise AssertionError("no prompt routed to replica-leaving")

            streaming = asyncio.create_task(long_stream())
            await asyncio.wait_for(started.wait(), 20)
            drained = await pb_grpc.LLMReplicaStub(r).Drain(pb.DrainRequest(), timeout=30)
            tokens = await streaming
            return drained, tokens

    drained, tokens = asyncio.run(drain_during_stream())
    assert drained.success
    assert [t.index for t in tokens] == list(range(30)) and tokens[-1].is_final
    assert {t.replica_id for t in tokens} == {"replica-leaving"}
    wait_until(lambda: c.members(gw)["replica-leaving"].draining, 5, 0.05, "gateway to see draining")
    results = asyncio.run(c.infer_many(gw, [(f"while_draining_{i}", 2) for i in range(6)]))
    assert all(r.ok and r.replicas == {"replica-keep"} for r in results)

    stopped_at = time.monotonic()
    assert c.stop(leaving) == 0  # SIGTERM: leaves the cluster, exits cleanly
    wait_until(lambda: c.states(gw).get("replica-leaving") in ("left", None), 5, 0.05, "gateway to see the leave")
    assert time.monotonic() - stopped_at < 5
    results = asyncio.run(c.infer_many(gw, [(f"after_leave_{i}", 3) for i in range(6)]))
    for res in results:
        assert_exactly_once(res, 3)
        assert res.replicas == {"replica-keep"}
