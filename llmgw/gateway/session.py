"""Many Generate streams to one replica over one GenerateSession call (proto: LLMReplica.GenerateSession).

A grpc.aio call costs a few hundred microseconds of CPU to set up and tens per message on each side, and a busy
gateway pays them per request and per token. On a session the gateway sends starts and cancels in batches and the
replica sends, in one message, every event ready since its last one. A SessionStream stands in for the grpc.aio
call of a Generate behind the same ReplicaStream interface (llmgw.gateway.replica_stream) -- read(), cancel(),
done() -- so route -> admit -> stream -> fail over reads the same whichever carries the tokens.

When the session ends (the replica crashed, its channel was closed), every stream on it fails with an UNAVAILABLE
AttemptError and the request path fails each over from its next token, exactly as when a Generate call breaks.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import grpc

from llmgw._proto import llmgateway_pb2 as pb
from llmgw.gateway.grpc_status import (
    END_OF_STREAM,
    FINISH_REASONS,
    STATUS_BY_NUMBER,
    attempt_error,
    chunk_from_response,
)
from llmgw.gateway.replica_stream import AttemptError, AttemptErrorKind, ReplicaChunk

log = logging.getLogger("llmgw.gateway.session")

GENERATE_SESSION_METHOD = "/llmgateway.LLMReplica/GenerateSession"
# The replica's first (empty) message must come within this, or the session is given up and retried later.
OPEN_TIMEOUT_S = 5.0
# Most bytes of stream starts in one SessionRequest. grpc servers refuse messages over 4 MiB by default, and a
# burst of requests with long prompts must not become one message that breaks the session for every stream.
MAX_REQUEST_BYTES = 1 << 20

_OPEN, _FINISHED, _FAILED, _CANCELLED = range(4)


class SessionUnsupported(Exception):
    """The replica does not serve GenerateSession (a reference replica, or one started with --no-sessions)."""


class SessionOpenFailed(Exception):
    """The session could not be opened (the replica ended it at once)."""


class ReplicaSession:
    """The gateway's half of one GenerateSession: `await open()`, then `start(request)` per stream."""

    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        self.address = address
        self._open_call = channel.stream_stream(GENERATE_SESSION_METHOD,
                                                request_serializer=pb.SessionRequest.SerializeToString,
                                                response_deserializer=pb.SessionResponse.FromString)
        self._call: grpc.aio.StreamStreamCall | None = None
        self._streams: dict[int, SessionStream] = {}
        self._next_id = 1
        self._starts: list[pb.SessionStart] = []
        self._cancels: list[int] = []
        self._pending = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.closed = False

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    async def open(self, timeout_s: float = OPEN_TIMEOUT_S) -> None:
        """Start the call and wait for the replica's first message. SessionUnsupported when the replica answers
        UNIMPLEMENTED; grpc.aio.AioRpcError, SessionOpenFailed or TimeoutError for anything else."""
        call = self._call = self._open_call()  # type: ignore[call-arg]  # requests are written, not iterated
        try:
            async with asyncio.timeout(timeout_s):
                hello = await call.read()
        except grpc.aio.AioRpcError as exc:
            self.closed = True
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise SessionUnsupported(self.address) from None
            raise
        except BaseException:
            self.closed = True
            call.cancel()
            raise
        if hello is END_OF_STREAM:
            self.closed = True
            raise SessionOpenFailed("replica ended the session at once")
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_events()), loop.create_task(self._write_requests())]

    def start(self, request: pb.GenerateRequest, timeout: float | None = None) -> SessionStream:
        """Start one stream. `timeout` is not sent: the request path enforces the request's deadline and cancels
        the stream when it passes."""
        stream_id = self._next_id
        self._next_id += 1
        stream = SessionStream(self, stream_id)
        if self.closed:
            stream._fail("replica session closed before the stream could start")
            return stream
        self._streams[stream_id] = stream
        self._starts.append(pb.SessionStart(stream_id=stream_id, request=request))
        self._pending.set()
        return stream

    def _cancel(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None and not self.closed:
            self._cancels.append(stream_id)
            self._pending.set()

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    async def _write_requests(self) -> None:
        # One write in flight at a time (grpc allows no more): whatever piled up meanwhile goes in the next one.
        call = self._call
        assert call is not None, "open() first"
        try:
            while True:
                await self._pending.wait()
                self._pending.clear()
                while self._starts or self._cancels:
                    await call.write(self._next_request())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the call broke: the reader sees it too and fails every stream
            self._end(f"sending to the replica failed: {exc!r}")

    def _next_request(self) -> pb.SessionRequest:
        """Every pending cancel, and pending starts up to MAX_REQUEST_BYTES (at least one: a single start is
        never larger than a Generate request for the same stream)."""
        starts = self._starts
        size, taken = 0, 0
        while taken < len(starts):
            size += starts[taken].ByteSize() + 8  # + the field's tag and length prefix
            if taken and size > MAX_REQUEST_BYTES:
                break
            taken += 1
        message = pb.SessionRequest(start=starts[:taken], cancel=self._cancels)
        del starts[:taken]
        self._cancels = []
        return message

    async def _read_events(self) -> None:
        reason = "replica ended the session"
        call = self._call
        assert call is not None, "open() first"
        try:
            while True:
                message = await call.read()
                if message is END_OF_STREAM:
                    break
                assert isinstance(message, pb.SessionResponse)
                streams = self._streams
                for event in message.events:
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream._deliver(event)
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            reason = "replica session closed"
            raise
        finally:
            self._end(reason)

    def _end(self, reason: str) -> None:
        if self.closed and not self._streams:
            return
        self.closed = True
        streams = list(self._streams.values())
        self._streams.clear()
        if streams:
            log.info("session to %s ended with %d streams open: %s", self.address, len(streams), reason)
        for stream in streams:
            stream._fail(f"replica session ended: {reason}")

    async def close(self) -> None:
        """End the session: the replica stops its streams, and any still read here fail over."""
        self._end("replica session closed")
        if self._call is not None:
            self._call.cancel()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)


