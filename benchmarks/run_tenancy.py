"""Tenancy benchmarks (issue 15): fair sharing under overload, cluster-wide limits over gossip, hostile keys,
and the overhead of API keys.

    python -m llmgw bench tenancy          # or: python benchmarks/run_tenancy.py [--quick] [--only NAME] [--json F]

Scenarios:
- fairness: one gateway (in-process) over simulated replicas; tenants send open-loop load by a schedule; served
  requests, share of served and queue waits (time to first token minus the replica's own first-token time) per
  tenant. Rows: the issue's load (A offers 10x B, 2x capacity in total), B at its fair share (B offers half the
  capacity, A 10x that), and weights 3:1 with both tenants backlogged.
- limit: 3 gateways (in-process, each with its own gossip node) + 1 replica, one tenant limited to 600
  requests/min sending 3x that spread over the three: the admitted rate after the first 2 s; then one gateway
  cut off from the other two by a gossip filter (llmgw.gossip.GossipFilter; it keeps the replica): the pair's
  rate and the isolated gateway's. tests/test_tenancy_cluster.py also runs the healthy case as processes.
- hostile: 10,000 distinct unknown keys, oversized and malformed headers against one gateway: answers, and the
  gateway's memory before and after.
- overhead: two gateway processes over the same replica, one with a key file of 10,000 keys and one with none,
  alternated in the same run: tokens/s relay ratio and TTFT.
- bandwidth: gossip bytes/s per gateway of the usage digests with 10 ... 10,000 active tenants.
Numbers are from one run on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[k]


def key_file_text(tenants: dict[str, dict], *, extra_keys: int = 0) -> tuple[str, dict[str, str]]:
    """A key file with one key per tenant (limits/weight from `tenants`) plus `extra_keys` keys of a filler
    tenant; returns (text, {tenant: key})."""
    from llmgw.tenancy.keys import hash_key

    lines: list[str] = []
    keys: dict[str, str] = {}
    for name, settings in tenants.items():
        key = f"sk-llmgw-bench-{name}-0123456789abcdef"
        keys[name] = key
        lines += ["[[key]]", f'sha256 = "{hash_key(key)}"', f'tenant = "{name}"']
        lines += [f"{field} = {value}" for field, value in settings.items()]
        lines.append("")
    for i in range(extra_keys):
        lines += ["[[key]]", f'sha256 = "{hash_key(f"sk-llmgw-filler-{i:08d}-0123456789")}"', 'tenant = "filler"', ""]
    return "\n".join(lines), keys


# ---- fairness (in-process) ---------------------------------------------------------------------------------
async def fairness_run(loads: dict[str, float], weights: dict[str, float], *, duration_s: float = 6.0,
                       warmup_s: float = 1.0, replicas: int = 1, capacity: int = 4, token_delay_ms: float = 20.0,
                       max_tokens: int = 5, queue_size: int = 200) -> dict:
    """`loads`: requests offered per tenant a second, in multiples of the measured capacity (requests/s the
    replicas complete when saturated). Returns per tenant: offered, served (finished within [warmup, duration]),
    refused (queue full), share of served, and queue wait p50/p99 (time to first token minus the replica's own)."""
    from inprocess import ReplicaPool
    from llmgw.gateway import Gateway, GatewayConfig
    from llmgw.gateway.api import GatewayError, InferenceRequest
    from llmgw.gateway.grpc_transport import GrpcTransport
    from llmgw.gateway.tenancy_gate import TenancyGate
    from llmgw.tenancy.keys import parse_key_file

    text, _ = key_file_text({name: {"weight": weights.get(name, 1)} for name in loads})
    pool = ReplicaPool()
    gateway = None
    tasks: list[asyncio.Task] = []
    try:
        for i in range(replicas):
            await pool.add_replica(f"r{i}", capacity=capacity, token_delay_ms=token_delay_ms)
        cfg = GatewayConfig(port=0, gossip_port=None, queue_size=queue_size, queue_timeout_s=120.0,
                            request_timeout_s=120.0, hedge_delay_ms=None, breaker_enabled=False)
        gateway = Gateway(cfg, GrpcTransport(upstream_batch=cfg.upstream_batch), membership=pool.membership)
        gateway.set_tenancy(TenancyGate("bench", parse_key_file(text)))
        await gateway.start()
        loop = asyncio.get_running_loop()
        first_tenant = next(iter(loads))
        # The replica's own time to first token, measured alone: subtracted to get the queue wait.
        first = []
        for _ in range(3):
            t0 = loop.time()
            async for _event in gateway.infer(InferenceRequest("calibrate", 1, tenant=first_tenant)):
                first.append(loop.time() - t0)
        base_ttft = min(first)
        # Capacity as measured, not as nominal (slots / service time): the gateway and the replicas share this
        # process's CPU, and the loads below are fractions of what is really served.
        completed: list[float] = []

        async def saturate(stop_at: float) -> None:
            while loop.time() < stop_at:
                async for event in gateway.infer(InferenceRequest("saturate", max_tokens, tenant=first_tenant)):
                    if event.is_final:
                        completed.append(loop.time())

        t0 = loop.time()
        await asyncio.gather(*(saturate(t0 + 2.0) for _ in range(2 * replicas * capacity)))
        rate = sum(1 for t in completed if t >= t0 + 0.5) / (max(completed) - (t0 + 0.5))
        results: dict[str, dict] = {name: {"offered": 0, "served": 0, "refused": 0, "waits": []} for name in loads}
        start = loop.time()

        async def one(name: str, n: int) -> None:
            t0 = loop.time()
            ttft = None
            try:
                async for event in gateway.infer(InferenceRequest(f"{name} request {n}", max_tokens, tenant=name)):
                    if ttft is None:
                        ttft = loop.time() - t0
                    if event.is_final:
                        done = loop.time() - start
                        if warmup_s <= done <= duration_s:
                            results[name]["served"] += 1
                            results[name]["waits"].append(max(0.0, ttft - base_ttft))
            except GatewayError:
                if warmup_s <= t0 - start:
                    results[name]["refused"] += 1

        async def offer(name: str, per_s: float) -> None:
            interval = 1.0 / per_s
            n = 0
            while True:
                due = start + n * interval
                if due - start >= duration_s:
                    return
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if due - start >= warmup_s:
                    results[name]["offered"] += 1
                tasks.append(asyncio.create_task(one(name, n)))
                n += 1

        await asyncio.gather(*(offer(name, load * rate) for name, load in loads.items()))
        await asyncio.sleep(max(0.0, start + duration_s - loop.time()))
        served = sum(r["served"] for r in results.values())
        out = {"capacity_rps": round(rate, 1), "nominal_capacity_rps": replicas * capacity * 1000.0 / (
            max_tokens * token_delay_ms), "queue_size": queue_size, "base_ttft_ms": round(base_ttft * 1000, 2),
            "tenants": {}}
        for name, r in results.items():
            out["tenants"][name] = {
                "offered": r["offered"], "served": r["served"], "refused": r["refused"],
                "share": round(r["served"] / served, 4) if served else 0.0,
                "wait_p50_s": round(_percentile(r["waits"], 50), 4),
                "wait_p99_s": round(_percentile(r["waits"], 99), 4)}
        return out
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10.0)
        if gateway is not None:
            await gateway.stop()
        await pool.close()


