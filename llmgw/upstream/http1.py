"""HTTP/1.1 to model servers: pooled keep-alive connections, each an asyncio Protocol parsed by httptools.

Why not aiohttp's client, which the gateway used first: a streamed completion is one request and a few hundred
small response events, and the gateway relays thousands of them per second on one event-loop thread. Measured
with py-spy at 256 concurrent streams, aiohttp's per-request machinery (ClientSession._request, ClientRequest,
the connector) and its per-read StreamReader took ~20% of the gateway's CPU. Here a request is one prebuilt
`transport.write`, and each network read goes from `data_received` through llhttp (httptools, the parser uvicorn
uses) straight into the reader's sink -- for a stream, the SSE parser -- with no intermediate buffer or future
unless a reader is waiting. The parsing that needs care (status line, headers, chunked framing, keep-alive rules)
is httptools'; this module only keeps connections and hands bytes on.

Scope, deliberately small: HTTP/1.1 (and 1.0 answers), `http://` and `https://` (TLS with the system's trust
store, as aiohttp's default), no proxies, no redirects, no cookies, no compression (`Accept-Encoding: identity`; a
compressed answer anyway is refused, not misread), one request at a time per connection (no pipelining).

The flow of one exchange: `ConnectionPool.acquire` gives a connected `Connection`; `Connection.send` writes the
request and returns an `Exchange`, whose `head()` waits for the status and headers. The body reaches the
exchange's sink (`Exchange.attach`) or waits in the exchange until one is attached. When the reader is done it
calls `Exchange.finish(reusable)`: a connection whose answer ended cleanly goes back to the pool (at once, or
when the end of the body arrives, within `DRAIN_SECONDS`); any other is closed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import ssl
import urllib.parse
from collections.abc import Callable, Iterable, Mapping

import httptools

from llmgw import __version__

USER_AGENT = f"llmgw/{__version__}"
# After the reader has what it needs ([DONE]), the end of the body usually came with it; this is how long a
# connection may wait for the rest before it is closed instead of reused.
DRAIN_SECONDS = 1.0
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ConnectionFailed(OSError):
    """No connection could be made (refused, unreachable, name not found, TLS handshake): nothing was sent."""


class ConnectTimedOut(ConnectionFailed):
    """The TCP (and TLS) connect took longer than its limit."""


class ConnectionBroken(ConnectionError):
    """The connection closed or broke while the request or its answer was under way."""


class BadResponse(ConnectionError):
    """The bytes the server sent are not an HTTP/1.1 response (or use a feature this client refuses)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if _DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"


@functools.lru_cache(maxsize=4096)
def split_url(url: str) -> tuple[Origin, str]:
    """(origin, request target) of an absolute http(s) URL; ValueError for anything else."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) URL with a host: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"credentials in an upstream URL are not supported (use headers): {url!r}")
    port = parts.port or _DEFAULT_PORTS[scheme]  # .port raises ValueError for a bad one
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Origin(scheme, parts.hostname, port), target


def check_header(name: str, value: str) -> None:
    """A header a caller supplies must not be able to split the request, and must be sendable (Latin-1)."""
    if not name or any(c in name for c in "\r\n:") or "\r" in value or "\n" in value \
            or (not (name + value).isascii() and not _latin1(name + value)):
        raise ValueError(f"invalid HTTP header {name!r}: {value!r}")


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def encode_request(method: str, origin: Origin, target: str, headers: Iterable[tuple[str, str]],
                   body: bytes | None) -> bytes:
    """The request's bytes: request line, headers (Host, Content-Length and the fixed ones added) and body."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {origin.host_header}", f"User-Agent: {USER_AGENT}",
             "Accept-Encoding: identity"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


