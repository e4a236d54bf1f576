"""An OpenAI-compatible HTTP client for model servers: one pool of keep-alive connections per process
(llmgw.upstream.http1, which says why it is not aiohttp's client).

Three timeouts, each answering a different question (all seconds):
- connect: can a TCP (and TLS) connection be made at all? Failing it means nothing reached the server.
- first_byte: from sending the request until the response starts -- for a stream, until its first event
  (a server that accepts the request and then queues it for minutes is as useless as one that never answers);
  for a non-streamed call, until the response headers (which a server sends when the answer is complete).
- idle: once the response has started, the longest silence between two network reads.

Every failure leaves as one UpstreamError with a FailureKind (see errors.py); connection-level exceptions never
escape. A stream is read with `UpstreamStream.read()` (a StreamChunk per event: the parsed JSON object and the
exact bytes the server sent as its data, for pass-through) until it returns None after `data: [DONE]`;
`cancel()` closes the connection, which is how a server learns the client went away. The shape (open, read,
cancel(), done()) follows the gateway's ReplicaStream, so the gateway's adapter stays a thin translation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from llmgw.upstream.errors import FailureKind, UpstreamError, classify_status, parse_retry_after
from llmgw.upstream.http1 import (
    BadResponse,
    ConnectionBroken,
    ConnectionFailed,
    ConnectionPool,
    ConnectTimedOut,
    Exchange,
    PoolLimits,
    check_header,
    encode_request,
    header_pairs,
    split_url,
)
from llmgw.upstream.sse import DEFAULT_MAX_EVENT_CHARS, SSEError, SSEParser, decode_openai_data

log = logging.getLogger("llmgw.upstream.client")

# Error bodies are kept verbatim for the client, up to this much (a 4xx body is a short JSON message).
MAX_ERROR_BODY_BYTES = 1024 * 1024
# A stream holding this many parsed events nobody has read yet stops reading from its server until half are read
# (the server then waits on TCP, as it would for a slow client).
_MAX_BUFFERED_EVENTS = 1024


class Endpoint(enum.Enum):
    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"


@dataclasses.dataclass(frozen=True)
class UpstreamTimeouts:
    connect: float = 5.0
    first_byte: float = 120.0
    idle: float = 30.0

    def __post_init__(self) -> None:
        for name in ("connect", "first_byte", "idle"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"UpstreamTimeouts.{name} must be a number > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class UpstreamLimits:
    max_connections: int = 1024  # across all servers: bounds the process's sockets
    max_connections_per_server: int = 0  # 0 = no per-server cap (the gateway's admission bounds concurrency)
    keepalive_seconds: float = 60.0  # how long an idle pooled connection is kept
    max_response_bytes: int = 64 * 1024 * 1024  # a non-streamed body larger than this is MALFORMED
    max_event_chars: int = DEFAULT_MAX_EVENT_CHARS

    def __post_init__(self) -> None:
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise ValueError(f"max_connections must be an integer >= 1, got {self.max_connections!r}")
        if not isinstance(self.max_connections_per_server, int) or self.max_connections_per_server < 0:
            raise ValueError(
                f"max_connections_per_server must be an integer >= 0, got {self.max_connections_per_server!r}")
        if not self.keepalive_seconds > 0:
            raise ValueError(f"keepalive_seconds must be > 0, got {self.keepalive_seconds!r}")
        if self.max_response_bytes < 1 or self.max_event_chars < 1:
            raise ValueError("max_response_bytes and max_event_chars must be >= 1")


@dataclasses.dataclass(frozen=True, slots=True)
class StreamChunk:
    data: dict[str, Any]
    raw: bytes  # the event's data exactly as the server sent it (UTF-8 JSON), for framing as `data: <raw>\n\n`


@dataclasses.dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    data: dict[str, Any]
    raw: bytes
    headers: Mapping[str, str]


def endpoint_url(base_url: str, path: str) -> str:
    """`path` ("/v1/...") under a server's base URL given with or without its "/v1" suffix."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        base = base[:-3]
    return base + path


def validate_base_url(base_url: str) -> str:
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise ValueError(f"an upstream URL must start with http:// or https://, got {base_url!r}")
    return base_url


