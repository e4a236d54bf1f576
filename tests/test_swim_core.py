"""Unit tests of the sans-IO SWIM core (llmgw._core.swim), driven by hand: no sockets, no clock."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest

from llmgw._core.codec import (
    ACK,
    ALIVE,
    DEAD,
    NACK,
    PING,
    PING_REQ,
    ROLE_UPSTREAM,
    SUSPECT,
    SYNC,
    SYNC_ACK,
    USER,
    Message,
    Update,
    decode,
    encode,
)
from llmgw._core.swim import MAX_APP_META, MAX_PENDING_USER_MESSAGES, MEMBER_FIELDS, Swim
from llmgw.gossip.auth import Authenticator
from llmgw.gossip.config import GossipConfig
from llmgw.gossip.node import Member
from llmgw.gossip.testing import (
    BASE_INC,
    addr,
    answering,
    datagram,
    deliver,
    gossip,
    inc_of,
    join_all,
    make,
    outgoing,
    run,
    state_of,
    upd,
)
from llmgw.topology import ROLE_UPSTREAM as UPSTREAM_NAME
from llmgw.topology import is_replica, is_upstream_agent

LAN = GossipConfig.lan()
SHUFFLE = GossipConfig.lan(probe_schedule="shuffle")


# --- refutation, incarnations ---------------------------------------------------------------------------------------

def test_suspected_node_refutes_with_max_plus_one():
    a = make("a")
    join_all([a, make("b")])
    gossip(a, "b", [upd("a", SUSPECT, BASE_INC + 7, reporter="b")])
    assert a.incarnation == BASE_INC + 8
    assert a.stats["refutations"] == 1
    # The refutation is the first thing a piggybacks.
    deliver(a, PING, "b", seq=3, target="a")
    (_, ack, _), = outgoing(a)
    assert ack.type == ACK and ack.sequence_num == 3
    assert (ack.updates[0].member_id, ack.updates[0].state, ack.updates[0].incarnation) == ("a", ALIVE,
                                                                                            BASE_INC + 8)


def test_dead_rumour_about_self_is_refuted_and_stale_ones_ignored():
    a = make("a", incarnation=BASE_INC + 100)
    gossip(a, "b", [upd("a", DEAD, BASE_INC + 50, reporter="b")])
    assert a.incarnation == BASE_INC + 100 and a.stats["refutations"] == 0
    gossip(a, "b", [upd("a", DEAD, BASE_INC + 100, reporter="b")])
    assert a.incarnation == BASE_INC + 101 and a.stats["refutations"] == 1


def test_restarted_node_with_time_based_incarnation_rejoins_after_dead():
    a = make("a")
    join_all([a, make("b")])
    gossip(a, "c", [upd("b", DEAD, BASE_INC, reporter="c")])
    assert state_of(a, "b") == "dead"
    assert [k for k, r in a.drain_events() if r[0] == "b"] == ["dead"]
    gossip(a, "b", [upd("b", ALIVE, BASE_INC + 5_000)])  # restarted: fresh, larger incarnation
    assert state_of(a, "b") == "alive"
    assert [k for k, r in a.drain_events() if r[0] == "b"] == ["joined"]


def test_absurd_incarnation_is_ignored_and_cannot_evict():
    a = make("a")
    join_all([a, make("b")])
    gossip(a, "evil", [upd("b", DEAD, 2**64 - 1, reporter="evil")])
    assert state_of(a, "b") == "alive"
    gossip(a, "evil", [upd("a", SUSPECT, 2**64 - 1, reporter="evil")])
    assert a.incarnation == BASE_INC  # no refutation into the stratosphere
    assert a.stats["implausible"] == 2
    # A plausible higher incarnation is still accepted.
    gossip(a, "b", [upd("b", ALIVE, BASE_INC + 10)])
    assert inc_of(a, "b") == BASE_INC + 10


def test_rejects_construction_errors():
    with pytest.raises(ValueError):
        Swim("", "h:1", LAN, 0, 0.0, 0)
    with pytest.raises(ValueError):
        Swim("x", "no-port", LAN, 0, 0.0, 0)


# --- buddy system, probes, NACK -------------------------------------------------------------------------------------

def _first_ping(node: Swim, target: str, until: float):
    """Run node's timers until it pings target; returns the PING message."""
    t = node.next_deadline()
    for _ in range(1000):
        node.tick(t)
        for address, msg, _ in outgoing(node):
            if msg.type == PING and msg.target_id == target:
                return msg, t
            if msg.type == PING:  # others answer, so the node stays healthy (awareness 0)
                node.handle_datagram(encode(Message(ACK, msg.target_id, node.member_id, msg.sequence_num, [],
                                                    address, "", 0)), address, t)
        t = node.next_deadline()
        if t > until:
            break
    raise AssertionError(f"no PING to {target} before {until}")


def test_buddy_system_ping_to_suspect_carries_suspicion_first_and_target_refutes():
    a, b = make("a", SHUFFLE), make("b", SHUFFLE)
    join_all([a, b])
    gossip(a, "c", [upd("b", SUSPECT, BASE_INC, reporter="c")])
    assert state_of(a, "b") == "suspect"
    ping, t = _first_ping(a, "b", until=10.0)
    first = ping.updates[0]
    assert (first.member_id, first.state, first.incarnation) == ("b", SUSPECT, BASE_INC)
    b.handle_datagram(encode(ping), addr("a"), t)
    (_, ack, _), = [o for o in outgoing(b) if o[1].type == ACK]
    assert b.incarnation == BASE_INC + 1
    a.handle_datagram(encode(ack), addr("b"), t + 0.01)
    assert state_of(a, "b") == "alive"
    assert ("alive", "b") in [(k, r[0]) for k, r in a.drain_events()]


