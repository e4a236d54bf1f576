"""Issue 14 part 2 on real processes: a replica frozen with SIGSTOP under load, and replicas that are slow, jittery
or pausing but healthy. tests/test_stall_acceptance.py runs these reduced; `python -m llmgw bench stalls` (the
benchmarks/run_stalls.py runner) runs them at full size and prints the figures recorded in docs/reliability.md.

Clients time every token as it arrives (the gap between two tokens of one stream is what a user waits), check
every stream token by token, and the stall counters are read from the gateway's /metrics. Everything is bounded
in time; every process is the caller's Cluster's and is stopped with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
import urllib.request
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from harness import Cluster, free_tcp_port  # noqa: E402
from llmgw import client  # noqa: E402

# The gateway flags of each no-false-alarm run: the breakers' slow-replica ejection would take the 10x slower
# replica out of routing (by design), and then nothing would test the stall deadlines on it.
GATEWAY_ARGS: dict[str, tuple[str, ...]] = {"slow": ("--no-breaker-slow-detection",)}

# Healthy but unusual replicas (llmgw replica flags) that must cause no stall suspicion.
BEHAVIOURS: dict[str, list[str]] = {
    "jitter": ["--jitter", "0.5"],  # each token's delay uniformly within +/-50 %
    "slow": ["--slow-factor", "10"],  # uniformly 10x slower
    "pauses": ["--pause-every-ms", "1000", "--pause-ms", "100"],  # every stream stops 100 ms once a second
}


@dataclasses.dataclass
class StreamLog:
    """One request as its client saw it: token indices and texts, arrival times (s since the request was sent)."""

    max_tokens: int
    code: str
    details: str
    indices: list[int]
    texts: list[str]
    finals: list[bool]
    arrivals: list[float]
    replicas: set[str]

    def exact(self) -> bool:
        n = self.max_tokens
        return (self.code == "OK" and self.indices == list(range(n)) and self.texts == [f"token_{i}" for i in range(n)]
                and self.finals == [False] * (n - 1) + [True])

    def gaps(self) -> list[float]:
        a = self.arrivals
        return [a[i] - a[i - 1] for i in range(1, len(a))]


async def one_stream(channel: grpc.aio.Channel, prompt: str, max_tokens: int, timeout_s: float) -> StreamLog:
    log = StreamLog(max_tokens, "OK", "", [], [], [], [], set())
    try:
        async for tok in client.stream_infer(channel, prompt, max_tokens, timeout_s=timeout_s):
            log.indices.append(tok.index)
            log.texts.append(tok.token)
            log.finals.append(tok.is_final)
            log.arrivals.append(tok.elapsed_s)
            if tok.replica_id:
                log.replicas.add(tok.replica_id)
    except grpc.aio.AioRpcError as exc:
        log.code, log.details = exc.code().name, exc.details() or ""
    return log


async def closed_loop(target: str, *, streams: int, duration_s: float, max_tokens: int, timeout_s: float = 60.0,
                      prefix: str = "stall", stagger_s: float = 0.0) -> list[StreamLog]:
    """`streams` clients each sending one request after another (unique prompts) for `duration_s`; requests in
    flight at the end are finished. Client w starts w/streams x `stagger_s` late, so that streams are spread over
    every phase of a request (started together, equal requests would stay in lockstep)."""
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)]
    loop = asyncio.get_running_loop()
    end = loop.time() + duration_s
    logs: list[StreamLog] = []

    async def worker(w: int) -> None:
        seq = 0
        await asyncio.sleep(w / streams * stagger_s)
        while loop.time() < end:
            logs.append(await one_stream(channels[w % len(channels)], f"{prefix}-{w}-{seq}", max_tokens, timeout_s))
            seq += 1

    try:
        await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(streams))), duration_s + timeout_s + 10)
    finally:
        for ch in channels:
            await ch.close()
    return logs


def client_figures(logs: list[StreamLog]) -> dict:
    """Requests, failures, inexact streams, and the waits between two tokens of one stream (p50/p99/max, ms)."""
    gaps = sorted(g for log in logs for g in log.gaps())

    def pct(q: float) -> float:
        return round(gaps[min(len(gaps) - 1, int(q * (len(gaps) - 1) + 0.5))] * 1000, 1) if gaps else float("nan")

    ttfts = sorted(log.arrivals[0] for log in logs if log.arrivals)
    failed = [log for log in logs if log.code != "OK"]
    served: dict[str, int] = {}
    for log in logs:
        for rid in log.replicas:
            served[rid] = served.get(rid, 0) + 1
    return dict(requests=len(logs), served_by=dict(sorted(served.items())), failed=len(failed),
                failures=sorted({f"{f.code}: {f.details}" for f in failed})[:5],
                inexact=sum(1 for log in logs if log.code == "OK" and not log.exact()),
                tokens=sum(len(log.indices) for log in logs), gaps=len(gaps), gap_p50_ms=pct(0.50),
                gap_p99_ms=pct(0.99), gap_max_ms=round(gaps[-1] * 1000, 1) if gaps else float("nan"),
                moved=sum(1 for log in logs if len(log.replicas) > 1),
                ttft_p50_ms=round(ttfts[len(ttfts) // 2] * 1000, 1) if ttfts else float("nan"),
                ttft_max_ms=round(ttfts[-1] * 1000, 1) if ttfts else float("nan"))


def scrape(http_url: str, timeout_s: float = 5.0) -> dict:
    """The gateway's stall counters and per-replica deadlines from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{http_url}/metrics", timeout=timeout_s) as response:
        text = response.read().decode()
    out: dict = {"stall_suspicions": 0.0, "stall_failovers": 0.0, "failovers": 0.0, "races": {},
                 "inter_token_deadline_s": {}, "first_token_deadline_s": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "llmgw_gateway_stall_suspicions_total":
                out["stall_suspicions"] = value
            elif name == "llmgw_gateway_stall_failovers_total":
                out["stall_failovers"] = value
            elif name == "llmgw_gateway_failovers_total":
                out["failovers"] = value
            elif name == "llmgw_gateway_stall_races_total":
                out["races"][labels["result"]] = value
            elif name == "llmgw_gateway_inter_token_deadline_seconds":
                out["inter_token_deadline_s"][labels["replica"]] = value
            elif name == "llmgw_gateway_first_token_deadline_seconds":
                out["first_token_deadline_s"][labels["replica"]] = value
    return out


@dataclasses.dataclass
class Setup:
    cluster: Cluster
    gateway: object
    http_url: str
    replicas: dict


def start(cluster: Cluster, replicas: dict[str, list[str]], *, token_delay_ms: float = 20,
          gateway_args: tuple[str, ...] = ()) -> Setup:
    """Replicas (name -> extra flags) at `token_delay_ms`, one gateway with an HTTP front (for /metrics)."""
    nodes = {name: cluster.start_replica(name, token_delay_ms=token_delay_ms, max_capacity=64, extra=extra)
             for name, extra in replicas.items()}
    http_port = free_tcp_port()
    gw = cluster.start_gateway("gateway-1", extra=["--http-port", str(http_port), *gateway_args])
    cluster.wait_converged([gw], timeout=30)
    return Setup(cluster, gw, f"http://127.0.0.1:{http_port}", nodes)


async def frozen_replica_run(setup: Setup, *, streams: int = 30, max_tokens: int = 50, before_s: float = 3.0,
                             pause_s: float = 3.0, after_s: float = 3.0) -> dict:
    """Closed-loop load on the setup; `before_s` in, the replica with the most streams open is SIGSTOPped for
    `pause_s`."""
    cluster = setup.cluster
    # Staggered over one request's length (20 ms/token): the freeze finds streams at every token index.
    load = asyncio.create_task(closed_loop(setup.gateway.grpc_address, streams=streams, max_tokens=max_tokens,
                                           duration_s=before_s + pause_s + after_s, prefix="freeze",
                                           stagger_s=max_tokens * 0.02))
    await asyncio.sleep(before_s)
    before = scrape(setup.http_url)
    in_flight = dict(cluster.gateway_status(setup.gateway).in_flight_by_replica)
    frozen_id = max(sorted(setup.replicas), key=lambda rid: in_flight.get(rid, 0))
    frozen = setup.replicas[frozen_id]
    paused_at = time.monotonic()
    cluster.pause(frozen)
    try:
        await asyncio.sleep(pause_s)
    finally:
        cluster.resume(frozen)
    resumed_at = time.monotonic()
    logs = await load
    after = scrape(setup.http_url)
    status = cluster.gateway_status(setup.gateway)  # GatewayAdmin.GetStatus, what `llmgw status` shows
    return dict(client_figures(logs), frozen=frozen_id, frozen_streams=in_flight.get(frozen_id, 0),
                paused_s=round(resumed_at - paused_at, 2),
                status_stall_failovers=status.stall_failovers, status_stall_suspicions=status.stall_suspicions,
                status_deadlines=dict(status.inter_token_deadline_by_replica),
                deadlines_before=before["inter_token_deadline_s"], suspicions=after["stall_suspicions"],
                stall_failovers=after["stall_failovers"], races=after["races"], failovers=after["failovers"])


async def steady_run(setup: Setup, *, streams: int = 30, max_tokens: int = 30, duration_s: float = 60.0,
                     prefix: str = "steady") -> dict:
    """Closed-loop load for `duration_s`; the stall counters and deadlines from /metrics at the end."""
    logs = await closed_loop(setup.gateway.grpc_address, streams=streams, max_tokens=max_tokens,
                             duration_s=duration_s, prefix=prefix)
    metrics = scrape(setup.http_url)
    return dict(client_figures(logs), suspicions=metrics["stall_suspicions"],
                stall_failovers=metrics["stall_failovers"], races=metrics["races"], failovers=metrics["failovers"],
                inter_token_deadline_s={k: round(v, 3) for k, v in metrics["inter_token_deadline_s"].items()},
                first_token_deadline_s={k: round(v, 3) for k, v in metrics["first_token_deadline_s"].items()})