class Exchange:
    """One request's answer on its connection: the head (status, headers), then the body.

    Body bytes go to the attached sink as they arrive (`attach`), or wait here until one is attached. The end of
    the body -- cleanly (`ended`) or with `error` -- is reported to the sink's `end` callback, once."""

    __slots__ = ("_body_parts", "_conn", "_end", "_finished", "_head", "_sink", "_until_close", "ended",
                 "error", "headers", "keep_alive", "raw_headers", "status")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers: dict[str, str] = {}  # lower-case names; a repeated header keeps its last value
        self.keep_alive = False
        self.ended = False
        self.error: BaseException | None = None
        self._until_close = False
        self._head: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes], None] | None = None
        self._end: Callable[[], None] | None = None
        self._body_parts: list[bytes] = []
        self._finished = False

    async def head(self, deadline: float) -> None:
        """Wait for the status line and headers, until `deadline` (event-loop time): TimeoutError after it,
        ConnectionBroken / BadResponse when the connection fails first."""
        if self.status:
            return
        if self.error is not None:
            raise self.error
        loop = asyncio.get_running_loop()
        head = self._head = loop.create_future()
        timer = loop.call_at(deadline, _expire, head)
        try:
            await head
        finally:
            timer.cancel()
            self._head = None

    def header_items(self) -> list[tuple[str, str]]:
        return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in self.raw_headers]

    def pause_reading(self) -> None:
        self._conn.pause_reading()

    def resume_reading(self) -> None:
        self._conn.resume_reading()

    def attach(self, sink: Callable[[bytes], None], end: Callable[[], None]) -> list[bytes]:
        """From now on body bytes go to `sink` and the end of the body to `end`; returns what arrived before."""
        self._sink, self._end = sink, end
        parts, self._body_parts = self._body_parts, []
        return parts

    def finish(self, reusable: bool) -> None:
        """The reader is done with this answer. `reusable`: it read what it needed and the connection is in a known
        state -- it goes back to the pool once the body has ended (waited for up to DRAIN_SECONDS)."""
        if self._finished:
            return
        self._finished = True
        self._sink = self._end = None
        self._body_parts = []
        self._conn.exchange_finished(self, reusable)

    # ---- called by the connection -----------------------------------------------------------------------------
    def _on_head(self, status: int) -> None:
        self.status = status
        headers = self.headers
        for name, value in self.raw_headers:
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        self._until_close = "content-length" not in headers and "chunked" not in headers.get(
            "transfer-encoding", "").lower() and status not in (204, 304) and status >= 200
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", ""):
            self._conn.broken(BadResponse(f"the server compressed its answer ({encoding}) though asked not to"))
            return
        head = self._head
        if head is not None and not head.done():
            head.set_result(None)

    def _on_body(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink(data)
        elif not self._finished:
            self._body_parts.append(data)

    def _on_end(self, error: BaseException | None) -> None:
        if self.ended or self.error is not None:
            return
        if error is None:
            self.ended = True
        else:
            self.error = error
            head = self._head
            if head is not None and not head.done():
                head.set_exception(error)
        end = self._end
        if end is not None:
            end()


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class Connection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self, pool: ConnectionPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._exchange: Exchange | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._draining = False

    # ---- used by the client -----------------------------------------------------------------------------------
    def send(self, request: bytes) -> Exchange:
        assert self._exchange is None and self.transport is not None
        exchange = self._exchange = Exchange(self)
        self.transport.write(request)
        return exchange

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._cancel_drain()
            if self.transport is not None:
                self.transport.close()
            self.pool.forget(self)

    def exchange_finished(self, exchange: Exchange, reusable: bool) -> None:
        if exchange is not self._exchange or self.closed:
            return
        if not reusable or exchange.error is not None:
            self.close()
        elif exchange.ended:
            self._reuse()
        else:
            # [DONE] came without the end of the body: give the server a moment to send it.
            self._draining = True
            self._drain_timer = asyncio.get_running_loop().call_later(DRAIN_SECONDS, self.close)

    def _reuse(self) -> None:
        exchange = self._exchange
        self._exchange = None
        self._draining = False
        self._cancel_drain()
        if exchange is None or not exchange.keep_alive or self.closed:
            self.close()
            return
        self.pool.put_idle(self)

    def _cancel_drain(self) -> None:
        timer, self._drain_timer = self._drain_timer, None
        if timer is not None:
            timer.cancel()

    # ---- asyncio.Protocol ---------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if self._exchange is None:
            self.close()  # bytes nobody asked for: the connection is in no known state
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.broken(BadResponse(f"the server's answer is not valid HTTP/1.1: {exc}"))

    def eof_received(self) -> bool:
        exchange = self._exchange
        if exchange is not None and exchange.status and exchange._until_close and not exchange.ended:
            exchange.keep_alive = False
            exchange._on_end(None)  # a body delimited by the end of the connection ends here
            if self._draining:
                self.close()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        self._cancel_drain()
        exchange = self._exchange
        if exchange is not None and not exchange.ended:
            reason = f": {exc}" if exc is not None else ""
            where = "before the answer started" if not exchange.status else "during the answer"
            exchange._on_end(ConnectionBroken(f"the connection closed {where}{reason}"))
        if not was_closed:
            self.pool.forget(self)

    # ---- httptools callbacks (never raise out of these) ---------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self._exchange is not None:
            self._exchange.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self._exchange
        if exchange is None:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            exchange.raw_headers.clear()  # an interim answer (100 Continue...): the real one follows
            return
        exchange._on_head(status)

    def on_body(self, body: bytes) -> None:
        exchange = self._exchange
        if exchange is not None and exchange.error is None:
            exchange._on_body(body)

    def on_message_complete(self) -> None:
        exchange = self._exchange
        if exchange is None or not exchange.status:
            return
        exchange.keep_alive = self._parser.should_keep_alive()
        exchange._on_end(None)
        if self._draining:
            self._reuse()

    def broken(self, error: BaseException) -> None:
        """The connection cannot go on: the exchange under way fails with `error`."""
        exchange = self._exchange
        if exchange is not None:
            exchange._on_end(error)
        self.close()


@dataclasses.dataclass(frozen=True)
class PoolLimits:
    max_connections: int
    max_per_origin: int  # 0: no cap per origin
    keepalive_seconds: float


class ConnectionPool:
    """Keep-alive connections per origin, bounded in total (and per origin if asked). The most recently used idle
    connection is reused first, so a burst's extra connections age out; an idle connection is closed after
    `keepalive_seconds` (checked on reuse and by a sweep while any are idle)."""

    def __init__(self, limits: PoolLimits) -> None:
        self.limits = limits
        self._idle: dict[Origin, list[Connection]] = {}
        self._open: dict[Origin, int] = collections.Counter()  # connected or connecting, idle or busy
        self._total = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._all: set[Connection] = set()
        self._closed = False
        self._ssl: ssl.SSLContext | None = None

    @property
    def open_connections(self) -> int:
        return self._total

    @property
    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def acquire(self, origin: Origin, *, connect_timeout: float, deadline: float) -> Connection:
        """A connection to `origin`: an idle one, or a new one (connect bounded by `connect_timeout`); when the pool
        is full, waits for a free slot until `deadline` (TimeoutError)."""
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise RuntimeError("the connection pool is closed")
            idle = self._idle.get(origin)
            while idle:
                conn = idle.pop()
                if not conn.closed and loop.time() - conn.idle_since < self.limits.keepalive_seconds:
                    return conn
                conn.close()
            if self._has_room(origin):
                return await self._connect(origin, connect_timeout)
            waiter = loop.create_future()
            self._waiters.append(waiter)
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _has_room(self, origin: Origin) -> bool:
        if self._total < self.limits.max_connections:
            per_origin = self.limits.max_per_origin
            return not per_origin or self._open[origin] < per_origin
        # Full: an idle connection to another origin gives its place up.
        for other, idle in self._idle.items():
            if idle and other != origin:
                idle.pop(0).close()
                return self._has_room(origin)
        return False

    async def _connect(self, origin: Origin, timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        self._total += 1
        self._open[origin] += 1
        conn = Connection(self, origin)
        self._all.add(conn)
        try:
            ssl_context = self._ssl_context() if origin.scheme == "https" else None
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_connection(lambda: conn, origin.host, origin.port, ssl=ssl_context,
                                                            server_hostname=origin.host if ssl_context else None)
            # uvloop may complete the connect before it calls connection_made.
            conn.transport = transport
        except TimeoutError as exc:
            self._discard(conn)
            raise ConnectTimedOut(f"connect timed out after {timeout}s") from exc
        except (OSError, ssl.SSLError) as exc:
            self._discard(conn)
            raise ConnectionFailed(f"cannot connect: {exc}") from exc
        except BaseException:
            self._discard(conn)
            raise
        return conn

    def _discard(self, conn: Connection) -> None:
        conn.closed = True
        if conn.transport is not None:
            conn.transport.close()
        self.forget(conn)

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def put_idle(self, conn: Connection) -> None:
        if self._closed:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self._idle.setdefault(conn.origin, []).append(conn)
        self._wake_one()
        if self._sweep is None:
            self._sweep = loop.call_later(self.limits.keepalive_seconds, self._sweep_idle)

    def forget(self, conn: Connection) -> None:
        """`conn` is closed: its place in the pool is free."""
        if conn not in self._all:
            return
        self._all.discard(conn)
        self._total -= 1
        self._open[conn.origin] -= 1
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep_idle(self) -> None:
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        keep = self.limits.keepalive_seconds
        for idle in list(self._idle.values()):
            for conn in [c for c in idle if now - c.idle_since >= keep]:
                conn.close()
        if any(self._idle.values()):
            self._sweep = loop.call_later(keep, self._sweep_idle)

    def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._all):
            conn.close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(RuntimeError("the connection pool is closed"))
        self._waiters.clear()


def header_pairs(*groups: Mapping[str, str] | None) -> list[tuple[str, str]]:
    """Headers from several mappings, later ones replacing earlier ones of the same name (case-insensitive)."""
    merged: dict[str, tuple[str, str]] = {}
    for group in groups:
        if group:
            for name, value in group.items():
                merged[name.lower()] = (name, value)
    return list(merged.values())
