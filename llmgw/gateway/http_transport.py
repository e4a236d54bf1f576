"""The HTTP transport: OpenAI-compatible model servers behind the ReplicaStream interface.

A request that came in as an OpenAI body (InferenceRequest.body) goes to the server as the client wrote it --
chat to /v1/chat/completions, completions to /v1/completions, streamed or not -- with only the gateway-owned
fields changed (llmgw.upstream.fidelity). Each server event travels back in `ReplicaChunk.raw` (a list of
llmgw.upstream.client.StreamChunk), so the HTTP front forwards what the server wrote; `tokens` carry the text
pieces, one per content event, which is what the request path counts and resumes from.

Failover: a stream that breaks after text reached the client continues on the next server exactly once per
attempt, from `fidelity.continuation_body` (completions: prompt + the text sent, max_tokens reduced; chat: the
partial answer as a prefill where the server kind can continue it). Where an exact continuation is impossible
(CannotContinue: n > 1, logprobs, a tool call in flight, a server without prefill...) the request ends with a
retryable error instead of a spliced answer. A server's own 4xx reaches the client as the server wrote it
(UpstreamRejected). Upstream failures become AttemptErrors here, once:

    connect, reset            -> UNAVAILABLE (fail over)
    429                       -> BUSY with the server's Retry-After (another server, or this one after the delay)
    5xx, malformed, no [DONE] -> ERROR (fail over)
    first-byte / idle timeout -> STALL (the attempt's own watchdogs usually fire first)

Events that arrived together leave together: after each event the stream takes every event already received
and parsed (UpstreamStream.buffered), so the front writes them in one go.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from llmgw.gateway.api import ErrorKind, GatewayError, Unavailable
from llmgw.gateway.replica_stream import (
    AttemptError,
    AttemptErrorKind,
    ReplicaChunk,
    ReplicaStream,
    ReplicaTarget,
    ReportedUsage,
    StreamJob,
    Transport,
)
from llmgw.upstream.backends import Backend
from llmgw.upstream.client import (
    Endpoint,
    StreamChunk,
    UpstreamClient,
    UpstreamResponse,
    UpstreamStream,
    UpstreamTimeouts,
)
from llmgw.upstream.errors import FailureKind, UpstreamError
from llmgw.upstream.fidelity import AnswerComplete, CannotContinue, continuation_body, continued_usage, prepare_request

log = logging.getLogger("llmgw.gateway.http_transport")

HTTP_SCHEMES = ("http://", "https://")
# A server's Retry-After beyond this is taken as this: one server's hint must not park it for hours.
MAX_RETRY_AFTER_S = 60.0

_ATTEMPT_KIND = {
    FailureKind.CONNECT: AttemptErrorKind.UNAVAILABLE,
    FailureKind.RESET: AttemptErrorKind.UNAVAILABLE,
    FailureKind.TIMEOUT_FIRST_BYTE: AttemptErrorKind.STALL,
    FailureKind.TIMEOUT_IDLE: AttemptErrorKind.STALL,
    FailureKind.RATE_LIMITED: AttemptErrorKind.BUSY,
    FailureKind.SERVER_ERROR: AttemptErrorKind.ERROR,
    FailureKind.MALFORMED: AttemptErrorKind.ERROR,
    FailureKind.INCOMPLETE: AttemptErrorKind.ERROR,
}
_CHAT_DELTA_TEXT = ("role", "content")


class UpstreamRejected(GatewayError):
    """The model server refused the request itself (an HTTP 4xx other than 429): the client gets the server's
    status and body as the server wrote them. No other server is tried: it would refuse the same body."""

    kind = ErrorKind.INVALID_ARGUMENT

    def __init__(self, status: int, body: bytes, content_type: str | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.content_type = content_type or "application/json"


class CannotContinueExactly(Unavailable):
    """A server failed mid-answer and no server can continue the answer exactly (docs/backends.md): the request
    ends with this retryable error rather than with two answers spliced together."""

    retry_after_s = 1.0


@dataclasses.dataclass
class _Progress:
    """What the attempts of one request know about what already reached the client (Job.transport_state)."""

    other_output: bool = False  # non-text output (a tool-call or reasoning delta) reached the client
    response_id: str = ""  # the first server's id (the front keeps it for the whole answer)


def endpoint_for(api: str) -> Endpoint:
    return Endpoint.CHAT if api == "chat" else Endpoint.COMPLETIONS


class HttpReplicaStream:
    """One attempt of one request on one model server. The request is sent at the first read()."""

    __slots__ = (
        "_backend",
        "_cancelled",
        "_choices",
        "_client",
        "_continued_tokens",
        "_ended",
        "_error",
        "_finish",
        "_finished",
        "_headers",
        "_job",
        "_opened",
        "_progress",
        "_stream",
        "_timeout_s",
    )

    def __init__(self, client: UpstreamClient, backend: Backend, job: StreamJob, timeout_s: float,
                 headers: dict[str, str] | None = None) -> None:
        self._client = client
        self._backend = backend
        self._job = job
        self._timeout_s = timeout_s
        self._headers = headers  # extra request headers (the attempt's traceparent), fixed when the attempt opened
        self._stream: UpstreamStream | None = None
        self._opened = False
        self._ended = False
        self._cancelled = False
        self._error: BaseException | None = None  # a failure found while coalescing: raised at the next read
        self._continued_tokens = 0  # tokens the client had when this attempt started (> 0: a continuation)
        self._finished: set[Any] = set()  # choice indices whose finish_reason arrived
        self._finish: str | None = None  # the last finish_reason seen
        self._choices = _choice_count(job.request.body)
        state = job.transport_state
        if not isinstance(state, _Progress):
            state = job.transport_state = _Progress()
        self._progress = state

    # ---- ReplicaStream ----------------------------------------------------------------------------------------
    def read(self) -> Coroutine[Any, Any, ReplicaChunk | None]:
        # Not a coroutine itself: a streamed event is read through one coroutine (_next), not two -- one frame
        # made, run and collected less per event, on the gateway's busiest path.
        if self._opened and not self._cancelled and not self._ended and self._error is None:
            return self._next()
        return self._read_first_or_last()

    async def _read_first_or_last(self) -> ReplicaChunk | None:
        if self._cancelled:
            raise asyncio.CancelledError()
        if self._ended:
            return None
        if self._error is not None:
            error, self._error = self._error, None
            self._ended = True
            raise error
        self._opened = True
        whole = await self._open()
        if whole is not None:
            self._ended = True
            return whole
        return await self._next()

    def cancel(self) -> bool:
        if self._cancelled or self._ended:
            return False
        self._cancelled = True
        if self._stream is not None:
            self._stream.cancel()
        return True

    def done(self) -> bool:
        return self._ended or self._cancelled

    # ---- sending ------------------------------------------------------------------------------------------------
    async def _open(self) -> ReplicaChunk | None:
        """Send the request (a continuation when the client already has text); a non-streamed answer (or the
        end of an answer with nothing left to generate) is returned whole, a stream is kept for _next()."""
        job = self._job
        request = job.request
        endpoint = endpoint_for(request.api)
        body = request.body
        forwarded = job.forwarded
        backend = self._backend
        if forwarded:
            if self._progress.other_output:
                raise CannotContinueExactly(f"request {job.request_id}: cannot continue the answer exactly on "
                                            f"{backend.id}: a tool call or other non-text output was in flight; "
                                            "retry the request")
            sent_tokens = sum(1 for piece in forwarded if piece)
            try:
                body = continuation_body(body, endpoint, sent_text="".join(forwarded), sent_tokens=sent_tokens,
                                         capabilities=backend.capabilities)
            except AnswerComplete:
                return ReplicaChunk(len(forwarded), [], True, "length",
                                    raw=[_finish_chunk(request.api, self._progress.response_id)])
            except CannotContinue as exc:
                raise CannotContinueExactly(f"request {job.request_id}: failed after {len(forwarded)} chunks and "
                                            f"{backend.id} cannot continue it exactly ({exc.reason}); retry the "
                                            "request") from None
            self._continued_tokens = sent_tokens
        server_model = backend.server_model(request.model) or request.model
        prepared = prepare_request(body, upstream_model=server_model, need_usage=asks_usage(request))
        payload: dict[str, Any] | bytes = prepared.body
        if prepared.unchanged and body is request.body and request.body_bytes is not None:
            payload = request.body_bytes  # the client's own bytes: nothing to encode, nothing to drift
        defaults = self._client.timeouts
        timeout_s = self._timeout_s
        timeouts = defaults  # the usual case: the request has more time left than the client's own limits
        if timeout_s < defaults.connect or timeout_s < defaults.first_byte:
            timeouts = UpstreamTimeouts(connect=min(defaults.connect, timeout_s),
                                        first_byte=min(defaults.first_byte, timeout_s), idle=defaults.idle)
        try:
            if request.stream:
                self._stream = await self._client.open_stream(backend.base_url, endpoint, payload,
                                                              timeouts=timeouts, headers=self._headers)
                return None
            answer = await self._client.complete(backend.base_url, endpoint, payload, timeouts=timeouts,
                                                 headers=self._headers)
        except UpstreamError as exc:
            raise self._translate(exc) from None
        return self._whole(answer)

    def _whole(self, answer: UpstreamResponse) -> ReplicaChunk:
        data = answer.data
        text = "".join(_texts(data, chat=self._job.request.api == "chat", whole=True))
        finish = None
        for choice in _choices_of(data):
            finish = choice.get("finish_reason") or finish
        _note_usage(self._job, data)
        return ReplicaChunk(0, [text] if text else [], True, _finish_label(finish),
                            raw=[StreamChunk(data, answer.raw)])

    # ---- receiving ------------------------------------------------------------------------------------------
    async def _next(self) -> ReplicaChunk | None:
        """The next token-bearing (or final) chunk, with the events before it and every event already received
        after it."""
        stream = self._stream
        assert stream is not None
        job = self._job
        chat = job.request.api == "chat"
        tokens: list[str] = []
        raws: list[StreamChunk] = []
        while True:
            try:
                # Events already parsed are taken without a coroutine call; only an empty buffer waits.
                chunk = stream.take_buffered() if stream.buffered else await stream.read()
            except UpstreamError as exc:
                if self._all_finished():
                    chunk = None  # the answer was complete; only [DONE] (or the usage after it) went missing
                elif tokens:
                    self._error = self._translate(exc)  # deliver what arrived first
                    return ReplicaChunk(len(job.forwarded), tokens, False, None, raw=raws)
                else:
                    self._ended = True
                    raise self._translate(exc) from None
            if chunk is None:  # [DONE]
                self._ended = True
                return ReplicaChunk(len(job.forwarded), tokens, True, _finish_label(self._finish), raw=raws)
            data = chunk.data
            if not self._progress.response_id and isinstance(data.get("id"), str):
                self._progress.response_id = data["id"]
            pieces, other, chunk_finish = self._inspect(data, chat)
            if chunk_finish is not None:
                self._finish = chunk_finish
            if self._continued_tokens:
                chunk = self._continued(chunk, chat, pieces, other, chunk_finish)
                if chunk is None:
                    continue
            _note_usage(job, chunk.data)
            raws.append(chunk)
            if pieces:
                tokens.append("".join(pieces))
            elif other:
                self._progress.other_output = True
                tokens.append("")  # forward it now: a tool call streams as it is generated
            if tokens and not (stream.buffered or stream.done()):
                return ReplicaChunk(len(job.forwarded), tokens, False, None, raw=raws)

    def _inspect(self, data: dict[str, Any], chat: bool) -> tuple[list[str], bool, str | None]:
        """(text pieces, whether it carries other output, finish_reason) of one server event."""
        pieces: list[str] = []
        other = False
        finish = None
        for choice in _choices_of(data):
            if chat:
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    content = delta.get("content")
                    if isinstance(content, str) and content:
                        pieces.append(content)
                    if not other:
                        for key, value in delta.items():
                            if value and key not in _CHAT_DELTA_TEXT:
                                other = True
                                break
            else:
                text = choice.get("text")
                if isinstance(text, str) and text:
                    pieces.append(text)
            reason = choice.get("finish_reason")
            if reason is not None:
                finish = reason
                self._finished.add(choice.get("index", 0))
        return pieces, other, finish

    def _continued(self, chunk: StreamChunk, chat: bool, pieces: list[str], other: bool,
                   finish: str | None) -> StreamChunk | None:
        """A continuation's event as the client's answer has it: the opening role delta is dropped (the client
        has it already) and usage counts the text already sent as completion, not prompt."""
        data = chunk.data
        if chat and not pieces and not other and finish is None and not _has_logprobs(data) \
                and data.get("usage") is None:
            return None
        usage = data.get("usage")
        if isinstance(usage, dict):
            return StreamChunk({**data, "usage": continued_usage(usage, sent_tokens=self._continued_tokens)}, b"")
        return chunk

    def _all_finished(self) -> bool:
        return len(self._finished) >= self._choices

    def _translate(self, exc: UpstreamError) -> BaseException:
        where = self._backend.id
        if exc.kind is FailureKind.CLIENT_ERROR:
            if not self._continued_tokens and not self._job.forwarded:
                return UpstreamRejected(exc.status or 400, exc.body or b"", exc.content_type,
                                        f"{where} refused the request: {exc.detail}")
            return AttemptError(AttemptErrorKind.ERROR, f"{where} refused the continuation: {exc.detail}")
        retry_after = exc.retry_after
        if retry_after is not None:
            retry_after = min(retry_after, MAX_RETRY_AFTER_S)
        return AttemptError(_ATTEMPT_KIND.get(exc.kind, AttemptErrorKind.ERROR), exc.detail,
                            retry_after_s=retry_after)


class _FailedStream:
    """A stream that could not be opened at all (its server left between the pick and the open)."""

    __slots__ = ("_error",)

    def __init__(self, error: AttemptError) -> None:
        self._error = error

    async def read(self) -> ReplicaChunk | None:
        raise self._error

    def cancel(self) -> bool:
        return False

    def done(self) -> bool:
        return True


class HttpTransport:
    """llmgw.gateway.replica_stream.Transport over HTTP to OpenAI-compatible servers. `backends` maps a replica id
    (an upstream's Backend.id) to its Backend; one pooled UpstreamClient serves every server."""

    def __init__(self, backends: Callable[[str], Backend | None], client: UpstreamClient | None = None) -> None:
        self._backends = backends
        self.client = client or UpstreamClient()

    def open(self, target: ReplicaTarget, job: StreamJob, timeout_s: float) -> ReplicaStream:
        backend = self._backends(target.replica_id or "")
        if backend is None:
            return _FailedStream(AttemptError(AttemptErrorKind.CLOSED, f"upstream {target.replica_id} left"))
        # The request goes out at the stream's first read(), but job.trace is this attempt's span only now: a
        # hedge leg opened meanwhile replaces it. So the trace context is taken here, synchronously.
        trace = job.trace
        headers: dict[str, str] | None = None
        if trace.recording:
            headers = {}
            trace.inject(headers)  # traceparent (+ tracestate) of the attempt span (llmgw.tracing)
        return HttpReplicaStream(self.client, backend, job, timeout_s, headers)

    def forget(self, address: str) -> None:
        """Nothing to drop: connections are pooled per host by the client and closed when idle."""

    async def close(self) -> None:
        await self.client.close()


class MixedTransport:
    """gRPC replicas and HTTP model servers behind one Transport: an address with an http(s) scheme is a model
    server, anything else a gRPC replica."""

    def __init__(self, grpc: Transport, http: Transport) -> None:
        self.grpc = grpc
        self.http = http

    def open(self, target: ReplicaTarget, job: StreamJob, timeout_s: float) -> ReplicaStream:
        if target.address.startswith(HTTP_SCHEMES):
            return self.http.open(target, job, timeout_s)
        return self.grpc.open(target, job, timeout_s)

    def forget(self, address: str) -> None:
        (self.http if address.startswith(HTTP_SCHEMES) else self.grpc).forget(address)

    async def close(self) -> None:
        try:
            await self.grpc.close()
        finally:
            await self.http.close()


# ---- helpers ------------------------------------------------------------------------------------------------
def asks_usage(request: Any) -> bool:
    """Whether a streamed request asks the server for usage (`stream_options.include_usage`) even when its client
    did not: a tenant's tokens count the server's usage where it reports one (llmgw.gateway.tenancy_gate). The
    HTTP front then forwards none of the usage its client did not ask for (llmgw.http.passthrough)."""
    return bool(request.tenant)


def _note_usage(job: StreamJob, data: dict[str, Any]) -> None:
    """Keep the server's usage on the job (the latest one: servers reporting it on every chunk count up)."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if prompt is not None and completion is not None:
        job.usage = ReportedUsage(prompt, completion)


def _count(value: Any) -> int | None:
    """A token count as the server wrote it, or None (absent, null as llama.cpp-style usage has, or not a count)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _choices_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    choices = data.get("choices")
    if not isinstance(choices, list):
        return []
    return [choice for choice in choices if isinstance(choice, dict)]


def _texts(data: dict[str, Any], *, chat: bool, whole: bool) -> list[str]:
    out = []
    for choice in _choices_of(data):
        if chat:
            message = choice.get("message" if whole else "delta")
            text = message.get("content") if isinstance(message, dict) else None
        else:
            text = choice.get("text")
        if isinstance(text, str) and text:
            out.append(text)
    return out


def _has_logprobs(data: dict[str, Any]) -> bool:
    return any(choice.get("logprobs") for choice in _choices_of(data))


def _choice_count(body: Any) -> int:
    n = body.get("n") if isinstance(body, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1


def _finish_label(finish: Any) -> str | None:
    """The request path's finish reason ("stop" | "length"); the server's own value travels in the raw chunk."""
    if finish is None:
        return None
    return "length" if finish == "length" else "stop"


def _finish_chunk(api: str, response_id: str) -> StreamChunk:
    """The last event of an answer that reached its token limit exactly when its server failed."""
    if api == "chat":
        data: dict[str, Any] = {"id": response_id, "object": "chat.completion.chunk", "model": "",
                                "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]}
    else:
        data = {"id": response_id, "object": "text_completion", "model": "",
                "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]}
    return StreamChunk(data, b"")
