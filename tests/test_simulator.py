"""Acceptance tests of the SWIM implementation in the deterministic simulator (the real core, simulated network).

Sizes: everything runs at the sizes the acceptance criteria name (the soak is the full 100 node-hours: 64 nodes
for ~94 simulated minutes, ~20 s of CPU); `python -m llmgw bench gossip` prints the same measurements as a table.
"""

from __future__ import annotations

import json

import pytest

from llmgw.gossip.config import GossipConfig
from llmgw.gossip.simulator import Simulator, percentile, run_scenario

LAN = GossipConfig.lan()


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 99) == 99


@pytest.mark.parametrize("loss,dead_p99_limit", [(0.0, 5.0), (0.05, 8.0)])
def test_n64_crash_detection_latency(loss, dead_p99_limit):
    r = run_scenario(64, loss=loss, duration=12 * 14 + 15, crashes=12, seed=11, crash_spacing=14.0)
    assert r.crashes == 12 and r.undetected_crashes == 0
    assert len(r.first_suspicion) == 12
    assert percentile(r.first_suspicion, 50) <= 2 * LAN.protocol_period
    assert percentile(r.dead_everywhere, 99) <= dead_p99_limit
    assert r.false_dead == 0
    assert r.converged, r.stuck


@pytest.mark.slow  # ~10 s of CPU: left out of `make test-fast`
def test_no_false_dead_at_5_percent_loss_soak():
    r = run_scenario(64, loss=0.05, duration=100 * 3600 / 64, seed=5)
    assert r.node_hours >= 100
    assert r.false_suspicions > 0  # the loss is real: suspicions happen, and are all refuted
    assert r.false_dead == 0
    assert r.converged, r.stuck


def test_a_stalling_node_causes_no_false_dead():
    r = run_scenario(64, duration=150, stalls=1, stall_every=10.0, stall_min=1.0, stall_max=2.0, seed=3)
    assert r.false_suspicions > 0  # the stalls are long enough to be suspected
    assert r.false_dead == 0
    assert r.converged, r.stuck


@pytest.mark.parametrize("nodes,loss,limit", [(30, 0.0, 1.5), (30, 0.05, 1.5)])
def test_dissemination_small_cluster(nodes, loss, limit):
    r = run_scenario(nodes, loss=loss, duration=40, updates=8, seed=2, update_spacing=3.0)
    assert len(r.dissemination) == 8 and r.undisseminated == 0
    assert max(r.dissemination) <= limit
    assert r.steady_bytes_per_node_s <= 2048


def _time_to_all(sim: Simulator, source: int, tag: str, log: dict, horizon: float = 3.0) -> float | None:
    """Change source's model_version to tag; seconds until every other running node has seen it."""
    t0 = sim.now
    log[tag] = {}
    sim.set_meta(source, model_version=tag)
    sim.run_until(t0 + horizon)
    others = set(sim.running()) - {source}
    seen = log[tag]
    if not others <= set(seen):
        return None
    return max(seen[i] for i in others) - t0


@pytest.mark.slow  # ~5 s of CPU: left out of `make test-fast`
def test_dissemination_and_traffic_at_1000_nodes():
    """One 1,000-node cluster (bootstrapping it is the expensive part): traffic, then updates at 0% and 5% loss."""
    cfg = GossipConfig.lan()
    assert cfg.gossip_interval == 0.2 and cfg.gossip_fanout == 3
    log: dict[str, dict[int, float]] = {}

    def on_event(t, observer, kind, row):
        seen = log.get(row[6])
        if seen is not None and observer not in seen:
            seen[observer] = t

    sim = Simulator(1000, config=cfg, seed=4, on_event=on_event)
    sim.run_until(3.0)
    b0 = sim.bytes_out() - sim.sync_bytes_out()
    sim.run_until(6.0)
    steady_1000 = (sim.bytes_out() - sim.sync_bytes_out() - b0) / 1000 / 3.0 + sim.push_pull_bytes_per_node_s()
    times = [_time_to_all(sim, src, f"v-quiet-{src}", log) for src in (17, 523)]
    sim.loss = 0.05
    times += [_time_to_all(sim, src, f"v-lossy-{src}", log) for src in (99, 801)]
    assert None not in times, times
    assert max(times) <= 2.5, times
    small = run_scenario(32, loss=0.0, duration=3, warmup=3, steady_window=3, seed=4, config=cfg)
    # steady state: <= 2 KB/s per node and flat in N (within a factor of 2 from 32 to 1,000 nodes)
    assert steady_1000 <= 2048 and small.steady_bytes_per_node_s <= 2048
    ratio = steady_1000 / small.steady_bytes_per_node_s
    assert 0.5 <= ratio <= 2.0, (steady_1000, small.steady_bytes_per_node_s)


def test_mass_restart_of_half_a_128_node_cluster_converges():
    r = run_scenario(128, duration=40, mass_restart=0.5, seed=6)
    assert r.converged, r.stuck


def test_partition_then_heal_reconverges():
    events = []
    sim = Simulator(16, seed=8, on_event=lambda t, obs, kind, row: events.append((t, obs, kind, row[0])))
    sim.run_until(5)
    sim.partition([range(8), range(8, 16)])
    sim.run_until(25)
    # Each side declared the other side dead.
    assert sim.nodes[0].core.member("node-12")[4] in ("dead",) or sim.nodes[0].core.member("node-12") is None
    sim.heal()
    sim.run_until(25 + 3 * LAN.reconnect_interval)
    for i in range(16):
        rows = {r[0]: r[4] for r in sim.nodes[i].core.members()}
        live = {f"node-{j}" for j in range(16) if j != i}
        # healed through the periodic reconnect attempt to DEAD members (no seeds in this simulation)
        assert all(rows.get(m) == "alive" for m in live), (i, rows)


def test_simulator_is_deterministic():
    a = run_scenario(20, duration=20, crashes=1, updates=2, seed=9, crash_spacing=12.0).summary()
    b = run_scenario(20, duration=20, crashes=1, updates=2, seed=9, crash_spacing=12.0).summary()
    a.pop("wall_seconds"), b.pop("wall_seconds")
    assert a == b


def test_simulator_rejects_bad_arguments():
    with pytest.raises(ValueError):
        Simulator(0)
    with pytest.raises(ValueError):
        Simulator(4, loss=1.5)
    with pytest.raises(ValueError):
        Simulator(4, bootstrap="telepathy")


def test_cli_simulate_json(capsys):
    from llmgw.__main__ import main

    rc = main(["simulate", "--nodes", "16", "--duration", "30", "--crash", "1", "--seed", "3", "--json",
               "--warmup", "5"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nodes"] == 16 and out["crashes"] == 1 and out["false_dead"] == 0
    assert out["dead_everywhere_p50_s"] is not None


def test_cli_simulate_plot_without_matplotlib_is_a_clear_error(capsys, tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from llmgw.__main__ import main

        rc = main(["simulate", "--nodes", "8", "--duration", "5", "--warmup", "2", "--plot",
                   str(tmp_path / "x.png")])
        assert rc == 2
        assert "matplotlib" in capsys.readouterr().err
    else:
        from llmgw.__main__ import main

        rc = main(["simulate", "--nodes", "8", "--duration", "10", "--warmup", "2", "--updates", "2",
                   "--crash", "1", "--plot", str(tmp_path / "x.png")])
        assert rc == 0 and (tmp_path / "x.png").stat().st_size > 0
