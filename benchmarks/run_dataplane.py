"""Data-plane benchmarks (issue 4): gateway vs direct TTFT, relay ceiling, 256 and 1,000 concurrent streams,
routing policies on a shared-prefix workload.

    python -m llmgw bench dataplane            # or: python benchmarks/run_dataplane.py [--quick] [--json out.json]

Every scenario starts its own replicas and gateway as subprocesses (tests/harness.py) and drives them from a
grpc.aio load generator running in a separate process, so the gateway's CPU is not shared with the client's
Python. Prints one table; numbers are from one run on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)


# ---- load generator (runs in its own process) ------------------------------------------------------------
def _percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100.0 * (len(values) - 1))))
    return values[k]


def loadgen(target: str, mode: str, prompts: list[str], max_tokens: int, concurrency: int,
            channels: int = 1, timeout_s: float = 120.0, per_message: int = 0) -> dict:
    """Send len(prompts) requests, at most `concurrency` at once; return latency and throughput figures."""
    import grpc

    from llmgw import client

    async def main():
        chans = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                 for _ in range(channels)]
        ttfts, errors, tokens = [], {}, 0
        queue = list(enumerate(prompts))
        queue.reverse()

        async def worker(w):
            nonlocal tokens
            ch = chans[w % channels]
            while queue:
                _, prompt = queue.pop()
                if mode == "direct":
                    stream = client.stream_generate(ch, prompt, max_tokens, timeout_s=timeout_s,
                                                    max_tokens_per_message=per_message)
                else:
                    stream = client.stream_infer(ch, prompt, max_tokens, timeout_s=timeout_s,
                                                 max_tokens_per_message=per_message)
                res = await client.collect(stream)
                if res.ok:
                    ttfts.append(res.ttft_s)
                    tokens += len(res.tokens)
                else:
                    errors[res.code.name] = errors.get(res.code.name, 0) + 1

        for ch in chans:  # connect before the clock starts
            await asyncio.wait_for(ch.channel_ready(), 10)
        start = time.perf_counter()
        cpu0 = time.process_time()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu0
        for ch in chans:
            await ch.close()
        return {"ttft_p50_ms": _percentile(ttfts, 50) * 1000, "ttft_p99_ms": _percentile(ttfts, 99) * 1000,
                "ttft_mean_ms": (statistics.fmean(ttfts) * 1000) if ttfts else float("nan"),
                "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
                "ok": len(ttfts), "errors": errors, "loadgen_cpu_share": cpu / wall if wall else 0.0}

    from llmgw import eventloop

    return eventloop.run(main())


class LoadGenerator:
    """A separate process (spawned, so it holds no inherited state) that runs `loadgen` calls."""

    def __enter__(self):
        self._pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        self._pool.submit(int, 0).result(timeout=60)  # warm: import cost not in the first measurement
        return self

    def __exit__(self, *exc):
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run(self, *args, timeout: float = 600.0, **kwargs) -> dict:
        return self._pool.submit(loadgen, *args, **kwargs).result(timeout=timeout)


# ---- cluster helpers ---------------------------------------------------------------------------------------
def _cluster(workdir):
    from harness import Cluster

    return Cluster(workdir, gossip_config="local", log_level="WARNING")


def _converge(c, nodes):
    c.wait_converged(nodes, timeout=30)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- scenarios -------------------------------------------------------------------------------------------
class BareRelay:
    """benchmarks/bare_relay.py in its own process: grpc.aio relaying bytes to one replica, nothing of llmgw."""

    def __init__(self, upstream: str) -> None:
        self._proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "bare_relay.py"),
                                       "--upstream", upstream], stdout=subprocess.PIPE, text=True)
        # The relay prints its port once it serves; a thread reads it so the wait can be bounded.
        ready: concurrent.futures.Future = concurrent.futures.Future()
        threading.Thread(target=lambda: ready.set_result(self._proc.stdout.readline()), daemon=True).start()
        try:
            port = ready.result(timeout=30).strip()
        except concurrent.futures.TimeoutError:
            port = ""
        if not port.isdigit():
            self.close()
            raise RuntimeError("bare relay did not start within 30 s")
        self.address = f"127.0.0.1:{port}"
        self.pid = self._proc.pid

    def close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)


def _median_ttfts(runs: dict[str, list[dict]]) -> dict:
    """path -> the median over its rounds of each round's TTFT p50 and p99."""
    return {name: {key: statistics.median(run[key] for run in rs) for key in ("ttft_p50_ms", "ttft_p99_ms")}
            for name, rs in runs.items()}