def test_indirect_probe_relay_forwards_ack_without_blocking():
    """The reference's relays blocked their own receive loop; here the relayed ACK really arrives."""
    a, b, c = make("a", SHUFFLE, seed=2), make("b", SHUFFLE), make("c", SHUFFLE)
    join_all([a, b, c])
    ping, t = _first_ping(a, "b", until=10.0)  # b never sees this direct ping (lost)
    run(a, t + LAN.probe_timeout)
    reqs = [m for _, m, _ in outgoing(a) if m.type == PING_REQ]
    assert len(reqs) == 1 and reqs[0].target_id == "b"
    c.handle_datagram(encode(reqs[0]), addr("a"), t + 0.21)
    (dst, relay_ping, _), = outgoing(c)
    assert dst == addr("b") and relay_ping.type == PING
    b.handle_datagram(encode(relay_ping), addr("c"), t + 0.22)
    (dst, ack, _), = outgoing(b)
    assert dst == addr("c")
    c.handle_datagram(encode(ack), addr("b"), t + 0.23)
    (dst, forwarded, _), = outgoing(c)
    assert dst == addr("a") and forwarded.type == ACK and forwarded.sequence_num == ping.sequence_num
    a.handle_datagram(encode(forwarded), addr("c"), t + 0.24)
    run(a, t + LAN.protocol_period)
    assert state_of(a, "b") == "alive"
    assert a.stats["indirect_acks"] == 1 and a.stats["suspicions_raised"] == 0


def test_relay_sends_nack_when_target_is_silent_and_requester_counts_it():
    a, c = make("a", SHUFFLE, seed=2), make("c", SHUFFLE)
    join_all([a, c, make("b", SHUFFLE)])
    ping, t = _first_ping(a, "b", until=10.0)
    run(a, t + LAN.probe_timeout)
    req, = [m for _, m, _ in outgoing(a) if m.type == PING_REQ]
    c.handle_datagram(encode(req), addr("a"), t + 0.21)
    outgoing(c)
    run(c, t + 0.21 + LAN.probe_timeout)
    (dst, nack, _), = [o for o in outgoing(c) if o[1].type == NACK]
    assert dst == addr("a") and nack.sequence_num == ping.sequence_num
    a.handle_datagram(encode(nack), addr("c"), t + 0.45)
    run(a, t + LAN.protocol_period)
    assert a.stats["nacks_received"] == 1
    assert state_of(a, "b") == "suspect"
    # The relay answered, so this failure is the target's, not ours: awareness unchanged.
    assert a.awareness == 0


# --- awareness ------------------------------------------------------------------------------------------------------

def test_awareness_rises_on_unanswered_probes_and_stretches_probe_interval():
    a = make("a", SHUFFLE)
    join_all([a, make("b"), make("c"), make("d")])
    # Nobody answers anything: relays never NACK, so a blames itself.
    run(a, 5.0)
    outgoing(a)
    assert a.awareness >= 2
    score = a.awareness
    t0 = a.next_deadline()
    round_start: dict[int, float] = {}

    def record(t):
        for _, m, _ in outgoing(a):
            if m.type == PING:
                round_start.setdefault(m.sequence_num, t)  # the fallback PING reuses the round's sequence

    run(a, t0 + 20.0, step_cb=record)
    # Successive probe rounds are at least period * (1 + score) apart (score only grows here).
    starts = sorted(round_start.values())
    gaps = [b - x for x, b in itertools.pairwise(starts)]
    # (the first round after t0 was scheduled before the score was read)
    assert len(gaps) >= 3 and min(gaps[1:]) >= LAN.protocol_period * (1 + score) - 1e-6


def test_awareness_falls_when_probes_succeed():
    a, b = make("a", SHUFFLE), make("b", SHUFFLE)
    join_all([a, b])
    gossip(a, "b", [upd("a", SUSPECT, BASE_INC, reporter="b")])  # refutation: +1
    assert a.awareness == 1
    ping, t = _first_ping(a, "b", until=10.0)
    b.handle_datagram(encode(ping), addr("a"), t)
    for _address, data in b.drain_outgoing():
        a.handle_datagram(data, addr("b"), t + 0.01)
    run(a, t + LAN.protocol_period * 2 + 0.01)
    assert a.awareness == 0


# --- Lifeguard dynamic suspicion ------------------------------------------------------------------------------------

def test_suspicion_timeout_starts_at_max_and_shrinks_with_independent_confirmations():
    n = 20
    a = make("a")
    join_all([a] + [make(f"n{i}") for i in range(n - 1)])
    lo = LAN.suspicion_mult * max(1.0, math.log10(n)) * LAN.protocol_period
    hi = lo * LAN.suspicion_max_mult
    gossip(a, "n1", [upd("n0", SUSPECT, BASE_INC, reporter="n1")])
    c, timeout, deadline = a.suspicion_of("n0")
    assert c == 0 and timeout == pytest.approx(hi)
    gossip(a, "n1", [upd("n0", SUSPECT, BASE_INC, reporter="n1")])  # same reporter: not independent
    assert a.suspicion_of("n0")[0] == 0
    gossip(a, "n5", [upd("n0", SUSPECT, BASE_INC, reporter="n2")])
    c, timeout, _ = a.suspicion_of("n0")
    k = LAN.suspicion_mult - 2
    assert c == 1 and timeout == pytest.approx(hi - (hi - lo) * math.log(2) / math.log(k + 1))
    assert lo < timeout < hi
    gossip(a, "n5", [upd("n0", SUSPECT, BASE_INC, reporter="n3")])
    c, timeout, deadline = a.suspicion_of("n0")
    assert c == 2 and timeout == pytest.approx(lo)
    # Nothing before the shrunken deadline, DEAD right after it.
    run(a, deadline - 0.01)
    assert state_of(a, "n0") == "suspect"
    run(a, deadline + 0.01)
    assert state_of(a, "n0") == "dead"
    assert a.stats["deaths_declared"] == 1


