"""Hostile gossip input (issue 7): a 100k-datagram fuzz of the SWIM membership table, one explicit test per kind of
bad datagram (oversized, truncated, wrong wire type, absurd incarnation, spoofed sender), and the shared-key
defences exercised at the GossipNode level over real UDP (unsigned, wrongly signed, replayed). The 1,000,000
datagram fuzz is `python -m llmgw bench reliability --suite-args='--only fuzz'`.

Already covered by tests/test_swim_core.py and not repeated here: junk bytes and prefixes counted as malformed,
unknown message types / states dropped, a DEAD at 2**64-1 about another member ignored, core-level HMAC checks.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time

import pytest

from llmgw._core.codec import ACK, ALIVE, DEAD, LEFT, PING, SUSPECT, Message, decode, encode
from llmgw.gossip import GossipConfig, GossipNode
from llmgw.gossip.auth import Authenticator
from llmgw.gossip.testing import BASE_INC, addr, datagram, gossip, join_all, make, state_of, upd
from reliability_helpers import FUZZ_SELF, fuzz_swim

LAN = GossipConfig.lan()


def test_fuzz_100k_datagrams_keep_the_member_table_sane():
    result = fuzz_swim(100_000, seed=11)
    print("fuzz:", result)
    assert result["datagrams"] == 100_000
    # The mix really exercised every path: parse failures, valid-but-hostile messages, dropped absurd updates.
    assert min(result["kinds"].values()) > 10_000
    assert result["decodable"] > 20_000 and result["malformed"] > 20_000 and result["implausible"] > 1_000
    assert result["slowest_datagram_ms"] < 50.0  # no datagram makes the core work for long (no hang)
    # Forged rumours about us could push our incarnation up by one whole lead at most, then one step per
    # refutation (finding 5: before the bound, 2.2e12 in 7 refutations).
    assert 0 < result["self_incarnation_growth"] <= LAN.max_self_incarnation_lead + result["refutations"] + 1


# ---- one explicit test per kind ----------------------------------------------------------------------------
def _core_with_peers():
    a = make(FUZZ_SELF)
    peers = [make(f"peer-{i}") for i in range(3)]
    join_all([a] + peers)
    return a


def _datagram_of_size(size: int) -> bytes:
    """An ACK from peer-0 announcing member "edge", padded (model_version) to exactly `size` bytes."""
    for pad in range(size, 0, -1):
        data = encode(Message(ACK, "peer-0", "", 0, [upd("edge", ALIVE, BASE_INC, model_version="v" * pad)],
                              addr("peer-0"), "", 0))
        if len(data) == size:
            return data
    raise AssertionError(f"no padding gives a {size}-byte datagram")


def test_oversized_datagram_is_dropped_before_decoding_and_counted():
    a = _core_with_peers()
    before = a.members()
    updates = [upd(f"bulk-{i}", ALIVE, BASE_INC) for i in range(2000)]
    data = encode(Message(ACK, "peer-0", "", 0, updates, addr("peer-0"), "", 0))
    assert len(data) > 40 * LAN.max_datagram  # far beyond what any member sends
    t0 = time.perf_counter()
    a.handle_datagram(data, addr("peer-0"), 0.0)
    assert time.perf_counter() - t0 < 0.05
    assert a.members() == before and a.stats["oversized"] == 1 and a.stats["malformed"] == 0
    # The limit is exactly what a member may send: max_datagram bytes are processed, one more is not.
    at_limit = _datagram_of_size(LAN.max_datagram)
    a.handle_datagram(at_limit + b"\x00", addr("peer-0"), 0.0)
    assert a.member("edge") is None and a.stats["oversized"] == 2
    a.handle_datagram(at_limit, addr("peer-0"), 0.0)
    assert state_of(a, "edge") == "alive"


def test_oversized_limit_leaves_room_for_the_auth_tag():
    auth = Authenticator(KEY)
    a = make(FUZZ_SELF, auth=auth)
    # The largest message a keyed peer sends: max_datagram - tag of payload, sealed to max_datagram bytes.
    sealed = auth.seal(_datagram_of_size(LAN.max_datagram - auth.overhead))
    assert len(sealed) == LAN.max_datagram
    a.handle_datagram(sealed, addr("peer-0"), 0.0)
    assert state_of(a, "edge") == "alive"
    a.handle_datagram(b"\x00" * (LAN.max_datagram + auth.overhead + 1), addr("peer-0"), 0.0)
    assert a.stats["oversized"] == 1 and a.stats["auth_rejected"] == 0


def test_member_table_is_capped_without_evicting_known_members():
    config = GossipConfig.lan(max_members=20, dead_gc_after=1.0, tombstone_ttl=5.0)
    a = make(FUZZ_SELF, config)
    peers = [make(f"peer-{i}", config) for i in range(3)]
    join_all([a] + peers)
    for chunk in range(10):  # 200 invented members, 20 per datagram (each within max_datagram)
        gossip(a, "peer-0", [upd(f"bulk-{chunk}-{i}", ALIVE, BASE_INC) for i in range(20)])
    ids = {r[0] for r in a.members()}
    assert len(ids) == 20 and {"peer-0", "peer-1", "peer-2"} <= ids
    assert a.stats["members_refused"] == 200 - 17
    # Known members keep being updated at the cap.
    gossip(a, "peer-1", [upd("peer-1", ALIVE, BASE_INC + 3)])
    assert a.member("peer-1")[5] == BASE_INC + 3
    # DEAD rumours about never-seen ids do not grow the tombstones past the same cap.
    for chunk in range(5):
        gossip(a, "peer-0", [upd(f"ghost-{chunk}-{i}", DEAD, BASE_INC) for i in range(20)])
    assert a.stats["members_refused"] > 200 - 17
    # Once GC frees room (members declared DEAD, then collected), newcomers are learned again.
    gossip(a, "peer-0", [upd(f"bulk-0-{i}", DEAD, BASE_INC) for i in range(17)])
    for step in range(1, 6):
        a.tick(float(step))
    gossip(a, "peer-0", [upd("late-newcomer", ALIVE, BASE_INC)], now=6.0)
    assert state_of(a, "late-newcomer") == "alive"


def test_forged_rumours_cannot_ratchet_our_incarnation_but_a_previous_life_is_outranked():
    a = _core_with_peers()
    own = a.incarnation
    lead = LAN.max_self_incarnation_lead
    # Far above anything a previous life of ours could have reached (but within max_incarnation_jump): dropped.
    for state in (SUSPECT, DEAD, ALIVE):
        gossip(a, "peer-0", [upd(FUZZ_SELF, state, own + lead + 1_000, reporter="peer-0")])
    assert a.incarnation == own and a.stats["refutations"] == 0 and a.stats["implausible"] == 3
    # A plausible accusation is refuted with max(own, rumoured) + 1 ...
    gossip(a, "peer-0", [upd(FUZZ_SELF, SUSPECT, own + 500, reporter="peer-0")])
    assert a.incarnation == own + 501 and a.stats["refutations"] == 1
    # ... and a rumour from a previous life with a higher incarnation is moved past.
    gossip(a, "peer-0", [upd(FUZZ_SELF, ALIVE, own + 9_000)])
    assert a.incarnation == own + 9_001
    # Forging at the bound over and over walks us up one step per datagram, never by a whole lead again.
    for _ in range(50):
        gossip(a, "peer-0", [upd(FUZZ_SELF, DEAD, own + lead, reporter="peer-0")])
        gossip(a, "peer-0", [upd(FUZZ_SELF, DEAD, a.incarnation, reporter="peer-0")])
    assert own + lead < a.incarnation <= own + lead + 1 + 50
    assert a.local_member()[4] == "alive"


def test_self_incarnation_bound_follows_the_wall_clock():
    """Time-based incarnations: a previous life's rumour is at most a few minutes of ms ahead of our wall clock."""
    wall_ms = 1_700_000_000_000
    a = make(FUZZ_SELF, incarnation=wall_ms, wall_offset=wall_ms / 1000.0)
    gossip(a, "peer-0", [upd(FUZZ_SELF, DEAD, wall_ms + 60_000, reporter="peer-0")], now=0.0)
    assert a.incarnation == wall_ms + 60_001
    # An hour later the allowance has moved with the clock.
    gossip(a, "peer-0", [upd(FUZZ_SELF, DEAD, wall_ms + 3_600_000 + 500_000, reporter="peer-0")], now=3600.0)
    assert a.incarnation == wall_ms + 4_100_001
    gossip(a, "peer-0", [upd(FUZZ_SELF, DEAD, wall_ms + 3_600_000 + 700_000, reporter="peer-0")], now=3600.0)
    assert a.incarnation == wall_ms + 4_100_001 and a.stats["implausible"] == 1


