"""`python -m llmgw simulate`: run the SWIM core on a simulated cluster and report detection/dissemination."""

from __future__ import annotations

import argparse

HELP = "simulate a gossip cluster (detection latency, false DEAD, dissemination, bytes per node)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--loss", type=float, default=0.0, help="i.i.d. datagram loss probability (0..1)")
    parser.add_argument("--duration", type=float, default=120.0, help="simulated seconds after the warm-up")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--crash", type=int, default=0, metavar="M", help="crash (and later restart) M nodes")
    parser.add_argument("--stall", type=int, default=0, metavar="K",
                        help="K nodes stall --stall-min..--stall-max s every --stall-every s")
    parser.add_argument("--stall-every", type=float, default=10.0)
    parser.add_argument("--stall-min", type=float, default=1.0)
    parser.add_argument("--stall-max", type=float, default=2.0)
    parser.add_argument("--updates", type=int, default=5, help="metadata updates to time (dissemination)")
    parser.add_argument("--mass-restart", type=float, default=0.0, metavar="FRACTION")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--delay", type=float, default=0.001, help="one-way link delay, s")
    parser.add_argument("--jitter", type=float, default=0.001, help="uniform extra delay, s")
    parser.add_argument("--preset", choices=("lan", "local", "wan"), default="lan")
    g = parser.add_argument_group("gossip settings (override the preset)")
    g.add_argument("--period", type=float, help="protocol period, s")
    g.add_argument("--probe-timeout", type=float)
    g.add_argument("--indirect", type=int, help="k relays for indirect probes")
    g.add_argument("--suspicion-mult", type=float)
    g.add_argument("--retransmit-mult", type=int, help="lambda")
    g.add_argument("--gossip-interval", type=float)
    g.add_argument("--gossip-fanout", type=int)
    g.add_argument("--probe-schedule", choices=("ring", "shuffle"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", metavar="FILE.png", help="draw dissemination curve and detection latencies")


def _config(args):
    from llmgw.gossip.config import GossipConfig

    overrides = {k: v for k, v in {
        "protocol_period": args.period, "probe_timeout": args.probe_timeout, "indirect_probes": args.indirect,
        "suspicion_mult": args.suspicion_mult, "retransmit_mult": args.retransmit_mult,
        "gossip_interval": args.gossip_interval, "gossip_fanout": args.gossip_fanout,
        "probe_schedule": args.probe_schedule,
    }.items() if v is not None}
    return GossipConfig.preset(args.preset, **overrides)


def _fmt(v, unit="s"):
    return "-" if v is None else f"{v:.3f} {unit}"


def run(args) -> int:
    import json
    import sys

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("error: --plot needs matplotlib (pip install 'llmgw[plot]')", file=sys.stderr)
            return 2
    try:
        config = _config(args)
        if args.nodes < 1 or args.duration <= 0 or not 0 <= args.loss < 1:
            raise ValueError("need --nodes >= 1, --duration > 0 and 0 <= --loss < 1")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from llmgw.gossip.simulator import run_scenario

    r = run_scenario(args.nodes, loss=args.loss, duration=args.duration, seed=args.seed, crashes=args.crash,
                     updates=args.updates, stalls=args.stall, stall_every=args.stall_every,
                     stall_min=args.stall_min, stall_max=args.stall_max, mass_restart=args.mass_restart,
                     config=config, delay=args.delay, jitter=args.jitter, warmup=args.warmup)
    s = r.summary()
    if args.json:
        print(json.dumps(s, sort_keys=True))
    else:
        p = config.protocol_period
        print(f"nodes {r.nodes}  loss {r.loss:.1%}  simulated {r.duration:.0f} s (+{args.warmup:.0f} s warm-up)  "
              f"seed {r.seed}  wall {r.wall_seconds:.1f} s")
        print(f"crashes {r.crashes} (undetected {r.undetected_crashes})")
        fs50 = s["first_suspicion_p50_s"]
        print(f"  first suspicion     p50 {_fmt(fs50)}"
              + (f" ({fs50 / p:.2f} periods)" if fs50 is not None else "")
              + f"  p99 {_fmt(s['first_suspicion_p99_s'])}")
        print(f"  DEAD everywhere     p50 {_fmt(s['dead_everywhere_p50_s'])}  p99 {_fmt(s['dead_everywhere_p99_s'])}")
        print(f"false DEAD {r.false_dead} events / {r.false_dead_members} members over {r.node_hours:.1f} "
              f"node-hours; suspicion events about live nodes {r.false_suspicions}")
        print(f"dissemination to all  p50 {_fmt(s['dissemination_p50_s'])}  p99 {_fmt(s['dissemination_p99_s'])}"
              f"  ({len(r.dissemination)} updates, {r.undisseminated} incomplete)")
        print(f"bytes/node/s  steady {r.steady_bytes_per_node_s:.0f} (anti-entropy {r.push_pull_bytes_per_node_s:.0f})"
              f"  during faults {r.bytes_per_node_s:.0f}")
        print(f"converged {r.converged}" + (f"  e.g. {r.stuck[0]}" if r.stuck else ""))
    if args.plot:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        if r.dissemination_curve:
            xs, ys = zip(*r.dissemination_curve, strict=True)
            ax1.step(xs, ys, where="post")
        ax1.set_xlabel("seconds after the update")
        ax1.set_ylabel("fraction of (update, node) pairs reached")
        ax1.set_title("dissemination")
        if r.first_suspicion or r.dead_everywhere:
            ax2.hist([r.first_suspicion, r.dead_everywhere], bins=20, label=["first suspicion", "DEAD everywhere"])
            ax2.legend()
        ax2.set_xlabel("seconds after crash")
        ax2.set_title("detection latency")
        fig.suptitle(f"N={r.nodes} loss={r.loss:.0%} seed={r.seed}")
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
