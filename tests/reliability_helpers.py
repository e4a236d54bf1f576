"""Shared machinery of the reliability campaigns (issue 7): load drivers that check every stream index by index,
process resource samplers, a chaos monkey, and the campaign bodies themselves.

The tests (tests/test_reliability_*.py) run each campaign reduced; benchmarks/run_reliability.py runs the same
functions at full size and prints the figures recorded in docs/reliability.md. Everything here is bounded in time
and count; nothing here starts a process the caller's Cluster does not own and stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from harness import Cluster, Node, wait_until  # noqa: E402
from harness import free_tcp_port as free_port  # noqa: E402  (a free loopback TCP port: llmgw.cluster.free_port)
from llmgw import client  # noqa: E402
from llmgw._proto import llmgateway_pb2 as pb  # noqa: E402
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("llmgw.tests.reliability")


# ---- one stream, checked index by index ---------------------------------------------------------------------
def stream_problems(result: client.StreamResult, max_tokens: int) -> list[str]:
    """Everything wrong with a completed stream: missing, duplicated or out-of-order indices, wrong token text
    (the simulated replica's token i is `token_<i>` whoever serves it), a final flag not on the last token."""
    problems = []
    indices = [t.index for t in result.tokens]
    if indices != list(range(max_tokens)):
        seen: dict[int, int] = {}
        for i in indices:
            seen[i] = seen.get(i, 0) + 1
        dup = sorted(i for i, n in seen.items() if n > 1)
        missing = sorted(set(range(max_tokens)) - set(seen))
        problems.append(f"indices wrong: duplicated {dup[:10]}, missing {missing[:10]}, "
                        f"order ok={indices == sorted(indices)}")
    for t in result.tokens:
        if t.token != f"token_{t.index}":
            problems.append(f"index {t.index} carried {t.token!r}")
            break
    finals = [t.index for t in result.tokens if t.is_final]
    if result.ok and (finals != [max_tokens - 1]):
        problems.append(f"is_final on indices {finals}, expected only on {max_tokens - 1}")
    return problems


@dataclasses.dataclass
class Outcome:
    """One request as a client saw it."""

    worker: int
    seq: int
    sent_at: float  # monotonic
    code: str
    details: str
    tokens: int
    ttft_s: float | None
    total_s: float
    replicas: tuple[str, ...]
    problems: list[str]


@dataclasses.dataclass
class LoadReport:
    outcomes: list[Outcome]
    duration_s: float

    def by_code(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o.code] = out.get(o.code, 0) + 1
        return out

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code == "OK"]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code != "OK"]

    @property
    def with_problems(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.problems]

    def tokens_checked(self) -> int:
        return sum(o.tokens for o in self.outcomes)

    def ttft_percentile(self, q: float) -> float:
        values = sorted(o.ttft_s for o in self.ok if o.ttft_s is not None)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]

    def summary(self) -> dict:
        return dict(requests=len(self.outcomes), by_code=self.by_code(), index_problems=len(self.with_problems),
                    tokens=self.tokens_checked(), ttft_p50_ms=round(self.ttft_percentile(50) * 1000, 1),
                    ttft_p99_ms=round(self.ttft_percentile(99) * 1000, 1),
                    max_total_s=round(max((o.total_s for o in self.outcomes), default=0.0), 2),
                    duration_s=round(self.duration_s, 1))


async def closed_loop_load(target: str, *, concurrency: int, duration_s: float, max_tokens: int,
                           timeout_s: float = 30.0, prompt_prefix: str = "load", channels: int = 4,
                           stop: asyncio.Event | None = None, reject_backoff_s: float = 0.0) -> LoadReport:
    """`concurrency` workers each send one request after another (unique prompts) for `duration_s`; every
    stream is checked index by index. Requests in flight at the end are finished, not abandoned."""
    chans = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(channels)]
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + duration_s
    outcomes: list[Outcome] = []

    async def worker(w: int) -> None:
        ch = chans[w % channels]
        seq = 0
        while loop.time() < end and not (stop is not None and stop.is_set()):
            prompt = f"{prompt_prefix}-{w}-{seq}"
            sent = time.monotonic()
            result = await client.collect(client.stream_infer(ch, prompt, max_tokens, timeout_s=timeout_s))
            outcomes.append(Outcome(w, seq, sent, result.code.name, result.details, len(result.tokens),
                                    result.ttft_s, result.total_s, tuple(sorted(result.replicas)),
                                    stream_problems(result, max_tokens) if result.ok else []))
            seq += 1
            if reject_backoff_s and result.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await asyncio.sleep(reject_backoff_s)  # a polite client; without it a rejection loop spins

    try:
        await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(concurrency))),
                               duration_s + timeout_s + 10.0)
    finally:
        for ch in chans:
            await ch.close()
    return LoadReport(outcomes, loop.time() - start)


