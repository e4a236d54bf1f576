"""Routing core: ring lookup (llmgw vs a pure-Python bisect ring vs uhashring), a full routing decision from a
1 KB prompt, a least-connections pick, and ring membership changes.

asv runs the classes; `report()` (also `python benchmarks/bench_routing.py`) prints the load-balance table and the
per-lookup figures with their ratios, all measured in the same process.

Every lookup benchmark loops over the same 1,024 random pre-computed keys (so caches and branch predictors see
realistic, varied keys); `ops_per_call` lets the plain runner divide by that. The loop's own cost (~10-20 ns per
key) is included in every implementation's figure alike.
"""

from __future__ import annotations

import bisect
import random
import sys
import time
import timeit

from llmgw.routing import DEFAULT_VNODES, HashRing, LeastConnectionsPicker, Router, hash_key

N_KEYS = 1024
N_MEMBERS = 8
MEMBERS = [f"replica-{i:02d}" for i in range(N_MEMBERS)]
RNG_SEED = 20240601
LOOKUP_IMPLEMENTATIONS = ["llmgw", "bisect", "uhashring"]
MASK64 = (1 << 64) - 1


def random_keys(n: int = N_KEYS) -> list[int]:
    rng = random.Random(RNG_SEED)
    return [rng.getrandbits(64) for _ in range(n)]


def key_strings(n: int = N_KEYS) -> list[str]:
    return [f"user-{i}: what is the capital of country number {i}?" for i in range(n)]


def prompts_1kb(n: int = 64) -> list[str]:
    rng = random.Random(RNG_SEED)
    words = "the of and to in is that for it as with was on be by at this from or an are".split()
    out = []
    for i in range(n):
        text = f"[{i}] " + " ".join(rng.choice(words) for _ in range(400))
        out.append(text[:1024])
    return out


class BisectRing:
    """The textbook pure-Python ring: sorted point list + bisect, same points as llmgw's ring."""

    def __init__(self, members: list[str], vnodes: int) -> None:
        points = sorted((hash_key(f"{m}#{i}"), m) for m in members for i in range(vnodes))
        self.hashes = [h for h, _ in points]
        self.owners = [m for _, m in points]

    def lookup(self, key_hash: int) -> str:
        i = bisect.bisect_left(self.hashes, key_hash)
        return self.owners[i if i < len(self.hashes) else 0]


def _uhashring_prehashed(members: list[str], vnodes: int):
    """uhashring with our 64-bit hash for its points and the identity for int keys: a pre-hashed lookup."""
    import uhashring

    def hash_fn(key):
        return key if isinstance(key, int) else hash_key(key)

    return uhashring.HashRing(nodes=members, vnodes=vnodes, hash_fn=hash_fn)


def build_lookup(implementation: str, members: list[str] = MEMBERS, vnodes: int = DEFAULT_VNODES):
    """A `lookup(key_hash) -> member` callable for one implementation."""
    if implementation == "llmgw":
        ring = HashRing(vnodes)
        for m in members:
            ring.set_member(m)
        return ring.lookup
    if implementation == "bisect":
        return BisectRing(members, vnodes).lookup
    if implementation == "uhashring":
        return _uhashring_prehashed(members, vnodes).get_node
    raise ValueError(f"unknown implementation {implementation!r}")


class RingLookup:
    """Lookup of a pre-hashed 64-bit key, 8 members x 160 vnodes, bounded loads on (all loads 0)."""

    params = LOOKUP_IMPLEMENTATIONS
    param_names = ["implementation"]
    ops_per_call = N_KEYS

    def setup(self, implementation):
        self.lookup = build_lookup(implementation)
        self.keys = random_keys()

    def time_lookup_prehashed(self, implementation):
        lookup = self.lookup
        for k in self.keys:
            lookup(k)


class RingLookupFromString:
    """Hash a short string key and look it up: llmgw (MurmurHash3) vs uhashring with its default md5."""

    params = ["llmgw", "uhashring"]
    param_names = ["implementation"]
    ops_per_call = N_KEYS

    def setup(self, implementation):
        self.keys = key_strings()
        if implementation == "llmgw":
            ring = HashRing()
            for m in MEMBERS:
                ring.set_member(m)
            lookup = ring.lookup
            self.fn = lambda s: lookup(hash_key(s))
        else:
            import uhashring

            self.fn = uhashring.HashRing(nodes=MEMBERS, vnodes=DEFAULT_VNODES).get_node

    def time_lookup_string(self, implementation):
        fn = self.fn
        for s in self.keys:
            fn(s)


