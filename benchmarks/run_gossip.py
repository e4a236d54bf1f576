"""Gossip benchmarks (issue 3), from the deterministic simulator: detection latency, false positives,
dissemination time vs N, bytes per node per second.

    python -m llmgw bench gossip [--quick | --full] [--json out.json]
    python benchmarks/run_gossip.py ...

Default: N = 64 detection at 0% and 5% loss (20 crashes each), a 25 node-hour false-DEAD soak at 5% loss, a
stalling node, dissemination at N = 30, 128, 1,000, and a 128-node mass restart. --full makes the soak the
acceptance's 100 node-hours; --quick shrinks everything for a smoke run. Figures are simulated (the real core
on a simulated clock and network: 1 ms +- 1 ms links), so they do not depend on this machine's load; only the
"wall" column does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _f(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def scenarios(quick: bool, full: bool) -> list[tuple[str, dict]]:
    soak_hours = 4 if quick else (100 if full else 25)
    crashes = 4 if quick else 20
    out = [
        ("detect N=64 loss 0%", dict(nodes=64, loss=0.0, crashes=crashes, duration=crashes * 14 + 15,
                                     crash_spacing=14.0, seed=1)),
        ("detect N=64 loss 5%", dict(nodes=64, loss=0.05, crashes=crashes, duration=crashes * 14 + 15,
                                     crash_spacing=14.0, seed=2)),
        (f"soak N=64 loss 5% {soak_hours} node-h", dict(nodes=64, loss=0.05, duration=soak_hours * 3600 / 64,
                                                        seed=3)),
        ("stall 1-2s/10s N=64", dict(nodes=64, stalls=1, duration=60 if quick else 300, seed=4)),
        ("disseminate N=30 loss 0%", dict(nodes=30, updates=8, duration=40, seed=5)),
        ("disseminate N=30 loss 5%", dict(nodes=30, loss=0.05, updates=8, duration=40, seed=5)),
        ("disseminate N=128 loss 5%", dict(nodes=128, loss=0.05, updates=8, duration=40, seed=6)),
    ]
    if not quick:
        out += [
            ("disseminate N=1000 loss 0%", dict(nodes=1000, updates=4, duration=10, warmup=4, steady_window=4,
                                                update_spacing=1.5, seed=7)),
            ("disseminate N=1000 loss 5%", dict(nodes=1000, loss=0.05, updates=4, duration=10, warmup=4,
                                                steady_window=4, update_spacing=1.5, seed=7)),
        ]
    out.append(("mass restart 64/128", dict(nodes=128, mass_restart=0.5, duration=40, seed=8)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="run_gossip", description="gossip simulator benchmarks")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--full", action="store_true", help="100 node-hour soak (the acceptance size)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    from llmgw.gossip.simulator import run_scenario

    header = (f"{'scenario':32} {'1st susp p50/p99 s':>19} {'DEAD all p50/p99 s':>19} {'false DEAD':>10} "
              f"{'diss p50/max s':>15} {'B/node/s':>9} {'conv':>5} {'wall s':>7}")
    print(header)
    print("-" * len(header))
    results = {}
    for name, kw in scenarios(args.quick, args.full):
        r = run_scenario(**kw)
        s = r.summary()
        results[name] = s
        susp = f"{_f(s['first_suspicion_p50_s'])}/{_f(s['first_suspicion_p99_s'])}"
        dead = f"{_f(s['dead_everywhere_p50_s'])}/{_f(s['dead_everywhere_p99_s'])}"
        diss = f"{_f(s['dissemination_p50_s'])}/{_f(s['dissemination_max_s'])}"
        false_dead = f"{r.false_dead}/{r.node_hours:.0f}h"
        print(f"{name:32} {susp:>19} {dead:>19} {false_dead:>10} {diss:>15} "
              f"{r.steady_bytes_per_node_s:>9.0f} {r.converged!s:>5} {r.wall_seconds:>7.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