# ---- process resources ------------------------------------------------------------------------------------
def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class ResourceSampler:
    """Samples a process's RSS (kB) and open fd count every `interval_s` on a daemon thread until stop()."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, rss_kb, fds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{pid}", daemon=True)

    def __enter__(self) -> ResourceSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), rss_kb(self.pid), fd_count(self.pid)))
            except (OSError, ValueError):
                return  # the process is gone
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def thirds(self) -> dict:
        """Mean RSS (MB) and fd count over the first and the last third of the samples (warm-up included in
        neither's favour: the comparison is what "flat" means here)."""
        if len(self.samples) < 6:
            raise AssertionError(f"only {len(self.samples)} resource samples: the run was too short to judge")
        k = len(self.samples) // 3
        first, last = self.samples[:k], self.samples[-k:]
        return dict(rss_first_mb=round(statistics.mean(s[1] for s in first) / 1024, 1),
                    rss_last_mb=round(statistics.mean(s[1] for s in last) / 1024, 1),
                    rss_max_mb=round(max(s[1] for s in self.samples) / 1024, 1),
                    fds_first=round(statistics.mean(s[2] for s in first), 1),
                    fds_last=round(statistics.mean(s[2] for s in last), 1),
                    fds_max=max(s[2] for s in self.samples), samples=len(self.samples))


# ---- chaos monkey -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ChaosLog:
    kills: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    restarts: list[tuple[float, str, float]] = dataclasses.field(default_factory=list)  # (t, name, ready_after_s)


async def chaos_monkey(cluster: Cluster, replica_names: list[str], *, every_s: float, until: float,
                       rng: random.Random, replica_args: dict, log_: ChaosLog) -> None:
    """Every `every_s` SIGKILL one random running replica and start it again (same id, fresh ports and a fresh
    time-based incarnation) until loop time `until`. Blocking harness calls run in a thread."""
    loop = asyncio.get_running_loop()
    next_kill = loop.time() + every_s
    while next_kill < until:
        await asyncio.sleep(max(0.0, next_kill - loop.time()))
        name = rng.choice(replica_names)
        node = cluster.nodes[name]
        await asyncio.to_thread(cluster.kill, node)
        log_.kills.append((time.monotonic(), name))
        t0 = time.monotonic()
        await asyncio.to_thread(cluster.start_replica, name, seeds=cluster.seeds(exclude=name), **replica_args)
        log_.restarts.append((time.monotonic(), name, time.monotonic() - t0))
        next_kill += every_s


async def chaos_under_load(cluster: Cluster, gateway: Node, replica_names: list[str], *, duration_s: float,
                           concurrency: int, kill_every_s: float, max_tokens: int, replica_args: dict,
                           seed: int = 7, timeout_s: float = 30.0) -> dict:
    """The chaos campaign: closed-loop load while a replica is SIGKILLed and restarted every `kill_every_s`;
    gateway RSS and fds are sampled throughout. Returns the load report, the chaos log and resource figures."""
    chaos = ChaosLog()
    with ResourceSampler(gateway.pid, interval_s=0.25) as sampler:
        loop = asyncio.get_running_loop()
        monkey = asyncio.create_task(chaos_monkey(cluster, replica_names, every_s=kill_every_s,
                                                  until=loop.time() + duration_s - 1.0, rng=random.Random(seed),
                                                  replica_args=replica_args, log_=chaos))
        try:
            report = await closed_loop_load(gateway.grpc_address, concurrency=concurrency, duration_s=duration_s,
                                            max_tokens=max_tokens, timeout_s=timeout_s, prompt_prefix="chaos")
        finally:
            if not monkey.done():
                await asyncio.wait_for(monkey, 60.0)
        monkey.result()
    return dict(report=report, chaos=chaos, resources=sampler.thirds())


# ---- admin helpers ------------------------------------------------------------------------------------------
def gateway_members(address: str, timeout: float = 2.0) -> dict[str, pb.MemberInfo]:
    with grpc.insecure_channel(address) as ch:
        resp = pb_grpc.GatewayAdminStub(ch).Members(pb.MembersRequest(), timeout=timeout)
    return {m.member_id: m for m in resp.members}


class StateWatcher:
    """Polls every observer's member table on a thread and records every (observer, member, state) ever seen,
    so "nobody ever saw X dead" can be asserted over a whole run, not just at its end."""

    def __init__(self, cluster: Cluster, observers: list[Node], interval_s: float = 0.1) -> None:
        self.cluster = cluster
        self.observers = observers
        self.interval_s = interval_s
        self.seen: dict[str, set[tuple[str, str]]] = {}  # member -> {(observer, state)}
        # Gateways only: (monotonic, observer, {replica: breaker state}) per poll, when the field is present.
        self.breakers: list[tuple[float, str, dict[str, str]]] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-watcher", daemon=True)

    def __enter__(self) -> StateWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10.0)

    def _run(self) -> None:
        # Own channels: the harness's channel cache belongs to the test's thread.
        channels: dict[str, grpc.Channel] = {}
        try:
            while not self._stop.is_set():
                for obs in self.observers:
                    if not obs.alive():
                        continue
                    ch = channels.get(obs.grpc_address)
                    if ch is None:
                        ch = channels[obs.grpc_address] = grpc.insecure_channel(obs.grpc_address)
                    stub = (pb_grpc.GatewayAdminStub(ch) if obs.role == "gateway" else pb_grpc.ReplicaAdminStub(ch))
                    try:
                        resp = stub.Members(pb.MembersRequest(), timeout=2.0)
                    except grpc.RpcError:
                        continue  # an observer briefly too busy to answer is not a finding
                    for m in resp.members:
                        self.seen.setdefault(m.member_id, set()).add((obs.name, m.state))
                    if obs.role == "gateway":
                        self.breakers.append((time.monotonic(), obs.name,
                                              {m.member_id: m.breaker for m in resp.members
                                               if getattr(m, "breaker", "")}))
                self.polls += 1
                self._stop.wait(self.interval_s)
        finally:
            for ch in channels.values():
                ch.close()

    def states_of(self, member: str) -> set[str]:
        return {state for _, state in self.seen.get(member, set())}

    def breaker_states_of(self, member: str) -> set[str]:
        return {snap[member] for _, _, snap in self.breakers if member in snap}

    def most_ejected_at_once(self) -> int:
        return max((sum(1 for v in snap.values() if v != "closed") for _, _, snap in self.breakers), default=0)


