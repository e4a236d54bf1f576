"""One gRPC channel per replica address, shared by every request, closed when the replica leaves; and, on it, one
GenerateSession carrying every request to that replica when the replica serves sessions (llmgw.gateway.session)."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from llmgw._proto import llmgateway_pb2 as pb
from llmgw.gateway.session import ReplicaSession, SessionUnsupported

log = logging.getLogger("llmgw.gateway.pool")

GENERATE_METHOD = "/llmgateway.LLMReplica/Generate"
# After a session failed to open (replica restarting, unreachable), requests use Generate calls for this long
# before the next attempt: a flapping replica is not hammered with session openings.
SESSION_RETRY_S = 1.0

CHANNEL_OPTIONS = [
    # Replicas come and go: notice a dead connection quickly instead of waiting on TCP timeouts.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class _Replica:
    """Everything the pool keeps for one replica address."""

    __slots__ = ("channel", "generate", "session", "opening", "sessions_unsupported", "retry_at")

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.generate = channel.unary_stream(GENERATE_METHOD, request_serializer=pb.GenerateRequest.SerializeToString,
                                             response_deserializer=pb.GenerateResponse.FromString)
        self.session: ReplicaSession | None = None
        self.opening: asyncio.Task | None = None
        self.sessions_unsupported = False
        self.retry_at = 0.0


class ChannelPool:
    """`credentials` (grpc.ChannelCredentials, see llmgw.replica.wire.channel_credentials) reaches replicas over
    TLS; None = plaintext. `sessions`: carry requests on one GenerateSession per replica where it is served."""

    def __init__(self, credentials: grpc.ChannelCredentials | None = None, *, sessions: bool = True) -> None:
        self.credentials = credentials
        self.sessions = sessions
        self._replicas: dict[str, _Replica] = {}
        self._closing: set[asyncio.Task] = set()

    def _replica(self, address: str) -> _Replica:
        entry = self._replicas.get(address)
        if entry is None:
            if self.credentials is None:
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.secure_channel(address, self.credentials, options=CHANNEL_OPTIONS)
            entry = self._replicas[address] = _Replica(channel)
        return entry

    def generate(self, address: str):
        """What starts a stream to `address`, called as `(GenerateRequest, timeout=seconds)`: the replica's
        session once it is open, else a Generate call (while the session opens, and for replicas without one)."""
        entry = self._replica(address)
        if not self.sessions or entry.sessions_unsupported:
            return entry.generate
        session = entry.session
        if session is not None and not session.closed:
            return session.start
        if entry.opening is None and time.monotonic() >= entry.retry_at:
            entry.session = None
            entry.opening = asyncio.get_running_loop().create_task(self._open_session(address, entry))
        return entry.generate

    async def _open_session(self, address: str, entry: _Replica) -> None:
        session = ReplicaSession(entry.channel, address)
        try:
            await session.open()
        except SessionUnsupported:
            entry.sessions_unsupported = True
            log.info("replica at %s serves no GenerateSession: one Generate call per request", address)
        except Exception as exc:  # unreachable, restarting, timed out: Generate calls until the retry
            entry.retry_at = time.monotonic() + SESSION_RETRY_S
            log.info("session to replica at %s did not open (%s); retrying in %.1f s", address, exc, SESSION_RETRY_S)
        else:
            if self._replicas.get(address) is entry:
                entry.session = session
            else:  # the replica left while the session opened
                await session.close()
        finally:
            entry.opening = None

    def session(self, address: str) -> ReplicaSession | None:
        """The open session to `address`, if any (tests and status pages)."""
        entry = self._replicas.get(address)
        if entry is None or entry.session is None or entry.session.closed:
            return None
        return entry.session

    def __contains__(self, address: str) -> bool:
        return address in self._replicas

    def discard(self, address: str) -> None:
        """Close the channel to a replica that left; calls still running on it end with an error."""
        entry = self._replicas.pop(address, None)
        if entry is not None:
            task = asyncio.get_running_loop().create_task(self._close_replica(entry))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close_replica(self, entry: _Replica) -> None:
        if entry.opening is not None:
            entry.opening.cancel()
        if entry.session is not None:
            await entry.session.close()
        await entry.channel.close(grace=None)

    async def close(self) -> None:
        entries = list(self._replicas.values())
        self._replicas.clear()
        for entry in entries:
            await self._close_replica(entry)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=5.0)