def scenario_fairness(quick: bool) -> dict:
    duration = 4.0 if quick else 8.0
    rows = {
        # The load: A offers 10x B, 2x capacity in total. B asks for 2/11 of the capacity, less than its
        # half, so max-min fairness gives B everything it asks for, and A the rest.
        "issue_10x_at_2x": ({"a": 2.0 * 10 / 11, "b": 2.0 / 11}, {"a": 1, "b": 1}),
        # B just under its fair share (its half), A 10x that: B is served all it asks, 45 % of what is served.
        "b_at_fair_share": ({"a": 4.8, "b": 0.48}, {"a": 1, "b": 1}),
        # Weights 3:1, both backlogged (each offers 2x capacity): shares 75 % / 25 %.
        "weights_3_to_1": ({"a": 2.0, "b": 2.0}, {"a": 3, "b": 1}),
    }
    return {name: asyncio.run(fairness_run(loads, weights, duration_s=duration))
            for name, (loads, weights) in rows.items()}


# ---- multi-process helpers ---------------------------------------------------------------------------------
async def _grpc_request(channel, prompt: str, max_tokens: int, key: str | None, *, timeout_s: float = 30.0):
    """(status code name, ttft_s or None, tokens) of one Infer call with `key` as the bearer key."""
    import grpc

    from llmgw._proto import llmgateway_pb2 as pb
    from llmgw._proto import llmgateway_pb2_grpc as pb_grpc

    metadata = (("authorization", f"Bearer {key}"),) if key else None
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    try:
        call = pb_grpc.InferenceGatewayStub(channel).Infer(
            pb.InferRequest(prompt=prompt, max_tokens=max_tokens, max_tokens_per_message=64),
            timeout=timeout_s, metadata=metadata)
        async for msg in call:
            if ttft is None:
                ttft = time.perf_counter() - t0
            tokens += 1 + len(msg.more_tokens)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name.lower(), ttft, tokens
    return "ok", ttft, tokens


