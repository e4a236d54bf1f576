"""An OpenAI-compatible HTTP client for model servers: one pooled keep-alive aiohttp session per process.

Three timeouts, each answering a different question (all seconds):
- connect: can a TCP (and TLS) connection be made at all? Failing it means nothing reached the server.
- first_byte: from sending the request until the response starts -- for a stream, until its first event
  (a server that accepts the request and then queues it for minutes is as useless as one that never answers);
  for a non-streamed call, until the response headers (which a server sends when the answer is complete).
- idle: once the response has started, the longest silence between two network reads.

Every failure leaves as one UpstreamError with a FailureKind (see errors.py); aiohttp's own exceptions never
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
from typing import Any, NoReturn

import aiohttp

from llmgw.upstream.errors import FailureKind, UpstreamError, classify_status, parse_retry_after
from llmgw.upstream.sse import DEFAULT_MAX_EVENT_CHARS, SSEError, SSEParser, decode_openai_event

log = logging.getLogger("llmgw.upstream.client")

# Error bodies are kept verbatim for the client, up to this much (a 4xx body is a short JSON message).
MAX_ERROR_BODY_BYTES = 1024 * 1024
# Drain after [DONE] so the connection can go back to the pool, but never wait long for a server's last bytes.
_DRAIN_AFTER_DONE_SECONDS = 1.0


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
    call `close()`; the session is made on first use, inside the running event loop."""

    def __init__(self, *, limits: UpstreamLimits | None = None, timeouts: UpstreamTimeouts | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self.limits = limits or UpstreamLimits()
        self.timeouts = timeouts or UpstreamTimeouts()
        self._headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        # Built once, not per request: the per-call aiohttp timeout of each connect limit in use.
        self._client_timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("UpstreamClient is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.limits.max_connections,
                                             limit_per_host=self.limits.max_connections_per_server,
                                             keepalive_timeout=self.limits.keepalive_seconds)
            # No session-wide timeout: each call applies its own three (see the module docstring). aiohttp's own
            # "connect" timeout would include waiting for a free pooled connection; sock_connect is the TCP
            # connect alone.
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers,
                                                  timeout=aiohttp.ClientTimeout(total=None),
                                                  raise_for_status=False)
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        request_headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **(headers or {})}
        response = await self._send(url, _encode_body(body), request_headers, timeouts, first_byte_deadline)
        try:
            if response.status != 200:
                raise await _http_error(response, url, timeouts.idle)
            content_type = response.headers.get("Content-Type", "")
            if not content_type.startswith("text/event-stream"):
                raw = await _read_body(response, timeouts.idle, MAX_ERROR_BODY_BYTES, url)
                raise UpstreamError(FailureKind.MALFORMED,
                                    f"{url} answered a streamed request with {content_type or 'no content type'}, "
                                    "not text/event-stream", status=response.status, body=raw,
                                    content_type=content_type or None)
        except BaseException:
            response.close()
            raise
        return UpstreamStream(response, url, timeouts, first_byte_deadline, self.limits.max_event_chars,
                              require_finish_reason=require_finish_reason)

    async def complete(self, base_url: str, endpoint: Endpoint, body: Mapping[str, Any] | bytes, *,
                       timeouts: UpstreamTimeouts | None = None,
                       headers: Mapping[str, str] | None = None) -> UpstreamResponse:
        """POST a non-streamed request and return the server's JSON answer (parsed and as raw bytes)."""
        timeouts = timeouts or self.timeouts
        url = endpoint_url(validate_base_url(base_url), endpoint.value)
        request_headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        return await self._json_call("POST", url, _encode_body(body), request_headers, timeouts)

    async def list_models(self, base_url: str, *, timeouts: UpstreamTimeouts | None = None,
                          headers: Mapping[str, str] | None = None) -> UpstreamResponse:
        """GET /v1/models. The answer's `data` is checked to be a list of objects with a string `id`."""
        timeouts = timeouts or self.timeouts
        url = endpoint_url(validate_base_url(base_url), "/v1/models")
        answer = await self._json_call("GET", url, None, {"Accept": "application/json", **(headers or {})},
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
        response = await self._send(url, None, dict(headers or {}), timeouts, deadline, method="GET")
        try:
            return response.status, await _read_body(response, timeouts.idle, self.limits.max_response_bytes, url)
        finally:
            response.release()

    async def _json_call(self, method: str, url: str, payload: bytes | None, headers: dict[str, str],
                         timeouts: UpstreamTimeouts) -> UpstreamResponse:
        deadline = asyncio.get_running_loop().time() + timeouts.first_byte
        response = await self._send(url, payload, headers, timeouts, deadline, method=method)
        try:
            if not 200 <= response.status < 300:
                raise await _http_error(response, url, timeouts.idle)
            raw = await _read_body(response, timeouts.idle, self.limits.max_response_bytes, url)
        finally:
            response.release()
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise UpstreamError(FailureKind.MALFORMED, f"{url} answered with a body that is not JSON ({exc})",
                                status=response.status, body=raw[:MAX_ERROR_BODY_BYTES]) from exc
        if not isinstance(data, dict):
            raise UpstreamError(FailureKind.MALFORMED, f"{url} answered with JSON that is not an object",
                                status=response.status, body=raw[:MAX_ERROR_BODY_BYTES])
        return UpstreamResponse(response.status, data, raw, dict(response.headers))

    async def _send(self, url: str, payload: bytes | None, headers: dict[str, str], timeouts: UpstreamTimeouts,
                    deadline: float, *, method: str = "POST") -> aiohttp.ClientResponse:
        """Send the request and wait for the response headers, by `deadline` (the first-byte deadline)."""
        session = self._client()
        remaining = deadline - asyncio.get_running_loop().time()
        client_timeout = self._client_timeouts.get(timeouts.connect)
        if client_timeout is None:
            if len(self._client_timeouts) >= 64:  # connect limits cut to a request's remaining time vary
                self._client_timeouts.clear()
            client_timeout = self._client_timeouts[timeouts.connect] = aiohttp.ClientTimeout(
                total=None, sock_connect=timeouts.connect)
        try:
            async with asyncio.timeout(remaining):
                return await session.request(method, url, data=payload, headers=headers, timeout=client_timeout)
        except aiohttp.ServerTimeoutError as exc:
            # The only aiohttp timeout set here is sock_connect (aiohttp >= 3.10 names it ConnectionTimeoutError).
            raise UpstreamError(FailureKind.CONNECT, f"{url}: connect timed out after {timeouts.connect}s") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(FailureKind.CONNECT, f"{url}: cannot connect: {exc.os_error or exc}") from exc
        except TimeoutError as exc:
            raise UpstreamError(FailureKind.TIMEOUT_FIRST_BYTE,
                                f"{url}: no response within {timeouts.first_byte}s") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(FailureKind.RESET, f"{url}: connection failed before the response: "
                                f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            raise UpstreamError(FailureKind.RESET, f"{url}: {type(exc).__name__}: {exc}") from exc


class _ReadTimedOut(Exception):
    """The read watchdog's verdict, delivered into a pending network read (never leaves this module)."""


class UpstreamStream:
    """One streamed response. `read()` returns the next chunk, or None once `data: [DONE]` arrived (and every call
    after that); it raises UpstreamError for every failure and closes the connection when it does. `cancel()`
    closes the connection at once (idempotent). Not safe for concurrent `read()` calls: one reader per stream."""

    def __init__(self, response: aiohttp.ClientResponse, url: str, timeouts: UpstreamTimeouts,
                 first_byte_deadline: float, max_event_chars: int, *, require_finish_reason: bool = True) -> None:
        self._response = response
        self.url = url
        self.status = response.status
        self.headers: Mapping[str, str] = dict(response.headers)
        self._timeouts = timeouts
        self._first_byte_deadline = first_byte_deadline
        self._parser = SSEParser(max_event_chars=max_event_chars)
        self._ready: deque[StreamChunk] = deque()
        self._events_seen = 0
        self._done_seen = False  # [DONE] arrived (chunks before it may still be queued)
        self._closed = False
        self._cancelled = False
        self._failure: UpstreamError | None = None
        self._require_finish_reason = require_finish_reason
        self._choices_seen: set[object] = set()
        self._choices_finished: set[object] = set()
        # The read watchdog (see _read_network): when the pending network read must give up (event-loop time;
        # None: no read pending), and the one timer that checks it.
        self._read_due: float | None = None
        self._watch: asyncio.TimerHandle | None = None

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
        return stopped

    def _close(self) -> None:
        self._stop_watch()
        if not self._closed:
            self._closed = True
            self._response.close()

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
                return self._ready.popleft()
            if self._failure is not None:
                raise self._failure
            if self._done_seen:
                return None
            data = await self._read_network()
            if not data:
                self._fail(FailureKind.INCOMPLETE,
                           f"{self.url}: stream ended without data: [DONE] after {self._events_seen} events"
                           + ("" if self._parser.at_event_boundary else ", inside an event"))
            self._take(data)
            if self._done_seen and self._failure is None:
                await self._drain()

    async def _read_network(self) -> bytes:
        # One timer per stream, not one per read: a read sets when it must give up (`_read_due`) and the timer is
        # re-armed only when it would fire too late; when it fires early (data came meanwhile) it re-arms at the
        # pending read's own due time. A read per server event made a timeout context per event (a timer
        # scheduled and cancelled each time), a visible share of the gateway's CPU per streamed chunk.
        loop = asyncio.get_running_loop()
        first = self._events_seen == 0
        due = self._first_byte_deadline if first else loop.time() + self._timeouts.idle
        self._read_due = due
        watch = self._watch
        if watch is None or watch.when() > due:
            if watch is not None:
                watch.cancel()
            self._watch = loop.call_at(due, self._watch_fired)
        try:
            return await self._response.content.readany()
        except asyncio.CancelledError:
            self._close()  # a read abandoned halfway leaves the stream in no known state
            raise
        except _ReadTimedOut:
            if first:
                self._fail(FailureKind.TIMEOUT_FIRST_BYTE,
                           f"{self.url}: no stream event within {self._timeouts.first_byte}s")
            self._fail(FailureKind.TIMEOUT_IDLE, f"{self.url}: stream silent for {self._timeouts.idle}s after "
                       f"{self._events_seen} events")
        except (aiohttp.ClientError, OSError) as exc:
            self._fail(FailureKind.RESET, f"{self.url}: connection broke after {self._events_seen} events: "
                       f"{type(exc).__name__}: {exc}")
        finally:
            self._read_due = None

    def _watch_fired(self) -> None:
        self._watch = None
        due = self._read_due
        if due is None or self._closed:
            return  # no read pending: the next one arms the timer again
        loop = asyncio.get_running_loop()
        if loop.time() < due:
            self._watch = loop.call_at(due, self._watch_fired)
            return
        # Wakes the pending readany() with this exception; the stream fails and closes in _read_network.
        self._response.content.set_exception(_ReadTimedOut())

    def _stop_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()

    def _take(self, data: bytes) -> None:
        """Queue the chunks `data` completes. A defect found after good chunks is recorded, not raised: read()
        hands out the chunks that arrived before it first, in order, then raises."""
        try:
            events = self._parser.feed(data)
        except SSEError as exc:
            self._stop(FailureKind.MALFORMED, f"{self.url}: {exc}")
            return
        for event in events:
            if self._done_seen:
                break  # anything after [DONE] is not part of the answer
            self._events_seen += 1
            try:
                chunk = decode_openai_event(event)
            except SSEError as exc:
                self._stop(FailureKind.MALFORMED, f"{self.url}: {exc}")
                return
            if chunk is None:
                self._done_seen = True
                self._check_finished()
                continue
            if "error" in chunk or chunk.get("object") == "error":
                # OpenAI and newer vLLM: {"error": {...}}; older vLLM: {"object": "error", "message": ...}.
                raw = event.data.encode("utf-8")
                status = _error_code(chunk.get("error", chunk))
                kind = FailureKind.SERVER_ERROR if status is None else classify_status(status)
                self._stop(kind, f"{self.url}: error event in the stream after {self._events_seen - 1} events",
                           status=status, body=raw, content_type="application/json")
                return
            if self._require_finish_reason:
                self._note_choices(chunk)
            self._ready.append(StreamChunk(chunk, event.data.encode("utf-8")))

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

    async def _drain(self) -> None:
        """Read the stream's last bytes after [DONE] so the keep-alive connection returns to the pool."""
        content = self._response.content
        # Usually the end of the body came with [DONE]: nothing to wait for (and no timer to set up per request).
        if not content.at_eof():
            try:
                async with asyncio.timeout(min(_DRAIN_AFTER_DONE_SECONDS, self._timeouts.idle)):
                    while await content.readany():
                        pass
            except (TimeoutError, aiohttp.ClientError, OSError):
                self._close()  # a connection in an unknown state is not reused
                return
        self._stop_watch()
        if not self._closed:
            self._closed = True
            self._response.release()

    def _stop(self, kind: FailureKind, detail: str, **fields: Any) -> None:
        self._failure = UpstreamError(kind, detail, **fields)
        self._close()

    def _fail(self, kind: FailureKind, detail: str, **fields: Any) -> NoReturn:
        self._stop(kind, detail, **fields)
        assert self._failure is not None
        raise self._failure


def _error_code(error: object) -> int | None:
    """The HTTP-like status an in-stream error event carries (vLLM: {"error": {"code": 400, ...}}), if any."""
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
        return code
    return None


async def _read_body(response: aiohttp.ClientResponse, idle: float, limit: int, url: str) -> bytes:
    parts: list[bytes] = []
    size = 0
    try:
        while True:
            async with asyncio.timeout(idle):
                part = await response.content.readany()
            if not part:
                return b"".join(parts)
            size += len(part)
            if size > limit:
                raise UpstreamError(FailureKind.MALFORMED, f"{url}: response body larger than {limit} bytes",
                                    status=response.status)
            parts.append(part)
    except TimeoutError as exc:
        raise UpstreamError(FailureKind.TIMEOUT_IDLE, f"{url}: response body silent for {idle}s",
                            status=response.status) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError(FailureKind.RESET, f"{url}: connection broke while reading the body: "
                            f"{type(exc).__name__}: {exc}", status=response.status) from exc


async def _http_error(response: aiohttp.ClientResponse, url: str, idle: float) -> UpstreamError:
    """The UpstreamError for a non-2xx answer, carrying the server's body as it sent it."""
    kind = classify_status(response.status)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    try:
        body = await _read_body(response, idle, MAX_ERROR_BODY_BYTES, url)
    except UpstreamError as exc:
        body = b""
        log.debug("could not read the error body of %s: %s", url, exc)
    finally:
        response.release()
    return UpstreamError(kind, f"{url} answered HTTP {response.status}: {_message_of(body)}",
                         status=response.status, body=body, content_type=response.headers.get("Content-Type"),
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
