"""Table-driven bad requests against a running gateway, over gRPC and HTTP (issue 7): wrong types, huge prompts,
negative / huge max_tokens, bad UTF-8, malformed JSON, slowloris bodies, abrupt disconnects. Each gets its
documented error (docs/api.md) and, after each, a normal request on the same gateway still succeeds and nothing
is left in flight."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import grpc
import pytest

from llmgw import client
from llmgw._proto import llmgateway_pb2 as pb
from reliability_helpers import Cluster, free_port, wait_until

CAP_TOKENS = 4096
CAP_PROMPT = 1 << 20
INFER = "/llmgateway.InferenceGateway/Infer"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("hostile"), gossip_config="local") as c:
        c.start_replica("replica-1", token_delay_ms=5, max_capacity=64)
        http_port = free_port()
        gw = c.start_gateway("gateway-1", extra=["--http-port", str(http_port)])
        c.wait_converged([gw])
        yield c, gw, f"http://127.0.0.1:{http_port}"


def _idle(c, gw) -> bool:
    status = c.gateway_status(gw)
    return status.in_flight == 0 and status.queued == 0


async def _normal_grpc(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        result = await client.collect(client.stream_infer(ch, "a normal request", 3, timeout_s=10))
    assert result.ok and [t.index for t in result.tokens] == [0, 1, 2], result


def _raw_infer(address: str, payload: bytes, timeout: float = 10.0) -> tuple[grpc.StatusCode, str]:
    """Send arbitrary bytes as an InferRequest (what a buggy or hostile client can do)."""
    async def go():
        async with grpc.aio.insecure_channel(address) as ch:
            call = ch.unary_stream(INFER, request_serializer=lambda b: b,
                                   response_deserializer=pb.InferResponse.FromString)(payload, timeout=timeout)
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details() or ""
            return grpc.StatusCode.OK, ""

    return asyncio.run(go())


def _field(number: int, wire_type: int, value: bytes) -> bytes:
    """One protobuf field: tag, then (for length-delimited) a length prefix."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)
    tag = varint((number << 3) | wire_type)
    return tag + (varint(len(value)) + value if wire_type == 2 else value)


def _encode_varint(n: int) -> bytearray:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return out


GOOD_PROMPT = _field(2, 2, b"hello")
GOOD_TOKENS = _field(3, 0, bytes(_encode_varint(3)))

