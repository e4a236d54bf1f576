"""Resilience benchmarks (issue 5): hedged vs unhedged TTFT with one slow replica among three, the extra load
hedging costs, and a rolling update of 5 replicas under load.

    python -m llmgw bench resilience           # or: python benchmarks/run_resilience.py [--quick] [--json out.json]

Replicas and gateways are subprocesses (tests/harness.py; llmgw.cluster.LocalCluster for the rolling update, whose
gateway restarts replicas through the cluster's control socket). The load runs in this process on grpc.aio.
Numbers are from one run on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)


def _pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100.0 * (len(values) - 1))))]


async def _serial(target: str, prompts: list[str], tokens: int, *, hedge: bool = False, direct: bool = False):
    import grpc

    from llmgw import client

    ttfts, errors = [], 0
    async with grpc.aio.insecure_channel(target) as ch:
        for prompt in prompts:
            stream = (client.stream_generate(ch, prompt, tokens, timeout_s=30) if direct
                      else client.stream_infer(ch, prompt, tokens, hedge=hedge, timeout_s=30))
            res = await client.collect(stream)
            if res.ok and len(res.tokens) == tokens:
                ttfts.append(res.ttft_s * 1000)
            else:
                errors += 1
    return ttfts, errors


def hedging(quick: bool) -> list[dict]:
    """TTFT p50/p99 through a gateway in front of 2 fast replicas (20 ms/token) and 1 slow one (300 ms prefill
    stall, 200 ms/token), without hedging, with hedge=true on every request, and with policy hedging."""
    from harness import Cluster
    from llmgw._proto import llmgateway_pb2 as pb
    from llmgw._proto import llmgateway_pb2_grpc as pb_grpc

    n = 30 if quick else 150
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmgw-bench-res-") as tmp, Cluster(tmp, log_level="WARNING") as c:
        fast = [c.start_replica(f"replica-{i}", token_delay_ms=20) for i in (1, 2)]
        slow = c.start_replica("replica-slow", token_delay_ms=200, extra=["--stall-before-first-ms", "300"])
        c.wait_converged(fast + [slow])
        ttfts, _ = asyncio.run(_serial(fast[0].grpc_address, [f"d{i}" for i in range(n)], 4, direct=True))
        rows.append({"scenario": "direct to a fast replica", "requests": n, "ttft_p50_ms": _pct(ttfts, 50),
                     "ttft_p99_ms": _pct(ttfts, 99), "errors": 0, "hedges_per_request": 0.0})
        # --no-breaker except in the last row: the breaker ejects the slow replica and would hide what hedging
        # alone does; the last row is the default setup (breaker on) with policy hedging.
        off = ["--no-breaker"]
        modes = [("unhedged", off, False), ("hedge=true on every request", off, True),
                 ("policy hedging, delay 50 ms", off + ["--hedge-delay-ms", "50"], False),
                 ("policy hedging, adaptive p95", off + ["--hedge-adaptive", "--hedge-delay-ms", "50"], False),
                 ("policy hedging 50 ms + breaker", ["--hedge-delay-ms", "50"], False)]
        for name, flags, explicit in modes:
            gw = c.start_gateway(f"gateway-{len(rows)}", extra=flags)
            c.wait_converged([gw], {r.name: "alive" for r in fast + [slow]})
            ttfts, errors = asyncio.run(_serial(gw.grpc_address, [f"{name}-{i}" for i in range(n)], 4,
                                                hedge=explicit))
            status = pb_grpc.GatewayAdminStub(c.channel(gw)).GetStatus(pb.GatewayStatusRequest(), timeout=5)
            rows.append({"scenario": f"gateway, {name}", "requests": n, "ttft_p50_ms": _pct(ttfts, 50),
                         "ttft_p99_ms": _pct(ttfts, 99), "errors": errors,
                         "hedges_per_request": status.hedges_started / n,
                         "hedges_won": status.hedges_won, "hedges_denied": status.hedges_denied})
            c.stop(gw)
    return rows


def rolling_update(quick: bool) -> dict:
    """5 replicas (10 ms/token) behind the cluster's gateway, 4 clients in a loop; update v1 -> v2 over gRPC."""
    import grpc

    from llmgw import client
    from llmgw._proto import llmgateway_pb2 as pb
    from llmgw._proto import llmgateway_pb2_grpc as pb_grpc
    from llmgw.cluster import ClusterConfig, LocalCluster

    before_s = 2.0 if quick else 5.0

    async def main():
        with tempfile.TemporaryDirectory(prefix="llmgw-ru-") as tmp:
            cluster = LocalCluster(ClusterConfig(replicas=5, token_delay_ms=10, max_capacity=16, http_port=0,
                                                 log_dir=tmp, restart=False))
            await cluster.start()
            try:
                samples: list[tuple[float, float | None]] = []  # (start time, ttft or None on error)
                stop = asyncio.Event()
                async with grpc.aio.insecure_channel(cluster.grpc_address) as ch:
                    async def worker(w):
                        i = 0
                        while not stop.is_set():
                            t = time.monotonic()
                            res = await client.collect(client.stream_infer(ch, f"ru-{w}-{i}", 8, timeout_s=30))
                            samples.append((t, res.ttft_s if res.ok and len(res.tokens) == 8 else None))
                            i += 1

                    workers = [asyncio.create_task(worker(w)) for w in range(4)]
                    await asyncio.sleep(before_s)
                    t0 = time.monotonic()
                    events = [ev async for ev in pb_grpc.GatewayAdminStub(ch).StartRollout(
                        pb.RolloutRequest(version="v2"), timeout=300)]
                    t1 = time.monotonic()
                    stop.set()
                    await asyncio.wait_for(asyncio.gather(*workers), 60)
                before = [s for t, s in samples if t < t0]
                during = [s for t, s in samples if t0 <= t <= t1]
                return {"replicas": 5, "state": events[-1].state if events else "none",
                        "duration_s": t1 - t0, "requests_during": len(during),
                        "client_errors": sum(1 for _, s in samples if s is None),
                        "ttft_p99_before_ms": _pct([s * 1000 for s in before if s is not None], 99),
                        "ttft_p99_during_ms": _pct([s * 1000 for s in during if s is not None], 99),
                        "ttft_p50_during_ms": _pct([s * 1000 for s in during if s is not None], 50)}
            finally:
                await cluster.stop()

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="run_resilience", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke test, not figures)")
    ap.add_argument("--only", choices=("hedging", "rollout"), default=None)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    out: dict = {}
    if args.only in (None, "hedging"):
        out["hedging"] = hedging(args.quick)
        print(f"{'scenario':46} {'req':>5} {'TTFT p50':>9} {'TTFT p99':>9} {'errors':>6} {'hedges/req':>10}")
        for r in out["hedging"]:
            print(f"{r['scenario']:46} {r['requests']:5d} {r['ttft_p50_ms']:8.1f}m {r['ttft_p99_ms']:8.1f}m "
                  f"{r['errors']:6d} {r['hedges_per_request']:10.2f}")
    if args.only in (None, "rollout"):
        r = out["rollout"] = rolling_update(args.quick)
        print(f"rolling update of {r['replicas']} replicas under load: {r['state']} in {r['duration_s']:.1f} s, "
              f"{r['requests_during']} requests during it, client errors {r['client_errors']}, TTFT p99 before "
              f"{r['ttft_p99_before_ms']:.1f} ms / during {r['ttft_p99_during_ms']:.1f} ms "
              f"(p50 during {r['ttft_p50_during_ms']:.1f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