# Compact and UTF-8 as is: the server reads the same JSON values the client sent. Built once: json.dumps with any
# option builds a new encoder per call (once per upstream request here).
_BODY_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _encode_body(body: Mapping[str, Any] | bytes) -> bytes:
    if isinstance(body, bytes):
        return body
    return _BODY_ENCODER.encode(body).encode("utf-8")


class UpstreamClient:
    """One per process: owns the connection pool every upstream call shares. Use as an async context manager or
    call `close()`."""

    def __init__(self, *, limits: UpstreamLimits | None = None, timeouts: UpstreamTimeouts | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self.limits = limits or UpstreamLimits()
        self.timeouts = timeouts or UpstreamTimeouts()
        self._headers = dict(headers or {})
        for name, value in self._headers.items():
            check_header(name, value)
        self._pool = ConnectionPool(PoolLimits(self.limits.max_connections, self.limits.max_connections_per_server,
                                               self.limits.keepalive_seconds))
        self._closed = False
        # The headers of the usual request, merged once: per-request headers (a trace context) are the exception.
        self._stream_headers = header_pairs(self._headers, _STREAM_HEADERS)
        self._json_headers = header_pairs(self._headers, _JSON_HEADERS)

    @property
    def open_connections(self) -> int:
        """Connections open to servers (busy, idle in the pool, or connecting)."""
        return self._pool.open_connections

    @property
    def idle_connections(self) -> int:
        """Connections in the pool, ready for the next request. A stream that read `data: [DONE]` gives its
        connection back when the rest of its body has arrived (usually with it), without its reader waiting."""
        return self._pool.idle_connections

    async def close(self) -> None:
        self._closed = True
        self._pool.close()

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def open_stream(self, base_url: str, endpoint: Endpoint, body: Mapping[str, Any] | bytes, *,
                          timeouts: UpstreamTimeouts | None = None, headers: Mapping[str, str] | None = None,
                          require_finish_reason: bool = True) -> UpstreamStream:
        """POST a streamed request; returns once the server answered 200 with an event stream. Raises
        UpstreamError (connect, first-byte timeout, an HTTP error with the server's body).

        With `require_finish_reason` (the default) a stream whose choices did not all end with a finish_reason
        before [DONE] is INCOMPLETE, not a complete answer."""
        timeouts = timeouts or self.timeouts
        url = endpoint_url(validate_base_url(base_url), endpoint.value)
        loop = asyncio.get_running_loop()
        first_byte_deadline = loop.time() + timeouts.first_byte
        request_headers = self._stream_headers if not headers else header_pairs(self._headers, _STREAM_HEADERS,
                                                                                  _checked(headers))
        exchange = await self._send("POST", url, _encode_body(body), request_headers, timeouts, first_byte_deadline)
        try:
            if exchange.status != 200:
                raise await _http_error(exchange, url, timeouts.idle)
            content_type = exchange.headers.get("content-type", "")
            if not content_type.startswith("text/event-stream"):
                raw = await _read_body(exchange, timeouts.idle, MAX_ERROR_BODY_BYTES, url)
                raise UpstreamError(FailureKind.MALFORMED,
                                    f"{url} answered a streamed request with {content_type or 'no content type'}, "
                                    "not text/event-stream", status=exchange.status, body=raw,
                                    content_type=content_type or None)
        except BaseException:
            exchange.finish(reusable=False)
            raise
        return UpstreamStream(exchange, url, timeouts, first_byte_deadline, self.limits.max_event_chars,
                              require_finish_reason=require_finish_reason)

    async def complete(self, base_url: str, endpoint: Endpoint, body: Mapping[str, Any] | bytes, *,
                       timeouts: UpstreamTimeouts | None = None,
                       headers: Mapping[str, str] | None = None) -> UpstreamResponse:
        """POST a non-streamed request and return the server's JSON answer (parsed and as raw bytes)."""
        timeouts = timeouts or self.timeouts
        url = endpoint_url(validate_base_url(base_url), endpoint.value)
        request_headers = self._json_headers if not headers else header_pairs(self._headers, _JSON_HEADERS,
                                                                              _checked(headers))
        return await self._json_call("POST", url, _encode_body(body), request_headers, timeouts)

    async def list_models(self, base_url: str, *, timeouts: UpstreamTimeouts | None = None,
                          headers: Mapping[str, str] | None = None) -> UpstreamResponse:
        """GET /v1/models. The answer's `data` is checked to be a list of objects with a string `id`."""
        timeouts = timeouts or self.timeouts
        url = endpoint_url(validate_base_url(base_url), "/v1/models")
        answer = await self._json_call("GET", url, None, header_pairs(self._headers, _ACCEPT_JSON, _checked(headers)),
                                       timeouts)
        models = answer.data.get("data")
        if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                   for m in models):
            raise UpstreamError(FailureKind.MALFORMED, f"{url}: `data` is not a list of models with string ids",
                                status=answer.status, body=answer.raw)
        return answer

    async def get(self, base_url: str, path: str, *, timeouts: UpstreamTimeouts | None = None,
                  headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """GET any path under the server (health checks, Prometheus /metrics): (status, body); only transport
        failures raise, an HTTP error status is returned for the caller to judge."""
        timeouts = timeouts or self.timeouts
        url = endpoint_url(validate_base_url(base_url), path)
        deadline = asyncio.get_running_loop().time() + timeouts.first_byte
        exchange = await self._send("GET", url, None, header_pairs(self._headers, _checked(headers)), timeouts,
                                    deadline)
        return exchange.status, await _read_body(exchange, timeouts.idle, self.limits.max_response_bytes, url)

    async def _json_call(self, method: str, url: str, payload: bytes | None, headers: list[tuple[str, str]],
                         timeouts: UpstreamTimeouts) -> UpstreamResponse:
        deadline = asyncio.get_running_loop().time() + timeouts.first_byte
        exchange = await self._send(method, url, payload, headers, timeouts, deadline)
        if not 200 <= exchange.status < 300:
            raise await _http_error(exchange, url, timeouts.idle)
        raw = await _read_body(exchange, timeouts.idle, self.limits.max_response_bytes, url)
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise UpstreamError(FailureKind.MALFORMED, f"{url} answered with a body that is not JSON ({exc})",
                                status=exchange.status, body=raw[:MAX_ERROR_BODY_BYTES]) from exc
        if not isinstance(data, dict):
            raise UpstreamError(FailureKind.MALFORMED, f"{url} answered with JSON that is not an object",
                                status=exchange.status, body=raw[:MAX_ERROR_BODY_BYTES])
        return UpstreamResponse(exchange.status, data, raw, _header_view(exchange))

    async def _send(self, method: str, url: str, payload: bytes | None, headers: list[tuple[str, str]],
                    timeouts: UpstreamTimeouts, deadline: float) -> Exchange:
        """Send the request and wait for the response's status and headers, by `deadline` (the first-byte
        deadline; waiting for a free connection counts towards it, connecting has its own limit too)."""
        if self._closed:
            raise RuntimeError("UpstreamClient is closed")
        try:
            origin, target = split_url(url)
        except ValueError as exc:
            raise UpstreamError(FailureKind.CONNECT, f"{url}: {exc}") from exc
        request = encode_request(method, origin, target, headers, payload)
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            if remaining <= 0:
                raise TimeoutError
            # A connect is bounded by its own limit and by the first-byte deadline, whichever comes first.
            conn = await self._pool.acquire(origin, connect_timeout=min(timeouts.connect, remaining),
                                            deadline=deadline)
        except ConnectTimedOut as exc:
            raise UpstreamError(FailureKind.CONNECT, f"{url}: connect timed out after {timeouts.connect}s") from exc
        except ConnectionFailed as exc:
            raise UpstreamError(FailureKind.CONNECT, f"{url}: {exc}") from exc
        except TimeoutError as exc:
            raise UpstreamError(FailureKind.TIMEOUT_FIRST_BYTE, f"{url}: no free connection within "
                                f"{timeouts.first_byte}s") from exc
        exchange = conn.send(request)
        try:
            await exchange.head(deadline)
        except TimeoutError as exc:
            exchange.finish(reusable=False)
            raise UpstreamError(FailureKind.TIMEOUT_FIRST_BYTE,
                                f"{url}: no response within {timeouts.first_byte}s") from exc
        except BadResponse as exc:
            exchange.finish(reusable=False)
            raise UpstreamError(FailureKind.MALFORMED, f"{url}: {exc}") from exc
        except (ConnectionBroken, OSError) as exc:
            exchange.finish(reusable=False)
            raise UpstreamError(FailureKind.RESET, f"{url}: connection failed before the response: "
                                f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            exchange.finish(reusable=False)
            raise
        return exchange


_STREAM_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
_ACCEPT_JSON = {"Accept": "application/json"}


def _checked(headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """A call's own headers, checked (the client's defaults were checked once, when it was made)."""
    for name, value in (headers or {}).items():
        check_header(name, value)
    return headers


def _header_view(exchange: Exchange) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(exchange.header_items()))


class UpstreamStream:
    """One streamed response. `read()` returns the next chunk, or None once `data: [DONE]` arrived (and every call
    after that); it raises UpstreamError for every failure and closes the connection when it does. `cancel()`
    closes the connection at once (idempotent). Not safe for concurrent `read()` calls: one reader per stream.

    The server's bytes are parsed as they arrive (in the connection's data_received): a reader that finds events
    queued takes them without waiting."""

    def __init__(self, exchange: Exchange, url: str, timeouts: UpstreamTimeouts, first_byte_deadline: float,
                 max_event_chars: int, *, require_finish_reason: bool = True) -> None:
        self._exchange = exchange
        self._loop = asyncio.get_running_loop()
        self.url = url
        self.status = exchange.status
        self._timeouts = timeouts
        self._first_byte_deadline = first_byte_deadline
        self._parser = SSEParser(max_event_chars=max_event_chars)
        self._ready: deque[StreamChunk] = deque()
        self._events_seen = 0
        self._done_seen = False  # [DONE] arrived (chunks before it may still be queued)
        self._closed = False
        self._cancelled = False
        self._paused = False
        self._failure: UpstreamError | None = None
        self._require_finish_reason = require_finish_reason
        self._choices_seen: set[object] = set()
        self._choices_finished: set[object] = set()
        self._waiter: asyncio.Future[None] | None = None  # a read() waiting for the network
        # The read watchdog (see read): when the pending read must give up (event-loop time; None: no read
        # pending), the last time bytes arrived, and the one timer that checks them.
        self._read_due: float | None = None
        self._data_at = self._loop.time()
        self._watch: asyncio.TimerHandle | None = None
        for part in exchange.attach(self._on_body, self._on_end):
            self._on_body(part)
        if exchange.ended or exchange.error is not None:
            self._on_end()

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return _header_view(self._exchange)

    def done(self) -> bool:
        """True once the stream can yield nothing more: [DONE] read, failed, or cancelled."""
        if self._cancelled:
            return True
        return not self._ready and (self._done_seen or self._failure is not None)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def events_received(self) -> int:
        return self._events_seen

    @property
    def buffered(self) -> int:
        """Chunks already received and parsed, ready for read() without waiting (a reader coalescing writes
        takes these along with the one it waited for)."""
        return 0 if self._cancelled else len(self._ready)

    def cancel(self) -> bool:
        """Stop the stream and close its connection; True when this call stopped a stream still running."""
        stopped = not self.done()
        if stopped:
            self._cancelled = True
            self._ready.clear()
        self._close()
        self._wake()
        return stopped

    def _close(self) -> None:
        self._stop_watch()
        if not self._closed:
            self._closed = True
            self._exchange.finish(reusable=False)

    def __aiter__(self) -> UpstreamStream:
        return self

    async def __aenter__(self) -> UpstreamStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.cancel()  # a no-op for a stream that finished; otherwise the server learns the client left

    async def __anext__(self) -> StreamChunk:
        chunk = await self.read()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def read(self) -> StreamChunk | None:
        while True:
            if self._cancelled:
                return None
            if self._ready:
                return self.take_buffered()
            if self._failure is not None:
                raise self._failure
            if self._done_seen:
                return None
            # Wait for the network. One timer per stream, not one per wait: a wait sets when it must give up
            # (`_read_due`) and the timer is re-armed only when it would fire too late; when it fires early (data
            # came meanwhile) it re-arms at the pending wait's own due time. A timeout context per read was a
            # visible share of the gateway's CPU.
            loop = self._loop
            due = self._first_byte_deadline if self._events_seen == 0 else loop.time() + self._timeouts.idle
            self._read_due = due
            watch = self._watch
            if watch is None or watch.when() > due:
                if watch is not None:
                    watch.cancel()
                self._watch = loop.call_at(due, self._watch_fired)
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            except asyncio.CancelledError:
                self._close()  # a read abandoned halfway leaves the stream in no known state
                raise
            finally:
                self._waiter = None
                self._read_due = None

    def take_buffered(self) -> StreamChunk:
        """The next chunk already received (call only while `buffered`): read() without a coroutine."""
        ready = self._ready
        if self._paused and len(ready) <= _MAX_BUFFERED_EVENTS // 2:
            self._paused = False
            self._exchange.resume_reading()
        return ready.popleft()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _watch_fired(self) -> None:
        self._watch = None
        due = self._read_due
        if due is None or self._closed:
            return  # no read pending: the next one arms the timer again
        first = self._events_seen == 0
        if not first:
            due = max(due, self._data_at + self._timeouts.idle)  # idle: the silence since the last bytes
        if self._loop.time() < due:
            self._watch = self._loop.call_at(due, self._watch_fired)
            return
        if first:
            self._stop(FailureKind.TIMEOUT_FIRST_BYTE, f"{self.url}: no stream event within "
                       f"{self._timeouts.first_byte}s")
        else:
            self._stop(FailureKind.TIMEOUT_IDLE, f"{self.url}: stream silent for {self._timeouts.idle}s after "
                       f"{self._events_seen} events")

    def _stop_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()

    # ---- the connection's side: bytes and the end of the body arrive here ----------------------------------
    def _on_body(self, data: bytes) -> None:
        if self._closed or self._done_seen:
            return  # anything after [DONE] is not part of the answer
        self._data_at = self._loop.time()
        self._take(data)
        if self._ready or self._done_seen or self._failure is not None:
            self._wake()
        if len(self._ready) >= _MAX_BUFFERED_EVENTS and not self._paused and not self._closed:
            self._paused = True
            self._exchange.pause_reading()

    def _on_end(self) -> None:
        if self._closed or self._done_seen or self._failure is not None:
            return
        error = self._exchange.error
        if error is not None:
            kind = FailureKind.MALFORMED if isinstance(error, BadResponse) else FailureKind.RESET
            self._stop(kind, f"{self.url}: connection broke after {self._events_seen} events: "
                       f"{type(error).__name__}: {error}")
        else:
            self._stop(FailureKind.INCOMPLETE,
                       f"{self.url}: stream ended without data: [DONE] after {self._events_seen} events"
                       + ("" if self._parser.at_event_boundary else ", inside an event"))
        self._wake()

    def _take(self, data: bytes) -> None:
        """Queue the chunks `data` completes. A defect found after good chunks is recorded, not raised: read()
        hands out the chunks that arrived before it first, in order, then raises."""
        try:
            events = self._parser.feed_data(data)
        except SSEError as exc:
            self._stop(FailureKind.MALFORMED, f"{self.url}: {exc}")
            return
        for raw in events:
            self._events_seen += 1
            try:
                chunk = decode_openai_data(raw)
            except SSEError as exc:
                self._stop(FailureKind.MALFORMED, f"{self.url}: {exc}")
                return
            if chunk is None:
                self._done_seen = True
                self._check_finished()
                if self._failure is None:
                    self._finished_cleanly()
                return  # anything after [DONE] is not part of the answer
            if "error" in chunk or chunk.get("object") == "error":
                # OpenAI and newer vLLM: {"error": {...}}; older vLLM: {"object": "error", "message": ...}.
                status = _error_code(chunk.get("error", chunk))
                kind = FailureKind.SERVER_ERROR if status is None else classify_status(status)
                self._stop(kind, f"{self.url}: error event in the stream after {self._events_seen - 1} events",
                           status=status, body=raw, content_type="application/json")
                return
            if self._require_finish_reason:
                self._note_choices(chunk)
            self._ready.append(StreamChunk(chunk, raw))

    def _finished_cleanly(self) -> None:
        """[DONE] read: the connection goes back to the pool (once the rest of the body, if any, has come)."""
        self._stop_watch()
        if not self._closed:
            self._closed = True
            if self._paused:
                self._paused = False
                self._exchange.resume_reading()
            self._exchange.finish(reusable=True)

    def _note_choices(self, chunk: dict[str, Any]) -> None:
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if isinstance(choice, dict):
                index = choice.get("index", 0)
                self._choices_seen.add(index)
                if choice.get("finish_reason") is not None:
                    self._choices_finished.add(index)

    def _check_finished(self) -> None:
        """[DONE] ends a complete answer only if every choice said why it finished. llama.cpp, for one, ends a
        stream that a newer request interrupted with [DONE] and no finish_reason: a truncated answer that would
        otherwise pass for a whole one."""
        if not self._require_finish_reason:
            return
        unfinished = self._choices_seen - self._choices_finished
        if unfinished or not self._choices_seen:
            which = f"choice(s) {sorted(unfinished, key=str)}" if unfinished else "no choice"
            self._stop(FailureKind.INCOMPLETE, f"{self.url}: stream ended with data: [DONE] but {which} "
                       "never got a finish_reason")

    def _stop(self, kind: FailureKind, detail: str, **fields: Any) -> None:
        self._failure = UpstreamError(kind, detail, **fields)
        self._close()
        self._wake()



def _error_code(error: object) -> int | None:
    """The HTTP-like status an in-stream error event carries (vLLM: {"error": {"code": 400, ...}}), if any."""
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
        return code
    return None


class _Body:
    """Collects a whole (bounded) body from an exchange."""

    __slots__ = ("limit", "over", "parts", "size", "waiter")

    def __init__(self, exchange: Exchange, limit: int) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.over = False
        self.waiter: asyncio.Future[None] | None = None
        for part in exchange.attach(self.add, self.wake):
            self.add(part)

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.over = True
            self.parts.clear()
        else:
            self.parts.append(data)
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def _read_body(exchange: Exchange, idle: float, limit: int, url: str) -> bytes:
    """The whole body, each silence bounded by `idle`; the connection is reused only after a complete body."""
    body = _Body(exchange, limit)
    loop = asyncio.get_running_loop()
    complete = False
    try:
        while True:
            if body.over:
                raise UpstreamError(FailureKind.MALFORMED, f"{url}: response body larger than {limit} bytes",
                                    status=exchange.status)
            if exchange.error is not None:
                error = exchange.error
                raise UpstreamError(FailureKind.RESET, f"{url}: connection broke while reading the body: "
                                    f"{type(error).__name__}: {error}", status=exchange.status)
            if exchange.ended:
                complete = True
                return b"".join(body.parts)
            waiter = body.waiter = loop.create_future()
            timer = loop.call_at(loop.time() + idle, _expire_waiter, waiter)
            try:
                await waiter
            except TimeoutError as exc:
                raise UpstreamError(FailureKind.TIMEOUT_IDLE, f"{url}: response body silent for {idle}s",
                                    status=exchange.status) from exc
            finally:
                timer.cancel()
                body.waiter = None
    finally:
        exchange.finish(reusable=complete)


def _expire_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


async def _http_error(exchange: Exchange, url: str, idle: float) -> UpstreamError:
    """The UpstreamError for a non-2xx answer, carrying the server's body as it sent it."""
    kind = classify_status(exchange.status)
    retry_after = parse_retry_after(exchange.headers.get("retry-after"))
    try:
        body = await _read_body(exchange, idle, MAX_ERROR_BODY_BYTES, url)
    except UpstreamError as exc:
        body = b""
        log.debug("could not read the error body of %s: %s", url, exc)
    return UpstreamError(kind, f"{url} answered HTTP {exchange.status}: {_message_of(body)}",
                         status=exchange.status, body=body, content_type=exchange.headers.get("content-type"),
                         retry_after=retry_after)


def _message_of(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)  # OpenAI {"error": {...}} or vLLM's older flat error object
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str):
            return message[:500]
    return text.strip()[:500] or "no body"
