"""The HTTP/1.1 connection layer under the upstream client (llmgw.upstream.http1): keep-alive rules, the pool's
bounds, and answers a well-behaved server never sends -- each from a raw asyncio server that writes exact bytes."""

import asyncio

import pytest
from tls_certs import self_signed_localhost

from llmgw.upstream import http1
from llmgw.upstream.client import Endpoint, UpstreamClient, UpstreamLimits, UpstreamStream, UpstreamTimeouts
from llmgw.upstream.errors import FailureKind, UpstreamError

FAST = UpstreamTimeouts(connect=2.0, first_byte=2.0, idle=2.0)
SSE_OK = (b'data: {"choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}\n\n'
          b"data: [DONE]\n\n")


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def sse_response(body_parts=(SSE_OK,), extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n" + extra
            + b"\r\n" + chunked(*body_parts))


class RawServer:
    """Answers each request on a connection with the next of `answers` (bytes; a callable gets the request and
    the writer and does what it likes). Records the requests and counts connections."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed_by_peer = 0
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader, writer):
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = self.answers.pop(0)
                if callable(answer):
                    if await answer(request, writer) == "close":
                        break
                else:
                    writer.write(answer)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_peer += 1
        finally:
            writer.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def read_all(stream: UpstreamStream):
    return [chunk async for chunk in stream]


async def until(check, timeout=3.0):
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_keep_alive_reuses_one_connection_and_close_or_http10_does_not():
    async def scenario():
        answers = [sse_response(), sse_response(), sse_response(extra=b"Connection: close\r\n"),
                   sse_response()]
        async with RawServer(answers) as server, UpstreamClient(timeouts=FAST) as client:
            for _ in range(4):
                chunks = await read_all(await client.open_stream(server.url, Endpoint.COMPLETIONS, b"{}"))
                assert [c.data["choices"][0]["text"] for c in chunks] == ["hi"]
                await until(lambda: client.idle_connections or client.open_connections == 0)
            first_two_shared = server.connections
            request = server.requests[0]
        def then_close(answer):
            async def write(request, writer):
                writer.write(answer)
                await writer.drain()
                return "close"
            return write

        async with RawServer([then_close(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                                         b"Content-Length: 2\r\n\r\n{}"),
                              then_close(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{}")]) as old, \
                UpstreamClient(timeouts=FAST) as client:
            first = await client.complete(old.url, Endpoint.COMPLETIONS, b"{}")
            second = await client.complete(old.url, Endpoint.COMPLETIONS, b"{}")  # body ends with the connection
            return first_two_shared, request, first.data, second.data, old.connections

    shared, request, first, second, old_connections = run(scenario())
    # 1+2+3 on one connection (3 said "Connection: close"), 4 on a second one.
    assert shared == 2
    head = request.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"POST /v1/completions HTTP/1.1"
    for line in (b"Accept-Encoding: identity", b"Content-Length: 2", b"Accept: text/event-stream"):
        assert line in head
    assert first == second == {} and old_connections == 2  # HTTP/1.0: no keep-alive


def test_answers_that_are_not_http_or_compressed_are_malformed_and_never_reused():
    async def scenario():
        answers = [b"SSH-2.0-OpenSSH\r\n\r\n",
                   sse_response(extra=b"Content-Encoding: gzip\r\n"),
                   b"HTTP/1.1 100 Continue\r\n\r\n" + sse_response()]
        async with RawServer(answers) as server, UpstreamClient(timeouts=FAST) as client:
            errors = []
            for _ in range(2):
                with pytest.raises(UpstreamError) as caught:
                    await client.open_stream(server.url, Endpoint.COMPLETIONS, b"{}")
                errors.append(caught.value)
            # An interim 100 answer is skipped: the real answer after it is read.
            chunks = await read_all(await client.open_stream(server.url, Endpoint.COMPLETIONS, b"{}"))
            return errors, chunks, server.connections

    errors, chunks, connections = run(scenario())
    assert [e.kind for e in errors] == [FailureKind.MALFORMED, FailureKind.MALFORMED]
    assert "not valid HTTP" in errors[0].detail and "gzip" in errors[1].detail
    assert [c.data["choices"][0]["text"] for c in chunks] == ["hi"]
    assert connections == 3  # a connection that carried a bad answer is closed, not pooled


def test_a_connection_cut_mid_body_is_reset_and_a_pooled_one_the_server_closed_is_replaced():
    async def cut(request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n" % (len(SSE_OK[:40]), SSE_OK[:40]))
        await writer.drain()
        return "close"

    async def answer_then_close(request, writer):
        writer.write(sse_response())
        await writer.drain()
        return "close"

    async def scenario():
        async with RawServer([cut, answer_then_close, sse_response()]) as server, \
                UpstreamClient(timeouts=FAST) as client:
            stream = await client.open_stream(server.url, Endpoint.COMPLETIONS, b"{}")
            with pytest.raises(UpstreamError) as broken:
                await stream.read()
            await read_all(await client.open_stream(server.url, Endpoint.COMPLETIONS, b"{}"))
            await until(lambda: client.open_connections == 0)  # the server closed the pooled one
            third = await read_all(await client.open_stream(server.url, Endpoint.COMPLETIONS, b"{}"))
            return broken.value, third

    broken, third = run(scenario())
    assert broken.kind is FailureKind.RESET and "connection" in broken.detail
    assert [c.data["choices"][0]["text"] for c in third] == ["hi"]


def test_the_pool_bounds_connections_and_a_full_pool_waits_until_the_first_byte_deadline():
    async def slow(request, writer):
        await asyncio.sleep(0.3)
        writer.write(sse_response())
        await writer.drain()

    async def hold(request, writer):  # an answer that starts and then goes on for longer than the test
        event = b'data: {"choices": [{"index": 0, "text": "x", "finish_reason": null}]}\n\n'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        await asyncio.sleep(10)

    async def scenario():
        async with RawServer([slow, sse_response(), hold]) as server, \
                UpstreamClient(timeouts=FAST, limits=UpstreamLimits(max_connections=1)) as client:
            async def one():
                return await read_all(await client.open_stream(server.url, Endpoint.COMPLETIONS, b"{}"))

            both = await asyncio.gather(one(), one())  # the second waits for the first's connection
            held = await client.open_stream(server.url, Endpoint.COMPLETIONS, b"{}")
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(UpstreamError) as full:
                await client.open_stream(server.url, Endpoint.COMPLETIONS, b"{}",
                                         timeouts=UpstreamTimeouts(first_byte=0.2))
            waited = loop.time() - started
            held.cancel()
            return both, server.connections, full.value, waited, client.open_connections

    both, connections, full, waited, still_open = run(scenario())
    assert [len(chunks) for chunks in both] == [1, 1] and connections == 1
    assert full.kind is FailureKind.TIMEOUT_FIRST_BYTE and "no free connection" in full.detail
    assert 0.15 <= waited < 2 and still_open == 0


def test_idle_connections_are_closed_after_keepalive_seconds():
    async def scenario():
        async with RawServer([sse_response()]) as server, \
                UpstreamClient(timeouts=FAST, limits=UpstreamLimits(keepalive_seconds=0.2)) as client:
            await read_all(await client.open_stream(server.url, Endpoint.COMPLETIONS, b"{}"))
            await until(lambda: client.idle_connections == 1)
            await until(lambda: client.open_connections == 0 and server.closed_by_peer == 1)
            return True

    assert run(scenario())


def test_headers_that_could_split_a_request_are_refused():
    with pytest.raises(ValueError):
        UpstreamClient(headers={"Authorization": "Bearer x\r\nX-Evil: 1"})
    with pytest.raises(ValueError):  # not sendable in an HTTP/1.1 header (Latin-1)
        UpstreamClient(headers={"X-Team": "名前"})
    UpstreamClient(headers={"X-Team": "Café"})  # Latin-1 is

    async def scenario():
        async with UpstreamClient(timeouts=FAST) as client:
            with pytest.raises(ValueError):
                await client.open_stream("http://127.0.0.1:1", Endpoint.COMPLETIONS, b"{}",
                                         headers={"traceparent": "00\nX-Evil: 1"})
            with pytest.raises(UpstreamError) as bad_url:
                await client.get("http://user:pw@127.0.0.1:1", "/health")
            return bad_url.value

    assert run(scenario()).kind is FailureKind.CONNECT


def test_split_url_and_host_header():
    origin, target = http1.split_url("https://Example.com/v1/chat/completions?x=1")
    assert origin == http1.Origin("https", "example.com", 443) and target == "/v1/chat/completions?x=1"
    assert origin.host_header == "example.com"
    origin, _ = http1.split_url("http://[::1]:8000/v1/models")
    assert origin.host_header == "[::1]:8000"
    for bad in ("ftp://h/x", "http:///x", "http://h:99999/x"):
        with pytest.raises(ValueError):
            http1.split_url(bad)


class _RecordingTransport:
    def __init__(self):
        self.paused = 0
        self.resumed = 0
        self.closed = False

    def write(self, data):
        pass

    def close(self):
        self.closed = True

    def pause_reading(self):
        self.paused += 1

    def resume_reading(self):
        self.resumed += 1


def test_a_stream_nobody_reads_stops_reading_from_its_server_and_resumes_when_read():
    async def scenario():
        pool = http1.ConnectionPool(http1.PoolLimits(4, 0, 60.0))
        conn = http1.Connection(pool, http1.Origin("http", "h", 1))
        transport = _RecordingTransport()
        conn.connection_made(transport)
        exchange = conn.send(b"request")
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n")
        loop = asyncio.get_running_loop()
        stream = UpstreamStream(exchange, "http://h:1/v1/completions", FAST, loop.time() + 5, 10**6)
        event = b'data: {"choices": [{"index": 0, "text": "x", "finish_reason": null}]}\n\n'
        for _ in range(1500):
            conn.data_received(b"%x\r\n%s\r\n" % (len(event), event))
        paused_at = transport.paused
        for _ in range(900):
            await stream.read()
        resumed_before = transport.resumed  # 600 still queued: more than half the bound
        for _ in range(100):
            await stream.read()
        return paused_at, resumed_before, transport.resumed, stream.buffered

    paused, resumed_before, resumed, buffered = run(scenario())
    assert paused == 1 and resumed_before == 0 and resumed == 1 and buffered == 500


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    """A certificate for 127.0.0.1 that is its own CA (the openssl command, as tests/test_tls.py makes it)."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed for the https upstream test")
    return self_signed_localhost(tmp_path_factory.mktemp("upstream-tls"))


def test_https_upstreams_are_verified_against_the_trust_store(self_signed, monkeypatch):
    import ssl

    cert_file, key_file = self_signed
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_file, key_file)

    async def scenario():
        server = RawServer([sse_response()])
        server.server = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=server_context)
        url = server.url.replace("http://", "https://")
        try:
            async with UpstreamClient(timeouts=FAST) as client:  # the system's trust store: not this certificate
                with pytest.raises(UpstreamError) as untrusted:
                    await client.open_stream(url, Endpoint.COMPLETIONS, b"{}")
            monkeypatch.setenv("SSL_CERT_FILE", cert_file)  # how a private CA is trusted (docs/backends.md)
            async with UpstreamClient(timeouts=FAST) as client:
                chunks = await read_all(await client.open_stream(url, Endpoint.COMPLETIONS, b"{}"))
            return untrusted.value, chunks, server.requests
        finally:
            await server.__aexit__()

    untrusted, chunks, requests = run(scenario())
    assert untrusted.kind is FailureKind.CONNECT and "CERTIFICATE_VERIFY_FAILED" in untrusted.detail
    assert [c.data["choices"][0]["text"] for c in chunks] == ["hi"]
    assert len(requests) == 1 and b"Host: 127.0.0.1:" in requests[0]
