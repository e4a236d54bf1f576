"""GossipNode (asyncio UDP shell) on loopback, in one process."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from llmgw.gossip import GossipConfig, GossipFilter, GossipNode, LossyNetwork, Member, MemberEvent
from llmgw.gossip.node import parse_host_port

FAST = GossipConfig.local()


async def wait_for(predicate, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


def live_ids(node: GossipNode) -> set[str]:
    return {m.member_id for m in node.members() if m.state == "alive"}


def run_nodes(body, timeout: float = 30.0) -> None:
    """Run body(make) on a fresh loop; every node make() started is stopped in the same loop, even on failure."""

    async def main():
        made: list[GossipNode] = []

        async def make(*args, **kwargs) -> GossipNode:
            kwargs.setdefault("config", FAST)
            n = GossipNode(*args, **kwargs)
            made.append(n)
            await n.start()
            return n

        try:
            await asyncio.wait_for(body(make), timeout)
        finally:
            for n in made:
                await asyncio.wait_for(n.stop(leave=False), 10)

    asyncio.run(main())


def test_join_metadata_events_and_leave():
    async def body(nodes):
        a = await nodes("replica-a", grpc_address="127.0.0.1:50051", model_version="v1", max_capacity=4)
        events: list[MemberEvent] = []
        unsubscribe = a.subscribe(events.append)
        b = await nodes("gateway-b", seeds=[a.address], role="gateway")
        c = await nodes("replica-c", seeds=[b.address], threaded=True)
        assert await wait_for(lambda: all(len(live_ids(n)) == 2 for n in (a, b, c)), 5.0)
        mb = a.member("gateway-b")
        assert isinstance(mb, Member) and mb.role == "gateway" and mb.address == b.address
        ma = c.member("replica-a")
        assert (ma.grpc_address, ma.model_version, ma.max_capacity, ma.weight) == ("127.0.0.1:50051", "v1", 4, 1.0)
        host, port = parse_host_port(c.address)
        assert port >= 10000  # Linux ephemeral ports; the reference convention needs gossip port - 10000 >= 0
        assert a.member("replica-c").grpc_address == f"{host}:{port - 10000}"
        c.update_meta(active_requests=3, model_version="v2", weight=0.5, draining=True)  # from the caller's thread
        assert await wait_for(lambda: (a.member("replica-c").model_version == "v2"
                                       and a.member("replica-c").active_requests == 3
                                       and a.member("replica-c").draining), 5.0)
        assert any(e.kind == "updated" and e.member.member_id == "replica-c" for e in events)
        await c.stop()
        assert await wait_for(lambda: a.member("replica-c").state == "left", 5.0)
        assert any(e.kind == "left" for e in events)
        unsubscribe()
        n_events = len(events)
        await b.stop()
        await asyncio.sleep(0.3)
        assert len(events) == n_events  # unsubscribed
        assert a.local_member().state == "alive" and a.local_member().member_id == "replica-a"
        s = a.stats()
        assert s["messages_in"] > 0 and s["malformed"] == 0 and s["callback_errors"] == 0

    run_nodes(body)


def test_killed_node_is_declared_dead_and_callback_errors_are_contained():
    async def body(nodes):
        a = await nodes("a")
        b = await nodes("b", seeds=[a.address])
        a.subscribe(lambda e: 1 / 0)  # a broken subscriber must not break the node
        assert await wait_for(lambda: live_ids(a) == {"b"}, 5.0)
        await b.stop(leave=False)  # like a crash: silence
        assert await wait_for(lambda: a.member("b").state == "dead", 10.0)
        assert a.stats()["callback_errors"] >= 1

    run_nodes(body)


def test_lossy_network_still_converges():
    async def body(nodes):
        def net(seed: int) -> LossyNetwork:
            return LossyNetwork(loss=0.2, duplicate=0.1, reorder=0.2, delay=0.002, jitter=0.003, seed=seed)

        a = await nodes("a", network=net(1))
        b = await nodes("b", seeds=[a.address], network=net(2))
        c = await nodes("c", seeds=[a.address], network=net(3))
        assert await wait_for(lambda: all(len(live_ids(n)) == 2 for n in (a, b, c)), 10.0)
        await asyncio.sleep(1.5)
        assert all(m.state != "dead" for n in (a, b, c) for m in n.members())
        assert a._network.dropped > 0

    run_nodes(body)


def test_shared_key_cluster_rejects_outsiders():
    key = b"0123456789abcdef0123456789abcdef"

    async def body(nodes):
        a = await nodes("a", key=key)
        b = await nodes("b", key=key, seeds=[a.address])
        _intruder = await nodes("intruder", seeds=[a.address])  # unsigned: must stay outside
        assert await wait_for(lambda: live_ids(a) == {"b"} and live_ids(b) == {"a"}, 5.0)
        await asyncio.sleep(0.5)
        assert a.member("intruder") is None
        assert a.stats()["auth_rejected"] > 0

    run_nodes(body)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError):
        GossipNode("")
    with pytest.raises(ValueError):
        GossipNode("x", bind="nonsense")
    with pytest.raises(ValueError):
        GossipNode("x", role="king")
    with pytest.raises(ValueError):
        GossipNode("x", seeds=["a:b:c:notaport"])
    with pytest.raises(ValueError):
        GossipNode("x", key=b"short")
    with pytest.raises(ValueError):
        GossipConfig.lan(probe_timeout=1.0)
    with pytest.raises(ValueError):
        GossipConfig.preset("moon")
    n = GossipNode("x")
    with pytest.raises(RuntimeError):
        n.members()
    with pytest.raises(RuntimeError):
        _ = n.address


def test_stop_is_idempotent_and_threaded_mode_runs_callbacks_on_its_thread():
    async def body(nodes):
        a = await nodes("a", threaded=True)
        threads = set()
        a.subscribe(lambda e: threads.add(threading.current_thread().name))
        b = await nodes("b", seeds=[a.address])
        assert await wait_for(lambda: live_ids(a) == {"b"}, 5.0)
        assert threads == {"gossip-a"}
        await a.stop()
        await a.stop()
        await b.stop()

    run_nodes(body)


def test_bind_wildcard_advertises_routable_address():
    async def body(nodes):
        a = await nodes("a", bind="0.0.0.0:0", advertise="127.0.0.1:0")
        host, port = parse_host_port(a.address)
        assert host == "127.0.0.1" and port > 0
        b = await nodes("b", bind="127.0.0.1:0", seeds=[a.address])
        assert await wait_for(lambda: live_ids(a) == {"b"} and live_ids(b) == {"a"}, 5.0)

    run_nodes(body)


@pytest.mark.parametrize("bad", [dict(max_members=0), dict(max_self_incarnation_lead=0),
                                 dict(max_self_incarnation_lead=2**41)])  # above max_incarnation_jump (2**40)
def test_hostile_input_bounds_are_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GossipConfig.lan(**bad)


def test_user_messages_and_app_meta_between_two_nodes_one_threaded():
    key = b"0123456789abcdef0123456789abcdef"

    async def body(nodes):
        a = await nodes("gateway-a", role="gateway", app_meta=b"a-1", key=key)
        b = await nodes("agent-b", role="upstream", app_meta=b"b-1", key=key, seeds=[a.address], threaded=True)
        got_a: list[tuple[str, bytes]] = []
        got_b: list[tuple[str, bytes, str]] = []
        a.subscribe_user(lambda sender, payload: got_a.append((sender, payload)))
        unsubscribe_b = b.subscribe_user(
            lambda sender, payload: got_b.append((sender, payload, threading.current_thread().name)))
        assert await wait_for(lambda: live_ids(a) == {"agent-b"} and live_ids(b) == {"gateway-a"}, 5.0)
        assert a.member("agent-b").app_meta == b"b-1" and a.member("agent-b").role == "upstream"
        assert b.member("gateway-a").app_meta == b"a-1"
        # Both ways; from the threaded node's side the call comes from this (another) thread.
        assert a.send_user("agent-b", b"to b \x00") and b.send_user("gateway-a", b"to a \xff")
        assert await wait_for(lambda: got_a and got_b, 3.0)
        assert got_a == [("agent-b", b"to a \xff")]
        assert got_b == [("gateway-a", b"to b \x00", "gossip-agent-b")]  # delivered on the gossip thread
        # The largest payload goes, one byte more is refused.
        limit = a.max_user_payload("agent-b")
        assert a.send_user("agent-b", b"L" * limit) and not a.send_user("agent-b", b"L" * (limit + 1))
        assert await wait_for(lambda: len(got_b) == 2, 3.0) and got_b[1][1] == b"L" * limit
        assert not a.send_user("nobody", b"x")
        with pytest.raises(TypeError):
            a.send_user("agent-b", "text")
        # app_meta changes reach the other side within a few protocol periods (0.25 s each here).
        started = time.monotonic()
        b.update_meta(app_meta=b"b-2")
        a.update_meta(app_meta=b"a-2")
        assert await wait_for(lambda: a.member("agent-b").app_meta == b"b-2"
                              and b.member("gateway-a").app_meta == b"a-2", 3.0)
        assert time.monotonic() - started < 6 * FAST.protocol_period
        with pytest.raises(ValueError, match="over the limit"):
            a.update_meta(app_meta=b"x" * 1025)
        unsubscribe_b()
        assert a.send_user("agent-b", b"after unsubscribe")
        await asyncio.sleep(0.3)
        assert len(got_b) == 2
        assert b.stats()["user_received"] == 3 and a.stats()["user_sent"] == 3
        assert a.stats()["callback_errors"] == b.stats()["callback_errors"] == 0

    run_nodes(body)


def test_filter_partitions_one_node_off_and_heals():
    async def body(nodes):
        # a and c share one filter; b has none, so what b sends to c reaches c's socket and must be dropped there.
        cut = GossipFilter()
        a = await nodes("gw-a", role="gateway", filter=cut)
        b = await nodes("gw-b", role="gateway", seeds=[a.address])
        c = await nodes("gw-c", role="gateway", seeds=[a.address])
        c.filter = cut  # settable while running
        got_c: list[bytes] = []
        c.subscribe_user(lambda sender, payload: got_c.append(payload))
        assert await wait_for(lambda: all(len(live_ids(n)) == 2 for n in (a, b, c)), 5.0)
        cut.block(member_ids=["gw-c"])
        # Nothing passes either way: a drops what it sends to c (its view of c's address is blocked), c drops
        # everything it receives (b's probes, and b's pings on a's behalf) and everything it sends.
        assert a.send_user("gw-c", b"lost")
        assert b.send_user("gw-c", b"lost too")
        assert await wait_for(lambda: a.member("gw-c").state == "dead" and b.member("gw-c").state == "dead"
                              and live_ids(c) == set(), 10.0)
        assert live_ids(a) == {"gw-b"} and live_ids(b) == {"gw-a"}
        assert got_c == [] and c.stats()["filtered_in"] > 0 and c.stats()["filtered_out"] > 0
        assert a.stats()["filtered_out"] > 0
        assert b.stats()["filtered_in"] == 0 and b.stats()["filtered_out"] == 0  # b has no filter
        cut.heal()
        assert await wait_for(lambda: all(len(live_ids(n)) == 2 for n in (a, b, c)), 15.0)
        assert a.send_user("gw-c", b"back")
        assert await wait_for(lambda: got_c == [b"back"], 3.0)

    run_nodes(body, timeout=45.0)


def test_filter_by_address_and_its_arguments():
    cut = GossipFilter(addresses=["10.0.0.1:1"])
    assert cut.drops("me", "10.0.0.1:1", lambda _: None)
    assert not cut.drops("me", "10.0.0.2:1", lambda _: None)
    cut.block(member_ids=["x"])
    assert cut.drops("me", "10.0.0.2:1", lambda mid: "10.0.0.2:1" if mid == "x" else None)
    assert cut.drops("x", "10.0.0.9:9", lambda _: None)  # the blocked member itself hears nothing
    cut.unblock(addresses=["10.0.0.1:1"], member_ids=["x"])
    assert cut.addresses == frozenset() and cut.member_ids == frozenset()
    with pytest.raises(TypeError):
        cut.block(addresses="10.0.0.1:1")
    with pytest.raises(TypeError):
        cut.block(member_ids=[3])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        GossipNode("x", app_meta="text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="over the limit"):
        GossipNode("x", app_meta=b"x" * 1025)


def test_user_messages_are_never_sent_to_reference_peers():
    import socket

    from llmgw._core.codec import ACK, Message, Update, encode

    async def body(nodes):
        a = await nodes("gw-a", role="gateway")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ref:
            ref.bind(("127.0.0.1", 0))
            ref_address = f"127.0.0.1:{ref.getsockname()[1]}"
            # What a reference node sends: no role (and no other llmgw field) about itself.
            ref.sendto(encode(Message(ACK, "ref-peer", "", 0, [Update("ref-peer", ref_address, 0, 5)])),
                       parse_host_port(a.address))
            assert await wait_for(lambda: a.member("ref-peer") is not None, 3.0)
            assert a.send_user("ref-peer", b"x") is False
            assert a.stats()["user_refused"] == 1 and a.stats()["user_sent"] == 0

    run_nodes(body)
