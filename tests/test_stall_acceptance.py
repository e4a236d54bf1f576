"""Issue 14 part 2 acceptance on real processes (gateway + simulated replicas, loopback): a stall is caught in under
a second, and healthy-but-unusual replicas raise no false alarm. Full-size runs (60 s each): `python -m llmgw bench
stalls`; figures in docs/reliability.md."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from stall_helpers import BEHAVIOURS, GATEWAY_ARGS, frozen_replica_run, start, steady_run

from harness import Cluster

pytestmark = pytest.mark.slow


def test_a_replica_frozen_3_s_under_30_streams_costs_clients_under_a_second_and_nothing_else(tmp_path):
    with Cluster(tmp_path, gossip_config="lan") as cluster:
        setup = start(cluster, {"replica-1": [], "replica-2": [], "replica-3": []})
        figures = asyncio.run(frozen_replica_run(setup, streams=30, max_tokens=50, before_s=3.0, pause_s=3.0,
                                                 after_s=2.0))
        shown = subprocess.run([sys.executable, "-m", "llmgw", "status", "--target", setup.gateway.grpc_address],
                               capture_output=True, text=True, timeout=30)
    print("frozen replica:", figures)
    assert figures["paused_s"] >= 3.0
    assert figures["requests"] >= 100 and figures["failed"] == 0, figures["failures"]
    assert figures["inexact"] == 0  # every stream token by token: indices, texts, one final
    # The streams on the frozen replica moved, each within one learnt deadline (issue target: <= 1.0 s; the
    # deadline is ~200 ms and a continuation's first token ~20-60 ms, so this has room for a loaded host).
    assert figures["frozen_streams"] >= 5 and figures["moved"] >= 5, figures
    assert figures["gap_max_ms"] <= 1000.0, figures
    assert figures["suspicions"] >= 5 and figures["races"].get("continuation_won", 0) >= 5, figures
    # The deadlines had been learnt before the freeze: far below the 5 s timeout.
    assert all(d < 1.0 for d in figures["deadlines_before"].values()), figures["deadlines_before"]
    # GetStatus and /metrics agree, and `llmgw status` shows each replica's deadlines and the counts.
    assert figures["status_stall_failovers"] == figures["stall_failovers"] > 0
    assert figures["status_stall_suspicions"] == figures["suspicions"]
    assert set(figures["status_deadlines"]) == {"replica-1", "replica-2", "replica-3"}
    assert shown.returncode == 0, shown.stderr
    section = shown.stdout.split("adaptive stall deadlines", 1)[1].splitlines()
    assert f"stall failovers {int(figures['stall_failovers'])}" in section[0]
    assert [line.split()[0] for line in section[2:5]] == ["replica-1", "replica-2", "replica-3"]
    # The others kept their learnt deadlines; the frozen one may have been declared DEAD by gossip and, back,
    # starts afresh at the ceiling -- stale evidence is not trusted.
    assert all(d < 1.0 for rid, d in figures["status_deadlines"].items() if rid != figures["frozen"]), figures


@pytest.mark.parametrize("kind", sorted(BEHAVIOURS))
def test_jittery_slow_and_pausing_replicas_raise_no_false_alarm(tmp_path, kind):
    """The unusual replica beside one healthy replica, 30 streams for 12 s (the benchmark runs 60 s each)."""
    with Cluster(tmp_path, gossip_config="local") as cluster:
        setup = start(cluster, {f"replica-{kind}": BEHAVIOURS[kind], "replica-healthy": []},
                      gateway_args=GATEWAY_ARGS.get(kind, ()))
        figures = asyncio.run(steady_run(setup, streams=30, max_tokens=10 if kind == "slow" else 30,
                                         duration_s=12.0, prefix=kind))
    print(kind, figures)
    assert figures["requests"] >= 30 and figures["failed"] == 0 and figures["inexact"] == 0, figures
    assert figures["suspicions"] == 0 and figures["stall_failovers"] == 0, figures
    assert figures["failovers"] == 0, figures
    # The unusual replica served its share, and its deadline was learnt (below the 5 s ceiling).
    assert figures["served_by"].get(f"replica-{kind}", 0) >= 15, figures
    deadlines = figures["inter_token_deadline_s"]
    assert deadlines[f"replica-{kind}"] < 5.0, figures
    if kind == "slow":  # a 10x slower replica gets a longer deadline than the fast one: slow is not punished
        assert deadlines["replica-slow"] > deadlines["replica-healthy"], deadlines