def test_insane_metadata_is_clamped_and_counted_not_stored_or_spread():
    a = _core_with_peers()
    hostile = [upd("peer-1", ALIVE, BASE_INC + 1, weight=float("inf"), max_capacity=-7, active_requests=-3),
               upd("peer-2", ALIVE, BASE_INC + 1, weight=float("nan")),
               upd("newcomer", ALIVE, BASE_INC, weight=-2.0, max_capacity=4, active_requests=1)]
    gossip(a, "peer-0", hostile)
    assert a.stats["metadata_clamped"] == 3
    fields = {r[0]: (r[5], r[7], r[8], r[9]) for r in a.members()}  # incarnation, active, capacity, weight
    assert fields["peer-1"] == (BASE_INC + 1, 0, 0, 1.0)  # the state and incarnation still count
    assert fields["peer-2"] == (BASE_INC + 1, 0, 0, 1.0)
    assert fields["newcomer"] == (BASE_INC, 1, 4, 1.0)
    for row in a.members():
        assert math.isfinite(row[9]) and row[9] > 0 and row[7] >= 0 and row[8] >= 0
    # What we pass on is the clamped version.
    a.drain_outgoing()
    a.tick(1.0)
    spread = [u for _, d in a.drain_outgoing() for u in decode(d).updates if u.member_id in fields]
    assert spread and all(math.isfinite(u.weight) and u.weight >= 0 and u.max_capacity >= 0
                          and u.active_requests >= 0 for u in spread)
    # Our own set_meta refuses the same values instead of publishing them.
    for bad in (dict(weight=float("inf")), dict(weight=-1.0), dict(max_capacity=-1), dict(active_requests=-1)):
        with pytest.raises(ValueError):
            a.set_meta(1.0, **bad)


