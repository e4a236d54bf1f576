"""`python -m llmgw client --http URL` against a real gateway process: tokens streamed from the HTTP front as they
arrive, the serving replica (X-LLMGW-Replica) and the TTFT; its errors; and the HTTP stream reader on its own."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

import aiohttp
import pytest
from aiohttp import web

from harness import Cluster, free_tcp_port
from llmgw import client


def run_client(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "llmgw", "client", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def http_gateway(tmp_path_factory):
    """A gateway process with its HTTP front and one replica slow enough (150 ms per token) that tokens arriving
    one by one are visible in time."""
    http_port = free_tcp_port()
    with Cluster(tmp_path_factory.mktemp("client-http")) as c:
        rep = c.start_replica("replica-1", token_delay_ms=150)
        gw = c.start_gateway("gateway-1", extra=["--http-port", str(http_port)])
        c.wait_converged([gw], {"gateway-1": "alive", "replica-1": "alive"})
        yield f"http://127.0.0.1:{http_port}", gw, rep


def test_http_mode_prints_tokens_as_they_arrive_with_replica_and_ttft(http_gateway):
    url, _, _ = http_gateway
    proc = subprocess.Popen([sys.executable, "-m", "llmgw", "client", "--http", url, "--prompt", "hello http",
                             "--max-tokens", "4", "--timeout-s", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        arrivals = []
        for _ in range(4):
            line = proc.stdout.readline()
            arrivals.append((time.monotonic(), line))
        rest = proc.stdout.readline()  # read through the same buffer: communicate() would bypass it
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert [line.split() for _, line in arrivals] == [
        ["0", "token_0", "[replica-1]"], ["1", "token_1", "[replica-1]"], ["2", "token_2", "[replica-1]"],
        ["3", "token_3", "[replica-1]", "(final)"]]
    # Streamed, not buffered: the lines came out about one token delay (150 ms) apart.
    assert arrivals[-1][0] - arrivals[0][0] >= 0.3
    summary = re.fullmatch(r"4 tokens, TTFT ([\d.]+) ms, total ([\d.]+) ms, served by replica-1\n", rest)
    assert summary, rest
    ttft, total = float(summary.group(1)), float(summary.group(2))
    assert 0 < ttft < total and total >= 400


def test_http_mode_reports_errors_and_bad_usage(http_gateway):
    url, gw, _ = http_gateway
    bad = run_client("--http", url, "--max-tokens", "0")
    assert bad.returncode == 1 and "error: HTTP 400: " in bad.stderr and "max_tokens" in bad.stderr
    nothing = run_client("--http", f"http://127.0.0.1:{free_tcp_port()}", "--timeout-s", "5")
    assert nothing.returncode == 1 and "error: ClientConnectorError" in nothing.stderr
    for args, message in ((["--http", "127.0.0.1:8080"], "must start with http:// or https://"),
                          (["--http", url, "--direct"], "cannot be combined with --http")):
        usage = run_client(*args)
        assert usage.returncode == 2 and message in usage.stderr and "Traceback" not in usage.stderr
    # The gRPC mode prints the same way.
    grpc_mode = run_client("--target", gw.grpc_address, "--max-tokens", "2")
    assert grpc_mode.returncode == 0, grpc_mode.stderr
    assert grpc_mode.stdout.splitlines()[-1].endswith(", served by replica-1")


# ---- the stream reader against scripted servers ---------------------------------------------------------------
async def _serve(body: bytes, *, status: int = 200):
    async def handler(request):
        resp = web.StreamResponse(status=status, headers={"Content-Type": "text/event-stream",
                                                          client.REPLICA_HEADER: "r9"})
        await resp.prepare(request)
        await resp.write(body)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def _read(body: bytes, status: int = 200):
    async def scenario():
        runner, url = await _serve(body, status=status)
        try:
            async with aiohttp.ClientSession() as session:
                return [t async for t in client.stream_completion_http(session, url + "/v1", "p", 3, timeout_s=10)]
        finally:
            await runner.cleanup()

    return asyncio.run(asyncio.wait_for(scenario(), 20))


def _chunk(text, finish=None):
    return (b'data: {"choices": [{"index": 0, "text": "%s", "finish_reason": %s}]}\n\n'
            % (text.encode(), b"null" if finish is None else b'"' + finish.encode() + b'"'))


def test_stream_reader_yields_tokens_with_the_replica_and_needs_done():
    tokens = _read(b": comment\n\n" + _chunk("a") + _chunk("b", "length") + b"data: [DONE]\n\n")
    assert [(t.index, t.token, t.replica_id, t.is_final) for t in tokens] == [(0, "a", "r9", False),
                                                                             (1, "b", "r9", True)]
    with pytest.raises(client.HttpStreamError, match="without data: \\[DONE\\]"):
        _read(_chunk("a"))
    with pytest.raises(client.HttpStreamError, match="stream failed after 1 tokens: replica gone"):
        _read(_chunk("a") + b'data: {"error": {"message": "replica gone"}}\n\n')
    with pytest.raises(client.HttpStreamError, match="not an OpenAI completion stream"):
        _read(b"data: {not json}\n\n")
    with pytest.raises(client.HttpStreamError) as err:
        _read(b'{"error": {"message": "queue full"}}', status=429)
    assert err.value.status == 429 and err.value.message == "queue full"


def test_completions_url():
    assert client.completions_url("http://h:1") == "http://h:1/v1/completions"
    assert client.completions_url("https://h:1/v1/") == "https://h:1/v1/completions"
    with pytest.raises(ValueError):
        client.completions_url("h:1")