def scenario_overhead(quick: bool) -> dict:
    """Same replica, two gateways: one with 10,000 keys (+ the bench tenant's), one open; alternated rounds."""
    import grpc

    from harness import Cluster

    rounds = 2 if quick else 8
    streams, tokens = (16, 100) if quick else (32, 400)
    ttft_samples = 10 if quick else 30
    with tempfile.TemporaryDirectory() as tmp:
        text, keys = key_file_text({"bench": {}}, extra_keys=10_000)
        path = Path(tmp) / "keys.toml"
        path.write_text(text)
        with Cluster(tmp, log_level="WARNING") as c:
            rep = c.start_replica("replica-1", token_delay_ms=1, max_capacity=256)
            keyed = c.start_gateway("gateway-keys", extra=["--keys", str(path)])
            open_ = c.start_gateway("gateway-open")
            # A second open gateway: the noise floor of this machine (two identical gateways, same method).
            control = c.start_gateway("gateway-open-2")
            c.wait_converged([keyed, open_, control, rep])

            async def round_(node, key):
                async with grpc.aio.insecure_channel(node.grpc_address) as ch:
                    cpu0 = _cpu_seconds(node.pid)
                    t0 = time.perf_counter()
                    got = await asyncio.gather(*(_grpc_request(ch, f"overhead {i}", tokens, key)
                                                 for i in range(streams)))
                    elapsed = time.perf_counter() - t0
                    cpu = _cpu_seconds(node.pid) - cpu0
                    # Time to first token of lone requests (nothing else running), one after another.
                    alone = [await _grpc_request(ch, f"alone {i}", 1, key) for i in range(ttft_samples)]
                bad = [g for g in got + alone if g[0] != "ok"]
                if bad:
                    raise RuntimeError(f"{node.name}: {len(bad)} requests failed: {bad[0]}")
                relayed = sum(g[2] for g in got)
                return relayed / elapsed, statistics.median(g[1] for g in alone), cpu / relayed * 1e6

            runs = {"keys": (keyed, keys["bench"]), "open": (open_, None), "open_2": (control, None)}
            for node, key in runs.values():  # warm up (channels, replica sessions)
                asyncio.run(round_(node, key))
            samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
            for _ in range(rounds):
                for name, (node, key) in runs.items():
                    samples[name].append(asyncio.run(round_(node, key)))
    ratios = sorted(k[0] / o[0] for k, o in zip(samples["keys"], samples["open"], strict=True))
    control_ratios = sorted(k[0] / o[0] for k, o in zip(samples["open_2"], samples["open"], strict=True))
    out = {"keys_in_file": 10_001, "streams": streams, "tokens_per_stream": tokens}
    for name, values in samples.items():
        out[name] = {"tokens_per_s": round(statistics.median(v[0] for v in values), 1),
                     "lone_ttft_median_ms": round(statistics.median(v[1] for v in values) * 1000, 3),
                     # The gateway process's CPU per relayed token: insensitive to other load on the machine.
                     "gateway_cpu_us_per_token": round(statistics.median(v[2] for v in values), 2)}
    out["rounds_tokens_per_s"] = {name: [round(v[0]) for v in values] for name, values in samples.items()}
    out["relay_ratio_keys_vs_open"] = round(statistics.median(ratios), 3)
    out["relay_ratios"] = [round(r, 3) for r in ratios]
    out["control_ratio_open2_vs_open"] = round(statistics.median(control_ratios), 3)
    out["control_ratios"] = [round(r, 3) for r in control_ratios]
    out["added_ttft_ms"] = round(out["keys"]["lone_ttft_median_ms"] - out["open"]["lone_ttft_median_ms"], 3)
    return out


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def scenario_hostile(quick: bool) -> dict:
    """10,000 distinct unknown keys (+ oversized / malformed values) over HTTP: every one 401, memory flat."""
    import aiohttp

    from harness import Cluster, free_tcp_port

    count = 2_000 if quick else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        text, keys = key_file_text({"bench": {}})
        path = Path(tmp) / "keys.toml"
        path.write_text(text)
        with Cluster(tmp, log_level="INFO") as c:
            rep = c.start_replica("replica-1", token_delay_ms=1)
            http_port = free_tcp_port()
            gw = c.start_gateway("gateway-1", extra=["--keys", str(path), "--http-port", str(http_port),
                                                     "--http-host", "127.0.0.1"])
            c.wait_converged([gw, rep])
            url = f"http://127.0.0.1:{http_port}/v1/completions"
            body = {"model": "m", "prompt": "hello", "max_tokens": 2}

            async def hammer(n: int, offset: int) -> dict[int, int]:
                statuses: dict[int, int] = {}
                async with aiohttp.ClientSession() as session:
                    sem = asyncio.Semaphore(32)

                    async def one(i: int) -> None:
                        async with sem, session.post(url, json=body, headers={
                                "Authorization": f"Bearer sk-unknown-{offset + i:08d}-{'x' * 40}"}) as resp:
                            await resp.read()
                            statuses[resp.status] = statuses.get(resp.status, 0) + 1

                    await asyncio.gather(*(one(i) for i in range(n)))
                return statuses

            asyncio.run(hammer(500, 0))  # warm up
            before = _rss_kib(gw.pid)
            t0 = time.perf_counter()
            statuses = asyncio.run(hammer(count, 1_000_000))
            elapsed = time.perf_counter() - t0
            after = _rss_kib(gw.pid)

            async def odd() -> dict[str, int]:
                out = {}
                async with aiohttp.ClientSession() as session:
                    for name, value in (("too_large_5000", "Bearer " + "k" * 5000),
                                        ("huge_20000", "Bearer " + "k" * 20000),
                                        ("basic_scheme", "Basic dXNlcjpwYXNz"), ("empty", ""),
                                        ("valid", f"Bearer {keys['bench']}")):
                        async with session.post(url, json=body, headers={"Authorization": value}) as resp:
                            await resp.read()
                            out[name] = resp.status
                return out

            odd_statuses = asyncio.run(odd())
            log_text = gw.log_path.read_text(errors="replace")
    leaked = sum(1 for i in range(0, count, 97) if f"sk-unknown-{1_000_000 + i:08d}" in log_text)
    return {"unknown_keys": count, "statuses": {str(k): v for k, v in statuses.items()},
            "requests_per_s": round(count / elapsed, 1), "rss_before_kib": before, "rss_after_kib": after,
            "rss_growth_kib": after - before, "odd_headers": odd_statuses, "keys_found_in_log": leaked}