__all__ = ["ChaosLog", "Cluster", "LoadReport", "Node", "Outcome", "ResourceSampler", "StateWatcher", "chaos_monkey",
           "chaos_under_load", "closed_loop_load", "fd_count", "free_port", "gateway_members", "rss_kb",
           "stream_problems", "wait_until"]


# ---- gossip under loss ----------------------------------------------------------------------------------------
async def gossip_under_loss(*, nodes: int, duration_s: float, loss: float, duplicate: float = 0.0,
                            reorder: float = 0.0, config=None, converge_timeout_s: float = 30.0,
                            seed: int = 1) -> dict:
    """`nodes` GossipNodes on real loopback UDP in this loop, every send through a LossyNetwork; once they have
    converged, run `duration_s` with nobody failing and count every DEAD/SUSPECT verdict (all of them false)."""
    from llmgw.gossip import GossipConfig, GossipNode, LossyNetwork

    config = config or GossipConfig.lan()
    made: list[GossipNode] = []
    events: dict[str, int] = {}
    false_dead: list[tuple[str, str]] = []
    measuring = False

    def on_event(observer: str):
        def cb(event) -> None:
            if not measuring:
                return
            events[event.kind] = events.get(event.kind, 0) + 1
            if event.kind == "dead":
                false_dead.append((observer, event.member.member_id))
        return cb

    nets = []
    try:
        for i in range(nodes):
            net = LossyNetwork(loss=loss, duplicate=duplicate, reorder=reorder, seed=seed * 1000 + i)
            nets.append(net)
            node = GossipNode(f"node-{i:02d}", config=config, network=net, seed=seed * 1000 + i,
                              seeds=[made[0].address] if made else [])
            made.append(node)
            await node.start()
            node.subscribe(on_event(node.member_id))
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        def converged() -> bool:
            return all(sum(1 for m in n.members() if m.state == "alive") == nodes - 1 for n in made)

        while not converged():
            if loop.time() - t0 > converge_timeout_s:
                raise AssertionError(f"{nodes} nodes did not converge within {converge_timeout_s} s at {loss:.0%} loss")
            await asyncio.sleep(0.1)
        converge_s = loop.time() - t0
        measuring = True
        await asyncio.sleep(duration_s)
        measuring = False
        final_ok = converged()
        stats = [n.stats() for n in made]
        return dict(nodes=nodes, loss=loss, duplicate=duplicate, reorder=reorder, duration_s=duration_s,
                    converge_s=round(converge_s, 2), false_dead=len(false_dead), false_dead_list=false_dead[:10],
                    suspect_events=events.get("suspect", 0), events=dict(events), all_alive_at_end=final_ok,
                    dropped=sum(n.dropped for n in nets), sent=sum(s.get("messages_out", 0) for s in stats),
                    refutations=sum(s.get("refutations", 0) for s in stats),
                    probes_failed=sum(s.get("probes_failed", 0) for s in stats),
                    ping_reqs_sent=sum(s.get("ping_reqs_sent", 0) for s in stats),
                    indirect_acks=sum(s.get("indirect_acks", 0) for s in stats))
    finally:
        for n in made:
            await asyncio.wait_for(n.stop(leave=False), 10)