class SessionStream:
    """One Generate stream on a session, a llmgw.gateway.replica_stream.ReplicaStream.

    read() returns the next ReplicaChunk -- every response that arrived since the last read, merged into one chunk
    when they are consecutive tokens, so tokens that are already here reach the client together -- then None; it
    raises AttemptError when the replica ended the stream with an error or the session broke, and
    asyncio.CancelledError after cancel().
    """

    __slots__ = ("_error", "_responses", "_session", "_state", "_waiter", "stream_id")

    def __init__(self, session: ReplicaSession, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self._responses: collections.deque[pb.GenerateResponse] = collections.deque()
        self._state = _OPEN
        self._error: AttemptError | None = None
        self._waiter: asyncio.Future | None = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _deliver(self, event: pb.SessionEvent) -> None:
        if self._state != _OPEN:
            return
        if event.status_code:
            code = STATUS_BY_NUMBER.get(event.status_code, grpc.StatusCode.UNKNOWN)
            self._error = attempt_error(code, event.status_details)
            self._state = _FAILED
            self._session._forget(self.stream_id)
        else:
            self._responses.append(event.response)
            if event.response.is_final:
                self._state = _FINISHED
                self._session._forget(self.stream_id)
        self._wake()

    def _fail(self, details: str) -> None:
        if self._state != _OPEN:
            return
        self._error = AttemptError(AttemptErrorKind.UNAVAILABLE, f"UNAVAILABLE: {details}")
        self._state = _FAILED
        self._wake()

    async def read(self) -> ReplicaChunk | None:
        while True:
            if self._state == _CANCELLED:
                raise asyncio.CancelledError()
            if self._responses:
                return self._take()
            if self._error is not None:
                raise self._error
            if self._state == _FINISHED:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _take(self) -> ReplicaChunk:
        responses = self._responses
        first = responses.popleft()
        if not first.token or first.is_final or not responses:
            return chunk_from_response(first)
        # Consecutive token-carrying responses become one chunk: the request path relays it as one batch.
        tokens = [first.token, *first.more_tokens]
        last = first
        while responses:
            nxt = responses[0]
            if not nxt.token or nxt.index != first.index + len(tokens):
                break
            responses.popleft()
            tokens.append(nxt.token)
            tokens.extend(nxt.more_tokens)
            last = nxt
            if nxt.is_final:
                break
        if last.is_final:
            return ReplicaChunk(first.index, tokens, True, FINISH_REASONS.get(last.finish_reason, "length"), last)
        return ReplicaChunk(first.index, tokens, False, None, last)

    def cancel(self) -> bool:
        if self._state != _OPEN:
            return False
        self._state = _CANCELLED
        self._session._cancel(self.stream_id)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()
        return True

    def done(self) -> bool:
        return self._state != _OPEN