def test_truncated_datagrams_never_yield_a_partial_member():
    a = _core_with_peers()
    full = datagram(ACK, "peer-0", [upd("newcomer-with-a-long-id", ALIVE, BASE_INC + 1),
                                    upd("peer-1", SUSPECT, BASE_INC + 3, reporter="peer-0")])
    before = {r[0] for r in a.members()}
    for k in range(len(full)):
        a.handle_datagram(full[:k], addr("peer-0"), 0.0)
    # Prefixes that end on a field boundary are valid protobuf; all others are malformed. Either way no member
    # id that is a fragment of a real one appears.
    assert {r[0] for r in a.members()} <= before | {"newcomer-with-a-long-id"}
    assert a.stats["malformed"] > len(full) // 2
    assert a.local_member()[4] == "alive"


def test_wrong_wire_type_is_skipped_like_protobuf_skips_it():
    """A known field with the wrong wire type is an unknown field to protobuf: skipped, never misread."""
    from llmgw._proto import gossip_pb2

    a = _core_with_peers()
    before = a.members()
    sender_as_varint = b"\x08\x02" + b"\x10\x05"  # type=ACK, then sender_id (a string field) as a varint
    update_as_varint = b"\x08\x02\x12\x06peer-0" + b"\x28\x01"  # updates (a message field) as a varint
    # An update whose incarnation (a varint field) arrives length-delimited.
    incarnation_as_bytes = datagram(ACK, "peer-0") + b"\x2a\x06" + b"\x0a\x01z\x22\x01x"
    for data in (sender_as_varint, update_as_varint, incarnation_as_bytes):
        ours, theirs = decode(data), gossip_pb2.GossipMessage.FromString(data)
        assert ours.sender_id == theirs.sender_id
        assert [(u.member_id, u.incarnation) for u in ours.updates] == [
            (u.member_id, u.incarnation) for u in theirs.updates]
    misdirected = a.stats["misdirected"]
    a.handle_datagram(sender_as_varint, addr("peer-0"), 0.0)  # no sender left: dropped
    assert a.stats["misdirected"] == misdirected + 1
    a.handle_datagram(update_as_varint, addr("peer-0"), 0.0)  # no update left: nothing to apply
    assert a.members() == before
    # "z" with its incarnation skipped (0) and no address: not enough to become a member.
    a.handle_datagram(incarnation_as_bytes, addr("peer-0"), 0.0)
    assert a.members() == before and a.local_member()[4] == "alive"