# ---- hostile datagrams against the SWIM core ------------------------------------------------------------------
FUZZ_SELF = "fuzz-self"
FUZZ_POOL = [f"peer-{i}" for i in range(48)] + [FUZZ_SELF, "", "gateway-x", "x" * 300, "é\u0000\U0001F600"]
ABSURD_INCARNATIONS = [2**64 - 1, 2**64 - 2, 2**63, 2**63 - 1, 2**62, 0, 1]
STATE_NAMES = {"alive", "suspect", "dead", "left"}


def _adversarial_datagram(rng: random.Random, base_inc: int) -> bytes:
    """A well-formed GossipMessage with hostile content: spoofed senders (ourselves included), rumours about us,
    absurd incarnations, unknown enum values, non-finite weights, negative loads, junk addresses."""
    from llmgw._core.codec import Message, Update, encode

    def inc() -> int:
        r = rng.random()
        if r < 0.25:
            return rng.choice(ABSURD_INCARNATIONS)
        if r < 0.5:
            return base_inc + rng.randint(-5, 50)
        return rng.getrandbits(rng.choice((8, 32, 40, 41, 63, 64)))

    updates = []
    for _ in range(rng.choice((0, 1, 1, 2, 3, 8, 30))):
        mid = rng.choice(FUZZ_POOL)
        updates.append(Update(mid, rng.choice(["", f"{mid}:1", "127.0.0.1:9", "[::1]:65535", "no-port", ":::"]),
                              rng.choice((0, 1, 2, 3, 3, -1, 4, 7, 2**31 - 1)), inc(),
                              rng.choice(("", "v1", "v" * 200)), rng.choice((0, 3, -1, -2**31, 2**31 - 1)),
                              rng.choice((0, 4, -7, 2**31 - 1)), rng.choice(("", "h:1", "junk")),
                              rng.choice((0, 1, 2, 9)), rng.choice((0.0, 1.0, -1.0, float("inf"), float("nan"), 1e38)),
                              rng.random() < 0.2, rng.choice(FUZZ_POOL)))
    return encode(Message(rng.choice((0, 1, 2, 3, 4, 5, 6, 9, 2**31 - 1)), rng.choice(FUZZ_POOL),
                          rng.choice((FUZZ_SELF, "", "someone-else")), rng.getrandbits(rng.choice((1, 8, 64))),
                          updates, rng.choice(("", "127.0.0.1:1", "bad")), rng.choice(("", "x:1")),
                          rng.getrandbits(rng.choice((8, 48)))))


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.3 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op < 0.5 and b:
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        elif op < 0.65 and b:
            del b[rng.randrange(len(b)):]  # truncate
        elif op < 0.8:
            at = rng.randrange(len(b) + 1)
            b[at:at] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 12)))
        elif b:
            i, j = sorted((rng.randrange(len(b)), rng.randrange(len(b))))
            b[i:i] = b[i:j]  # duplicate a slice: repeated fields, bogus lengths
    return bytes(b)