# ---- cluster-wide limit ------------------------------------------------------------------------------------
async def limit_load(targets: list[tuple[str, str]], key: str, per_s: float, duration_s: float, *,
                     skip_s: float = 2.0) -> dict:
    """Send `per_s` single-token requests a second for `duration_s`, round robin over `targets` ((name, gRPC
    address)...), as `key`'s tenant. Returns the admitted rate per minute after the first `skip_s` seconds, in
    total and per gateway, and the admitted count of every second."""
    import grpc

    channels = [grpc.aio.insecure_channel(address) for _, address in targets]
    admitted: dict[str, list[float]] = {name: [] for name, _ in targets}
    codes: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []

    async def one(i: int) -> None:
        name = targets[i % len(targets)][0]
        code, _, _ = await _grpc_request(channels[i % len(targets)], f"limit {i}", 1, key, timeout_s=10.0)
        codes[code] = codes.get(code, 0) + 1
        if code == "ok":
            admitted[name].append(loop.time() - start)

    n = 0
    try:
        while n / per_s < duration_s:
            delay = start + n / per_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n)))
            n += 1
        await asyncio.wait_for(asyncio.gather(*tasks), 30.0)
    finally:
        for task in tasks:
            task.cancel()
        for ch in channels:
            await ch.close()
    window = duration_s - skip_s
    per_gateway = {name: round(sum(1 for t in times if t >= skip_s) / window * 60.0, 1)
                   for name, times in admitted.items()}
    every = sorted(t for times in admitted.values() for t in times)
    per_second = [sum(1 for t in every if s <= t < s + 1) for s in range(math.ceil(duration_s))]
    # Per 5 s (the limiter's pacing window) after skip_s: the rate the limit is held to at that time scale.
    per_5s = [sum(per_second[s:s + 5]) for s in range(math.ceil(skip_s), len(per_second) - 4, 5)]
    by_gateway = {name: [sum(1 for t in times if s <= t < s + 1) for s in range(math.ceil(duration_s))]
                  for name, times in admitted.items()}
    return {"offered": n, "codes": codes, "admitted_per_min": round(sum(per_gateway.values()), 1),
            "per_gateway_per_min": per_gateway, "per_second": per_second, "per_5s": per_5s,
            "per_second_by_gateway": by_gateway}


