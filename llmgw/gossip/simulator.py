"""Deterministic in-process cluster simulator: the real sans-IO SWIM core on a simulated clock and network.

The network has per-link loss, delay + jitter and partitions; nodes can be crashed, restarted (fresh time-based
incarnation, same address) and paused (a stalled process: datagrams queue up in its socket buffer and are read,
before its overdue timers fire, when it resumes). Everything is driven by one event heap and one seeded RNG, so a
run is reproducible from its seed.

``run_scenario`` is the measurement harness behind ``python -m llmgw simulate``, the acceptance tests and
``benchmarks/run_gossip.py``.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from llmgw._core.codec import SYNC_ACK, Message, Update, encode_limited
from llmgw._core.swim import MEMBER_FIELDS, Swim
from llmgw.gossip.config import GossipConfig
from llmgw.gossip.node import Member
from llmgw.topology import ROLE_REPLICA, SEED_PLACEHOLDER_PREFIX, role_number

_DELIVER = 0
_TIMER = 1
_CALL = 2
_RESUME = 3

WALL_OFFSET = 1.7e9  # simulated wall clock = simulated monotonic time + this (only incarnations use it)
# Positions in the core's member tuples (the event callback and the measurements read raw rows: at N = 1,000 a
# Member object per event would cost more than the protocol itself).
_ID, _ADDRESS, _STATE, _INCARNATION, _VERSION, _ACTIVE, _CAPACITY, _WEIGHT, _DRAINING = (
    MEMBER_FIELDS.index(name) for name in ("member_id", "address", "state", "incarnation", "model_version",
                                           "active_requests", "max_capacity", "weight", "draining"))


class SimNode:
    __slots__ = ("address", "backlog", "core", "generation", "index", "member_id", "paused_until", "timer_at")

    def __init__(self, index: int, member_id: str, address: str) -> None:
        self.index = index
        self.member_id = member_id
        self.address = address
        self.core: Swim | None = None
        self.generation = 0
        self.timer_at = math.inf
        self.paused_until = -math.inf
        self.backlog: list[tuple[str, bytes]] = []

    @property
    def running(self) -> bool:
        return self.core is not None

    @property
    def live_core(self) -> Swim:
        """The core of a running node (RuntimeError for a crashed one: a caller that should have checked)."""
        if self.core is None:
            raise RuntimeError(f"{self.member_id} is not running")
        return self.core


class Simulator:
    """N nodes named ``node-<i>`` at ``10.<i/256>.<i%256>.1:7946``, driven by ``run_until``."""

    def __init__(self, n_nodes: int, *, config: GossipConfig | None = None, seed: int = 0, loss: float = 0.0,
                 delay: float = 0.001, jitter: float = 0.001, bootstrap: str = "sync",
                 on_event: Callable[[float, int, str, tuple], None] | None = None) -> None:
        if n_nodes < 1:
            raise ValueError("n_nodes must be >= 1")
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        if delay < 0 or jitter < 0:
            raise ValueError("delay and jitter must be >= 0")
        if bootstrap not in ("sync", "join"):
            raise ValueError("bootstrap must be 'sync' (instant full state) or 'join' (through a seed)")
        self.config = config or GossipConfig.lan()
        self.rng = random.Random(seed)
        self.loss = loss
        self.delay = delay
        self.jitter = jitter
        self.link_loss: dict[tuple[int, int], float] = {}
        self.partition_of: dict[int, int] | None = None
        self.on_event = on_event
        self.now = 0.0
        self._heap: list = []
        self._seq = 0
        self.nodes = [SimNode(i, f"node-{i}", f"10.{i // 256}.{i % 256}.1:7946") for i in range(n_nodes)]
        self._by_address = {n.address: n for n in self.nodes}
        self.datagrams_sent = 0
        self.datagrams_lost = 0
        self.events_processed = 0
        # Building N full tables allocates N^2 long-lived objects; the cyclic GC would rescan them all over and
        # over (minutes at N = 1,000). They are not cyclic garbage, so pause it and then freeze what exists.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for n in self.nodes:
                self._boot(n, 0.0)
            if bootstrap == "sync":
                self._bootstrap_full_state()
            else:
                seed_address = self.nodes[0].address
                for n in self.nodes[1:]:
                    n.live_core.join([seed_address], 0.0)
                    self._after(n)
        finally:
            gc.freeze()
            if gc_was_enabled:
                gc.enable()

    # -- setup -----------------------------------------------------------------------------------------------------

    def _boot(self, n: SimNode, t: float) -> None:
        n.generation += 1
        n.core = Swim(n.member_id, n.address, self.config, self.rng.getrandbits(64), t,
                      int((t + WALL_OFFSET) * 1000), wall_offset=WALL_OFFSET, role=role_number(ROLE_REPLICA),
                      placeholder_prefix=SEED_PLACEHOLDER_PREFIX)
        n.timer_at = math.inf
        n.paused_until = -math.inf
        n.backlog = []
        self._after(n)

    def _bootstrap_full_state(self) -> None:
        """Hand every node the whole table at t=0 through the core's own SYNC_ACK path (no special hook)."""
        state = [Update(n.member_id, n.address, 0, n.live_core.incarnation, "", 0, 0, "", role_number(ROLE_REPLICA),
                        1.0, False, "") for n in self.nodes]
        msg = Message(SYNC_ACK, "bootstrap", "", 0, None, "", "", int(WALL_OFFSET * 1000))
        chunks = []
        pos = 0
        while pos < len(state):
            data, k = encode_limited(msg, state[pos:], self.config.max_datagram)
            chunks.append(data)
            pos += k
        for n in self.nodes:
            for data in chunks:
                n.live_core.handle_datagram(data, "", 0.0)  # empty source: the fake sender is not learned
            self._after(n)

    # -- event plumbing --------------------------------------------------------------------------------------------

    def _push(self, t: float, kind: int, a, b=None, c=None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, a, b, c))

    def _after(self, n: SimNode) -> None:
        """Ship what the node produced, record its events and make sure its next deadline is scheduled."""
        core = n.live_core
        out = core.drain_outgoing()
        if out:
            rng = self.rng
            for address, data in out:
                self.datagrams_sent += 1
                dst = self._by_address.get(address)
                if dst is None:
                    continue
                loss = self.link_loss.get((n.index, dst.index), self.loss)
                if self.partition_of is not None and (self.partition_of.get(n.index, -1)
                                                      != self.partition_of.get(dst.index, -1)):
                    loss = 1.0
                if loss and rng.random() < loss:
                    self.datagrams_lost += 1
                    continue
                latency = self.delay + (rng.random() * self.jitter if self.jitter else 0.0)
                self._push(self.now + latency, _DELIVER, dst, n.address, data)
        events = core.drain_events()
        if events and self.on_event is not None:
            for kind, row in events:
                self.on_event(self.now, n.index, kind, row)
        d = core.next_deadline()
        if d < n.timer_at:
            n.timer_at = d
            self._push(d, _TIMER, n, n.generation)

    def run_until(self, t_end: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= t_end:
            t, _, kind, a, b, c = heapq.heappop(heap)
            self.now = t
            self.events_processed += 1
            if kind == _DELIVER:
                n = a
                if n.core is None:
                    continue
                if n.paused_until > t:
                    n.backlog.append((b, c))
                    continue
                n.core.handle_datagram(c, b, t)
                self._after(n)
            elif kind == _TIMER:
                n = a
                if n.core is None or b != n.generation or t != n.timer_at:
                    continue
                n.timer_at = math.inf
                if n.paused_until > t:
                    continue  # the resume event ticks it
                n.core.tick(t)
                self._after(n)
            elif kind == _RESUME:
                n = a
                if n.core is None or b != n.generation or n.paused_until != t:
                    continue
                backlog, n.backlog = n.backlog, []
                for source, data in backlog:
                    n.core.handle_datagram(data, source, t)
                n.core.tick(t)
                n.timer_at = math.inf
                self._after(n)
            else:
                a(t)
        self.now = t_end

    # -- faults and actions ----------------------------------------------------------------------------------------

    def at(self, t: float, action: Callable[[float], None]) -> None:
        """Run action(t) at simulated time t (use it to script crashes, updates, partitions...)."""
        self._push(t, _CALL, action)

    def crash(self, i: int) -> None:
        n = self.nodes[i]
        n.core = None
        n.generation += 1
        n.backlog = []

    def restart(self, i: int, seeds: Iterable[int] = ()) -> None:
        n = self.nodes[i]
        self._boot(n, self.now)
        seed_addresses = [self.nodes[s].address for s in seeds if s != i]
        if seed_addresses:
            n.live_core.join(seed_addresses, self.now)
        self._after(n)

    def pause(self, i: int, duration: float) -> None:
        n = self.nodes[i]
        if n.core is None:
            return
        n.paused_until = self.now + duration
        self._push(n.paused_until, _RESUME, n, n.generation)

    def partition(self, groups: Iterable[Iterable[int]]) -> None:
        """Only nodes in the same group can talk; nodes in no group are isolated."""
        self.partition_of = {i: g for g, members in enumerate(groups) for i in members}

    def heal(self) -> None:
        self.partition_of = None

    def set_meta(self, i: int, **fields) -> None:
        n = self.nodes[i]
        n.live_core.set_meta(self.now, **fields)
        self._after(n)

    def running(self) -> list[int]:
        return [n.index for n in self.nodes if n.core is not None]

    def members(self, index: int, *, include_self: bool = False) -> list[Member]:
        """Node `index`'s member table as the UDP shell presents it (llmgw.gossip.Member, same derivations)."""
        core = self.nodes[index].core
        if core is None:
            raise ValueError(f"node {index} is not running")
        return [Member.from_core(row) for row in core.members(include_self)]

    def bytes_out(self) -> int:
        return sum(n.core.bytes_out for n in self.nodes if n.core is not None)

    def sync_bytes_out(self) -> int:
        return sum(n.core.sync_bytes_out for n in self.nodes if n.core is not None)

    def push_pull_bytes_per_node_s(self) -> float:
        """Anti-entropy cost amortized: each node sends one full state per interval and answers one.

        The interval stretches with N (see GossipConfig.push_pull_interval), often beyond a simulated window, so
        it is computed from the real size of a full state rather than sampled.
        """
        running = self.running()
        if not running:
            return 0.0
        rows = [Member.from_core(r) for r in self.nodes[running[0]].live_core.members(True)]
        state_bytes = sum(Update(m.member_id, m.address, 0, m.incarnation, m.model_version, m.active_requests,
                                 m.max_capacity, "", role_number(ROLE_REPLICA), m.weight, m.draining,
                                 "").encoded_size()
                          for m in rows)
        datagrams = max(1, math.ceil(state_bytes / (self.config.max_datagram - 80)))
        state_bytes += datagrams * 60  # message header per datagram
        interval = self.config.push_pull_interval * max(1.0, len(rows) / 32.0)
        return 2.0 * state_bytes / interval


# ---------------------------------------------------------------------------------------------------------------
# Measurement harness


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


@dataclass
class ScenarioResult:
    nodes: int
    loss: float
    duration: float
    seed: int
    protocol_period: float
    crashes: int = 0
    first_suspicion: list[float] = field(default_factory=list)  # seconds from crash to first SUSPECT anywhere
    dead_everywhere: list[float] = field(default_factory=list)  # seconds from crash to DEAD at every live node
    undetected_crashes: int = 0
    false_dead: int = 0  # "dead" events about a running node, summed over observers
    false_dead_members: int = 0  # distinct running nodes that some observer declared dead
    false_suspicions: int = 0
    dissemination: list[float] = field(default_factory=list)  # seconds for an update to reach every live node
    undisseminated: int = 0
    dissemination_curve: list[tuple[float, float]] = field(default_factory=list)  # (s after update, fraction)
    steady_bytes_per_node_s: float = 0.0  # quiet window, anti-entropy amortized over its (N-scaled) interval
    push_pull_bytes_per_node_s: float = 0.0
    bytes_per_node_s: float = 0.0
    node_hours: float = 0.0
    converged: bool = True
    stuck: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0

    def summary(self) -> dict:
        period = self.protocol_period
        suspicion_p50 = percentile(self.first_suspicion, 50)
        out = {
            "nodes": self.nodes, "loss": self.loss, "duration_s": self.duration, "seed": self.seed,
            "crashes": self.crashes, "undetected_crashes": self.undetected_crashes,
            "first_suspicion_p50_s": percentile(self.first_suspicion, 50),
            "first_suspicion_p99_s": percentile(self.first_suspicion, 99),
            "first_suspicion_p50_periods": None if suspicion_p50 is None else suspicion_p50 / period,
            "dead_everywhere_p50_s": percentile(self.dead_everywhere, 50),
            "dead_everywhere_p99_s": percentile(self.dead_everywhere, 99),
            "false_dead": self.false_dead, "false_dead_members": self.false_dead_members,
            "false_suspicions": self.false_suspicions,
            "dissemination_p50_s": percentile(self.dissemination, 50),
            "dissemination_p99_s": percentile(self.dissemination, 99),
            "dissemination_max_s": max(self.dissemination) if self.dissemination else None,
            "undisseminated": self.undisseminated,
            "steady_bytes_per_node_s": round(self.steady_bytes_per_node_s, 1),
            "push_pull_bytes_per_node_s": round(self.push_pull_bytes_per_node_s, 1),
            "bytes_per_node_s": round(self.bytes_per_node_s, 1),
            "node_hours": round(self.node_hours, 2), "converged": self.converged,
            "wall_seconds": round(self.wall_seconds, 2),
        }
        return out

    def to_dict(self) -> dict:
        return asdict(self)


# How long a restarted node gets to be known ALIVE everywhere before the final convergence check.
REJOIN_SETTLE_S = 5.0


def run_scenario(nodes: int = 64, *, loss: float = 0.0, duration: float = 60.0, seed: int = 1, crashes: int = 0,
                 updates: int = 0, stalls: int = 0, stall_every: float = 10.0, stall_min: float = 1.0,
                 stall_max: float = 2.0, mass_restart: float = 0.0, config: GossipConfig | None = None,
                 delay: float = 0.001, jitter: float = 0.001, warmup: float = 10.0, steady_window: float = 10.0,
                 crash_spacing: float | None = None, update_spacing: float = 3.0) -> ScenarioResult:
    """Simulate a cluster and measure it.

    Timeline: warm-up (bootstrap chatter settles), a quiet window measuring steady-state bytes, then the crashes
    (one at a time, each restarted once DEAD is known everywhere, so N stays constant), the metadata updates, the
    stalling nodes (stalls > 0: that many nodes stall stall_min..stall_max s every stall_every s), and an optional
    mass restart of a fraction of the cluster. ``duration`` is the measured span after the warm-up.
    """
    import time as _time

    wall_start = _time.perf_counter()
    config = config or GossipConfig.lan()
    period = config.protocol_period
    res = ScenarioResult(nodes=nodes, loss=loss, duration=duration, seed=seed, protocol_period=period)
    crashed_at: dict[str, float] = {}
    first_suspect: dict[str, float] = {}
    dead_seen: dict[str, set[int]] = {}
    pending_updates: dict[str, tuple[float, str, set[int], list[float]]] = {}  # tag -> (t0, member, seen, times)
    false_dead_ids: set[str] = set()
    sim_ref: list[Simulator] = []

    def on_event(t: float, observer: int, kind: str, row: tuple) -> None:
        member_id = row[_ID]
        if kind == "suspect" or kind == "dead":
            if member_id in crashed_at:
                if member_id not in first_suspect:
                    first_suspect[member_id] = t
                if kind == "dead":
                    dead_seen.setdefault(member_id, set()).add(observer)
            elif t >= warmup:
                if kind == "dead":
                    res.false_dead += 1
                    false_dead_ids.add(member_id)
                else:
                    res.false_suspicions += 1
        if pending_updates and (kind == "updated" or kind == "joined" or kind == "alive"):
            entry = pending_updates.get(row[_VERSION])
            if (entry is not None and entry[1] == member_id and observer not in entry[2]
                    and update_population[row[_VERSION]].get(observer) == sim_ref[0].nodes[observer].generation):
                entry[2].add(observer)
                entry[3].append(t - entry[0])

    sim = Simulator(nodes, config=config, seed=seed, loss=loss, delay=delay, jitter=jitter, on_event=on_event)
    sim_ref.append(sim)
    rng = random.Random(seed ^ 0x5EED)
    sim.run_until(warmup)
    t = warmup
    quiet_end = t + min(steady_window, duration)
    b0 = sim.bytes_out() - sim.sync_bytes_out()
    sim.run_until(quiet_end)
    res.push_pull_bytes_per_node_s = sim.push_pull_bytes_per_node_s()
    res.steady_bytes_per_node_s = ((sim.bytes_out() - sim.sync_bytes_out() - b0) / nodes / (quiet_end - t)
                                   + res.push_pull_bytes_per_node_s)

    # Scripted faults spread over the measured span.
    end = warmup + duration
    spacing = crash_spacing or max(12.0, (end - quiet_end) / max(crashes, 1))
    crash_times = [quiet_end + i * spacing for i in range(crashes)]
    victims: list[int] = []
    stall_nodes = rng.sample(range(nodes), min(stalls, nodes)) if stalls else []
    for ct in crash_times:
        candidates = [x for x in range(nodes) if x not in stall_nodes]
        victim = rng.choice(candidates)
        victims.append(victim)

        def do_crash(now: float, v=victim) -> None:
            member_id = sim.nodes[v].member_id
            crashed_at[member_id] = now
            first_suspect.pop(member_id, None)
            dead_seen[member_id] = set()
            sim.crash(v)

        def do_check(now: float, v=victim, t_crash=ct) -> None:
            member_id = sim.nodes[v].member_id
            res.crashes += 1
            if member_id in first_suspect:
                res.first_suspicion.append(first_suspect[member_id] - t_crash)
            # DEAD-everywhere time was captured by poll_dead; restarting keeps N constant for the next crash.
            crashed_at.pop(member_id, None)
            sim.restart(v, seeds=rng.sample(sim.running(), min(3, len(sim.running()))))

        sim.at(ct, do_crash)
        sim.at(ct + spacing * 0.9, do_check)
        # Every crash gets its full observation window, and the last restart time to rejoin before convergence
        # is judged at the end.
        end = max(end, ct + spacing * 0.9 + REJOIN_SETTLE_S)

    def poll_dead(now: float) -> None:
        # DEAD-everywhere time: the first poll at which every running node has seen the crashed member DEAD.
        running = set(sim.running())
        for member_id, t_crash in list(crashed_at.items()):
            if (member_id, t_crash) in done_dead:
                continue
            seen = dead_seen.get(member_id, set())
            if running <= seen:
                done_dead[(member_id, t_crash)] = True
                res.dead_everywhere.append(_latest_dead_time[member_id] - t_crash)
        if now + 0.05 <= end:
            sim.at(now + 0.05, poll_dead)

    done_dead: dict[tuple[str, float], bool] = {}
    _latest_dead_time: dict[str, float] = {}

    # Exact DEAD-everywhere time: track the last observer's dead event time.
    inner = on_event

    def on_event_with_latest(t_ev: float, observer: int, kind: str, row: tuple) -> None:
        if kind == "dead" and row[_ID] in crashed_at:
            _latest_dead_time[row[_ID]] = t_ev
        inner(t_ev, observer, kind, row)

    sim.on_event = on_event_with_latest
    if crashes:
        sim.at(quiet_end, poll_dead)

    update_population: dict[str, dict[int, int]] = {}  # tag -> {node: generation} when the update was made
    for i in range(updates):
        ut = quiet_end + (i + 0.5) * update_spacing
        if ut >= end:
            break

        def do_update(now: float, k=i) -> None:
            running = sim.running()
            src = rng.choice(running)
            tag = f"sim-update-{k}"
            member_id = sim.nodes[src].member_id
            pending_updates[tag] = (now, member_id, {src}, [0.0])
            update_population[tag] = {x: sim.nodes[x].generation for x in running}
            sim.set_meta(src, model_version=tag)

        sim.at(ut, do_update)

    for s in stall_nodes:
        first = quiet_end + rng.random() * stall_every
        k = 0
        while first + k * stall_every < end:
            st = first + k * stall_every
            def stall(now: float, s: int = s) -> None:  # the stall's length is drawn when it starts
                sim.pause(s, stall_min + rng.random() * (stall_max - stall_min))

            sim.at(st, stall)
            k += 1

    restarted: list[int] = []
    if mass_restart > 0:
        mr_t = quiet_end

        def do_mass_crash(now: float) -> None:
            chosen = rng.sample(range(nodes), int(nodes * mass_restart))
            restarted.extend(chosen)
            for v in chosen:
                sim.crash(v)

        def do_mass_restart(now: float) -> None:
            survivors = [x for x in range(nodes) if x not in restarted]
            for v in restarted:
                sim.restart(v, seeds=rng.sample(survivors, min(3, len(survivors))))

        sim.at(mr_t, do_mass_crash)
        sim.at(mr_t + 1.0, do_mass_restart)

    b1 = sim.bytes_out()
    t1 = quiet_end
    sim.run_until(end)
    res.bytes_per_node_s = (sim.bytes_out() - b1) / nodes / max(end - t1, 1e-9)
    res.node_hours = nodes * duration / 3600.0
    res.false_dead_members = len(false_dead_ids)
    res.undetected_crashes = res.crashes - len(res.dead_everywhere)

    running = sim.running()
    curve_points: list[float] = []
    for tag, (_t0, _member_id, seen, times) in pending_updates.items():
        # Nodes that crashed or restarted after the update are not expected to hear it as news.
        population = {x for x, gen in update_population[tag].items() if sim.nodes[x].generation == gen}
        if population <= seen:
            res.dissemination.append(max(times))
        else:
            res.undisseminated += 1
        curve_points.extend(times)
    if curve_points and pending_updates:
        curve_points.sort()
        total = sum(len(p) for p in update_population.values())
        res.dissemination_curve = [(tp, (i + 1) / total) for i, tp in enumerate(curve_points)]

    # Convergence: every running node sees every other running node alive.
    stuck = []
    for i in running:
        states = {str(row[_ID]): str(row[_STATE]) for row in sim.nodes[i].live_core.members()}
        for j in running:
            if j != i and states.get(sim.nodes[j].member_id) != "alive":
                stuck.append(f"{sim.nodes[i].member_id} sees {sim.nodes[j].member_id} as "
                             f"{states.get(sim.nodes[j].member_id, 'unknown')}")
    res.stuck = stuck[:20]
    res.converged = not stuck
    res.wall_seconds = _time.perf_counter() - wall_start
    return res
