"""In-memory replicas for unit tests of the request path: a scripted ReplicaStream and a Transport handing them out,
and a Gateway built on them over a test-driven membership (no sockets, no gRPC)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from inprocess import FakeMember, FakeMembership
from llmgw.gateway import Gateway, GatewayConfig
from llmgw.gateway.replica_stream import ReplicaChunk

# A script step: a chunk to return, a number of seconds to stay silent, or an exception to raise.
Step = ReplicaChunk | float | BaseException


def chunk(index: int, count: int = 1, *, final: bool = False, reason: str | None = None) -> ReplicaChunk:
    """`count` tokens token_<index>.. as one chunk (count 0: a final chunk without a token)."""
    return ReplicaChunk(index, [f"token_{i}" for i in range(index, index + count)], final,
                        (reason or "length") if final else None)


def answer(start: int, end: int, *, per_chunk: int = 1, gap_s: float = 0.0) -> list[Step]:
    """Tokens start..end-1 (end-1 final), `per_chunk` per chunk, `gap_s` of silence before each later chunk."""
    steps: list[Step] = []
    at = start
    while at < end:
        n = min(per_chunk, end - at)
        if at > start and gap_s:
            steps.append(gap_s)
        steps.append(chunk(at, n, final=at + n == end))
        at += n
    return steps


class ScriptedStream:
    """A ReplicaStream that plays `steps`; then ends (read() returns None)."""

    def __init__(self, steps: list[Step]) -> None:
        self._steps = collections.deque(steps)
        self._done = False
        self.cancelled = False

    async def read(self) -> ReplicaChunk | None:
        while True:
            if self.cancelled:
                raise asyncio.CancelledError()
            if not self._steps:
                self._done = True
                return None
            step = self._steps.popleft()
            if isinstance(step, BaseException):
                self._done = True
                raise step
            if isinstance(step, (int, float)):
                await asyncio.sleep(step)
                continue
            if step.is_final:
                self._done = True
            return step

    def cancel(self) -> bool:
        if self._done:
            return False
        self._done = self.cancelled = True
        return True

    def done(self) -> bool:
        return self._done


# replica id -> (resume index, max_tokens) -> the steps of a stream opened there
Script = Callable[[int, int], list[Step]]


class ScriptedTransport:
    """A Transport whose replicas play scripts; records every stream it opened and every address it forgot."""

    def __init__(self, scripts: dict[str, Script] | None = None) -> None:
        self.scripts: dict[str, Script] = dict(scripts or {})
        self.opened: list[tuple[str, int]] = []  # (replica id, tokens the client already had)
        self.streams: list[ScriptedStream] = []
        self.forgotten: list[str] = []
        self.closed = False

    def open(self, target, job, timeout_s) -> ScriptedStream:
        self.opened.append((target.replica_id, len(job.forwarded)))
        stream = ScriptedStream(self.scripts[target.replica_id](len(job.forwarded), job.max_tokens))
        self.streams.append(stream)
        return stream

    def forget(self, address: str) -> None:
        self.forgotten.append(address)

    async def close(self) -> None:
        self.closed = True


def healthy(gap_s: float = 0.0, per_chunk: int = 1) -> Script:
    """A replica that answers every request in full from where it is resumed."""
    return lambda resume, max_tokens: answer(resume, max_tokens, per_chunk=per_chunk, gap_s=gap_s)


async def fake_gateway(scripts: dict[str, Script], *, capacity: int = 4, **config) -> tuple[Gateway, ScriptedTransport]:
    """A started Gateway over scripted replicas (one member per script, all alive)."""
    membership = FakeMembership()
    for rid in scripts:
        membership.set(FakeMember(rid, f"fake:{rid}", max_capacity=capacity), "joined")
    transport = ScriptedTransport(scripts)
    gateway = Gateway(GatewayConfig(port=0, gossip_port=None, **config), transport, membership=membership)
    await gateway.start()
    return gateway, transport