def loaded_router() -> Router:
    """8 members with capacity 4 and some in flight: a realistic steady state."""
    router = Router(seed=1)
    for i, m in enumerate(MEMBERS):
        router.set_member(m, capacity=4, state="suspect" if i == 7 else "alive")
        router.set_load(m, i % 4)
    return router


class RouteDecision:
    """Router.route() on 64 different 1 KB prompts: prefix slice + UTF-8 + MurmurHash3 + ring walk (+ fallback)."""

    ops_per_call = 64

    def setup(self):
        self.router = loaded_router()
        self.prompts = prompts_1kb()
        self.keys = random_keys(64)

    def time_route_1kb_prompt(self):
        route = self.router.route
        for p in self.prompts:
            route(p)

    def time_route_hash(self):
        route_hash = self.router.route_hash
        for k in self.keys:
            route_hash(k)


class PickerPick:
    """Weighted least-connections over 8 members (one suspect, mixed loads and weights)."""

    ops_per_call = N_KEYS

    def setup(self):
        self.picker = LeastConnectionsPicker(seed=1)
        for i, m in enumerate(MEMBERS):
            self.picker.set_member(m, weight=1.0 + (i % 3), capacity=8, state="suspect" if i == 7 else "alive")
            self.picker.set_load(m, i % 5)
        self.loop = range(N_KEYS)

    def time_pick(self):
        pick = self.picker.pick
        for _ in self.loop:
            pick()


class RingMembership:
    """Adding then removing one member on a 32-member ring (160 MurmurHash3 calls + two O(points) passes)."""

    def setup(self):
        self.ring = HashRing()
        for i in range(32):
            self.ring.set_member(f"m{i}")

    def time_add_remove_member(self):
        self.ring.set_member("newcomer")
        self.ring.remove_member("newcomer")

    def peakmem_ring_128_members(self):
        ring = HashRing()
        for i in range(128):
            ring.set_member(f"m{i}")


# ---------------------------------------------------------------------------------------------------- report


def keyspace_balance(n_members: int, vnodes: int = DEFAULT_VNODES) -> tuple[float, float]:
    """(max share / mean share, min share / mean share) of the 64-bit key space, computed exactly from the arcs."""
    ring = HashRing(vnodes)
    for i in range(n_members):
        ring.set_member(f"replica-{i:03d}")
    pts = ring.points()
    shares = dict.fromkeys(ring.members(), 0)
    for i, (h, m) in enumerate(pts):
        shares[m] += (h - pts[i - 1][0]) & MASK64
    mean = (1 << 64) / n_members
    return max(shares.values()) / mean, min(shares.values()) / mean


def bounded_load_simulation(balance: float | None, n_members: int = 8, requests: int = 20_000,
                            concurrency: int = 32) -> float:
    """Peak in-flight max/mean under a skewed workload (a few hot prefixes), `concurrency` requests in flight."""
    router = Router(balance=balance, seed=1)
    for i in range(n_members):
        router.set_member(f"replica-{i}")
    rng = random.Random(RNG_SEED)
    hot = [f"system prompt {i} " * 8 for i in range(4)]
    in_flight: list[str] = []
    worst = 0.0
    for r in range(requests):
        prompt = rng.choice(hot) if rng.random() < 0.6 else f"cold prompt {r} " * 8
        member = router.route(prompt).member
        router.add_load(member, 1)
        in_flight.append(member)
        if len(in_flight) > concurrency:
            router.add_load(in_flight.pop(rng.randrange(len(in_flight))), -1)
        if len(in_flight) == concurrency:  # steady state only: with 1 in flight max/mean is trivially n
            loads = [router.load(f"replica-{i}") for i in range(n_members)]
            worst = max(worst, max(loads) / (concurrency / n_members))
    return worst


