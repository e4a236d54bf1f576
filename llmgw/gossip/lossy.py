"""Fault injection for GossipNode: a lossy send path and a partition filter.

    node = GossipNode("a", network=LossyNetwork(loss=0.1, duplicate=0.05, reorder=0.1, delay=0.01, seed=1))

The shell hands every outgoing datagram to ``LossyNetwork.send(send, address, data, loop)``, which decides its fate
and calls ``send(data, address)`` zero, one or two times, now or later on ``loop``.

    cut = GossipFilter()
    nodes = [GossipNode(f"gw-{i}", filter=cut) for i in range(3)]   # or node.filter = cut later
    cut.block(member_ids=["gw-2"])     # gw-2 is cut off from everyone, both ways
    cut.heal()

``GossipFilter`` drops every datagram to or from chosen gossip addresses or member ids, on both the send and the
receive side of each node that uses it, so one gateway can be partitioned off in a test without network
namespaces. A node whose own id is blocked drops everything it sends and receives.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable


class LossyNetwork:
    def __init__(self, *, loss: float = 0.0, duplicate: float = 0.0, reorder: float = 0.0, delay: float = 0.0,
                 jitter: float = 0.0, seed: int | None = None) -> None:
        for name, p in (("loss", loss), ("duplicate", duplicate), ("reorder", reorder)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        if delay < 0 or jitter < 0:
            raise ValueError("delay and jitter must be >= 0")
        self.loss = loss
        self.duplicate = duplicate
        self.reorder = reorder
        self.delay = delay
        self.jitter = jitter
        self._rng = random.Random(seed)
        self.dropped = 0
        self.duplicated = 0
        self.reordered = 0

    def _latency(self) -> float:
        d = self.delay + (self._rng.random() * self.jitter if self.jitter else 0.0)
        if self.reorder and self._rng.random() < self.reorder:
            # Held back long enough that later datagrams overtake it.
            self.reordered += 1
            d += max(self.delay, 0.005) * (1.0 + 4.0 * self._rng.random())
        return d

    def send(self, send: Callable[[bytes, str], None], address: str, data: bytes,
             loop: asyncio.AbstractEventLoop) -> None:
        if self.loss and self._rng.random() < self.loss:
            self.dropped += 1
            return
        copies = 1
        if self.duplicate and self._rng.random() < self.duplicate:
            self.duplicated += 1
            copies = 2
        for _ in range(copies):
            latency = self._latency()
            if latency <= 0:
                send(data, address)
            else:
                loop.call_later(latency, send, data, address)


class GossipFilter:
    """Which peers a node may not exchange datagrams with: gossip addresses ("host:port", as the node sends to
    and receives from them) and member ids (matched through each node's member table). Safe to change from any
    thread while nodes run: each change swaps in new frozensets."""

    def __init__(self, *, addresses: Iterable[str] = (), member_ids: Iterable[str] = ()) -> None:
        self._addresses: frozenset[str] = frozenset()
        self._member_ids: frozenset[str] = frozenset()
        self.block(addresses=addresses, member_ids=member_ids)

    @property
    def addresses(self) -> frozenset[str]:
        return self._addresses

    @property
    def member_ids(self) -> frozenset[str]:
        return self._member_ids

    def block(self, *, addresses: Iterable[str] = (), member_ids: Iterable[str] = ()) -> None:
        self._addresses = self._addresses | _strings(addresses, "addresses")
        self._member_ids = self._member_ids | _strings(member_ids, "member_ids")

    def unblock(self, *, addresses: Iterable[str] = (), member_ids: Iterable[str] = ()) -> None:
        self._addresses = self._addresses - _strings(addresses, "addresses")
        self._member_ids = self._member_ids - _strings(member_ids, "member_ids")

    def heal(self) -> None:
        """Drop nothing any more."""
        self._addresses = frozenset()
        self._member_ids = frozenset()

    def drops(self, own_id: str, peer_address: str, address_of: Callable[[str], str | None]) -> bool:
        """Whether node `own_id` must drop a datagram to or from `peer_address`; `address_of(member_id)` is that
        node's view of a member's gossip address (None when unknown)."""
        member_ids = self._member_ids
        if own_id in member_ids or peer_address in self._addresses:
            return True
        return any(address_of(member_id) == peer_address for member_id in member_ids)


def _strings(values: Iterable[str], name: str) -> frozenset[str]:
    if isinstance(values, str):
        raise TypeError(f"{name} must be an iterable of strings, not one string")
    out = frozenset(values)
    for v in out:
        if not isinstance(v, str):
            raise TypeError(f"{name} must hold strings, got {v!r}")
    return out
