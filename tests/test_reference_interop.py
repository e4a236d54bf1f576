"""Mixed clusters, in process: llmgw's SWIM core against datagrams shaped exactly as reference nodes send them
(tests/reference_peer.py), in both directions. The multi-process version is tests/test_mixed_cluster.py."""

from __future__ import annotations

from reference_peer import ReferencePeer

from llmgw._core.codec import ACK, ALIVE, PING, SUSPECT, Message, Update, decode, encode
from llmgw.gossip import Member, MemberEventKind
from llmgw.gossip.testing import BASE_INC, addr, gossip, make, outgoing, upd
from llmgw.topology import SEED_PLACEHOLDER_PREFIX, is_routable_replica

REF_ADDRESS = "10.9.0.1:60061"  # a reference replica: gRPC 50061, gossip 60061 by its convention


def llmgw_gateway():
    return make("gateway-1", placeholder_prefix=SEED_PLACEHOLDER_PREFIX)


def send(peer: ReferencePeer, core, mtype: int = ACK, now: float = 0.0) -> None:
    core.handle_datagram(peer.datagram(mtype, core.member_id, 0), peer.address, now)


def view(core, member_id: str) -> Member | None:
    row = core.member(member_id)
    return None if row is None else Member.from_core(row)


def test_reference_load_capacity_and_version_arrive_at_an_unchanged_incarnation():
    g = llmgw_gateway()
    ref = ReferencePeer("replica-r1", REF_ADDRESS, max_capacity=2, model_version="v7")
    send(ref, g, PING)
    m = view(g, "replica-r1")
    assert (m.incarnation, m.active_requests, m.max_capacity, m.model_version) == (0, 0, 2, "v7")
    # What the gateway makes of it: a routable replica at the reference's gRPC address.
    assert is_routable_replica(m) and m.grpc_address == "10.9.0.1:50061" and m.weight == 1.0
    g.drain_events()
    for load in (1, 2, 0):
        ref.active_requests = load
        send(ref, g)
        m = view(g, "replica-r1")
        assert (m.incarnation, m.active_requests, m.max_capacity) == (0, load, 2), load
        assert [(k, r[0]) for k, r in g.drain_events()] == [("updated", "replica-r1")]
    ref.model_version = "v8"
    send(ref, g)
    assert view(g, "replica-r1").model_version == "v8"
    assert [(k, r[0]) for k, r in g.drain_events()] == [("updated", "replica-r1")]
    send(ref, g)  # nothing changed: no event
    assert g.drain_events() == []
    assert g.stats["owner_meta_applied"] == 4


def test_metadata_at_an_unchanged_incarnation_counts_only_from_the_member_itself():
    g = llmgw_gateway()
    ref = ReferencePeer("replica-r1", REF_ADDRESS, max_capacity=2, model_version="v7")
    send(ref, g, PING)
    # A third party's rumour at the same incarnation is not news (SWIM's merge rule is unchanged).
    gossip(g, "other", [upd("replica-r1", incarnation=0, address=REF_ADDRESS, active_requests=9, max_capacity=9,
                            model_version="stale")])
    m = view(g, "replica-r1")
    assert (m.active_requests, m.max_capacity, m.model_version) == (0, 2, "v7")


def test_metadata_is_not_state_suspect_stays_suspect_until_refuted():
    g = llmgw_gateway()
    ref = ReferencePeer("replica-r1", REF_ADDRESS, max_capacity=2)
    send(ref, g, PING)
    gossip(g, "other", [upd("replica-r1", SUSPECT, incarnation=0, address=REF_ADDRESS, reporter="other")])
    assert view(g, "replica-r1").state == "suspect"
    ref.active_requests = 1
    send(ref, g)  # ALIVE@0 from the member: load taken, state not (only a higher incarnation refutes)
    m = view(g, "replica-r1")
    assert (m.state, m.active_requests, m.incarnation) == ("suspect", 1, 0)
    ref.merge(Update("replica-r1", REF_ADDRESS, SUSPECT, 0))  # the reference hears of it and refutes
    send(ref, g)
    m = view(g, "replica-r1")
    assert (m.state, m.incarnation) == ("alive", 1)


def test_seed_placeholders_are_never_members():
    g = llmgw_gateway()
    # A reference replica seeded with the gateway's and another replica's address gossips both placeholders.
    ref = ReferencePeer("replica-r2", "10.9.0.2:60062", seeds=[g.address, REF_ADDRESS], max_capacity=2)
    for _ in range(3):
        send(ref, g)
    # A SUSPECT about a placeholder without an address, and a real member whose id merely starts with "seed-".
    gossip(g, "other", [Update("seed-10.9.0.5:60065", "", SUSPECT, 0), upd("seed-box", incarnation=BASE_INC)])
    ids = {r[0] for r in g.members()}
    assert ids == {"replica-r2", "other", "seed-box"}
    assert g.stats["placeholders_ignored"] >= 3
    events = [(MemberEventKind(k), r[0]) for k, r in g.drain_events()]
    assert all(not mid.startswith(f"seed-{REF_ADDRESS}") and mid != f"seed-{g.address}" for _, mid in events)


def test_a_core_without_the_convention_keeps_such_ids():
    # The prefix is the shell's knowledge (llmgw.topology), handed in; the core alone assumes nothing.
    plain = make("gateway-1")
    ref = ReferencePeer("replica-r2", "10.9.0.2:60062", seeds=[REF_ADDRESS], max_capacity=2)
    send(ref, plain)
    assert f"seed-{REF_ADDRESS}" in {r[0] for r in plain.members()}