def _per_op_ns(stmt_fn, ops: int, repeat: int = 7) -> float:
    # CPU time of this process: wall time on a shared machine also counts other processes' time slices.
    timer = timeit.Timer(stmt_fn, timer=time.process_time)
    number, elapsed = timer.autorange()
    number = max(1, int(number * 0.1 / max(elapsed, 1e-9)))
    return min(timer.repeat(repeat=repeat, number=number)) / number / ops * 1e9


def measure_lookups() -> dict[str, float]:
    """ns per operation for each comparison, all in this process."""
    results = {}
    for impl in LOOKUP_IMPLEMENTATIONS:
        bench = RingLookup()
        bench.setup(impl)
        results[f"lookup_prehashed/{impl}"] = _per_op_ns(lambda b=bench, i=impl: b.time_lookup_prehashed(i), N_KEYS)
    for impl in ("llmgw", "uhashring"):
        bench = RingLookupFromString()
        bench.setup(impl)
        results[f"lookup_string/{impl}"] = _per_op_ns(lambda b=bench, i=impl: b.time_lookup_string(i), N_KEYS)
    route = RouteDecision()
    route.setup()
    results["route_1kb_prompt"] = _per_op_ns(route.time_route_1kb_prompt, 64)
    pick = PickerPick()
    pick.setup()
    results["picker_pick"] = _per_op_ns(pick.time_pick, N_KEYS)
    keys = random_keys()
    results["loop_overhead"] = _per_op_ns(lambda: [None for _ in keys], N_KEYS)
    return results


def report() -> str:
    lines = [f"Keyspace share at {DEFAULT_VNODES} vnodes (exact arc lengths; 1.00 = perfectly even)",
             f"{'members':>8} {'points':>7} {'max/avg':>8} {'min/avg':>8}"]
    for n in (3, 8, 32, 128):
        hi, lo = keyspace_balance(n)
        lines.append(f"{n:>8} {n * DEFAULT_VNODES:>7} {hi:>8.3f} {lo:>8.3f}")

    lines += ["", "Peak in-flight max/mean, 8 members, 32 in flight, 60% of prompts on 4 hot prefixes"]
    for balance in (None, 2.0, 1.25):
        lines.append(f"  balance={balance!s:<5} {bounded_load_simulation(balance):6.2f}")

    r = measure_lookups()
    ours = r["lookup_prehashed/llmgw"]
    lines += ["", (f"Per operation (ns), {N_MEMBERS} members x {DEFAULT_VNODES} vnodes, loop over {N_KEYS} keys, "
                   f"CPU time, best of 7 (python loop overhead ~{r['loop_overhead']:.0f} ns included)"),
              f"{'operation':<34} {'ns/op':>9} {'vs llmgw':>9}"]
    for impl in LOOKUP_IMPLEMENTATIONS:
        v = r[f"lookup_prehashed/{impl}"]
        lines.append(f"{'ring lookup, pre-hashed, ' + impl:<34} {v:>9.0f} {v / ours:>8.1f}x")
    ours_s = r["lookup_string/llmgw"]
    for impl in ("llmgw", "uhashring"):
        v = r[f"lookup_string/{impl}"]
        lines.append(f"{'hash str + lookup, ' + impl:<34} {v:>9.0f} {v / ours_s:>8.1f}x")
    lines.append(f"{'Router.route(1 KB prompt)':<34} {r['route_1kb_prompt']:>9.0f}")
    lines.append(f"{'LeastConnectionsPicker.pick()':<34} {r['picker_pick']:>9.0f}")
    like_for_like = r["lookup_prehashed/uhashring"] / ours
    native = r["lookup_string/uhashring"] / ours
    lines += ["", "Targets:",
              f"  pre-hashed lookup <= 150 ns: {'met' if ours <= 150 else 'MISSED'} ({ours:.0f} ns)",
              (f"  >= 10x uhashring: like-for-like pre-hashed {like_for_like:.1f}x "
               f"({'met' if like_for_like >= 10 else 'MISSED'}); vs uhashring's own get_node(str) {native:.1f}x "
               f"({'met' if native >= 10 else 'MISSED'})"),
              (f"  route 1 KB prompt <= 5 us: {'met' if r['route_1kb_prompt'] <= 5000 else 'MISSED'} "
               f"({r['route_1kb_prompt'] / 1000:.2f} us)")]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
    sys.exit(0)
