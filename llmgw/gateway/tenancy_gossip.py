"""Tenant usage over the gossip mesh: each gateway sends its own usage digest to every other live gateway.

Every `interval_s` (0.5 s) the gateway builds `limiter.build_digest(now, budget)` and sends it to each live
gateway as a gossip user message (GossipNode.send_user), even when it is empty: the digest is the usage plane's
heartbeat, and a peer not heard from for the limiter's peer timeout stops counting (then a lone gateway falls back
to its share of each limit). Received digests go to `limiter.receive_digest`; a payload that is not a digest is
counted and dropped, like a bad datagram. A gateway that leaves gracefully (SWIM's LEFT) is forgotten at once
(`limiter.peer_left`). The limiter lives on the gateway's event loop: gossip callbacks, which may run on the
gossip thread, are handed over to it.

Payloads start with `USAGE_TAG`, so other users of gossip user messages can share the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from llmgw.gateway.tenancy_gate import TenancyGate
from llmgw.tenancy.digest import DigestError
from llmgw.topology import ROLE_GATEWAY

__all__ = ["DIGEST_BUDGET_BYTES", "DIGEST_INTERVAL_S", "USAGE_TAG", "UsageGossip"]

log = logging.getLogger("llmgw.gateway.tenancy")

USAGE_TAG = b"llmgw.usage.1\n"
DIGEST_INTERVAL_S = 0.5
# Fits one gossip datagram with its header (and the optional HMAC); ~4 KB/s per gateway with 1,000 tenants.
DIGEST_BUDGET_BYTES = 1024
_LIVE = ("alive", "suspect")


class UsageGossip:
    """Sends this gateway's usage digest to the other gateways and takes in theirs. `node` is the gateway's
    GossipNode (members(), subscribe(), send_user(), subscribe_user())."""

    def __init__(self, gate: TenancyGate, node: Any, *, interval_s: float = DIGEST_INTERVAL_S,
                 budget_bytes: int = DIGEST_BUDGET_BYTES) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        self.gate = gate
        self.node = node
        self.interval_s = interval_s
        self.budget_bytes = budget_bytes
        self.sent = 0
        self.sent_bytes = 0
        self.received = 0
        self.bad = 0  # payloads that were not a digest (or counted over other windows)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._unsubscribe: list[Callable[[], None]] = []

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._unsubscribe.append(self.node.subscribe_user(self._from_gossip))
        self._unsubscribe.append(self.node.subscribe(self._member_event))
        self._task = asyncio.create_task(self._run(), name="tenancy-usage-gossip")

    async def stop(self) -> None:
        for unsubscribe in self._unsubscribe:
            with contextlib.suppress(Exception):
                unsubscribe()
        self._unsubscribe.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "sent_bytes": self.sent_bytes, "received": self.received, "bad": self.bad}

    # ---- sending --------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self.send_once(loop.time())
            except Exception:  # one failed round must not end the usage plane
                log.exception("usage digest round failed")
            await asyncio.sleep(self.interval_s)

    def send_once(self, now: float) -> int:
        """Build one digest and send it to every live gateway but this one; returns how many it went to."""
        me = self.node.member_id
        peers = [m.member_id for m in self.node.members()
                 if m.role == ROLE_GATEWAY and m.member_id != me and str(m.state) in _LIVE]
        budget = self.budget_bytes
        for peer in peers:  # one datagram each: the digest fits the smallest room any peer's datagram has
            budget = min(budget, self.node.max_user_payload(peer) - len(USAGE_TAG))
        # Built even with no peer to send to: building is what keeps the limiter's digest clock going.
        payload = USAGE_TAG + self.gate.limiter.build_digest(now, max(budget, 64))
        count = 0
        for peer in peers:
            if self.node.send_user(peer, payload):
                count += 1
        self.sent += count
        self.sent_bytes += count * len(payload)
        return count

    # ---- receiving ------------------------------------------------------------------------------------------
    def _from_gossip(self, sender_id: str, payload: bytes) -> None:
        if not payload.startswith(USAGE_TAG):
            return  # another user of the channel
        self._call_on_loop(self._receive, sender_id, bytes(payload[len(USAGE_TAG):]))

    def _member_event(self, event: Any) -> None:
        member = event.member
        if member.role == ROLE_GATEWAY and str(event.kind) in ("left", "removed") and str(member.state) != "dead":
            self._call_on_loop(self.gate.limiter.peer_left, member.member_id)

    def _call_on_loop(self, fn: Callable[..., object], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us: the gateway is stopping
            loop.call_soon_threadsafe(fn, *args)

    def _receive(self, sender_id: str, data: bytes) -> None:
        assert self._loop is not None
        try:
            self.gate.limiter.receive_digest(sender_id, data, self._loop.time())
        except DigestError as exc:
            self.bad += 1
            log.debug("bad usage digest from %s: %s", sender_id, exc)
            return
        self.received += 1