def fuzz_swim(count: int, *, seed: int = 1, check_every: int = 1000) -> dict:
    """Throw `count` mutated / random / adversarial datagrams at one Swim core (with a peer table and live timers)
    and check its invariants every `check_every` datagrams. Returns counters; raises AssertionError on the first
    broken invariant (self not alive, an invented member, an insane field, a slow datagram)."""
    from llmgw._core.codec import decode
    from llmgw.gossip.config import GossipConfig
    from llmgw.gossip.testing import BASE_INC, datagram, join_all, make, upd

    config = GossipConfig.lan()
    rng = random.Random(seed)
    core = make(FUZZ_SELF, config, seed=seed)
    peers = [make(f"peer-{i}", config, seed=i) for i in range(4)]
    join_all([core] + peers)
    start_inc = core.incarnation
    known_ids = {p.member_id for p in peers}  # every id a datagram could legitimately have introduced
    corpus = [datagram(t, f"peer-{i % 4}", [upd(f"peer-{(i + 1) % 4}", s, BASE_INC + i)], seq=i, target=FUZZ_SELF)
              for i, (t, s) in enumerate([(0, 0), (2, 1), (1, 2), (2, 3), (4, 0), (5, 0), (3, 1)])]
    now = 0.0
    kinds = {"mutated": 0, "random": 0, "adversarial": 0}
    decodable = 0
    slowest = 0.0
    t_start = time.perf_counter()
    for n in range(1, count + 1):
        r = rng.random()
        if r < 0.45:
            data = _mutate(rng, rng.choice(corpus))
            kinds["mutated"] += 1
        elif r < 0.6:
            data = bytes(rng.getrandbits(8) for _ in range(rng.choice((0, 1, 2, 5, 40, 300, 1400))))
            kinds["random"] += 1
        else:
            data = _adversarial_datagram(rng, start_inc)
            kinds["adversarial"] += 1
            if rng.random() < 0.05:
                corpus.append(data)
                if len(corpus) > 64:
                    corpus.pop(1)
        try:
            msg = decode(data)
        except ValueError:
            msg = None
        if msg is not None:
            decodable += 1
            known_ids.add(msg.sender_id)
            known_ids.update(u.member_id for u in msg.updates)
        t0 = time.perf_counter()
        core.handle_datagram(data, rng.choice(("127.0.0.1:7946", "10.0.0.1:1", "[::1]:2")), now)
        if n % 7 == 0:
            now += 0.05
            core.tick(now)
        core.drain_outgoing()
        core.drain_events()
        slowest = max(slowest, time.perf_counter() - t0)
        if n % check_every == 0 or n == count:
            check_swim_invariants(core, known_ids, start_inc, config)
    elapsed = time.perf_counter() - t_start
    stats = core.stats
    return dict(datagrams=count, kinds=kinds, decodable=decodable, seconds=round(elapsed, 2),
                slowest_datagram_ms=round(slowest * 1000, 3), members=len(core.members()),
                self_incarnation_growth=core.incarnation - start_inc,
                malformed=stats["malformed"], implausible=stats["implausible"], misdirected=stats["misdirected"],
                refutations=stats["refutations"])


def check_swim_invariants(core, known_ids: set[str], start_inc: int, config) -> None:
    from llmgw.gossip import Member
    from llmgw.topology import ROLES, is_routable

    me = Member.from_core(core.local_member())
    assert me.state == "alive" and not core.leaving, f"self is {me.state} in its own table"
    assert start_inc <= core.incarnation < 2**63, f"self incarnation {core.incarnation} out of range"
    rows = core.members()
    assert len(rows) <= len(known_ids), f"{len(rows)} members but only {len(known_ids)} ids were ever presented"
    members = [Member.from_core(row) for row in rows]  # the shell's reading of each row must not fail either
    for m in members:
        assert m.member_id in known_ids, f"member {m.member_id!r} was never in any datagram"
        assert m.member_id != core.member_id, "self listed among the others"
        assert m.state in STATE_NAMES, f"{m.member_id}: state {m.state!r}"
        assert m.role in ROLES, f"{m.member_id}: role {m.role!r}"
        assert 0 <= m.incarnation < 2**64, f"{m.member_id}: incarnation {m.incarnation}"
        assert isinstance(m.address, str) and isinstance(m.grpc_address, str)
    # The core's live-member count (self included), which sizes suspicion and retransmits, agrees with its table.
    live = sum(1 for m in members if is_routable(m.state))
    assert core.num_live() == live + 1, f"num_live {core.num_live()} but {live} live others in the table"


