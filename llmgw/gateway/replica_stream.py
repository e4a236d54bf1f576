"""What the request path needs from a transport: open a stream to a replica, read neutral chunks, cancel it.

A transport (gRPC Generate calls and GenerateSession streams in grpc_transport.py; an HTTP upstream later) turns
one request, resumed after the tokens the client already has, into a ReplicaStream. Each transport translates its
own failures once, into AttemptError; nothing above this interface knows a status code, a channel or an SSE line.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from llmgw.tracing import Span


class ReplicaChunk:
    """One message from a replica: `tokens` starting at token `index`, the last of them final when `is_final`.

    A final chunk may carry no token (the replica only said it is done). `finish_reason` ("length" | "stop" |
    None) is set on the final chunk. `raw` is the transport's own message, for fronts that pass a backend's answer
    through (e.g. an OpenAI chunk from an HTTP upstream); the request path never reads it."""

    __slots__ = ("finish_reason", "index", "is_final", "raw", "tokens")

    def __init__(self, index: int, tokens: list[str], is_final: bool = False, finish_reason: str | None = None,
                 raw: Any = None) -> None:
        self.index = index
        self.tokens = tokens
        self.is_final = is_final
        self.finish_reason = finish_reason
        self.raw = raw

    def __repr__(self) -> str:
        return (f"ReplicaChunk(index={self.index}, tokens={self.tokens!r}, is_final={self.is_final}, "
                f"finish_reason={self.finish_reason!r})")


class ReportedUsage(NamedTuple):
    """A request's token usage as the model server reported it (OpenAI `usage`), in the client's terms: after a
    failover the text already sent counts as completion, not prompt."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class AttemptErrorKind(enum.Enum):
    """Why one replica could not (or would not) continue a stream."""

    ERROR = "error"  # the replica failed the stream (an error status, a broken or malformed stream)
    UNAVAILABLE = "unavailable"  # the replica could not be reached, or its connection broke mid-stream
    CLOSED = "closed"  # the gateway closed the connection under the stream (the replica left the membership)
    STALL = "stall"  # no first token / no next token within its limit (raised by the attempt, not a transport)
    BUSY = "busy"  # the replica is at capacity and refused the request
    DRAINING = "draining"  # the replica is draining and refused the request
    INVALID = "invalid"  # the replica rejected the request itself as invalid: no other replica will take it
    DEADLINE = "deadline"  # the transport's own deadline (the request's) passed


class AttemptError(Exception):
    """One replica could not continue the stream; `kind` tells the request path what to do about it."""

    def __init__(self, kind: AttemptErrorKind, detail: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail
        self.retry_after_s = retry_after_s  # a refusal's hint (BUSY), when the transport has one


class ReplicaStream(Protocol):
    """One request's stream from one replica.

    `read()` returns the next chunk, None once the replica ended the stream (after its final chunk, or early: the
    caller decides whether that is a failure); raises AttemptError when the stream failed, and
    asyncio.CancelledError after cancel(). `cancel()` stops the stream (the replica frees its slot); `done()` says
    whether the stream has ended, one way or another."""

    async def read(self) -> ReplicaChunk | None: ...

    def cancel(self) -> bool: ...

    def done(self) -> bool: ...


class ReplicaTarget(Protocol):
    """Where a stream goes: the replica's id and the address its transport reaches it at."""

    replica_id: str | None
    address: str


class StreamJob(Protocol):
    """What a stream is asked to produce: the request (`request`, the front's llmgw.gateway.InferenceRequest,
    for transports that pass more of it on), its id, prompt and token budget, the tokens the client already has
    (`forwarded`: the stream continues after them) and the span of the attempt (`trace`)."""

    @property
    def request(self) -> Any: ...

    @property
    def request_id(self) -> str: ...

    @property
    def prompt(self) -> str: ...

    @property
    def max_tokens(self) -> int: ...

    @property
    def forwarded(self) -> Sequence[str]: ...

    # The span of the attempt being opened (llmgw.tracing; NOOP_SPAN when not tracing). A transport reads it
    # synchronously in open() for the outgoing traceparent: a hedge leg may replace it once open() returned.
    @property
    def trace(self) -> Span: ...

    # What a transport keeps about this request across its attempts (None until one sets it), e.g. the HTTP
    # transport's record of what already reached the client.
    transport_state: object

    # The server's own count of the request's tokens, set by a transport that saw one (None = none reported: the
    # gateway's count stands). The request path hands it to the tenant's token limit.
    usage: ReportedUsage | None


class Transport(Protocol):
    """Opens replica streams. `open` does not wait for the replica: errors surface from the stream's read().
    `timeout_s` is what is left of the request's deadline."""

    def open(self, target: ReplicaTarget, job: StreamJob, timeout_s: float) -> ReplicaStream: ...

    def forget(self, address: str) -> None:
        """The replica at `address` left: drop its connection (streams still on it fail with CLOSED)."""

    async def close(self) -> None: ...