def scenario_ttft(lg, workdir, n, rounds=3):
    """One stream at a time, 1 token: time to first token direct, through a bare grpc.aio relay (the floor
    grpc.aio itself sets) and through the gateway. The three paths alternate in `rounds` rounds so a noisy
    stretch of the machine hits all of them; each figure is the median of the rounds' percentiles."""
    with _cluster(workdir / "ttft") as c:
        r = c.start_replica("replica-1", token_delay_ms=10, max_capacity=64, extra=["--prefill-ms-per-kchar", "0"])
        gw = c.start_gateway("gateway-1")
        _converge(c, [gw, r])
        bare = BareRelay(r.grpc_address)
        try:
            paths = {"direct": (r.grpc_address, "direct"), "bare_relay": (bare.address, "direct"),
                     "gateway": (gw.grpc_address, "infer")}
            prompts = [f"ttft probe {i}" for i in range(n)]
            for target, mode in paths.values():  # warm every path
                lg.run(target, mode, prompts[:20], 1, 1)
            runs = {name: [] for name in paths}
            per_round = max(20, n // rounds)
            for k in range(rounds):
                for name, (target, mode) in paths.items():
                    runs[name].append(lg.run(target, mode, prompts[k * per_round:(k + 1) * per_round], 1, 1))
        finally:
            bare.close()
    out = _median_ttfts(runs)
    out["rounds"] = rounds
    out["added_p50_ms"] = out["gateway"]["ttft_p50_ms"] - out["direct"]["ttft_p50_ms"]
    out["added_p99_ms"] = out["gateway"]["ttft_p99_ms"] - out["direct"]["ttft_p99_ms"]
    out["bare_added_p50_ms"] = out["bare_relay"]["ttft_p50_ms"] - out["direct"]["ttft_p50_ms"]
    return out


def scenario_relay(lg, workdir, rounds, repeats=3, otel=False):
    """16 streams x 200 tokens at 0 ms/token: how many tokens/s the gateway relays compared with a client
    talking to the replica directly (one token per message to the client in both cases). Direct and gateway runs
    alternate `repeats` times and the ratio is the median of the per-pair ratios, so one noisy stretch of a shared
    machine cannot decide it. `otel`: the gateway traces every request, exporting over OTLP to a local sink."""
    from benchmarks.otlp_sink import traced_gateways

    out = {}
    for label, upstream in (("batched", "64"), ("per_token", "1")):
        with _cluster(workdir / f"relay-{label}{'-otel' if otel else ''}") as c, traced_gateways(otel) as sink:
            r = c.start_replica("replica-1", token_delay_ms=0, max_capacity=64,
                                extra=["--prefill-ms-per-kchar", "0"])
            gw = c.start_gateway("gateway-1", extra=["--upstream-batch", upstream])
            _converge(c, [gw, r])
            prompts = [f"relay {i}" for i in range(16 * rounds)]
            lg.run(gw.grpc_address, "infer", prompts[:16], 50, 16)
            pairs = []
            for _ in range(repeats):
                direct = lg.run(r.grpc_address, "direct", prompts, 200, 16)
                gw_cpu0 = cpu_seconds(gw.pid)
                via = lg.run(gw.grpc_address, "infer", prompts, 200, 16)
                gw_cpu = cpu_seconds(gw.pid) - gw_cpu0
                pairs.append((via["tokens_per_s"] / direct["tokens_per_s"], direct, via, gw_cpu))
            c.stop(gw)  # flushes the spans still batched
            exported = sink.requests if sink is not None else 0
        pairs.sort(key=lambda pair: pair[0])
        ratio, direct, via, gw_cpu = pairs[len(pairs) // 2]
        out[label] = {"direct": direct, "gateway": via, "ratio": ratio, "ratios": [pair[0] for pair in pairs],
                      "gateway_cpu_us_per_token": gw_cpu / max(1, via["tokens"]) * 1e6,
                      "gateway_cpu_share": gw_cpu / via["wall_s"], "otel": otel, "otlp_exports": exported}
    return out


def scenario_streams(lg, workdir, streams, tokens, delay_ms, replicas, name, per_message):
    """`streams` concurrent streams, all started at once. Runs, in this order: direct to one replica, through the
    gateway (replica sessions, the default), through a second gateway started with --no-replica-sessions (one
    Generate call per request, as the reference) and through a bare grpc.aio relay to replica-0 (the floor for any
    relay) -- first with clients reading one token per message, then with clients opting in to coalescing (the
    gateway only)."""
    with _cluster(workdir / name) as c:
        reps = [c.start_replica(f"replica-{i}", token_delay_ms=delay_ms, max_capacity=streams,
                                extra=["--prefill-ms-per-kchar", "0"]) for i in range(replicas)]
        gw = c.start_gateway("gateway-1", extra=["--queue-size", str(streams)])
        calls_gw = c.start_gateway("gateway-2", extra=["--queue-size", str(streams), "--no-replica-sessions"])
        _converge(c, [gw, calls_gw, *reps])
        prompts = [f"{name} stream {i}" for i in range(streams)]
        channels = max(1, streams // 100)
        for g in (gw, calls_gw):  # warm: channels, and the sessions to every replica
            lg.run(g.grpc_address, "infer", prompts[:32], 2, 32)
        out = {}
        for label, pm in (("per_token", 0), ("coalescing", per_message)):
            if streams <= 256:
                out[f"direct_{label}"] = lg.run(reps[0].grpc_address, "direct", prompts, tokens, streams,
                                                channels=channels, per_message=pm)
            targets = [("gateway", gw)] + ([("gateway_calls", calls_gw)] if label == "per_token" else [])
            for kind, g in targets:
                cpu0 = {n.name: cpu_seconds(n.pid) for n in (g, *reps)}
                res = lg.run(g.grpc_address, "infer", prompts, tokens, streams, channels=channels, per_message=pm)
                res["cpu_share"] = {n.name: (cpu_seconds(n.pid) - cpu0[n.name]) / res["wall_s"] for n in (g, *reps)}
                out[f"{kind}_{label}"] = res
        bare = BareRelay(reps[0].grpc_address)
        try:
            out["bare_relay_per_token"] = lg.run(bare.address, "direct", prompts, tokens, streams, channels=channels)
        finally:
            bare.close()
    return out


def scenario_burst(lg, workdir, streams):
    """`streams` one-token requests started at once on a replica with no token delay: the call set-up burst alone,
    with nothing to generate -- the floor under the many-stream TTFT figures."""
    with _cluster(workdir / "burst") as c:
        r = c.start_replica("replica-0", token_delay_ms=0, max_capacity=streams, extra=["--prefill-ms-per-kchar", "0"])
        gw = c.start_gateway("gateway-1", extra=["--queue-size", str(streams)])
        _converge(c, [gw, r])
        prompts = [f"burst {i}" for i in range(streams)]
        channels = max(1, streams // 100)
        lg.run(gw.grpc_address, "infer", prompts[:32], 1, 32)
        runs = {"direct": [], "gateway": []}
        for _ in range(3):
            runs["direct"].append(lg.run(r.grpc_address, "direct", prompts, 1, streams, channels=channels))
            runs["gateway"].append(lg.run(gw.grpc_address, "infer", prompts, 1, streams, channels=channels))
    return _median_ttfts(runs)


def scenario_routing(lg, workdir, requests):
    """Shared-prefix workload: 8 long system prompts, many questions each; compare routing policies."""
    prefixes = [(f"[system prompt {k}] " + "You are a careful assistant. " * 80)[:2048] for k in range(8)]
    prompts = [prefixes[(i * 5) % 8] + f" question {i}?" for i in range(requests)]
    out = {}
    for policy in ("affinity", "least_connections", "random"):
        with _cluster(workdir / f"routing-{policy}") as c:
            # 2,048-char prefix = 32 cache blocks; 128 blocks hold 4 prefixes per replica.
            extra = ["--prefill-ms-per-kchar", "20", "--prefix-cache-size", "128"]
            reps = [c.start_replica(f"replica-{i}", token_delay_ms=5, max_capacity=16, extra=extra)
                    for i in range(4)]
            gw = c.start_gateway("gateway-1", extra=["--routing", policy])
            _converge(c, [gw, *reps])
            before = [c.replica_status(r) for r in reps]
            res = lg.run(gw.grpc_address, "infer", prompts, 2, 8)
            after = [c.replica_status(r) for r in reps]
            hits = sum(a.prefix_cache_hits - b.prefix_cache_hits for a, b in zip(after, before, strict=True))
            lookups = sum(a.prefix_cache_lookups - b.prefix_cache_lookups for a, b in zip(after, before, strict=True))
            served = res["ok"]
            out[policy] = {"hit_rate": hits / lookups if lookups else 0.0, "ttft_mean_ms": res["ttft_mean_ms"],
                           "ttft_p50_ms": res["ttft_p50_ms"], "errors": res["errors"], "served": served}
    return out


# ---- report ------------------------------------------------------------------------------------------------
def _fmt(x, nd=1):
    return "n/a" if x is None or x != x else f"{x:,.{nd}f}"


def report(results: dict) -> str:
    lines = []
    m = results.get("machine")
    if m:
        lines += [(f"{m['cpus']} CPUs; 1-minute load average at start / end of the run: "
                   f"{m['loadavg_1m_at_start']:.1f} / {m['loadavg_1m_at_end']:.1f} "
                   "(anything above the CPU count means the figures include waiting for a CPU)"), ""]
    lines += ["| scenario | via gateway | direct | ratio / target |", "|---|---|---|---|"]
    t = results.get("ttft")
    if t:
        lines.append(f"| TTFT, 10 ms/token, one stream, p50 / p99 (ms), median of {t['rounds']} alternating rounds | "
                     f"{_fmt(t['gateway']['ttft_p50_ms'], 2)} / {_fmt(t['gateway']['ttft_p99_ms'], 2)} | "
                     f"{_fmt(t['direct']['ttft_p50_ms'], 2)} / {_fmt(t['direct']['ttft_p99_ms'], 2)} | "
                     f"added p50 {_fmt(t['added_p50_ms'], 2)} ms (target <= 1 ms) |")
        lines.append(f"| TTFT through a bare grpc.aio relay (benchmarks/bare_relay.py: bytes forwarded, no llmgw "
                     f"code), p50 / p99 (ms) | {_fmt(t['bare_relay']['ttft_p50_ms'], 2)} / "
                     f"{_fmt(t['bare_relay']['ttft_p99_ms'], 2)} | (same direct) | added p50 "
                     f"{_fmt(t['bare_added_p50_ms'], 2)} ms: the floor grpc.aio sets for any relay |")
    for label, r in [*(results.get("relay") or {}).items(), *(results.get("relay_otel") or {}).items()]:
        what = ("replica->gateway batched (default)" if label == "batched"
                else "one message per token on both hops (--upstream-batch 1)")
        if r.get("otel"):
            what += f", tracing on (LLMGW_OTEL=1, {r['otlp_exports']} OTLP exports to a local sink)"
        lines.append(f"| relay ceiling, 0 ms/token, 16 x 200 tokens, {what} (tokens/s) | "
                     f"{_fmt(r['gateway']['tokens_per_s'], 0)} (gateway CPU {_fmt(r['gateway_cpu_us_per_token'])} "
                     f"us/token, {_fmt(r['gateway_cpu_share'] * 100, 0)}% of a core) | "
                     f"{_fmt(r['direct']['tokens_per_s'], 0)} | median {_fmt(r['ratio'], 2)}x of "
                     f"{', '.join(f'{x:.2f}' for x in r['ratios'])} (target >= 0.8x) |")
    for key, title, target in (("streams256", "256 streams x 100 tokens @ 20 ms/token", "target <= 60 / 150 ms"),
                               ("streams1000", ("1,000 streams x {tokens} tokens @ {delay_ms:g} ms/token, one "
                                                "gateway process"), "target 0 errors, p99 <= 1,000 ms")):
        s = results.get(key)
        if not s:
            continue
        for key_label, label in (("gateway_per_token", "per_token"), ("gateway_calls_per_token", "per_token"),
                                 ("gateway_coalescing", "coalescing"), ("bare_relay_per_token", "per_token")):
            g, d = s.get(key_label), s.get(f"direct_{label}")
            if g is None:
                continue
            mode = "client reads one token per message" if label == "per_token" else \
                f"client opts in to coalescing (max {s['per_message']} tokens/message)"
            if key_label == "gateway_calls_per_token":
                mode += ", gateway with --no-replica-sessions (one Generate call per request)"
            if key_label == "bare_relay_per_token":
                mode += ", through a bare grpc.aio relay instead of the gateway (no llmgw code: the floor)"
            direct_txt = (f"{_fmt(d['ttft_p50_ms'])} / {_fmt(d['ttft_p99_ms'])}, errors {sum(d['errors'].values())}"
                          if d else "—")
            cpu = ", ".join(f"{name} {share * 100:.0f}%" for name, share in g.get("cpu_share", {}).items()) or "n/a"
            lines.append(f"| {title.format(**s)}, {mode}: TTFT p50 / p99 (ms) | {_fmt(g['ttft_p50_ms'])} / "
                         f"{_fmt(g['ttft_p99_ms'])}, ok {g['ok']}, errors {sum(g['errors'].values())}, "
                         f"{_fmt(g['tokens_per_s'], 0)} tokens/s; CPU: {cpu}, load generator "
                         f"{g['loadgen_cpu_share'] * 100:.0f}% | {direct_txt} | {target} |")
    b = results.get("burst")
    if b:
        lines.append(f"| 256 one-token requests started at once, 0 ms/token (the call set-up burst alone), TTFT "
                     f"p50 / p99 (ms), median of 3 | {_fmt(b['gateway']['ttft_p50_ms'])} / "
                     f"{_fmt(b['gateway']['ttft_p99_ms'])} | {_fmt(b['direct']['ttft_p50_ms'])} / "
                     f"{_fmt(b['direct']['ttft_p99_ms'])} | floor under the 256-stream target (60 / 150 ms) |")
    rt = results.get("routing")
    if rt:
        lines.append("")
        lines.append("| routing policy (shared-prefix workload) | prefix-cache hit rate | mean TTFT (ms) "
                     "| p50 TTFT (ms) |")
        lines.append("|---|---|---|---|")
        for policy, v in rt.items():
            lines.append(f"| {policy} | {v['hit_rate'] * 100:.0f}% | {_fmt(v['ttft_mean_ms'])} | "
                         f"{_fmt(v['ttft_p50_ms'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench dataplane", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    parser.add_argument("--only", default="", help="comma-separated scenarios: ttft,relay,streams256,burst,"
                                                   "streams1000,routing")
    parser.add_argument("--json", default="", help="also write the raw results to this file")
    parser.add_argument("--otel", choices=("off", "on", "both"), default="off",
                        help="relay scenario with the gateway's request tracing off, on (OTLP to a local sink), or "
                             "both in the same run")
    parser.add_argument("--thousand-delay-ms", type=float, default=100.0)
    parser.add_argument("--thousand-tokens", type=int, default=20)
    parser.add_argument("--per-message", type=int, default=16,
                        help="tokens per message for the coalescing runs of the many-streams scenarios")
    args = parser.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    want = lambda name: not only or name in only  # noqa: E731
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="llmgw-bench-") as tmp, LoadGenerator() as lg:
        workdir = Path(tmp)
        results["machine"] = {"cpus": os.cpu_count(), "loadavg_1m_at_start": os.getloadavg()[0]}
        if want("ttft"):
            results["ttft"] = scenario_ttft(lg, workdir, 100 if args.quick else 400)
        if want("relay"):
            if args.otel in ("off", "both"):
                results["relay"] = scenario_relay(lg, workdir, 1 if args.quick else 4)
            if args.otel in ("on", "both"):
                results["relay_otel"] = scenario_relay(lg, workdir, 1 if args.quick else 4, otel=True)
        if want("streams256"):
            res = scenario_streams(lg, workdir, 256, 100, 20, 1, "s256", args.per_message)
            res.update(tokens=100, delay_ms=20, per_message=args.per_message)
            results["streams256"] = res
        if want("burst"):
            results["burst"] = scenario_burst(lg, workdir, 256)
        if want("streams1000"):
            res = scenario_streams(lg, workdir, 1000, args.thousand_tokens, args.thousand_delay_ms, 2, "s1000",
                                   args.per_message)
            res.update(tokens=args.thousand_tokens, delay_ms=args.thousand_delay_ms, per_message=args.per_message)
            results["streams1000"] = res
        if want("routing"):
            results["routing"] = scenario_routing(lg, workdir, 96 if args.quick else 320)
    results["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