def test_suspicion_is_stale_after_refutation():
    a = make("a")
    join_all([a, make("b"), make("c")])
    gossip(a, "c", [upd("b", SUSPECT, BASE_INC, reporter="c")])
    _, _, old_deadline = a.suspicion_of("b")
    gossip(a, "b", [upd("b", ALIVE, BASE_INC + 1)])
    assert a.suspicion_of("b") is None
    run(a, old_deadline + 1.0, step_cb=answering(a))
    assert state_of(a, "b") == "alive" and a.stats["deaths_declared"] == 0


# --- dissemination --------------------------------------------------------------------------------------------------

def _count_sends(node: Swim, member_id: str, state: int, rounds: int) -> int:
    sent = 0
    for i in range(rounds):
        deliver(node, PING, "p2", seq=100 + i, target=node.member_id)
        for _, m, _ in outgoing(node):
            sent += sum(1 for u in m.updates if u.member_id == member_id and u.state == state)
    return sent


def test_each_update_is_retransmitted_exactly_lambda_log_n_times():
    a = make("a")
    peers = [make(f"p{i}") for i in range(9)]
    join_all([a] + peers)
    for _ in range(40):  # flush what joining queued
        deliver(a, PING, "p2", seq=1, target="a")
    outgoing(a)
    limit = a.retransmit_limit()
    assert limit == LAN.retransmit_mult * math.ceil(math.log10(10 + 1))
    # A suspicion: exactly lambda * ceil(log10(N + 1)) piggybacks, then it leaves the queue.
    gossip(a, "p0", [upd("p1", SUSPECT, BASE_INC, reporter="p0")])
    assert _count_sends(a, "p1", SUSPECT, limit * 4) == limit
    assert a.pending_broadcasts() == 0
    # ALIVE news (here a metadata change) gets three times that budget (see NEWS_BUDGET_MULT in swim.pyx).
    gossip(a, "p0", [upd("p3", ALIVE, BASE_INC + 1, model_version="v2")])
    assert _count_sends(a, "p3", ALIVE, limit * 8) == 3 * limit
    assert a.pending_broadcasts() == 0


def test_newest_least_sent_updates_go_first_and_datagrams_stay_within_1400_bytes():
    a = make("a")
    long_ids = [f"member-with-a-rather-long-identifier-{i:04d}-" + "x" * 40 for i in range(120)]
    for mid in long_ids:
        gossip(a, "z", [upd(mid, ALIVE, BASE_INC, model_version="m" * 30)])
    outgoing(a)
    deliver(a, PING, "z", seq=1, target="a")
    (_, first, size), = outgoing(a)
    assert size <= 1400
    assert 0 < len(first.updates) < 120
    # newest first among equally-sent
    assert first.updates[0].member_id == long_ids[-1]
    deliver(a, PING, "z", seq=2, target="a")
    (_, second, size2), = outgoing(a)
    assert size2 <= 1400
    assert not {u.member_id for u in second.updates} & {u.member_id for u in first.updates}


def test_full_state_sync_is_split_over_datagrams_and_answered_once():
    big, small = make("big"), make("small")
    for i in range(150):
        gossip(big, "z", [upd(f"node-{i:03d}-" + "y" * 30, ALIVE, BASE_INC)])
    outgoing(big)
    small.join([addr("big")], 0.0)
    (dst, sync), = small.drain_outgoing()
    assert dst == addr("big") and decode(sync).type == SYNC
    big.handle_datagram(sync, addr("small"), 0.01)
    answers = [d for _, d in big.drain_outgoing()]
    assert len(answers) > 2 and all(len(d) <= 1400 for d in answers)
    assert all(decode(d).type == SYNC_ACK for d in answers)
    big.handle_datagram(sync, addr("small"), 0.02)  # a duplicated SYNC of the same session is answered once
    assert big.drain_outgoing() == []
    for d in answers:
        small.handle_datagram(d, addr("big"), 0.03)
    assert len([r for r in small.members() if r[4] == "alive"]) == 152  # big, z and the 150
    assert state_of(big, "small") == "alive"
    # The receiver of a full state does not re-gossip it (only news about the sender itself).
    assert small.pending_broadcasts() <= 2


def test_load_only_changes_are_rate_limited_to_one_per_period():
    a = make("a")
    join_all([a, make("b")])
    inc0 = a.incarnation
    a.set_meta(1.0, active_requests=1)
    assert a.incarnation == inc0 + 1
    a.set_meta(1.1, active_requests=2)
    a.set_meta(1.2, active_requests=3)
    assert a.incarnation == inc0 + 1  # held back
    run(a, 1.0 + LAN.protocol_period + 0.001)
    assert a.incarnation == inc0 + 2
    assert a.local_member()[7] == 3
    a.set_meta(1.6, model_version="v9")  # not load-only: immediate
    assert a.incarnation == inc0 + 3


def test_metadata_changes_reach_peers_as_updated_events():
    a, b = make("a"), make("b")
    join_all([a, b])
    a.set_meta(1.0, model_version="v2", max_capacity=8, weight=2.5, draining=True, grpc_address="10.0.0.9:50051")
    deliver(b, PING, "x", seq=1, target="b")
    b.drain_outgoing()
    deliver(a, PING, "b", seq=9, target="a", now=1.0)
    for _, data in a.drain_outgoing():
        b.handle_datagram(data, addr("a"), 1.01)
    row = b.member("a")
    assert row[2] == "10.0.0.9:50051" and row[6] == "v2" and row[8] == 8 and row[9] == 2.5 and row[10] is True
    assert ("updated", "a") in [(k, r[0]) for k, r in b.drain_events()]