async def partition_run(*, per_minute: int = 600, duration_s: float = 10.0, settle_s: float = 6.0) -> dict:
    """3 gateways (in-process, each its own gossip node) + 1 replica; one tenant at `per_minute`, offered 3x spread
    over the three: first healthy, then with gateway-3 cut off by a gossip filter (SWIM and usage digests)."""
    from harness import free_udp_port
    from llmgw.gateway import GatewayConfig
    from llmgw.gateway.app import build_server, start_gateway, stop_gateway
    from llmgw.gateway.tenancy_gate import TenancyGate
    from llmgw.gossip import GossipFilter
    from llmgw.replica import Replica, ReplicaConfig
    from llmgw.tenancy.keys import parse_key_file

    text, keys = key_file_text({"limited": {"requests_per_minute": per_minute}})
    ports = [free_udp_port() for _ in range(4)]
    seeds = (f"127.0.0.1:{ports[0]}",)
    replica = Replica(ReplicaConfig(replica_id="replica-1", port=0, gossip_port=ports[3], seeds=seeds,
                                    gossip_config="local", token_delay_ms=1, max_capacity=256))
    servers = []
    # gateway-3 loses the other gateways (both ways) but keeps the replica: a partition of the gateways' mesh.
    pair_side, lone_side = GossipFilter(), GossipFilter()
    try:
        for i in range(3):
            cfg = GatewayConfig(gateway_id=f"gateway-{i + 1}", port=0, gossip_port=ports[i],
                                seeds=seeds if i else (), gossip_config="local")
            server = build_server(cfg, tenancy=TenancyGate(cfg.gateway_id, parse_key_file(text)))
            servers.append(server)
            await start_gateway(server, _no_http())
            server.gossip.filter = lone_side if i == 2 else pair_side
        await replica.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20.0
        while not all(len(s.gateway.routable()) == 1 and _gateways_seen(s) == 3 for s in servers):
            if loop.time() > deadline:
                raise RuntimeError("the gateways did not see each other and the replica within 20 s")
            await asyncio.sleep(0.1)
        targets = [(s.config.gateway_id, s.grpc_address) for s in servers]
        per_s = 3 * per_minute / 60.0
        healthy = await limit_load(targets, keys["limited"], per_s, duration_s)
        pair_side.block(member_ids=["gateway-3"])
        lone_side.block(member_ids=["gateway-1", "gateway-2"])
        await asyncio.sleep(settle_s)  # past the limiter's peer timeout (5 s)
        partitioned = await limit_load(targets, keys["limited"], per_s, duration_s)
        now = loop.time()
        return {"limit_per_min": per_minute, "offered_per_min": 3 * per_minute, "healthy": healthy,
                "partitioned": partitioned,
                "share_seen_by": {s.config.gateway_id: s.gateway.tenancy.limiter.share(now) for s in servers},
                "digests": {s.config.gateway_id: s.usage_gossip.stats() for s in servers}}
    finally:
        for server in servers:
            await stop_gateway(server, None)
        await replica.stop(0.1)


def _no_http():
    from llmgw.gateway.app import HttpSettings

    return HttpSettings(port=0)


def _gateways_seen(server) -> int:
    return sum(1 for m in server.gossip.members(include_self=True) if m.role == "gateway" and m.is_live)


def scenario_limit(quick: bool) -> dict:
    # 2 s + whole pacing windows: the admitted rate is a sum over whole 5 s windows.
    return asyncio.run(partition_run(duration_s=12.0 if quick else 22.0))


def scenario_bandwidth(quick: bool) -> dict:
    """Gossip bytes/s per gateway for the usage digests (the cores under a simulated clock, every tenant active:
    the worst case), by number of tenants."""
    from dataclasses import asdict

    from llmgw.tenancy.bench import digest_bandwidth

    counts = (10, 1000) if quick else (10, 100, 1000)
    return {str(n): asdict(digest_bandwidth(n, duration_s=30.0 if quick else 60.0)) for n in counts}


SCENARIOS = {"fairness": scenario_fairness, "limit": scenario_limit, "hostile": scenario_hostile,
             "overhead": scenario_overhead, "bandwidth": scenario_bandwidth}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench tenancy", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (smoke test, not figures)")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run only these scenarios")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = {}
    for name in args.only or list(SCENARIOS):
        t0 = time.perf_counter()
        results[name] = SCENARIOS[name](args.quick)
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"## {name}\n{json.dumps(results[name], indent=2)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
