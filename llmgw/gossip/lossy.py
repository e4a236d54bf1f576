"""A fault-injecting send path for GossipNode: loss, duplication, reordering and delay (seeded).

    node = GossipNode("a", network=LossyNetwork(loss=0.1, duplicate=0.05, reorder=0.1, delay=0.01, seed=1))

The shell hands every outgoing datagram to ``LossyNetwork.send(send, address, data, loop)``, which decides its fate
and calls ``send(data, address)`` zero, one or two times, now or later on ``loop``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable


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
