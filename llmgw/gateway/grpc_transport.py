"""The gRPC transport: Generate calls and GenerateSession streams to replicas behind the ReplicaStream interface.

One gRPC channel per replica address, shared by every request, closed when the replica leaves; and, on it, one
GenerateSession carrying every request to that replica when the replica serves sessions (llmgw.gateway.session).
A Generate call's failures (error statuses, a channel closed under it) become AttemptErrors here, once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from llmgw._proto import llmgateway_pb2 as pb
from llmgw.gateway.grpc_status import END_OF_STREAM, attempt_error, chunk_from_response
from llmgw.gateway.replica_stream import (
    AttemptError,
    AttemptErrorKind,
    ReplicaChunk,
    ReplicaStream,
    ReplicaTarget,
    StreamJob,
)
from llmgw.gateway.session import ReplicaSession, SessionUnsupported
from llmgw.tracing import NOOP_SPAN

DRAIN_METHOD = "/llmgateway.LLMReplica/Drain"
log = logging.getLogger("llmgw.gateway.grpc_transport")

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

    __slots__ = ("channel", "generate", "opening", "retry_at", "session", "session_start", "sessions_unsupported")

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.generate = channel.unary_stream(GENERATE_METHOD, request_serializer=pb.GenerateRequest.SerializeToString,
                                             response_deserializer=pb.GenerateResponse.FromString)
        self.session: ReplicaSession | None = None
        self.session_start: _SessionStart | None = None
        self.opening: asyncio.Task | None = None
        self.sessions_unsupported = False
        self.retry_at = 0.0


class ChannelPool:
    """`credentials` (grpc.ChannelCredentials, see llmgw.tls.channel_credentials) reaches replicas over
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

    def stream(self, address: str, request: pb.GenerateRequest, timeout_s: float,
               metadata: tuple[tuple[str, str], ...] | None = None) -> ReplicaStream:
        """A stream to `address`: on the replica's session once it is open, else a Generate call (while the
        session opens, and for replicas without one). `metadata` goes with a Generate call (a session carries
        the trace context in the request's own `traceparent` field)."""
        start = self.generate(address)
        if start.__class__ is _SessionStart:
            return start(request)
        if metadata:
            return GenerateStream(start(request, timeout=timeout_s, metadata=metadata))
        return GenerateStream(start(request, timeout=timeout_s))

    def generate(self, address: str):
        """What starts a stream to `address`: the replica's session's `start` once it is open, else the Generate
        multicallable (while the session opens, and for replicas without one); starts opening a session when
        none is open or being opened."""
        entry = self._replica(address)
        if not self.sessions or entry.sessions_unsupported:
            return entry.generate
        session = entry.session
        if session is not None and not session.closed:
            return entry.session_start
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
        except Exception as exc:  # noqa: BLE001 - unreachable, restarting, timed out: Generate calls until the retry
            entry.retry_at = time.monotonic() + SESSION_RETRY_S
            log.info("session to replica at %s did not open (%s); retrying in %.1f s", address, exc, SESSION_RETRY_S)
        else:
            if self._replicas.get(address) is entry:
                entry.session = session
                entry.session_start = _SessionStart(session)
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


class _SessionStart:
    """The bound `start` of an open session, told apart from the Generate multicallable by its class."""

    __slots__ = ("start",)

    def __init__(self, session: ReplicaSession) -> None:
        self.start = session.start

    def __call__(self, request: pb.GenerateRequest):
        return self.start(request)


def _cancelled_by_caller() -> bool:
    """Whether a CancelledError out of a replica call is a real cancellation of this task (the client went away, a
    lost hedge leg). If nobody cancelled the task, grpc cancelled the call because its channel was closed under it
    -- the replica was declared DEAD and its channel discarded -- and that is a failed attempt to fail over from,
    not a reason to leave the client without a status."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


class GenerateStream:
    """One Generate call (unary-stream) as a ReplicaStream."""

    __slots__ = ("_call",)

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call

    async def read(self) -> ReplicaChunk | None:
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise attempt_error(exc.code(), exc.details()) from None
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            raise AttemptError(AttemptErrorKind.CLOSED,
                               "replica connection closed (replica removed from membership)") from None
        if msg is END_OF_STREAM:
            return None
        return chunk_from_response(msg)  # type: ignore[arg-type]  # a GenerateResponse: the call's type

    def cancel(self) -> bool:
        return self._call.cancel()

    def done(self) -> bool:
        return self._call.done()


class GrpcTransport:
    """llmgw.gateway.replica_stream.Transport over gRPC. `credentials` (grpc.ChannelCredentials) reaches replicas
    over TLS; `sessions` carries requests on one GenerateSession per replica where served; `upstream_batch` is
    the most tokens per replica message the gateway asks for."""

    def __init__(self, credentials: grpc.ChannelCredentials | None = None, *, sessions: bool = True,
                 upstream_batch: int = 64) -> None:
        self.pool = ChannelPool(credentials, sessions=sessions)
        self.upstream_batch = upstream_batch

    def open(self, target: ReplicaTarget, job: StreamJob, timeout_s: float) -> ReplicaStream:
        forwarded = job.forwarded
        request = pb.GenerateRequest(request_id=job.request_id, prompt=job.prompt, max_tokens=job.max_tokens,
                                     tokens_already_generated=len(forwarded), generated_tokens=forwarded,
                                     max_tokens_per_message=self.upstream_batch)
        trace = getattr(job, "trace", NOOP_SPAN)
        if trace.recording:  # the attempt's trace context, to the replica (llmgw.tracing)
            metadata = trace.grpc_metadata()
            request.traceparent = dict(metadata).get("traceparent", "")
            return self.pool.stream(target.address, request, timeout_s, metadata)
        return self.pool.stream(target.address, request, timeout_s)

    def forget(self, address: str) -> None:
        self.pool.discard(address)

    def __contains__(self, address: str) -> bool:
        return address in self.pool

    async def close(self) -> None:
        await self.pool.close()

    async def drain_replica(self, address: str, timeout_s: float) -> bool:
        """Ask the replica at `address` to drain (LLMReplica.Drain); False when it did not finish in time."""
        credentials = self.pool.credentials
        channel = (grpc.aio.insecure_channel(address) if credentials is None
                   else grpc.aio.secure_channel(address, credentials))
        async with channel:
            drain = channel.unary_unary(DRAIN_METHOD, request_serializer=pb.DrainRequest.SerializeToString,
                                        response_deserializer=pb.DrainResponse.FromString)
            try:
                response = await drain(pb.DrainRequest(), timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return False
                raise RuntimeError(f"Drain RPC failed: {exc.code().name}: {exc.details()}") from None
        return bool(response.success)
