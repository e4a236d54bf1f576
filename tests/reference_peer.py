"""A sans-IO model of how a reference (C++) node gossips, built from issue 14 and ../shared/reference.md.

No reference binary exists here; these rules are what it does, as read from its source:
- Every datagram it sends (PING, ACK, PING_REQ) carries up to 8 piggybacked updates from its table **plus one
  update about itself appended last**: its id, its gossip host:port, ALIVE, its incarnation (0 at start; it grows
  only to refute a suspicion), active_requests, max_capacity, model_version. Load changes therefore travel at an
  unchanged incarnation. It sets neither sender_address, grpc_address, role, weight nor a timestamp (fields it
  does not have).
- It seeds its table with `seed-<host:port>` placeholders (ALIVE, incarnation 0), keeps them after it learns the
  real ids, and gossips them on like any member.
- Merging an update about another member: the SWIM state rule (higher incarnation wins; at equal incarnation
  DEAD > SUSPECT > ALIVE), and -- independently of it -- active_requests/max_capacity are taken whenever either is
  non-zero, model_version whenever non-empty.
- It knows PING, PING_REQ and ACK only (llmgw's NACK/SYNC/SYNC_ACK are ignored).
"""

from __future__ import annotations

import dataclasses

from llmgw._core.codec import ACK, ALIVE, DEAD, PING, PING_REQ, SUSPECT, Message, Update, decode, encode

MAX_PIGGYBACK = 8
PROTOCOL_PERIOD_S = 0.5
_RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2}


@dataclasses.dataclass
class Entry:
    address: str
    state: int = ALIVE
    incarnation: int = 0
    active_requests: int = 0
    max_capacity: int = 0
    model_version: str = ""


class ReferencePeer:
    def __init__(self, member_id: str, address: str, seeds: tuple[str, ...] | list[str] = (), *,
                 max_capacity: int = 0, model_version: str = "") -> None:
        self.member_id = member_id
        self.address = address
        self.incarnation = 0
        self.active_requests = 0
        self.max_capacity = max_capacity
        self.model_version = model_version
        self.members: dict[str, Entry] = {f"seed-{s}": Entry(s) for s in seeds}
        self._seq = 0
        self._probe_cursor = 0
        self._gossip_cursor = 0
        self.datagrams_sent = 0

    # ---- what it sends -----------------------------------------------------------------------------------
    def self_update(self) -> Update:
        return Update(self.member_id, self.address, ALIVE, self.incarnation, self.model_version,
                      self.active_requests, self.max_capacity)

    def _piggyback(self) -> list[Update]:
        ids = sorted(self.members)
        if not ids:
            return []
        picked = []
        for i in range(min(MAX_PIGGYBACK, len(ids))):
            mid = ids[(self._gossip_cursor + i) % len(ids)]
            e = self.members[mid]
            picked.append(Update(mid, e.address, e.state, e.incarnation, e.model_version, e.active_requests,
                                 e.max_capacity))
        self._gossip_cursor += len(picked)
        return picked

    def datagram(self, mtype: int, target_id: str = "", seq: int = 0) -> bytes:
        self.datagrams_sent += 1
        updates = [*self._piggyback(), self.self_update()]  # itself last, on every datagram
        return encode(Message(mtype, self.member_id, target_id, seq, updates, "", "", 0))

    def probe(self) -> tuple[str, bytes] | None:
        """One protocol period's PING to the next member of its table (placeholders included, as it does)."""
        live = sorted(mid for mid, e in self.members.items() if e.state != DEAD)
        if not live:
            return None
        target = live[self._probe_cursor % len(live)]
        self._probe_cursor += 1
        self._seq += 1
        return self.members[target].address, self.datagram(PING, target, self._seq)

    # ---- what it does with what it receives ----------------------------------------------------------------
    def receive(self, data: bytes, source: str) -> list[tuple[str, bytes]]:
        msg = decode(data)
        if msg.type not in (PING, PING_REQ, ACK) or msg.sender_id == self.member_id:
            return []  # not a message type it knows, or its own PING to a placeholder of its own address
        for u in msg.updates:
            self.merge(u)
        if msg.sender_id and msg.sender_id not in self.members:
            self.members[msg.sender_id] = Entry(source)
        if msg.type == PING:
            return [(source, self.datagram(ACK, msg.sender_id, msg.sequence_num))]
        if msg.type == PING_REQ:
            target = self.members.get(msg.target_id)
            if target is not None:
                return [(target.address, self.datagram(PING, msg.target_id, msg.sequence_num))]
        return []

    def merge(self, u: Update) -> None:
        if u.member_id == self.member_id:
            if u.state != ALIVE and u.incarnation >= self.incarnation:
                self.incarnation = u.incarnation + 1  # refute
            return
        state = u.state if u.state in _RANK else DEAD  # it has no LEFT: a leave reads as a death
        e = self.members.get(u.member_id)
        if e is None:
            e = self.members[u.member_id] = Entry(u.address, state, u.incarnation)
        elif u.incarnation > e.incarnation or (u.incarnation == e.incarnation and _RANK[state] > _RANK[e.state]):
            e.state, e.incarnation = state, u.incarnation
            e.address = u.address or e.address
        if u.active_requests or u.max_capacity:
            e.active_requests, e.max_capacity = u.active_requests, u.max_capacity
        if u.model_version:
            e.model_version = u.model_version
