"""The HTTP front's connections: POST /v1/chat/completions and /v1/completions served here, everything else by aiohttp.

Why not aiohttp for the completion routes too: measured on the gateway (docs/performance.md), aiohttp's request
machinery was ~17% of the front's CPU at 256 streams, and on Python 3.11 it runs a request two event-loop turns
after its bytes arrive (a per-connection task woken by a future, then a new task per request); at 256 streams a
turn is 15-20 ms. Here a completion request's handler task is created from `data_received` as soon as its head is
parsed (one turn), and its answer goes straight to the transport: one write per batch of events, status line and
headers in the first. The handlers are the same (llmgw.http.openai_api and passthrough): they take a LeanRequest,
which offers the few things of aiohttp's request they use.

A connection starts here. Its bytes are parsed with httptools (llhttp, the parser uvicorn uses); the first request
that is not a completion request hands the connection to aiohttp for good -- its RequestHandler is made the
transport's protocol and given the bytes from that request's first byte on, so aiohttp sees the connection as if
it had had it from that request on (health checks, metrics scrapes and admin calls are served by aiohttp as they
always were, including its 404/405 answers). A request pipelined behind a completion request in the same read
has no known first byte; it is given to aiohttp as its parsed head and body, re-framed, until the connection is
again between requests at the end of a read.

What a completion request gets here, as from aiohttp: a head within aiohttp's limits (MAX_FIELD_BYTES per header and
for the URL, MAX_HEAD_BYTES in all; 431 otherwise), a body at most the front's client_max_size (the handler answers
400 body_too_large, and the connection is closed), the handler's own body timeout, `100 Continue` when asked,
keep-alive on HTTP/1.1 with aiohttp's idle timeout (an HTTP/1.0 answer ends with the connection), a handler
cancelled when its client disconnects, and on shutdown a grace for open answers before they are cancelled. Malformed
HTTP gets 400 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

import httptools
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from llmgw.http.openai_api import ApiError, compact_json

log = logging.getLogger("llmgw.http")

LEAN_ROUTES = {b"/v1/chat/completions": "chat", b"/v1/completions": "completions"}
MAX_HEAD_BYTES = 64 * 1024  # request line + headers, in all
MAX_FIELD_BYTES = 8190  # the URL, a header's name, a header's value: aiohttp's limits, so both fronts take alike
KEEPALIVE_TIMEOUT_S = 75.0  # aiohttp's default, so both kinds of connection idle out alike

Handler = Callable[[Any], Awaitable[web.StreamResponse]]


def _http_date() -> bytes:
    """The Date header's value (RFC 9110 IMF-fixdate), made once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, email.utils.formatdate(now, usegmt=True).encode("ascii")]
    return _date_cache[1]


_date_cache: list[Any] = [0, b""]


def _head(status: int, reason: bytes, headers: list[tuple[str, str]], *, close: bool) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, reason), b"Date: " + _http_date()]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _Message:
    """One request as it is parsed."""

    __slots__ = ("body", "body_size", "complete", "expect_continue", "head_bytes", "header_list", "keep_alive",
                 "method", "raw_ok", "route", "too_large", "url", "version", "waiter")

    def __init__(self, raw_ok: bool) -> None:
        self.raw_ok = raw_ok  # the connection's raw bytes from this request's first byte on are at hand
        self.url = b""
        self.header_list: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.method = b""
        self.version = "1.1"
        self.route: str | None = None  # a LEAN_ROUTES value once the head is parsed; None = aiohttp's
        self.body: list[bytes] = []
        self.body_size = 0
        self.too_large = False
        self.complete = False
        self.keep_alive = True
        self.expect_continue = False
        self.waiter: asyncio.Future[None] | None = None  # a handler waiting for more of the body


class LeanRequest:
    """What the completion handlers use of a request: headers, the body, the body limit."""

    def __init__(self, connection: LeanConnection, message: _Message, headers: CIMultiDictProxy[str],
                 client_max_size: int) -> None:
        self._connection = connection
        self._message = message
        self.headers = headers
        self.client_max_size = client_max_size
        self.version = message.version
        self.response: LeanEventStream | None = None
        self.close_after = False  # the connection is closed once the answer is out

    @property
    def content(self) -> LeanRequest:  # request.content.is_eof(), as on aiohttp's request
        return self

    def is_eof(self) -> bool:
        return self._message.complete

    async def read(self) -> bytes:
        """The whole body; HTTPRequestEntityTooLarge past client_max_size (as aiohttp's read raises)."""
        message = self._message
        while not message.complete and not message.too_large:
            if message.expect_continue:
                message.expect_continue = False
                self._connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            message.waiter = asyncio.get_running_loop().create_future()
            self._connection.resume_reading()
            try:
                await message.waiter
            finally:
                message.waiter = None
        if message.too_large:
            raise web.HTTPRequestEntityTooLarge(max_size=self.client_max_size, actual_size=message.body_size)
        return b"".join(message.body)

    def start_event_stream(self, headers: dict[str, str]) -> LeanEventStream:
        self.response = LeanEventStream(self._connection, headers, self.version)
        return self.response

    def answer_and_close(self) -> None:
        self.close_after = True