def test_absurd_incarnations_neither_evict_nor_hijack():
    a = _core_with_peers()
    own = a.incarnation
    # About self: a SUSPECT / DEAD rumour at 2**64 - 1 is implausible and dropped -- no refutation that would
    # push our incarnation to the ceiling (where we could never refute again).
    for state in (SUSPECT, DEAD, LEFT):
        gossip(a, "peer-0", [upd(FUZZ_SELF, state, 2**64 - 1, reporter="peer-0")])
    assert a.incarnation == own and a.local_member()[4] == "alive"
    # About a newcomer: an ALIVE at 2**64 - 1 cannot plant a member no later rumour could ever update.
    gossip(a, "peer-0", [upd("squatter", ALIVE, 2**64 - 1)])
    assert a.member("squatter") is None
    # About a known member: ALIVE/DEAD at 2**63 (well beyond the plausible jump) is ignored; it stays as it was.
    for state in (ALIVE, DEAD):
        gossip(a, "peer-0", [upd("peer-1", state, 2**63)])
    assert state_of(a, "peer-1") == "alive" and a.member("peer-1")[5] == BASE_INC
    assert a.stats["implausible"] >= 6
    # A plausible bump still works (the guard is not a blanket refusal).
    gossip(a, "peer-0", [upd("peer-1", ALIVE, BASE_INC + 10)])
    assert a.member("peer-1")[5] == BASE_INC + 10


def test_spoofed_senders():
    a = _core_with_peers()
    own = a.incarnation
    # Our own id as sender: dropped (it would otherwise let anyone speak for us).
    misdirected = a.stats["misdirected"]
    a.handle_datagram(datagram(ACK, FUZZ_SELF, [upd("peer-2", DEAD, BASE_INC + 1, reporter=FUZZ_SELF)]),
                      "203.0.113.9:1", 0.0)
    assert a.stats["misdirected"] == misdirected + 1 and state_of(a, "peer-2") == "alive"
    # A stranger from an unrelated address claiming to be peer-0 and rumouring that we are dead: we refute.
    a.handle_datagram(datagram(ACK, "peer-0", [upd(FUZZ_SELF, DEAD, own, reporter="peer-0")]), "203.0.113.9:1", 0.0)
    assert a.local_member()[4] == "alive" and a.incarnation == own + 1
    refutation = [decode(d) for _, d in a.drain_outgoing()]
    assert refutation == [] or all(m.sender_id == FUZZ_SELF for m in refutation)
    # A spoofed PING for someone else is not answered (no reflection / amplification through us).
    a.drain_outgoing()
    a.handle_datagram(datagram(PING, "peer-0", seq=5, target="victim"), "203.0.113.9:1", 0.0)
    assert a.drain_outgoing() == []
    # Without a key a spoofed rumour about a third member is believed: that is what the shared key is for
    # (test_signed_cluster_over_udp_ignores_unsigned_forged_and_replayed below).
    gossip(a, "peer-0", [upd("peer-2", SUSPECT, BASE_INC, reporter="peer-0")])
    assert state_of(a, "peer-2") == "suspect"


