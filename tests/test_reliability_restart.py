"""Gateway restart during traffic (issue 7): two gateways in front of three replicas, both under load; SIGKILL one
mid-traffic. Only streams on the killed gateway see errors, the other keeps serving every request; the restarted
gateway learns every replica (push-pull on join) and routes correctly within 2 protocol periods of joining."""

from __future__ import annotations

import asyncio
import time

import pytest

from llmgw.gossip import GossipConfig
from reliability_helpers import Cluster, closed_loop_load, restart_gateway

PERIOD_S = GossipConfig.lan().protocol_period
REPLICAS = ["replica-1", "replica-2", "replica-3"]


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path, gossip_config="lan") as c:
        yield c


def test_killing_one_gateway_costs_only_its_own_streams_and_a_restart_routes_at_once(cluster):
    for name in REPLICAS:
        cluster.start_replica(name, token_delay_ms=20, max_capacity=64)
    gw1 = cluster.start_gateway("gateway-1", extra=["--http-port", "0"])
    gw2 = cluster.start_gateway("gateway-2", extra=["--http-port", "0"])
    cluster.wait_converged([gw1, gw2])

    async def traffic():
        survivor = asyncio.create_task(closed_loop_load(gw1.grpc_address, concurrency=12, duration_s=7.0,
                                                        max_tokens=20, prompt_prefix="gw1"))
        # The victim's load ends just after the kill, so its workers do not spin against a closed port.
        victim = asyncio.create_task(closed_loop_load(gw2.grpc_address, concurrency=12, duration_s=2.6,
                                                      max_tokens=20, prompt_prefix="gw2", timeout_s=10.0))
        await asyncio.sleep(2.5)
        cluster.kill(gw2)
        return await survivor, await victim

    survivor, victim = asyncio.run(traffic())
    print("survivor:", survivor.summary(), "victim:", victim.summary())
    assert survivor.failed == [] and survivor.with_problems == [], survivor.summary()
    assert len(survivor.outcomes) >= 100
    assert set(victim.by_code()) <= {"OK", "UNAVAILABLE"}, victim.by_code()
    assert victim.by_code().get("UNAVAILABLE", 0) >= 1, "the kill must have cut streams in flight"
    assert victim.with_problems == []  # what it did deliver before dying was exact

    # Restart (same id, fresh ports) and time how long after READY it knows every replica as it really is: alive,
    # at its real gRPC address and incarnation -- a bare stub learned from a replica's PING (address derived by
    # the port convention, incarnation 0) would list the replica alive yet route to a port nobody serves.
    restarted, ready_at = restart_gateway(cluster, "gateway-2", extra=["--http-port", "0"])
    truth = {name: cluster.nodes[name].grpc_address for name in REPLICAS}
    while True:
        seen = cluster.members(restarted)
        if all(r in seen and seen[r].state == "alive" and seen[r].grpc_address == truth[r]
               and seen[r].incarnation > 0 for r in REPLICAS):
            break
        assert time.monotonic() - ready_at < 10.0, {k: (m.state, m.grpc_address) for k, m in seen.items()}
        time.sleep(0.01)
    learned_s = time.monotonic() - ready_at
    print(f"restarted gateway knew all replicas {learned_s * 1000:.0f} ms after READY")
    # The promise: routes correctly within 2 protocol periods of joining. (Before finding 9 was fixed the
    # seeds ignored the restarted node's join SYNC as an already-answered session: 0.4-1.8 s.)
    assert learned_s <= 2 * PERIOD_S
    after = asyncio.run(closed_loop_load(restarted.grpc_address, concurrency=12, duration_s=2.0, max_tokens=20,
                                         prompt_prefix="gw2-again"))
    assert after.failed == [] and after.with_problems == [], after.summary()
    # Routed to every replica: none is known only as a stub at a wrong address (H11's "replica-1 got none of ~60").
    used = {r for o in after.ok for r in o.replicas}
    assert used == set(REPLICAS), used


def test_a_node_restarted_under_the_same_name_serves_when_start_returns(tmp_path):
    """The harness waits for the new life's READY, not the previous life's line in the appended log."""
    with Cluster(tmp_path, gossip_config="lan") as c:
        first = c.start_replica("replica-1")
        c.kill(first)
        again = c.start_replica("replica-1")
        assert c.replica_status(again, timeout=1.0).replica_id == "replica-1"  # no retry: it already serves
        assert again.ready_at is not None and again.ready_at > first.ready_at
