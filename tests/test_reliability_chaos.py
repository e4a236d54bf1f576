"""Chaos under load (issue 7), reduced: gateway + 5 replicas, closed-loop streams for ~20 s while one random
replica is SIGKILLed and restarted every 4 s. Every request must succeed with every token index exactly once, and
the gateway's RSS and fd count must stay flat. The full-size run (200 streams, 60 s, a kill every 5 s) is
`python -m llmgw bench reliability --suite-args='--only chaos'`."""

from __future__ import annotations

import asyncio

import pytest

from reliability_helpers import Cluster, chaos_under_load

REPLICAS = [f"replica-{i}" for i in range(1, 6)]
REPLICA_ARGS = dict(token_delay_ms=20, max_capacity=64)


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path, gossip_config="local") as c:
        yield c


def test_chaos_kills_under_load_lose_no_request_and_no_token(cluster):
    for name in REPLICAS:
        cluster.start_replica(name, **REPLICA_ARGS)
    gw = cluster.start_gateway("gateway-1", extra=["--http-port", "0"])
    cluster.wait_converged([gw])

    result = asyncio.run(chaos_under_load(cluster, gw, REPLICAS, duration_s=20.0, concurrency=40,
                                          kill_every_s=4.0, max_tokens=20, replica_args=REPLICA_ARGS))
    report, chaos, res = result["report"], result["chaos"], result["resources"]
    summary = report.summary()
    print("chaos:", summary, "kills:", len(chaos.kills), "resources:", res)

    assert len(chaos.kills) >= 4, "the monkey must actually have killed replicas during the run"
    assert len(report.outcomes) >= 500, summary
    assert report.failed == [], [(o.code, o.details) for o in report.failed[:5]]
    assert report.with_problems == [], [o.problems for o in report.with_problems[:5]]
    assert report.tokens_checked() == 20 * len(report.outcomes)
    # Flat: no growth from the first third of the run to the last beyond allocator noise.
    assert res["rss_last_mb"] <= res["rss_first_mb"] * 1.25 + 10, res
    assert res["fds_last"] <= res["fds_first"] + 10, res
    # Failover really happened: some streams were served by more than one replica.
    assert any(len(o.replicas) > 1 for o in report.ok), "no stream was failed over: the kills missed the load"