# --- robustness -----------------------------------------------------------------------------------------------------

def test_malformed_datagrams_are_counted_and_harmless():
    a = make("a")
    join_all([a, make("b")])
    before = a.members()
    rng = random.Random(7)
    junk = [b"", b"\x00", b"\xff" * 20, b"\x0a\x05abc", bytes(rng.getrandbits(8) for _ in range(300))]
    valid = datagram(PING, "b", [upd("b")], seq=1, target="a")
    junk += [valid[:k] for k in range(1, len(valid) - 1, 3)]
    for j in junk:
        a.handle_datagram(j, "1.2.3.4:5", 0.0)
    assert a.stats["malformed"] >= 5
    assert a.members() == before


def test_bad_enum_values_are_dropped():
    a = make("a")
    join_all([a, make("b")])
    u = upd("b", 7, BASE_INC + 1)
    gossip(a, "b", [u])
    assert state_of(a, "b") == "alive" and inc_of(a, "b") == BASE_INC
    a.handle_datagram(encode(Message(42, "b", "a", 1, [], addr("b"), "", 0)), addr("b"), 0.0)
    assert a.stats["malformed"] >= 2


def test_unknown_sender_is_learned_as_alive():
    a = make("a")
    deliver(a, PING, "stranger", seq=1, target="a")
    assert state_of(a, "stranger") == "alive"
    assert a.member("stranger")[1] == addr("stranger")


def test_ping_for_someone_else_is_ignored():
    a = make("a")
    deliver(a, PING, "b", seq=1, target="not-a")
    assert outgoing(a) == [] and a.stats["misdirected"] == 1


def test_core_returns_role_and_grpc_address_as_gossiped_without_deriving_them():
    # The application's readings (the gossip port - 10000 convention, "ids starting with gateway") live in
    # llmgw.topology and are applied by the shell (tests/test_topology.py); the core hands back the raw fields.
    a = make("a")
    gossip(a, "gateway-1", [upd("gateway-1", address="10.1.2.3:17946")])
    gossip(a, "b", [upd("b", grpc_address="h:1", role=2)])
    rows = {r[0]: dict(zip(MEMBER_FIELDS, r, strict=True)) for r in a.members()}
    assert (rows["gateway-1"]["grpc_address"], rows["gateway-1"]["role"]) == ("", 0)
    assert (rows["b"]["grpc_address"], rows["b"]["role"]) == ("h:1", 2)


# --- leave and garbage collection ---------------------------------------------------------------------------------

def test_leave_is_left_not_dead_and_is_never_refuted_then_gc_keeps_a_tombstone():
    cfg = GossipConfig.lan(dead_gc_after=5.0, tombstone_ttl=100.0)
    a, b = make("a", cfg), make("b", cfg)
    join_all([a, b])
    b.leave(1.0)
    for _, data in b.drain_outgoing():
        a.handle_datagram(data, addr("b"), 1.0)
    assert state_of(a, "b") == "left"
    assert ("left", "b") in [(k, r[0]) for k, r in a.drain_events()]
    # b is gone: rumours about it do not make it refute, and an old ALIVE does not resurrect it.
    run(a, 10.0)
    assert a.member("b") is None
    assert ("removed", "b") in [(k, r[0]) for k, r in a.drain_events()]
    gossip(a, "c", [upd("b", ALIVE, BASE_INC)])
    assert a.member("b") is None
    gossip(a, "c", [upd("b", ALIVE, BASE_INC + 10)])  # a genuinely newer life is welcome
    assert state_of(a, "b") == "alive"


# --- probe coverage -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["ring", "shuffle"])
def test_every_live_member_is_probed_within_2n_periods(schedule):
    cfg = GossipConfig.lan(probe_schedule=schedule)
    n = 12
    nodes = [make(f"m{i}", cfg, seed=i) for i in range(n)]
    join_all(nodes)
    a = nodes[0]
    probed: dict[str, float] = {}

    def answer(t):
        for dst, msg, _ in outgoing(a):
            if msg.type == PING:
                probed.setdefault(msg.target_id, t)
                a.handle_datagram(encode(Message(ACK, msg.target_id, "a", msg.sequence_num, [], dst, "", 0)),
                                  dst, t)

    t0 = a.next_deadline()
    run(a, t0 + 2 * n * LAN.protocol_period, step_cb=answer)
    assert set(probed) == {f"m{i}" for i in range(1, n)}
    assert a.awareness == 0