# ---- shared key, real UDP --------------------------------------------------------------------------------------
KEY = b"reliability-campaign-key-32bytes"
FAST = GossipConfig.local()


class Recorder:
    """A `network` for GossipNode that passes every datagram through and keeps a copy (the attacker's capture)."""

    def __init__(self) -> None:
        self.captured: list[tuple[str, bytes]] = []

    def send(self, send, address, data, loop) -> None:
        self.captured.append((address, data))
        send(data, address)

    delay = 0.0


def test_signed_cluster_over_udp_ignores_unsigned_forged_and_replayed():
    async def body():
        made: list[GossipNode] = []

        async def node(name, **kw):
            n = GossipNode(name, key=KEY, config=FAST, **kw)
            made.append(n)
            await n.start()
            return n

        try:
            a = await node("node-a")
            b = await node("node-b", seeds=[a.address])
            rec = Recorder()
            c = await node("node-c", seeds=[a.address], network=rec)
            await _until(lambda: all(_live(n) == 2 for n in (a, b, c)), 10.0)
            verdicts: list[tuple[str, str, str]] = []
            for n in (a, b):
                n.subscribe(lambda ev, n=n: verdicts.append((n.member_id, ev.kind, ev.member.member_id)))

            attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            attacker.bind(("127.0.0.1", 0))
            try:
                now_ms = int(time.time() * 1000)
                hostile = [upd("node-b", DEAD, 2**40, reporter="node-a"), upd("node-c", SUSPECT, 2**40,
                           reporter="node-a"), upd("intruder", ALIVE, BASE_INC, address="127.0.0.1:9")]
                plain = encode(Message(ACK, "node-a", "", 0, hostile, a.address, "", now_ms))
                forged = Authenticator(b"not-the-cluster-key-at-all-32byt").seal(plain)
                for victim in (a, b):
                    host, port = victim.address.rsplit(":", 1)
                    for _ in range(20):
                        attacker.sendto(plain, (host, int(port)))
                        attacker.sendto(forged, (host, int(port)))
                # c leaves (its signed LEFT is captured), comes back with a newer incarnation, and the attacker
                # replays everything c ever sent, LEFT included.
                await c.stop(leave=True)
                replay = list(rec.captured)
                await _until(lambda: a.member("node-c") is not None and a.member("node-c").state == "left", 5.0)
                c2 = await node("node-c", seeds=[a.address])
                await _until(lambda: all(n.member("node-c") and n.member("node-c").state == "alive"
                                         for n in (a, b)), 10.0)
                verdicts.clear()
                for address, data in replay:
                    host, port = address.rsplit(":", 1)
                    attacker.sendto(data, (host, int(port)))
                await asyncio.sleep(1.5)
            finally:
                attacker.close()

            for n in (a, b):
                assert n.member("intruder") is None
                assert n.member("node-c").state == "alive", n.member("node-c")
                assert n.member("node-b" if n is a else "node-a").state == "alive"
            # No verdict against anyone after the replay began: not suspected, not dead, not left.
            assert [v for v in verdicts if v[1] in ("suspect", "dead", "left")] == []
            assert a.stats()["auth_rejected"] >= 40 and b.stats()["auth_rejected"] >= 40
            assert a.stats()["replays_rejected"] + b.stats()["replays_rejected"] >= 1
            assert _live(c2) == 2
        finally:
            for n in made:
                await asyncio.wait_for(n.stop(leave=False), 10)

    asyncio.run(asyncio.wait_for(body(), 60))


def _live(node: GossipNode) -> int:
    return sum(1 for m in node.members() if m.state == "alive")


async def _until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
