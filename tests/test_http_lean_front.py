"""The HTTP front's lean connections (llmgw.http.lean_front), byte for byte on raw sockets: completion requests
served by the front itself, everything else handed to aiohttp on the same connection -- first, after, and
pipelined behind completion requests -- and the HTTP details a client relies on (keep-alive, HTTP/1.0, chunked
and 100-continue bodies, malformed and oversized heads, the idle timeout)."""

import asyncio
import email.utils
import json

import httptools
import pytest
from test_http_server import run_stack

from llmgw.http import lean_front
from llmgw.http.lean_front import MAX_FIELD_BYTES, MAX_HEAD_BYTES

COMPLETION = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 3, "stream": True}).encode()
WHOLE = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 3}).encode()


def post(path: bytes, body: bytes, *, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/%s\r\nHost: x\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n"
            % (path, version, extra, len(body)) + body)


def get(path: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path


class Answers:
    """Parses the answers that arrive on one connection, in order."""

    def __init__(self) -> None:
        self.done: list[dict] = []
        self._current: dict | None = None
        self._parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self._current = {"status": 0, "headers": {}, "body": b""}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current["headers"][name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self._current["status"] = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._current["body"] += body

    def on_message_complete(self) -> None:
        self.done.append(self._current)

    def feed(self, data: bytes) -> None:
        self._parser.feed_data(data)


async def exchange(port: int, data: bytes, answers: int, *, timeout: float = 10.0) -> tuple[list[dict], bytes]:
    """Send `data` on a new connection and read until `answers` answers are complete; (answers, raw bytes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        parsed, raw = Answers(), b""
        async with asyncio.timeout(timeout):
            while len(parsed.done) < answers:
                chunk = await reader.read(65536)
                assert chunk, f"closed after {len(parsed.done)} answers: {raw!r}"
                raw += chunk
                parsed.feed(chunk)
        return parsed.done, raw
    finally:
        writer.close()


def events(body: bytes) -> list:
    out = []
    for block in body.decode().split("\n\n"):
        if block.strip():
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_streamed(answer: dict, tokens: int = 3) -> None:
    assert answer["status"] == 200 and answer["headers"]["content-type"] == "text/event-stream", answer
    got = events(answer["body"])
    assert got[-1] == "[DONE]" and len(got) == tokens + 1, got
    assert [e["choices"][0]["text"] for e in got[:-1]] == [f"token_{i}" for i in range(tokens)]


def stack_scenario(body):
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start()
        await body(s, s.front.port)
    run_stack(scenario)


def test_completion_requests_share_a_kept_connection_with_the_routes_aiohttp_serves():
    async def body(s, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        parsed = Answers()

        async def next_answer():
            count = len(parsed.done)
            async with asyncio.timeout(10):
                while len(parsed.done) == count:
                    chunk = await reader.read(65536)
                    assert chunk
                    parsed.feed(chunk)
            return parsed.done[-1]
        try:
            for request in (post(b"/v1/completions", COMPLETION), post(b"/v1/completions", WHOLE),
                            get(b"/v1/models"), get(b"/healthz")):
                writer.write(request)
                answer = await next_answer()
                assert answer["status"] == 200, answer
            assert_streamed(parsed.done[0])
            assert json.loads(parsed.done[1]["body"])["choices"][0]["text"] == "token_0token_1token_2"
            assert json.loads(parsed.done[3]["body"]) == {"status": "ok"}
            # After aiohttp took the connection, a completion request on it is still served (by aiohttp now).
            writer.write(post(b"/v1/completions", COMPLETION))
            assert_streamed(await next_answer())
        finally:
            writer.close()
    stack_scenario(body)


def test_a_connection_that_starts_with_another_route_is_aiohttps_from_the_start():
    async def body(s, port):
        answers, _ = await exchange(port, get(b"/healthz"), 1)
        assert answers[0]["status"] == 200 and "server" in answers[0]["headers"]  # aiohttp names itself
        answers, _ = await exchange(port, get(b"/no/such/route"), 1)
        assert answers[0]["status"] == 404 and json.loads(answers[0]["body"])["error"]["message"]
        answers, _ = await exchange(port, get(b"/v1/completions"), 1)  # the path, but not the method
        assert answers[0]["status"] == 405
    stack_scenario(body)


def test_pipelined_requests_are_answered_in_order_whoever_serves_them():
    async def body(s, port):
        chunked_admin = (b"POST /v1/models HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nabc\r\n0\r\n\r\n")  # aiohttp's 405, its chunked body re-framed on the way
        data = (post(b"/v1/completions", COMPLETION) + get(b"/v1/models") + chunked_admin
                + post(b"/v1/completions", COMPLETION))
        answers, _ = await exchange(port, data, 4)
        assert_streamed(answers[0])
        assert answers[1]["status"] == 200 and json.loads(answers[1]["body"])["object"] == "list"
        assert answers[2]["status"] == 405
        assert_streamed(answers[3])
        # Two completion requests pipelined: both served by the front, one after the other.
        answers, _ = await exchange(port, post(b"/v1/completions", COMPLETION) * 2, 2)
        assert_streamed(answers[0]) is None and assert_streamed(answers[1]) is None
    stack_scenario(body)


def test_chunked_and_100_continue_bodies_and_http_1_0():
    async def body(s, port):
        half = len(COMPLETION) // 2
        chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"%x\r\n%b\r\n" % (half, COMPLETION[:half])
                   + b"%x\r\n%b\r\n0\r\n\r\n" % (len(COMPLETION) - half, COMPLETION[half:]))
        answers, _ = await exchange(port, chunked, 1)
        assert_streamed(answers[0])

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            head = post(b"/v1/completions", COMPLETION, extra=b"Expect: 100-continue\r\n")[:-len(COMPLETION)]
            writer.write(head)
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(COMPLETION)
            parsed = Answers()
            async with asyncio.timeout(10):
                while not parsed.done:
                    parsed.feed(await reader.read(65536))
            assert_streamed(parsed.done[0])
        finally:
            writer.close()

        # HTTP/1.0: no chunked framing; the answer ends with the connection.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(post(b"/v1/completions", COMPLETION, version=b"1.0"))
            raw = await asyncio.wait_for(reader.read(), 10)  # to EOF: the server closes
        finally:
            writer.close()
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
        assert b"connection: close" in head.lower()
        assert_streamed({"status": 200, "headers": {"content-type": "text/event-stream"}, "body": rest})

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(post(b"/v1/completions", WHOLE, version=b"1.0"))
            raw = await asyncio.wait_for(reader.read(), 10)  # a whole answer, then the server closes
        finally:
            writer.close()
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
        assert json.loads(rest)["choices"][0]["text"] == "token_0token_1token_2"
    stack_scenario(body)


def test_malformed_and_oversized_heads_are_refused_and_closed():
    async def body(s, port):
        for data, status, code in [
            (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", 400, "bad_request"),
            (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_FIELD_BYTES + 1) + b"\r\n\r\n",
             431, "head_too_large"),
            (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
             + b"".join(b"X-%d: %b\r\n" % (i, b"a" * 8000) for i in range(MAX_HEAD_BYTES // 8000 + 1)) + b"\r\n",
             431, "head_too_large"),
        ]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(data)
                raw = await asyncio.wait_for(reader.read(), 10)  # to EOF: refused and closed
            finally:
                writer.close()
            head, _, rest = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 %d" % status), raw[:200]
            error = json.loads(rest)["error"]
            assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
        # The front still serves.
        answers, _ = await exchange(port, post(b"/v1/completions", COMPLETION), 1)
        assert_streamed(answers[0])
    stack_scenario(body)


def test_an_idle_kept_connection_is_closed_after_the_keepalive_time():
    async def body(s, port):
        s.front._lean.keepalive_timeout_s = 0.3
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(post(b"/v1/completions", WHOLE))
            parsed = Answers()
            async with asyncio.timeout(10):
                while not parsed.done:
                    parsed.feed(await reader.read(65536))
            assert parsed.done[0]["status"] == 200
            loop = asyncio.get_running_loop()
            idle_from = loop.time()
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
            assert 0.2 <= loop.time() - idle_from < 5.0
            assert not s.front._lean.connections
        finally:
            writer.close()
    stack_scenario(body)


def test_a_request_for_aiohttp_sent_while_a_completion_streams_waits_its_turn_and_may_come_in_pieces():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=150)
        await s.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", s.front.port)
        try:
            writer.write(post(b"/v1/completions", COMPLETION))
            await asyncio.sleep(0.1)  # the completion is streaming; the next request comes in two reads
            request = get(b"/v1/models")
            writer.write(request[:10])
            await asyncio.sleep(0.05)
            writer.write(request[10:])
            parsed = Answers()
            async with asyncio.timeout(10):
                while len(parsed.done) < 2:
                    chunk = await reader.read(65536)
                    assert chunk
                    parsed.feed(chunk)
            assert_streamed(parsed.done[0])
            assert parsed.done[1]["status"] == 200 and json.loads(parsed.done[1]["body"])["object"] == "list"
        finally:
            writer.close()
    run_stack(scenario)


def test_an_answer_in_progress_gets_the_shutdown_grace_and_idle_connections_are_closed_at_once():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=100)
        await s.start(shutdown_timeout_s=5.0)
        port = s.front.port
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        streaming = asyncio.create_task(exchange(port, post(b"/v1/completions", COMPLETION), 1))
        await asyncio.sleep(0.15)  # its first token is out
        loop = asyncio.get_running_loop()
        started = loop.time()
        await s.front.close()
        answers, _ = await streaming
        assert_streamed(answers[0])  # finished within the grace, whole
        assert loop.time() - started < 4.0
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # the idle one was closed
        idle_writer.close()
    run_stack(scenario)


@pytest.mark.parametrize("when", [0, 951782400, 1798848000 + 3599, 4102444799])
def test_the_date_header_is_rfc_9110s_imf_fixdate(monkeypatch, when):
    monkeypatch.setattr(lean_front.time, "time", lambda: when + 0.5)
    monkeypatch.setattr(lean_front, "_date_cache", [None, b""])
    assert lean_front._http_date() == email.utils.formatdate(when, usegmt=True).encode()