class LeanEventStream:
    """A streamed answer: status line and headers leave with the first events; chunked on HTTP/1.1, ended by the
    connection's close on HTTP/1.0."""

    def __init__(self, connection: LeanConnection, headers: dict[str, str], version: str) -> None:
        self._connection = connection
        self._chunked = version != "1.0"
        head_headers = list(headers.items())
        if self._chunked:
            head_headers.append(("Transfer-Encoding", "chunked"))
        self._head: bytes | None = _head(200, b"OK", head_headers, close=not self._chunked)
        self.ended = False

    @property
    def chunked(self) -> bool:
        return self._chunked

    async def write(self, data: bytes) -> None:
        self._connection.write(self._frame(data))
        await self._connection.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if self.ended:
            return
        out = self._frame(data)
        self.ended = True
        self._connection.write(out + (b"0\r\n\r\n" if self._chunked else b""))
        await self._connection.drain()

    def _frame(self, data: bytes) -> bytes:
        head, self._head = self._head, None
        if data and self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        return head + data if head is not None else data


class LeanConnection(asyncio.Protocol):
    """One client connection, until it is handed to aiohttp."""

    def __init__(self, front: LeanFront) -> None:
        self._front = front
        self._loop = front.loop
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._messages: collections.deque[_Message] = collections.deque()  # ours, in order; [0] is being served
        self._parsing: _Message | None = None
        self._task: asyncio.Task[None] | None = None
        self._raw: bytearray | None = None  # the bytes since the last read that began between requests
        self._fresh_read = False  # no request has ended yet in the read being parsed
        # Handing over: aiohttp's RequestHandler, the bytes it is owed (given once our answers before them are
        # out), and whether they are the raw bytes (the parser is done) or re-framed from the parse.
        self._handed: Any = None
        self._handed_connected = False
        self._raw_mode = False
        self._forward: list[bytes] = []
        self._closing = False
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    # ---- asyncio.Protocol --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._front.connections.add(self)
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._front.connections.discard(self)
        self._cancel_idle_timer()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client left: its handler is cancelled (aiohttp's handler_cancellation)
        for message in self._messages:
            _wake(message)
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the client closed the connection"))
        if self._handed_connected:  # handed over, but the transport still called us: aiohttp must know
            self._handed.connection_lost(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._raw_mode:
            self._forward.append(data)
            self._flush_forward()
            return
        if self._parsing is None:  # this read begins between requests: its bytes are the next request's own
            self._raw = bytearray(data) if self._handed is None else None
            self._fresh_read = True
        elif self._raw is not None:
            self._raw += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._raw_mode:
                return  # the rest of the read is aiohttp's, as raw bytes
            if self._handed is not None:  # malformed, pipelined behind requests already re-framed for aiohttp
                self._raw_mode = True
                self.close()
            elif isinstance(exc.__context__, _HeadTooLarge):
                self._refuse(431, f"the request head is too large: at most {MAX_FIELD_BYTES} bytes per header and "
                                  f"for the URL, {MAX_HEAD_BYTES} in all", "head_too_large")
            else:
                self._refuse(400, f"malformed HTTP request: {exc}", "bad_request")
            return
        if self._handed is not None:
            self._flush_forward(read_ended=True)
        elif self._raw is not None and len(self._raw) > MAX_HEAD_BYTES + self._front.client_max_size:
            self._raw = None

    # ---- httptools callbacks -----------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._raw_mode:
            return
        message = _Message(raw_ok=self._fresh_read and self._raw is not None)
        self._parsing = message
        self._messages.append(message)

    def on_url(self, url: bytes) -> None:
        message = self._parsing
        if message is not None and not self._raw_mode:
            message.url += url
            self._count_head(message, len(url), len(message.url))

    def on_header(self, name: bytes, value: bytes) -> None:
        message = self._parsing
        if message is not None and not self._raw_mode:
            message.header_list.append((name, value))
            self._count_head(message, len(name) + len(value) + 4, max(len(name), len(value)))

    def on_headers_complete(self) -> None:
        message = self._parsing
        if message is None or self._raw_mode:
            return
        parser = self._parser
        message.method = parser.get_method()
        message.version = parser.get_http_version()
        message.keep_alive = parser.should_keep_alive()
        path = message.url.split(b"?", 1)[0]
        route = LEAN_ROUTES.get(path) if message.method == b"POST" else None
        if route is None or self._handed is not None:
            self._hand_over_from(message)
            return
        message.route = route
        self._raw = None  # this request is served here: its bytes are not needed
        self._cancel_idle_timer()
        for name, value in message.header_list:
            if name.lower() == b"expect" and value.lower() == b"100-continue":
                message.expect_continue = True
        if message is self._messages[0]:
            self._serve_next()
        else:
            self.pause_reading()  # pipelined: one request at a time

    def on_body(self, body: bytes) -> None:
        message = self._parsing
        if message is None or self._raw_mode:
            return
        if message.route is None:
            if self._handed is not None:
                self._forward_body(message, body)
            return
        message.body_size += len(body)
        if message.body_size > self._front.client_max_size:
            if not message.too_large:
                message.too_large = True
                message.body.clear()
                _wake(message)
                self.pause_reading()  # the rest is not read: the connection is closed after the answer
            return
        message.body.append(body)
        if message.waiter is not None:
            _wake(message)

    def on_message_complete(self) -> None:
        message = self._parsing
        if self._raw_mode:
            return
        self._parsing = None
        self._fresh_read = False
        if message is None:
            return
        message.complete = True
        if message.route is None:
            if self._handed is not None:
                self._forward_end(message)
            return
        _wake(message)

    # ---- serving ---------------------------------------------------------------------------------------
    def _serve_next(self) -> None:
        messages = self._messages
        if self._task is not None or not messages or self._closing:
            return
        message = messages[0]
        if message.route is None:
            return
        headers = CIMultiDictProxy(CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in message.header_list))
        request = LeanRequest(self, message, headers, self._front.client_max_size)
        handler = self._front.handlers[message.route]
        self._task = self._loop.create_task(self._run(handler, request, message))

    async def _run(self, handler: Handler, request: LeanRequest, message: _Message) -> None:
        close = True
        try:
            response = await handler(request)
            close = self._answer(request, message, response)
        except (asyncio.CancelledError, ConnectionError):
            pass
        except Exception:  # the handlers answer their own errors: this is a bug, not the client's fault
            log.exception("HTTP front: a completion handler failed")
        finally:
            self._task = None
            if self._messages and self._messages[0] is message:
                self._messages.popleft()
            if close or self._closing:
                self.close()
            else:
                self._after_answer()

    def _answer(self, request: LeanRequest, message: _Message, response: web.StreamResponse) -> bool:
        """Write a handler's answer unless it streamed it itself; whether the connection closes after it."""
        stream = request.response
        close = (request.close_after or message.too_large or not message.complete or not message.keep_alive
                 or message.version == "1.0")
        if stream is not None:
            return close or not stream.ended or not stream.chunked
        if self._closing:
            return True
        if not isinstance(response, web.Response):
            log.error("HTTP front: a completion handler returned %s", type(response).__name__)
            return True
        body = response.body
        if body is None:
            body = b""
        if not isinstance(body, bytes | bytearray):
            log.error("HTTP front: a completion handler answered with a %s body", type(body).__name__)
            return True
        close = close or response.keep_alive is False
        headers = [(k, v) for k, v in response.headers.items()
                   if k.lower() not in ("content-length", "connection", "transfer-encoding", "date")]
        headers.append(("Content-Length", str(len(body))))
        reason = (response.reason or "").encode("latin-1")
        self.write(_head(response.status, reason, headers, close=close) + bytes(body))
        return close

    def _after_answer(self) -> None:
        """One request answered on a kept connection: the next, if it came already; else wait for one."""
        self.resume_reading()
        if self._ours_queued():
            self._serve_next()
        elif self._handed is not None:
            self._flush_forward(read_ended=self._parsing is None)
        else:
            self._arm_idle_timer()

    # ---- handing the connection to aiohttp ----------------------------------------------------------------
    def _hand_over_from(self, message: _Message) -> None:
        """`message` and everything after it are aiohttp's. With its raw bytes at hand (it began a read) they are
        given as they came, else re-framed from the parse; either way once the answers before them are out."""
        self._messages.pop()  # `message`, the last: not ours
        if self._handed is None:
            self._handed = self._front.aiohttp_protocol()
            self._cancel_idle_timer()
            if self._task is not None or self._messages:
                self.pause_reading()  # until our answers before it are out
            if message.raw_ok and self._raw is not None:
                self._raw_mode = True  # the parser's callbacks are ignored from here on
                self._forward.append(bytes(self._raw))
                self._raw = None
                self._parsing = None
                self._flush_forward()
                return
        self._forward.append(b"\r\n".join(
            [b"%s %s HTTP/%s" % (message.method, message.url, message.version.encode("ascii"))]
            + [name + b": " + value for name, value in message.header_list]) + b"\r\n\r\n")

    def _forward_body(self, message: _Message, body: bytes) -> None:
        self._forward.append(b"%x\r\n%b\r\n" % (len(body), body) if _chunked(message) else body)

    def _forward_end(self, message: _Message) -> None:
        if _chunked(message):
            self._forward.append(b"0\r\n\r\n")

    def _flush_forward(self, read_ended: bool = False) -> None:
        """Give aiohttp what it is owed once no answer of ours is left to write; and the connection itself once
        nothing of ours is left on it: raw bytes from here on, or (re-framing) at the end of a read that ended
        between requests."""
        handed = self._handed
        transport = self.transport
        if handed is None or self._task is not None or self._ours_queued():
            return
        if transport is None or transport.is_closing():
            return
        if not self._handed_connected:
            self._handed_connected = True
            handed.connection_made(transport)
            self.resume_reading()
        if self._raw_mode or (read_ended and self._parsing is None):
            transport.set_protocol(handed)
            self._raw_mode = True  # a read that is still being parsed (raw mode set mid-read) is forwarded whole
            self._front.connections.discard(self)
        data = b"".join(self._forward)
        self._forward.clear()
        if data:
            handed.data_received(data)

    # ---- writing, reading, closing -------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(data)

    async def drain(self) -> None:
        if not self._paused:
            return
        if self._drain_waiter is None:
            self._drain_waiter = self._loop.create_future()
        await self._drain_waiter

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        self._closing = True
        self._cancel_idle_timer()
        if self.transport is not None:
            self.transport.close()

    def close_if_idle(self) -> bool:
        """Close a connection with no request in progress (shutdown); whether it was idle."""
        if self._idle():
            self.close()
            return True
        return False

    def _ours_queued(self) -> bool:
        """A completion request (ours to serve) is parsed and waiting, or being served."""
        return any(m.route for m in self._messages)

    def _idle(self) -> bool:
        """Nothing in progress here: no handler running, none of ours waiting, not handed to aiohttp."""
        return self._task is None and self._handed is None and not self._ours_queued()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer a request this front cannot parse, then close (after an answer in progress)."""
        self._raw_mode = True  # nothing more is parsed
        self._handed = None
        if self._parsing is not None and self._parsing in self._messages:
            self._messages.remove(self._parsing)
        self._parsing = None
        body = compact_json(ApiError(status, message, code=code).body()).encode()
        answer = _head(status, HTTPStatus(status).phrase.encode("ascii"),
                       [("Content-Type", "application/json; charset=utf-8"), ("Content-Length", str(len(body)))],
                       close=True) + body
        if self._task is None:
            with contextlib.suppress(ConnectionError):
                self.write(answer)
            self.close()
        else:
            self.pause_reading()
            self._task.add_done_callback(lambda _: self.close())

    def _count_head(self, message: _Message, size: int, field: int) -> None:
        message.head_bytes += size
        if message.head_bytes > MAX_HEAD_BYTES or field > MAX_FIELD_BYTES:
            raise _HeadTooLarge()

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        self._idle_timer = self._loop.call_later(self._front.keepalive_timeout_s, self._idle_out)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_out(self) -> None:
        """No request (or only the start of one) since the keep-alive time: closed, as aiohttp does."""
        self._idle_timer = None
        if self._idle():
            self.close()


class _HeadTooLarge(Exception):
    pass


def _chunked(message: _Message) -> bool:
    return any(name.lower() == b"transfer-encoding" and b"chunked" in value.lower()
               for name, value in message.header_list)


def _wake(message: _Message) -> None:
    waiter = message.waiter
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class LeanFront:
    """The protocol factory of the HTTP front's listening socket, and the connections it made."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handlers: Mapping[str, Handler],
                 aiohttp_protocol: Callable[[], Any], *, client_max_size: int,
                 keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S) -> None:
        self.loop = loop
        self.handlers = handlers
        self.aiohttp_protocol = aiohttp_protocol
        self.client_max_size = client_max_size
        self.keepalive_timeout_s = keepalive_timeout_s
        self.connections: set[LeanConnection] = set()

    def __call__(self) -> LeanConnection:
        return LeanConnection(self)

    async def shutdown(self, timeout_s: float) -> None:
        """Close idle connections; give answers in progress `timeout_s`, then cancel them."""
        for connection in list(self.connections):
            connection.close_if_idle()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for connection in list(self.connections):
            connection.close()


class LeanSite(web.TCPSite):
    """aiohttp's TCP site, listening with the lean front's protocol factory (which hands aiohttp what is its)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, front: LeanFront, **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self.front = front

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner (TCPSite.start would listen itself)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.front, self._host, self._port, ssl=self._ssl_context,
                                                backlog=self._backlog, reuse_address=self._reuse_address,
                                                reuse_port=self._reuse_port)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