def test_ring_schedule_probes_each_member_once_per_period():
    n = 10
    nodes = [make(f"r{i}", LAN, seed=i) for i in range(n)]
    join_all(nodes)
    probes: dict[str, list[float]] = {}
    span = (n - 1) * LAN.protocol_period
    for node in nodes:
        log: list = []
        run(node, span, step_cb=answering(node, log))
        for t, _, msg in log:
            if msg.type == PING:
                probes.setdefault(msg.target_id, []).append(t)
    # n - 1 periods: every member probed n - 1 times, once in each period, by n - 1 distinct nodes
    assert sorted(len(v) for v in probes.values()) == [n - 1] * n
    for times in probes.values():
        assert sorted(int(t // LAN.protocol_period) for t in times) == list(range(n - 1))


# --- auth -----------------------------------------------------------------------------------------------------------

KEY = b"k" * 32


def _auth_pair():
    ta, tb = Authenticator(KEY), Authenticator(KEY)
    a = make("a", auth=ta, wall_offset=1000.0)
    b = make("b", auth=tb, wall_offset=1000.0)
    return a, b


def test_auth_accepts_signed_and_drops_unsigned_forged_and_replayed():
    a, b = _auth_pair()
    b.join([addr("a")], 0.0)
    signed = b.drain_outgoing()
    for _, d in signed:
        a.handle_datagram(d, addr("b"), 0.0)
    assert state_of(a, "b") == "alive"
    # unsigned: a perfectly good SUSPECT rumour without a tag
    plain = datagram(ACK, "b", [upd("c", SUSPECT, BASE_INC, reporter="b")], timestamp_ms=1_000_000)
    a.handle_datagram(plain, addr("b"), 0.0)
    # forged: tag computed with the wrong key
    forged = Authenticator(b"x" * 32).seal(plain)
    a.handle_datagram(forged, addr("b"), 0.0)
    assert a.member("c") is None
    assert a.stats["auth_rejected"] == 2
    # replayed: the exact signed datagram again
    for _, d in signed:
        a.handle_datagram(d, addr("b"), 0.1)
    assert a.stats["replays_rejected"] == len(signed)


def test_replayed_leave_cannot_kill_a_restarted_member():
    a, b = _auth_pair()
    b.join([addr("a")], 0.0)
    for _, d in b.drain_outgoing():
        a.handle_datagram(d, addr("b"), 0.0)
    for _, d in a.drain_outgoing():
        b.handle_datagram(d, addr("a"), 0.0)
    b.leave(0.5)
    left = b.drain_outgoing()
    for _, d in left:
        a.handle_datagram(d, addr("b"), 0.5)
    assert state_of(a, "b") == "left"
    b2 = make("b", incarnation=BASE_INC + 10_000, auth=Authenticator(KEY), wall_offset=1000.0)
    b2.join([addr("a")], 1.0)
    for _, d in b2.drain_outgoing():
        a.handle_datagram(d, addr("b"), 1.0)
    assert state_of(a, "b") == "alive"
    for _, d in left:  # an attacker replays the old LEFT announcement
        a.handle_datagram(d, addr("b"), 2.0)
    assert state_of(a, "b") == "alive"


def test_auth_rejects_stale_timestamps():
    a, _ = _auth_pair()
    sealer = Authenticator(KEY)
    old = sealer.seal(datagram(ACK, "b", [upd("b")], timestamp_ms=(1000 - 60) * 1000))
    a.handle_datagram(old, addr("b"), 0.0)
    assert a.member("b") is None and a.stats["replays_rejected"] == 1


def test_authenticator_validates_key_and_bounds_its_cache():
    with pytest.raises(ValueError):
        Authenticator(b"short")
    with pytest.raises(TypeError):
        Authenticator("not-bytes")  # type: ignore[arg-type]
    auth = Authenticator(KEY, cache_size=4)
    tags = [auth.seal(b"m%d" % i)[-32:] for i in range(10)]
    assert all(auth.accept_fresh(t, 1000 + i, 1000) for i, t in enumerate(tags))
    assert len(auth._seen) <= 4
    # an evicted entry cannot be replayed: its timestamp is at or below the watermark
    assert not auth.accept_fresh(tags[0], 1000, 1000)


# --- restart and join (docs/reliability.md, finding 9) ------------------------------------------------------------

def _sync_session(node: Swim, seeds: list[str], now: float) -> bytes:
    node.join(seeds, now)
    (_dst, sync), = node.drain_outgoing()
    assert decode(sync).type == SYNC
    return sync


def test_a_restarted_node_s_join_sync_is_answered_even_with_its_previous_life_s_sequence_numbers():
    seed_node = make("seed")
    first_life = make("n", seed=5)
    seed_node.handle_datagram(_sync_session(first_life, [addr("seed")], 0.0), addr("n"), 0.0)
    assert {decode(d).type for _, d in seed_node.drain_outgoing()} == {SYNC_ACK}
    # Same id, same generator seed (so the same sequence numbers), a fresh time-based incarnation: a new session.
    second_life = make("n", seed=5, incarnation=BASE_INC + 40_000, now=2.0)
    sync = _sync_session(second_life, [addr("seed")], 2.0)
    assert decode(sync).sequence_num == decode(_sync_session(make("n", seed=5), [addr("seed")], 0.0)).sequence_num
    seed_node.handle_datagram(sync, addr("n"), 2.0)
    answers = [decode(d) for _, d in seed_node.drain_outgoing()]
    assert [m.type for m in answers] == [SYNC_ACK]
    assert inc_of(seed_node, "n") == BASE_INC + 40_000
    # ... and still once per session.
    seed_node.handle_datagram(sync, addr("n"), 2.1)
    assert seed_node.drain_outgoing() == []


def test_sequence_numbers_do_not_restart_at_zero_in_every_process():
    firsts = {decode(_sync_session(make("n", seed=s), [addr("seed")], 0.0)).sequence_num for s in range(20)}
    assert len(firsts) == 20 and min(firsts) > 1


def test_join_retries_until_a_full_state_arrives_even_when_a_peer_is_already_known():
    seed_node = make("seed")
    gossip(seed_node, "other", [upd("other")])
    node = make("n")
    _sync_session(node, [addr("seed")], 0.0)  # lost on the way
    # The seed heard of n some other way and pings it: n now knows one live member, a bare stub.
    deliver(node, PING, "seed", seq=9, target="n", now=0.1)
    node.drain_outgoing()
    assert state_of(node, "seed") == "alive" and node.member("other") is None
    retry = []
    run(node, LAN.join_retry_interval + 0.01,
        lambda t: retry.extend(d for dst, d in node.drain_outgoing() if decode(d).type == SYNC))
    assert retry, "no join retry although no full state ever arrived"
    seed_node.handle_datagram(retry[0], addr("n"), 1.1)
    for _, d in seed_node.drain_outgoing():
        node.handle_datagram(d, addr("seed"), 1.2)
    assert state_of(node, "other") == "alive" and inc_of(node, "seed") == BASE_INC
    # Full state in: no more join SYNCs (anti-entropy goes to members, not to seeds).
    later = []
    run(node, 1.2 + 3 * LAN.join_retry_interval,
        lambda t: later.extend(dst for dst, d in node.drain_outgoing() if decode(d).type == SYNC))
    assert later.count(addr("seed")) <= 1  # at most one push-pull happens to pick it


# --- opaque application metadata (memberlist's Node.Meta) --------------------------------------------------------

APP_META = MEMBER_FIELDS.index("app_meta")
ADVERT = b'{"u":"http://10.0.0.9:8000","v":1}'


def meta_of(node: Swim, member_id: str) -> bytes | None:
    row = node.member(member_id)
    return None if row is None else row[APP_META]


def pump(nodes: list[Swim], until: float, *, start: float = 0.0, step: float = 0.05,
         blocked: frozenset[tuple[str, str]] = frozenset()) -> None:
    """Run the nodes' timers to `until` on a lossless instant network, except the (sender, receiver) pairs in
    `blocked`."""
    by_address = {n.address: n for n in nodes}
    t = start
    while t < until:
        t += step
        for n in nodes:
            n.tick(t)
        for _ in range(100):
            moved = False
            for n in nodes:
                for address, data in n.drain_outgoing():
                    dst = by_address.get(address)
                    if dst is not None and (n.member_id, dst.member_id) not in blocked:
                        dst.handle_datagram(data, n.address, t)
                        moved = True
            if not moved:
                break


def test_own_app_meta_is_advertised_from_the_start_and_read_back():
    a = make("agent-a", role=ROLE_UPSTREAM, app_meta=ADVERT)
    assert a.local_member()[APP_META] == ADVERT
    b = make("gateway-b", seed=2)
    b.join([a.address], 0.0)
    pump([a, b], 0.05)
    assert meta_of(b, "agent-a") == ADVERT
    member = Member.from_core(b.member("agent-a"))
    assert member.app_meta == ADVERT and member.role == UPSTREAM_NAME
    assert is_upstream_agent(member) and not is_replica(member)


def test_a_change_is_a_new_incarnation_and_spreads_over_two_hops():
    a, b, c = make("agent-a", role=ROLE_UPSTREAM, app_meta=b"old"), make("b", seed=2), make("c", seed=3)
    join_all([a, b, c])
    pump([a, b, c], 1.0)
    assert meta_of(b, "agent-a") == meta_of(c, "agent-a") == b"old"
    c.drain_events()
    before = a.incarnation
    a.set_meta(1.0, app_meta=ADVERT)
    assert a.incarnation == before + 1
    # a never reaches c directly: c can only learn the change from b's rebroadcast.
    pump([a, b, c], 2.0, start=1.0, blocked=frozenset({("agent-a", "c")}))
    assert meta_of(b, "agent-a") == meta_of(c, "agent-a") == ADVERT
    assert any(kind == "updated" and row[APP_META] == ADVERT for kind, row in c.drain_events())
    # Setting the same bytes again is no change: no new incarnation.
    a.set_meta(2.0, app_meta=ADVERT)
    assert a.incarnation == before + 1


def test_merge_follows_the_incarnation_rules_of_the_other_metadata():
    node = make("observer")
    gossip(node, "agent", [upd("agent", ALIVE, BASE_INC, app_meta=b"v1")])
    assert meta_of(node, "agent") == b"v1"
    # Older: ignored. Same incarnation from someone else: not news, ignored.
    gossip(node, "other", [upd("agent", ALIVE, BASE_INC - 1, app_meta=b"stale")])
    gossip(node, "other", [upd("agent", ALIVE, BASE_INC, app_meta=b"hearsay")])
    assert meta_of(node, "agent") == b"v1"
    # Newer: replaces it.
    gossip(node, "other", [upd("agent", ALIVE, BASE_INC + 1, app_meta=b"v2")])
    assert meta_of(node, "agent") == b"v2"
    node.drain_events()
    # The member's own word at the incarnation we hold (how reference peers publish load) applies too.
    applied = node.owner_meta_applied
    gossip(node, "agent", [upd("agent", ALIVE, BASE_INC + 1, app_meta=b"v3")])
    assert meta_of(node, "agent") == b"v3" and node.owner_meta_applied == applied + 1
    assert [(kind, row[APP_META]) for kind, row in node.drain_events()] == [("updated", b"v3")]
    # A suspicion at the same incarnation outranks ALIVE and carries its own copy of the metadata.
    gossip(node, "other", [upd("agent", SUSPECT, BASE_INC + 1, reporter="other", app_meta=b"v3")])
    assert node.member("agent")[4] == "suspect" and meta_of(node, "agent") == b"v3"


def test_full_state_sync_carries_app_meta():
    a = make("a")
    for i in range(3):
        gossip(a, f"agent-{i}", [upd(f"agent-{i}", ALIVE, BASE_INC, app_meta=bytes([i]) * 300)])
    a.drain_outgoing()
    b = make("b", seed=2)
    deliver(a, SYNC, "b", [upd("b", incarnation=b.incarnation)], seq=9)
    answers = a.drain_outgoing()
    assert answers and all(len(data) <= GossipConfig.lan().max_datagram for _, data in answers)
    for _, data in answers:
        b.handle_datagram(data, a.address, 0.0)
    assert [meta_of(b, f"agent-{i}") for i in range(3)] == [bytes([i]) * 300 for i in range(3)]


def test_oversized_app_meta_from_the_network_is_dropped_and_counted():
    node = make("observer")
    huge = b"x" * (MAX_APP_META + 1)
    gossip(node, "agent", [upd("agent", ALIVE, BASE_INC, app_meta=huge, max_capacity=4)])
    row = node.member("agent")
    assert row is not None and row[APP_META] == b"" and row[MEMBER_FIELDS.index("max_capacity")] == 4
    assert node.metadata_clamped == 1
    # What we pass on is the clamped version.
    node.tick(1.0)
    for _, msg, _ in outgoing(node):
        for u in msg.updates:
            if u.member_id == "agent":
                assert u.app_meta == b""
    # At the cap exactly, it is kept.
    gossip(node, "agent", [upd("agent", ALIVE, BASE_INC + 1, app_meta=b"y" * MAX_APP_META)])
    assert meta_of(node, "agent") == b"y" * MAX_APP_META and node.metadata_clamped == 1


def test_set_meta_refuses_what_no_peer_would_accept():
    a = make("a")
    with pytest.raises(ValueError, match="over the limit of 1024"):
        a.set_meta(0.0, app_meta=b"x" * (MAX_APP_META + 1))
    with pytest.raises(TypeError, match="app_meta must be bytes"):
        a.set_meta(0.0, app_meta="text")
    with pytest.raises(ValueError, match="over the limit"):
        make("b", app_meta=b"x" * (MAX_APP_META + 1))
    # A small datagram limit: the member's update with a 1 KB app_meta could never be sent.
    small = dataclasses.replace(GossipConfig.lan(), max_datagram=600)
    s = make("s", small)
    with pytest.raises(ValueError, match="does not fit one"):
        s.set_meta(0.0, app_meta=b"x" * MAX_APP_META)
    assert s.local_member()[APP_META] == b""
    s.set_meta(0.0, app_meta=bytearray(b"fits"))
    assert s.local_member()[APP_META] == b"fits"


def test_a_full_app_meta_update_fits_a_signed_datagram_beside_another():
    auth = Authenticator(b"k" * 32)
    a = make("agent-with-a-rather-long-member-id-0001", auth=auth, app_meta=b"m" * MAX_APP_META)
    a.handle_datagram(auth.seal(datagram(ACK, "peer", [upd("peer")])), addr("peer"), 0.0)
    assert state_of(a, "peer") == "alive"
    a.tick(1.0)
    sent = a.drain_outgoing()
    assert sent and all(len(data) <= GossipConfig.lan().max_datagram for _, data in sent)
    carried = [u for _, data in sent for u in _open(auth, data).updates if u.member_id == a.member_id]
    assert carried and carried[0].app_meta == b"m" * MAX_APP_META


def _open(auth, data: bytes):
    opened = auth.open(data)
    assert opened is not None
    return decode(opened[0])


def test_dead_member_keeps_its_last_app_meta_until_it_returns():
    node = make("observer")
    gossip(node, "agent", [upd("agent", ALIVE, BASE_INC, app_meta=b"v1")])
    gossip(node, "other", [upd("agent", DEAD, BASE_INC, reporter="other", app_meta=b"v1")])
    assert node.member("agent")[4] == "dead" and meta_of(node, "agent") == b"v1"
    gossip(node, "agent", [upd("agent", ALIVE, BASE_INC + 5, app_meta=b"v2")])
    assert node.member("agent")[4] == "alive" and meta_of(node, "agent") == b"v2"


def test_an_update_with_app_meta_is_what_the_codec_sends():
    u = Update("agent", "h:1", ALIVE, 1, app_meta=ADVERT)
    node = make("observer")
    deliver(node, ACK, "agent", [u])
    assert meta_of(node, "agent") == ADVERT


# --- user messages (memberlist's SendBestEffort / NotifyMsg) -------------------------------------------------------

def _llmgw_peers(*ids: str) -> list[Swim]:
    """Cores that know each other as llmgw members (with a role: reference peers gossip none)."""
    nodes = [make(mid, seed=i + 1, role=2) for i, mid in enumerate(ids)]
    for n in nodes:
        for other in nodes:
            if other is not n:
                gossip(n, other.member_id, [upd(other.member_id, incarnation=other.incarnation, role=2)])
        n.drain_outgoing()
        n.drain_events()
    return nodes


def _carry(src: Swim, dst: Swim, now: float = 0.0) -> int:
    sent = src.drain_outgoing()
    for address, data in sent:
        assert address == dst.address
        dst.handle_datagram(data, src.address, now)
    return len(sent)


def test_a_user_message_reaches_a_live_member_and_changes_nothing_else():
    a, b = _llmgw_peers("gw-a", "gw-b")
    members_before, inc_before, pending_before = b.members(), b.incarnation, b.pending_broadcasts()
    assert a.user_message("gw-b", b"digest \x00\xff", 0.0) is True
    assert a.user_message("gw-b", bytearray(b"second"), 0.0) is True
    assert _carry(a, b) == 2
    assert b.drain_user_messages() == [("gw-a", b"digest \x00\xff"), ("gw-a", b"second")]
    assert b.drain_user_messages() == []
    # No membership effect: no events, no answer, no rumour queued, the table and our incarnation unchanged.
    assert b.drain_events() == [] and b.drain_outgoing() == [] and b.pending_broadcasts() == pending_before
    assert b.members() == members_before and b.incarnation == inc_before
    assert (a.user_sent, b.user_received, b.user_dropped, b.malformed) == (2, 2, 0, 0)
    assert b.stats["user_received"] == 2 and a.stats["user_sent"] == 2
    # An empty payload is a message too.
    assert a.user_message("gw-b", b"", 0.0) and _carry(a, b) == 1
    assert b.drain_user_messages() == [("gw-a", b"")]


def test_user_messages_are_refused_for_unknown_dead_and_too_big():
    a, b = _llmgw_peers("gw-a", "gw-b")
    assert a.user_message("nobody", b"x", 0.0) is False
    assert a.user_message("gw-a", b"x", 0.0) is False  # ourselves
    limit = a.max_user_payload("gw-b")
    assert 1200 < limit < LAN.max_datagram
    assert a.user_message("gw-b", b"x" * (limit + 1), 0.0) is False
    assert a.drain_outgoing() == [] and a.user_refused == 3 and a.user_sent == 0
    # Exactly the limit fits one datagram, at the largest sequence and timestamp a datagram can carry.
    assert a.user_message("gw-b", b"x" * limit, 0.0) is True
    (_, data), = a.drain_outgoing()
    assert len(data) <= LAN.max_datagram
    b.handle_datagram(data, a.address, 0.0)
    assert b.drain_user_messages() == [("gw-a", b"x" * limit)]
    gossip(a, "gw-c", [upd("gw-b", DEAD, BASE_INC + 1, reporter="gw-c", role=2)])
    assert a.user_message("gw-b", b"x", 0.0) is False
    with pytest.raises(TypeError):
        a.user_message("gw-b", "text", 0.0)


def test_user_messages_from_unknown_or_dead_senders_are_dropped_and_learn_nothing():
    b = make("gw-b", role=2)
    stranger = datagram(USER, "stranger", target="gw-b", payload=b"hi")
    b.handle_datagram(stranger, addr("stranger"), 0.0)
    assert b.drain_user_messages() == [] and b.user_dropped == 1 and b.members() == []
    # Updates riding on a USER datagram are ignored: it cannot introduce a member nor revive one.
    b.handle_datagram(datagram(USER, "stranger", [upd("stranger"), upd("z")], target="gw-b", payload=b"hi"),
                      addr("stranger"), 0.0)
    assert b.members() == [] and b.user_dropped == 2
    gossip(b, "gw-a", [upd("gw-a", role=2)])
    gossip(b, "gw-c", [upd("gw-a", DEAD, BASE_INC, reporter="gw-c")])
    b.handle_datagram(datagram(USER, "gw-a", [upd("gw-a", ALIVE, BASE_INC + 1)], target="gw-b", payload=b"x"),
                      addr("gw-a"), 0.0)
    assert state_of(b, "gw-a") == "dead" and b.drain_user_messages() == [] and b.user_dropped == 3
    # Meant for another member (e.g. our address's previous owner): misdirected.
    misdirected = b.misdirected
    gossip(b, "gw-d", [upd("gw-d", role=2)])
    b.handle_datagram(datagram(USER, "gw-d", target="someone-else", payload=b"x"), addr("gw-d"), 0.0)
    assert b.misdirected == misdirected + 1 and b.drain_user_messages() == []


def test_pending_user_messages_are_bounded():
    a, b = _llmgw_peers("gw-a", "gw-b")
    for i in range(MAX_PENDING_USER_MESSAGES + 5):
        assert a.user_message("gw-b", i.to_bytes(4, "big"), 0.0)
        _carry(a, b)
    got = b.drain_user_messages()
    assert len(got) == MAX_PENDING_USER_MESSAGES
    assert got[-1] == ("gw-a", (MAX_PENDING_USER_MESSAGES - 1).to_bytes(4, "big"))
    assert b.user_dropped == 5


def test_signed_user_messages_equal_payloads_twice_and_forgeries():
    auth_a, auth_b = Authenticator(b"k" * 32), Authenticator(b"k" * 32)
    a = make("gw-a", role=2, auth=auth_a, wall_offset=1_700_000_000.0)
    b = make("gw-b", seed=2, role=2, auth=auth_b, wall_offset=1_700_000_000.0)
    gossip_signed = [(a, b), (b, a)]
    for src, dst in gossip_signed:
        src.tick(0.0)
        src.drain_outgoing()
        dst.handle_datagram(auth_a.seal(datagram(ACK, src.member_id, [upd(src.member_id, incarnation=src.incarnation,
                                                                        role=2)],
                                                 timestamp_ms=1_700_000_000_000)), src.address, 0.0)
    assert state_of(a, "gw-b") == "alive" and state_of(b, "gw-a") == "alive"
    # The same payload twice in the same millisecond: two datagrams, both delivered (not taken for a replay).
    assert a.user_message("gw-b", b"same", 0.0) and a.user_message("gw-b", b"same", 0.0)
    sent = a.drain_outgoing()
    assert len({data for _, data in sent}) == 2
    for _, data in sent:
        b.handle_datagram(data, a.address, 0.0)
    assert b.drain_user_messages() == [("gw-a", b"same"), ("gw-a", b"same")]
    # A replay of either, and an unsigned or forged one, are dropped.
    b.handle_datagram(sent[0][1], a.address, 0.0)
    b.handle_datagram(datagram(USER, "gw-a", target="gw-b", payload=b"forged"), a.address, 0.0)
    forged = bytearray(sent[1][1])
    forged[-40] ^= 1
    b.handle_datagram(bytes(forged), a.address, 0.0)
    assert b.drain_user_messages() == []
    assert b.replays_rejected == 1 and b.auth_rejected == 2


def test_a_leaving_node_neither_sends_nor_delivers_user_messages():
    a, b = _llmgw_peers("gw-a", "gw-b")
    assert a.user_message("gw-b", b"before", 0.0)
    data = a.drain_outgoing()[0][1]
    b.leave(0.0)
    b.drain_outgoing()
    b.handle_datagram(data, a.address, 0.0)
    assert b.drain_user_messages() == [] and b.user_message("gw-a", b"x", 0.0) is False