# ---- overload -----------------------------------------------------------------------------------------------
async def http_burst(url: str, count: int, *, max_tokens: int = 5, timeout_s: float = 15.0) -> list[tuple[int, str]]:
    """`count` concurrent POST /v1/completions; [(status, Retry-After header)] in order."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async def one(i):
            body = {"model": "v1", "prompt": f"http-overload-{i}", "max_tokens": max_tokens}
            async with session.post(url + "/v1/completions", json=body) as resp:
                await resp.read()
                return resp.status, resp.headers.get("Retry-After", "")

        return await asyncio.gather(*(one(i) for i in range(count)))


async def overload_campaign(gateway: Node, *, duration_s: float, concurrency: int, max_tokens: int,
                            timeout_s: float, http_url: str | None = None, http_bursts: int = 3) -> dict:
    """Closed-loop load at `concurrency` (set it to ~10x capacity + queue) for `duration_s`, plus concurrent HTTP
    bursts; samples the gateway's RSS and fds."""
    with ResourceSampler(gateway.pid, interval_s=0.25) as sampler:
        load = asyncio.create_task(closed_loop_load(gateway.grpc_address, concurrency=concurrency,
                                                    duration_s=duration_s, max_tokens=max_tokens,
                                                    timeout_s=timeout_s, prompt_prefix="overload",
                                                    reject_backoff_s=0.05))
        http: list[tuple[int, str]] = []
        if http_url:
            for _ in range(http_bursts):
                await asyncio.sleep(duration_s / (http_bursts + 1))
                http += await http_burst(http_url, 40, max_tokens=max_tokens, timeout_s=timeout_s)
        report = await load
    return dict(report=report, http=http, resources=sampler.thirds())


async def fifo_probe(gateway: Node, *, requests: int, spacing_s: float, max_tokens: int,
                     timeout_s: float) -> list[client.StreamResult]:
    """Requests sent one by one, `spacing_s` apart, on one channel (so they reach the gateway in send order)."""
    async with grpc.aio.insecure_channel(gateway.grpc_address) as ch:
        async def one(i):
            await asyncio.sleep(i * spacing_s)
            return await client.collect(client.stream_infer(ch, f"fifo-{i:04d}", max_tokens, timeout_s=timeout_s))

        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(requests))),
                                      timeout_s + requests * spacing_s + 5.0)


def restart_gateway(cluster: Cluster, name: str, **kwargs) -> tuple[Node, float]:
    """Start gateway `name` again (same id, fresh ports); (node, monotonic time its new READY line was seen)."""
    node = cluster.start_gateway(name, **kwargs)
    return node, node.ready_at


# ---- agent: run inside a network namespace (tests/test_netns.py) ----------------------------------------------
def _agent_main(argv: list[str]) -> int:
    """`python tests/reliability_helpers.py members ADDR` -> JSON {member: state} of a gateway;
    `... load ADDR DURATION CONCURRENCY TOKENS PREFIX` -> JSON summary of a closed-loop load with per-outcome
    (sent_at, code) pairs. Prints one JSON line; used from `ip netns exec` where the test process cannot reach."""
    import json

    cmd = argv[0]
    if cmd == "members":
        try:
            print(json.dumps({k: m.state for k, m in gateway_members(argv[1]).items()}))
        except grpc.RpcError as exc:
            print(json.dumps({"_error": str(exc.code())}))
        return 0
    if cmd == "load":
        address, duration, concurrency, tokens, prefix = argv[1], float(argv[2]), int(argv[3]), int(argv[4]), argv[5]
        report = asyncio.run(closed_loop_load(address, concurrency=concurrency, duration_s=duration,
                                              max_tokens=tokens, timeout_s=15.0, prompt_prefix=prefix))
        print(json.dumps(dict(summary=report.summary(), problems=len(report.with_problems),
                              outcomes=[(o.sent_at, o.total_s, o.code) for o in report.outcomes])))
        return 0
    raise SystemExit(f"unknown agent command {cmd!r}")


if __name__ == "__main__":
    sys.exit(_agent_main(sys.argv[1:]))
