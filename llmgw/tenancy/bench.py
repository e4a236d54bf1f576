"""Gossip bandwidth of usage digests, measured on the real `UsageLimiter` cores under a simulated clock.

Every gateway records traffic for every tenant (all of them active: the worst case for the digest), builds one
digest per `interval_s` and delivers it to every other gateway. Reported: payload bytes per second sent by one
gateway (all destinations), the largest digest, and the longest observed gap between two digests carrying the same
tenant (how stale a peer's view of a quiet tenant can get; tenants near a limit go first and are fresher).

``python -m llmgw.tenancy.bench [--tenants N] ...`` prints the report as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass

from llmgw.tenancy.digest import decode_digest
from llmgw.tenancy.keys import TenantLimits
from llmgw.tenancy.limits import UsageLimiter

__all__ = ["BandwidthReport", "digest_bandwidth", "main"]


@dataclass(frozen=True)
class BandwidthReport:
    tenants: int
    gateways: int
    interval_s: float
    budget_bytes: int
    duration_s: float
    bytes_per_s_per_node: float  # digest payload sent by one gateway to all the others
    largest_digest_bytes: int
    tenants_per_digest: float
    longest_gap_s: float  # longest time between two digests from one gateway naming the same tenant
    advertised_cycle_s: float  # the largest cycle the digests announced (receivers keep entries 2 cycles)


def digest_bandwidth(tenants: int = 1000, gateways: int = 3, *, interval_s: float = 0.5, budget_bytes: int = 1024,
                     duration_s: float = 60.0, seed: int = 1) -> BandwidthReport:
    if tenants < 1 or gateways < 2 or interval_s <= 0 or duration_s < 2 * interval_s:
        raise ValueError("need tenants >= 1, gateways >= 2 and a duration of at least two intervals")
    rng = random.Random(seed)
    names = [f"tenant-{i:05d}" for i in range(tenants)]
    limits = {name: TenantLimits(requests_per_minute=rng.choice([60, 600, 6000]), tokens_per_minute=1_000_000)
              for name in names}
    nodes = [UsageLimiter(f"gateway-{g}") for g in range(gateways)]
    for node in nodes:
        node.configure(limits)
    sent_bytes = [0] * gateways
    largest = 0
    entries = 0
    digests = 0
    last_seen: dict[tuple[int, str], float] = {}
    longest_gap = 0.0
    cycle_s = 0.0
    warmup_s = min(10.0, duration_s / 2)
    steps = int(duration_s / interval_s)
    for step in range(steps):
        now = step * interval_s
        for g, node in enumerate(nodes):
            # Every tenant stays active: each gets a request (and tokens) from this gateway about every 5 s.
            for name in rng.sample(names, max(1, round(tenants * interval_s / 5.0))):
                node.try_admit(name, now)
                node.stream_ended(name)
                node.record_tokens(name, rng.randrange(50, 5000), now)
            data = node.build_digest(now, budget_bytes)
            digest = decode_digest(data)
            sent_bytes[g] += len(data) * (gateways - 1)
            largest = max(largest, len(data))
            entries += len(digest.tenants)
            digests += 1
            cycle_s = max(cycle_s, digest.cycle_ms / 1000.0)
            for usage in digest.tenants:
                key = (g, usage.tenant)
                previous = last_seen.get(key)
                if previous is not None and previous >= warmup_s:
                    longest_gap = max(longest_gap, now - previous)
                last_seen[key] = now
            for h, peer in enumerate(nodes):
                if h != g:
                    peer.receive_digest(node.gateway_id, data, now)
    elapsed = steps * interval_s
    return BandwidthReport(tenants, gateways, interval_s, budget_bytes, elapsed,
                           round(max(sent_bytes) / elapsed, 1), largest, round(entries / digests, 1),
                           round(longest_gap, 3), cycle_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmgw.tenancy.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--gateways", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between two digests of a gateway")
    parser.add_argument("--budget", type=int, default=1024, help="largest digest, bytes")
    parser.add_argument("--duration", type=float, default=60.0, help="simulated seconds")
    args = parser.parse_args(argv)
    report = digest_bandwidth(args.tenants, args.gateways, interval_s=args.interval, budget_bytes=args.budget,
                              duration_s=args.duration)
    print(json.dumps(asdict(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