def test_what_llmgw_replicas_send_gives_a_reference_gateway_their_load_capacity_and_version():
    """The other direction: decode what an llmgw replica sends and apply the reference's merge rule to it."""
    replica = make("replica-1", role=1, grpc_address="10.0.0.7:50061", max_capacity=4, model_version="v2",
                   placeholder_prefix=SEED_PLACEHOLDER_PREFIX)
    ref_gw = ReferencePeer("gateway-ref", "10.9.0.9:60051", seeds=[replica.address])
    replica.join([ref_gw.address], 0.0)
    now = 0.0

    def exchange(until: float) -> None:
        """Both run until `until`: the reference pings once per period, the replica runs its timers; every
        datagram between them is delivered (the replica's own answers to the reference's PINGs included)."""
        nonlocal now
        next_probe = now
        while now < until:
            step = min(replica.next_deadline(), next_probe, until)
            now = max(now, step)
            replica.tick(now)
            if now >= next_probe:
                probe = ref_gw.probe()
                if probe is not None and probe[0] == replica.address:
                    replica.handle_datagram(probe[1], ref_gw.address, now)
                next_probe = now + 0.5
            for address, data in replica.drain_outgoing():
                if address == ref_gw.address:
                    for back_address, reply in ref_gw.receive(data, replica.address):
                        if back_address == replica.address:
                            replica.handle_datagram(reply, ref_gw.address, now)
            replica.drain_events()

    def seen() -> tuple[int, int, str]:
        e = ref_gw.members["replica-1"]
        return e.active_requests, e.max_capacity, e.model_version

    exchange(2.0)
    assert seen() == (0, 4, "v2")
    for load in (3, 4, 1, 0):
        replica.set_meta(now, active_requests=load)
        exchange(now + 2.0)
        assert seen() == (load, 4, "v2"), load
    replica.set_meta(now, model_version="v3", max_capacity=6)
    exchange(now + 2.0)
    assert seen() == (0, 6, "v3")
    # Load changes faster than gossip publishes them (once per period): the last value always arrives.
    for load in (1, 2, 3, 2):
        replica.set_meta(now, active_requests=load)
        exchange(now + 0.1)
    exchange(now + 2.0)
    assert seen() == (2, 6, "v3")
    # And the reference saw the replica as ALIVE throughout, at the incarnations llmgw published.
    entry = ref_gw.members["replica-1"]
    assert entry.state == ALIVE and entry.incarnation == replica.incarnation


def test_every_llmgw_datagram_decodes_for_a_reference_node():
    """Reference nodes know message types 0..2; llmgw's own types only ever go to whoever sent them first or to
    seeds, and every update field the reference reads is set from the replica's real values."""
    replica = make("replica-1", role=1, max_capacity=4, model_version="v2")
    gossip(replica, "gateway-ref", [Update("gateway-ref", addr("gateway-ref"), ALIVE, 0)])
    replica.set_meta(1.0, active_requests=2)
    sent = outgoing(replica)
    for _, msg, _ in sent:
        for u in msg.updates:
            if u.member_id == "replica-1":
                assert (u.max_capacity, u.model_version) == (4, "v2")
    # An llmgw replica's PING answer to a reference PING is an ACK with the same sequence number.
    replica.handle_datagram(encode(Message(PING, "gateway-ref", "replica-1", 77, [], "", "", 0)),
                            addr("gateway-ref"), 2.0)
    acks = [decode(d) for a, d in replica.drain_outgoing() if decode(d).type == ACK]
    assert any(m.sequence_num == 77 for m in acks)


def test_a_ping_to_the_placeholder_of_our_own_address_is_answered():
    """A reference node seeded with our address pings `seed-<our address>` until it learns our id (and keeps
    doing so, since it never drops the placeholder): that PING is for us, not for a previous occupant."""
    g = llmgw_gateway()
    ref = ReferencePeer("replica-r1", REF_ADDRESS, seeds=[g.address], max_capacity=2)
    target, data = ref.probe()
    assert target == g.address and decode(data).target_id == f"seed-{g.address}"
    g.handle_datagram(data, ref.address, 0.0)
    acks = [m for a, m, _ in outgoing(g) if a == ref.address and m.type == ACK]
    assert [m.sequence_num for m in acks] == [decode(data).sequence_num]
    assert view(g, "replica-r1").max_capacity == 2 and g.stats["misdirected"] == 0
    # A PING for some other id at our address still is misdirected (a restarted node under a new id).
    g.handle_datagram(encode(Message(PING, "replica-r1", "gateway-0", 5, [], "", "", 0)), ref.address, 0.1)
    assert g.stats["misdirected"] == 1


def test_only_the_senders_last_word_about_itself_counts():
    """The reference appends itself last; an earlier update about the sender in the same datagram (a stale copy
    from its table) must not flap the metadata back and forth on the way."""
    g = llmgw_gateway()
    ref = ReferencePeer("replica-r1", REF_ADDRESS, max_capacity=2, model_version="v7")
    send(ref, g, PING)
    g.drain_events()
    ref.active_requests = 1
    stale = Update("replica-r1", REF_ADDRESS, ALIVE, 0)  # load 0, capacity 0 "unknown", no version
    g.handle_datagram(encode(Message(ACK, "replica-r1", "gateway-1", 0, [stale, ref.self_update()], "", "", 0)),
                      REF_ADDRESS, 1.0)
    assert [(k, r[0]) for k, r in g.drain_events()] == [("updated", "replica-r1")]
    m = view(g, "replica-r1")
    assert (m.active_requests, m.max_capacity, m.model_version) == (1, 2, "v7")