GRPC_CASES = [
    # (name, raw InferRequest bytes, expected status, text the message must contain)
    ("empty prompt", GOOD_TOKENS, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("max_tokens 0", GOOD_PROMPT, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ("max_tokens -5", GOOD_PROMPT + _field(3, 0, bytes(_encode_varint(-5))), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens"),
    ("max_tokens 2**31-1", GOOD_PROMPT + _field(3, 0, bytes(_encode_varint(2**31 - 1))),
     grpc.StatusCode.INVALID_ARGUMENT, "cap"),
    ("prompt over the cap", _field(2, 2, b"a" * (CAP_PROMPT + 1)) + GOOD_TOKENS, grpc.StatusCode.INVALID_ARGUMENT,
     "cap"),
    ("prompt with invalid UTF-8", _field(2, 2, b"ok \xff\xfe bad") + GOOD_TOKENS, grpc.StatusCode.INVALID_ARGUMENT,
     ""),
    ("prompt with a lone surrogate (CESU)", _field(2, 2, b"\xed\xa0\x80") + GOOD_TOKENS,
     grpc.StatusCode.INVALID_ARGUMENT, ""),
    ("max_tokens sent as a string (wrong wire type: an unknown field, so max_tokens is 0)",
     GOOD_PROMPT + _field(3, 2, b"10"), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ("bytes that are not protobuf", b"\xff\xff\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, ""),
    ("truncated length prefix", _field(2, 2, b"hello")[:4], grpc.StatusCode.INVALID_ARGUMENT, ""),
]


@pytest.mark.parametrize("name,payload,code,text", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_grpc_bad_request(gateway, name, payload, code, text):
    c, gw, _ = gateway
    got, details = _raw_infer(gw.grpc_address, payload)
    assert got == code, (name, got, details)
    assert text.lower() in details.lower(), details
    asyncio.run(_normal_grpc(gw.grpc_address))
    wait_until(lambda: _idle(c, gw), 5.0, what="gateway idle")


def test_grpc_odd_but_valid_fields_are_served(gateway):
    """Negative / NaN / infinite timeout_s mean "the default"; a client_id of 1 MiB junk is only a log field."""
    _, gw, _ = gateway
    for extra in (_field(6, 1, b"\x00\x00\x00\x00\x00\x00\xf0\xbf"),  # -1.0
                  _field(6, 1, b"\x00\x00\x00\x00\x00\x00\xf8\x7f"),  # NaN
                  _field(6, 1, b"\x00\x00\x00\x00\x00\x00\xf0\x7f"),  # +inf
                  _field(1, 2, b"\x00" * 1000)):
        got, details = _raw_infer(gw.grpc_address, GOOD_PROMPT + GOOD_TOKENS + extra)
        assert got == grpc.StatusCode.OK, (extra[:12], got, details)


def test_grpc_message_over_the_transport_limit(gateway):
    """5 MiB exceeds grpc's default 4 MiB receive limit: refused by the transport (RESOURCE_EXHAUSTED) before
    the gateway's own cap is consulted; the connection and the gateway stay healthy."""
    _, gw, _ = gateway
    got, details = _raw_infer(gw.grpc_address, _field(2, 2, b"a" * (5 << 20)) + GOOD_TOKENS)
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED, (got, details)
    asyncio.run(_normal_grpc(gw.grpc_address))


def test_grpc_abrupt_disconnects_mid_stream_free_their_slots(gateway):
    c, gw, _ = gateway

    async def go():
        for _ in range(10):
            ch = grpc.aio.insecure_channel(gw.grpc_address)
            stream = client.stream_infer(ch, "walk away", 500, timeout_s=30)
            got = [await anext(stream) for _ in range(3)]
            assert [t.index for t in got] == [0, 1, 2]
            await ch.close(grace=None)  # the connection goes away mid-stream, no cancel message first

    asyncio.run(go())
    wait_until(lambda: _idle(c, gw), 5.0, what="gateway to release abandoned streams")
    status = c.replica_status(c.nodes["replica-1"])
    assert status.active_requests == 0
    asyncio.run(_normal_grpc(gw.grpc_address))


# ---- HTTP ------------------------------------------------------------------------------------------------------
HTTP_CASES = [
    # (name, raw body, expected status, expected error code or param)
    ("malformed JSON", b'{"model": "v1", "prompt": ', 400, "invalid_json"),
    ("invalid UTF-8", b'{"model": "v1", "prompt": "\xff\xfe"}', 400, "invalid_utf8"),
    ("empty body", b"", 400, "invalid_json"),
    ("JSON array, not an object", b"[]", 400, None),
    ("nesting bomb", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    ("prompt is a number", json.dumps({"model": "v1", "prompt": 5}).encode(), 400, "prompt"),
    ("max_tokens is a string", json.dumps({"model": "v1", "prompt": "x", "max_tokens": "10"}).encode(), 400,
     "max_tokens"),
    ("max_tokens is a bool", json.dumps({"model": "v1", "prompt": "x", "max_tokens": True}).encode(), 400,
     "max_tokens"),
    ("negative max_tokens", json.dumps({"model": "v1", "prompt": "x", "max_tokens": -1}).encode(), 400,
     "max_tokens"),
    ("huge max_tokens", json.dumps({"model": "v1", "prompt": "x", "max_tokens": 10**30}).encode(), 400,
     "max_tokens"),
    ("stream is a string", json.dumps({"model": "v1", "prompt": "x", "stream": "yes"}).encode(), 400, "stream"),
    ("missing model", json.dumps({"prompt": "x"}).encode(), 400, "model"),
    ("NaN temperature", b'{"model": "v1", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("prompt over the cap", json.dumps({"model": "v1", "prompt": "a" * (CAP_PROMPT + 1)}).encode(), 400, None),
    ("body over client_max_size", b'{"model": "v1", "prompt": "' + b"a" * (3 << 20) + b'"}', 400,
     "body_too_large"),
]


async def _post(url: str, body: bytes, *, path: str = "/v1/completions") -> tuple[int, dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s, \
            s.post(url + path, data=body, headers={"Content-Type": "application/json"}) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, {"raw": text[:200]}


async def _normal_http(url: str) -> None:
    status, body = await _post(url, json.dumps({"model": "v1", "prompt": "normal", "max_tokens": 3}).encode())
    assert status == 200 and body["choices"][0]["text"] == "token_0token_1token_2", body


@pytest.mark.parametrize("name,body,status,code", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_bad_request(gateway, name, body, status, code):
    c, gw, url = gateway

    async def go():
        got, answer = await _post(url, body)
        assert got == status, (name, got, answer)
        err = answer.get("error", {})
        assert err.get("message"), answer  # OpenAI's error shape, with a message a caller can act on
        if code is not None:
            assert code in (err.get("code"), err.get("param")), answer
        await _normal_http(url)

    asyncio.run(go())
    wait_until(lambda: _idle(c, gw), 5.0, what="gateway idle")


def test_http_abrupt_disconnects_mid_stream_free_their_slots(gateway):
    c, gw, url = gateway
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "v1", "prompt": "walk away", "max_tokens": 500, "stream": True}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    for _ in range(10):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(request)
            got = b""
            while got.count(b"data: ") < 3:
                chunk = sock.recv(65536)
                assert chunk, "server closed early"
                got += chunk
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    wait_until(lambda: _idle(c, gw), 5.0, what="gateway to release abandoned HTTP streams")
    assert c.replica_status(c.nodes["replica-1"]).active_requests == 0
    asyncio.run(_normal_http(url))


SLOWLORIS_CONNECTIONS = 50
SLOWLORIS_BODY_TIMEOUT_S = 1.0  # start_http(body_timeout_s=...); the gateway's default is 30 s


def test_http_slowloris_bodies_are_cut_off_at_the_body_timeout_while_others_are_served():
    """50 connections announce a 1 KB body and trickle one byte every 0.2 s. Each gets 408 (OpenAI error shape,
    code body_timeout) and is closed by the server within the body timeout (plus scheduling slack on a busy
    2-core machine); normal requests meanwhile are served promptly. In process, to set a short timeout."""
    from test_http_server import run_stack

    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1024\r\n\r\n{")

    async def slow_client(port: int) -> tuple[float, bytes]:
        """Trickle until the server answers and closes; (seconds from the headers to EOF, what was received)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head)
            await writer.drain()
            started = asyncio.get_running_loop().time()
            received = b""

            async def trickle():
                for _ in range(100):  # 20 s at most: far past the timeout
                    await asyncio.sleep(0.2)
                    writer.write(b" ")
                    await writer.drain()

            trickler = asyncio.create_task(trickle())
            try:
                while chunk := await asyncio.wait_for(reader.read(65536), 15.0):
                    received += chunk
            except (ConnectionResetError, BrokenPipeError):
                pass
            finally:
                trickler.cancel()
                await asyncio.gather(trickler, return_exceptions=True)
            return asyncio.get_running_loop().time() - started, received
        finally:
            writer.close()

    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1, capacity=16)
        await s.start(body_timeout_s=SLOWLORIS_BODY_TIMEOUT_S)
        slow = [asyncio.create_task(slow_client(s.front.port)) for _ in range(SLOWLORIS_CONNECTIONS)]
        served = []
        while not all(t.done() for t in slow) and len(served) < 20:
            t0 = asyncio.get_running_loop().time()
            async with s.session.post("/v1/completions", json={"model": "v1", "prompt": "normal",
                                                               "max_tokens": 3}) as resp:
                assert resp.status == 200, await resp.text()
            served.append(asyncio.get_running_loop().time() - t0)
            await asyncio.sleep(0.1)
        results = await asyncio.gather(*slow)
        return served, results

    served, results = run_stack(scenario, timeout=60.0)
    held = sorted(r[0] for r in results)
    print(f"slowloris: {len(results)} slow bodies closed after {held[0]:.2f}-{held[-1]:.2f} s; "
          f"{len(served)} normal requests served meanwhile, slowest {max(served):.2f} s")
    assert served and max(served) < 2.0, served
    for elapsed, received in results:
        status_line, _, rest = received.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 408"), received[:200]
        assert b"Connection: close" in rest.split(b"\r\n\r\n")[0]
        body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "body_timeout" and body["error"]["type"] == "invalid_request_error"
        # Closed by the server at the timeout, not after aiohttp's 10 s lingering read of the rest of the body.
        assert SLOWLORIS_BODY_TIMEOUT_S - 0.05 <= elapsed < SLOWLORIS_BODY_TIMEOUT_S + 3.0, elapsed
