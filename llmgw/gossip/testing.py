"""Helpers for driving the sans-IO SWIM core by hand in tests: no sockets, no clock (foca's testing.rs idea)."""

from __future__ import annotations

from llmgw._core.codec import ACK, ALIVE, PING, Message, Update, decode, encode
from llmgw._core.swim import MEMBER_FIELDS, Swim
from llmgw.gossip.config import GossipConfig

BASE_INC = 1_000_000
_STATE = MEMBER_FIELDS.index("state")
_INCARNATION = MEMBER_FIELDS.index("incarnation")


def addr(member_id: str) -> str:
    return f"{member_id}.test:17946"


def make(member_id: str, config: GossipConfig | None = None, *, seed: int = 1, now: float = 0.0,
         incarnation: int = BASE_INC, **kw) -> Swim:
    return Swim(member_id, addr(member_id), config or GossipConfig.lan(), seed, now, incarnation, **kw)


def upd(member_id: str, state: int = ALIVE, incarnation: int = BASE_INC, reporter: str = "", **kw) -> Update:
    u = Update(member_id, kw.pop("address", addr(member_id)), state, incarnation, reporter_id=reporter)
    for k, v in kw.items():
        setattr(u, k, v)
    return u


def datagram(mtype: int, sender: str, updates=(), *, seq: int = 0, target: str = "", target_address: str = "",
             timestamp_ms: int = 0, payload: bytes = b"") -> bytes:
    return encode(Message(mtype, sender, target, seq, list(updates), addr(sender), target_address, timestamp_ms,
                          payload))


def deliver(node: Swim, mtype: int, sender: str, updates=(), *, now: float = 0.0, **kw) -> None:
    node.handle_datagram(datagram(mtype, sender, updates, **kw), addr(sender), now)


def gossip(node: Swim, sender: str, updates, now: float = 0.0) -> None:
    """Piggyback-only message (unsolicited ACK with sequence 0), the way gossip rounds send rumours."""
    deliver(node, ACK, sender, updates, now=now)


def outgoing(node: Swim) -> list[tuple[str, Message, int]]:
    """Drain and decode: [(address, message, size)]."""
    return [(a, decode(d), len(d)) for a, d in node.drain_outgoing()]


def state_of(node: Swim, member_id: str) -> str | None:
    row = node.member(member_id)
    return None if row is None else str(row[_STATE])


def inc_of(node: Swim, member_id: str) -> int | None:
    row = node.member(member_id)
    return None if row is None else int(row[_INCARNATION])


def run(node: Swim, until: float, step_cb=None) -> None:
    """Fire the node's timers up to `until`, in deadline order (bounded)."""
    for _ in range(100_000):
        d = node.next_deadline()
        if d > until:
            return
        node.tick(d)
        if step_cb is not None:
            step_cb(d)
    raise AssertionError("timer loop did not settle")


def join_all(nodes: list[Swim], now: float = 0.0) -> None:
    """Tell every node about every other one at BASE_INC (as a full-state exchange would)."""
    for n in nodes:
        for other in nodes:
            if other is not n:
                gossip(n, other.member_id, [upd(other.member_id, incarnation=other.incarnation)], now)
        n.drain_outgoing()
        n.drain_events()


def answering(node: Swim, log: list | None = None):
    """A run() step callback under which every PING the node sends is ACKed by its target at once."""

    def step(t: float) -> None:
        for dst, msg, _size in outgoing(node):
            if log is not None:
                log.append((t, dst, msg))
            if msg.type == PING:
                node.handle_datagram(encode(Message(ACK, msg.target_id, node.member_id, msg.sequence_num, [],
                                                    dst, "", 0)), dst, t)
    return step
