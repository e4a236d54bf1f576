"""One attempt: one replica continuing a request from the tokens the client already has.

`Attempt.open()` sends the request through the transport and waits, bounded by the first-token limit, for the
first chunk; `Attempt.relay()` turns chunks into token events, checking order and count, with an inter-token
watchdog. An attempt that cannot go on raises AttemptError (the request path fails over) or a GatewayError
(the request itself is at fault: invalid, or out of time); it calls nothing above it. Its verdict for the breaker
is read from it afterwards (`ttft_s`, `mean_itl_s`, `finished`).

Limits come from a `Limits` object asked per replica and per wait: the hard ones (the configured timeouts). With
a `StallGuard` (llmgw.gateway.stall_race) the attempt lets the guard do its waits: it adds each replica's adaptive
deadline and, past it, races a continuation on another replica; the attempt may then go on with the
continuation's stream, ticket and replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from llmgw.gateway.api import DeadlineExceeded, InferenceRequest, InvalidArgument, TokenEvent
from llmgw.gateway.capacity import Ticket
from llmgw.gateway.replica_stream import (
    AttemptError,
    AttemptErrorKind,
    ReplicaChunk,
    ReplicaStream,
    ReportedUsage,
    Transport,
)
from llmgw.tracing import NOOP_SPAN, Span

if TYPE_CHECKING:
    from llmgw.gateway.stall_race import StallGuard, WaitTimer

# A transport's own deadline error this close to the request's deadline is the request's deadline.
DEADLINE_SLACK_S = 0.005


class Limits(Protocol):
    """How long a replica may stay silent: before its first token, and between two tokens."""

    def first_token_s(self, replica_id: str) -> float: ...

    def inter_token_s(self, replica_id: str) -> float: ...


class StaticLimits:
    """The configured limits, the same for every replica."""

    __slots__ = ("first_token", "inter_token")

    def __init__(self, first_token_s: float, inter_token_s: float) -> None:
        self.first_token = first_token_s
        self.inter_token = inter_token_s

    def first_token_s(self, replica_id: str) -> float:
        return self.first_token

    def inter_token_s(self, replica_id: str) -> float:
        return self.inter_token


class Job:
    """A request as its attempts see it (a replica_stream.StreamJob): what to generate, by when, and the tokens
    the client already has (the resume point of the next attempt; each attempt appends what it delivers)."""

    __slots__ = ("deadline", "forwarded", "max_tokens", "prompt", "request", "request_id", "trace",
                 "transport_state", "usage")

    def __init__(self, request: InferenceRequest, request_id: str, deadline: float) -> None:
        self.request = request
        self.request_id = request_id
        self.prompt = request.prompt
        self.max_tokens = request.max_tokens
        self.deadline = deadline  # event-loop time
        self.forwarded: list[str] = []
        self.transport_state: object = None  # what a transport keeps about this request across its attempts
        self.usage: ReportedUsage | None = None  # the server's usage, when a transport saw one
        # The span of the attempt being opened (llmgw.tracing; NOOP_SPAN when not tracing): the request path sets
        # it just before Attempt.open(), whose transport.open() reads it synchronously for the outgoing
        # traceparent (gRPC metadata + GenerateRequest.traceparent; span.inject(headers) over HTTP).
        self.trace: Span = NOOP_SPAN


class Attempt:
    """One replica's try at a job, on the capacity `ticket` holds."""

    __slots__ = (
        "_limits",
        "_transport",
        "finished",
        "first",
        "guard",
        "job",
        "mean_itl_s",
        "message_at",
        "replica_id",
        "stream",
        "ticket",
        "ttft_s",
        "wait_timer",
    )

    def __init__(self, job: Job, ticket: Ticket, transport: Transport, limits: Limits,
                 guard: StallGuard | None = None) -> None:
        self.job = job
        self.ticket = ticket
        self.replica_id: str = ticket.replica_id or ""
        self._transport = transport
        self._limits = limits
        self.stream: ReplicaStream | None = None
        self.first: ReplicaChunk | None = None
        self.ttft_s = 0.0  # seconds from sending the request to the first chunk
        self.mean_itl_s: float | None = None  # after the final token: mean time per token after the first
        self.finished = False  # the final token was delivered (the stream must not be cancelled then)
        # Adaptive stall deadlines and stall races (llmgw.gateway.stall_race): the guard does the waits, the limits
        # above stay the hard ones. None = the limits alone.
        self.guard = guard
        self.message_at = 0.0  # event-loop time the latest message was read (the guard measures gaps from it)
        self.wait_timer: WaitTimer | None = None  # the guard's timer of this attempt's inter-token waits

    async def open(self) -> Attempt:
        """Send the request and wait (bounded) for the first chunk; returns self."""
        loop = asyncio.get_running_loop()
        job = self.job
        started = loop.time()
        limit = self._limits.first_token_s(self.replica_id)
        if job.request.body is not None and not job.request.stream:
            # A model server's non-streamed answer is its first and only chunk: it may take the whole request.
            limit = max(limit, job.deadline - started)
        stream = self.stream = self._transport.open(self.ticket, job, max(0.001, job.deadline - started))
        # A non-streamed answer from a model server arrives whole: there is no first token to watch for.
        guard = self.guard if job.request.stream or job.request.body is None else None
        with self._failures(lambda: f"no first token within {limit:g} s"):
            async with asyncio.timeout_at(min(job.deadline, started + limit)) as watchdog:
                chunk = await stream.read() if guard is None else await guard.read(self, watchdog, first=True)
            if chunk is None:
                raise AttemptError(AttemptErrorKind.ERROR, "stream ended before the first token")
            self.first = chunk
            self.ttft_s = loop.time() - started
            return self

    def cancel(self) -> None:
        """Stop the replica's stream (it frees its slot), unless it already ended."""
        timer = self.wait_timer
        if timer is not None:
            timer.close()
        stream = self.stream
        if stream is not None and not self.finished and not stream.done():
            stream.cancel()

    @contextlib.contextmanager
    def _failures(self, stall_detail: Callable[[], str]) -> Iterator[None]:
        """How a replica stream can end early, in the request path's terms: a silence past the limit is a STALL;
        a transport's INVALID or (at the request's deadline) DEADLINE is the request's own fault; a cancellation
        stays one. A stream the attempt did not finish is cancelled on the way out, so the replica frees its
        slot."""
        try:
            yield
        except TimeoutError:
            self.cancel()
            if asyncio.get_running_loop().time() >= self.job.deadline:
                raise DeadlineExceeded(f"request deadline passed after {len(self.job.forwarded)} tokens") from None
            raise AttemptError(AttemptErrorKind.STALL, stall_detail()) from None
        except AttemptError as exc:
            self.cancel()
            if exc.kind is AttemptErrorKind.INVALID:
                raise InvalidArgument(f"replica {self.replica_id}: {exc.detail}") from None
            if exc.kind is AttemptErrorKind.DEADLINE and \
                    asyncio.get_running_loop().time() >= self.job.deadline - DEADLINE_SLACK_S:
                raise DeadlineExceeded(f"request deadline passed after {len(self.job.forwarded)} tokens") from None
            raise
        except BaseException:
            self.cancel()
            raise

    async def relay(self) -> AsyncGenerator[list[TokenEvent], None]:
        """The attempt's tokens as events, in batches as they arrived, ending with the final one. Call after
        open(). Every event's index is the next the client expects; a replica sending another index, or more
        tokens than max_tokens, fails the attempt."""
        chunk = self.first
        stream = self.stream
        assert chunk is not None and stream is not None, "relay() before open()"
        loop = asyncio.get_running_loop()
        job = self.job
        deadline = job.deadline
        forwarded = job.forwarded
        max_tokens = job.max_tokens
        replica_id = self.replica_id
        inter_token_s = self._limits.inter_token_s
        guard = self.guard
        first = chunk
        expected = len(forwarded)
        first_at = loop.time()
        later_tokens = 0  # tokens after the first chunk's first one: the inter-token latency's denominator
        limit = 0.0  # the wait's hard limit (with a guard, the guard asks for it: it is asked again only to report)
        with self._failures(lambda: f"no token {expected} within "
                                    f"{limit if guard is None else inter_token_s(replica_id):g} s"):
            async with asyncio.timeout(None) as watchdog:
                while True:
                    # Reference replicas leave index unset (0): then order is the only index there is.
                    if chunk.index != expected and chunk.index != 0:
                        raise AttemptError(AttemptErrorKind.ERROR,
                                           f"replica sent index {chunk.index}, expected {expected}")
                    tokens = chunk.tokens
                    count = len(tokens)
                    if count:
                        if expected + count > max_tokens or (not chunk.is_final and expected + count >= max_tokens):
                            raise AttemptError(AttemptErrorKind.ERROR, "replica sent more tokens than max_tokens")
                        if count == 1:
                            token = tokens[0]
                            forwarded.append(token)
                            if chunk.is_final:
                                batch = [TokenEvent(expected, token, replica_id, True, chunk.finish_reason or "length",
                                                    chunk.raw)]
                            else:
                                batch = [TokenEvent(expected, token, replica_id, False, None, chunk.raw)]
                        else:
                            batch = [TokenEvent(expected + k, tok, replica_id) for k, tok in enumerate(tokens)]
                            forwarded.extend(tokens)
                            last = batch[-1]
                            last.raw = chunk.raw
                            if chunk.is_final:
                                last.is_final = True
                                last.finish_reason = chunk.finish_reason or "length"
                        later_tokens += count if chunk is not first else count - 1
                        expected += count
                        if chunk.is_final:
                            self._finish(loop.time() - first_at, later_tokens)
                            yield batch
                            return
                        yield batch
                    elif chunk.is_final:  # a final chunk with no token
                        self._finish(loop.time() - first_at, later_tokens)
                        yield [TokenEvent(expected, "", replica_id, True, chunk.finish_reason or "length", chunk.raw)]
                        return
                    if guard is None:
                        limit = inter_token_s(replica_id)
                        watchdog.reschedule(min(deadline, loop.time() + limit))
                        chunk = await stream.read()
                        watchdog.reschedule(None)  # never fire while the caller holds the event
                    else:
                        chunk = await guard.read(self, watchdog, first=False)
                        replica_id = self.replica_id  # a stall race may have moved the stream to another
                    if chunk is None:
                        raise AttemptError(AttemptErrorKind.ERROR, "stream ended before the final token")

    def _finish(self, elapsed_s: float, later_tokens: int) -> None:
        # After the final token the replica is only closing its stream: cancelling it then would make a
        # completed stream look abandoned on the replica side.
        self.finished = True
        self.mean_itl_s = elapsed_s / later_tokens if later_tokens else None
