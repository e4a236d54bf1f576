"""TLS on the gateway's gRPC and HTTP ports and on the gateway->replica hop (self-signed certificate made by the
test with openssl), plaintext clients refused, and the admin API's bearer-token rule."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import sys

import aiohttp
import grpc
import pytest
from tls_certs import self_signed_localhost

from harness import Cluster, free_tcp_port, wait_until
from llmgw import client
from llmgw.tls import client_ssl_context

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 / localhost; it is its own CA."""
    return self_signed_localhost(tmp_path_factory.mktemp("tls"))


def _https_ready(url: str, context: ssl.SSLContext) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2, context=context) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_gateway_serves_grpc_and_http_over_tls_and_reaches_replicas_over_tls(tmp_path, cert):
    cert_file, key_file = cert
    tls = ["--tls-cert", cert_file, "--tls-key", key_file]
    http_port = free_tcp_port()
    with Cluster(tmp_path) as c:
        c.start_replica("replica-1", token_delay_ms=2, extra=tls)
        gw = c.start_gateway("gateway-1", extra=[*tls, "--replica-tls-ca", cert_file, "--http-port", str(http_port),
                                                 "--admin-token", "s3cret"])
        base = f"https://127.0.0.1:{http_port}"
        context = client_ssl_context(cert_file)
        wait_until(lambda: _https_ready(base, context), 20, 0.1, "the gateway to see a routable replica")

        async def scenario():
            # gRPC over TLS, end to end: client -> gateway (TLS) -> replica (TLS)
            async with client.open_channel(gw.grpc_address, ca_file=cert_file) as channel:
                result = await client.collect(client.stream_infer(channel, "hello tls", 6, timeout_s=20))
            assert result.ok, result.details
            assert result.texts == [f"token_{i}" for i in range(6)] and result.replicas == {"replica-1"}
            # A plaintext gRPC client cannot talk to the TLS port.
            async with grpc.aio.insecure_channel(gw.grpc_address) as channel:
                refused = await client.collect(client.stream_infer(channel, "hello", 2, timeout_s=5))
            assert refused.code == grpc.StatusCode.UNAVAILABLE and not refused.tokens

            timeout = aiohttp.ClientTimeout(total=20)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                body = {"model": "m", "prompt": "hello https", "max_tokens": 3, "stream": True}
                async with session.post(base + "/v1/completions", json=body, ssl=context) as resp:
                    assert resp.status == 200
                    text = (await resp.read()).decode()
                chunks = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
                assert "".join(ch["choices"][0]["text"] for ch in chunks) == "token_0token_1token_2"
                assert text.rstrip().endswith("data: [DONE]")
                # Plaintext HTTP to the HTTPS port gets no answer.
                with pytest.raises(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{http_port}/healthz") as resp:
                        await resp.read()
                # An unverified server certificate is rejected by a verifying client.
                with pytest.raises(aiohttp.ClientConnectorError):
                    async with session.get(base + "/healthz", ssl=ssl.create_default_context()) as resp:
                        await resp.read()
                # Admin: a token is set, so even on loopback no token or a wrong one is refused.
                async with session.get(base + "/admin/members", ssl=context) as resp:
                    assert resp.status == 401
                async with session.get(base + "/admin/members", ssl=context,
                                       headers={"Authorization": "Bearer wrong"}) as resp:
                    assert resp.status == 401
                async with session.get(base + "/admin/members", ssl=context,
                                       headers={"Authorization": "Bearer s3cret"}) as resp:
                    assert resp.status == 200
                    members = {m["member_id"]: m for m in (await resp.json())["members"]}
                assert members["replica-1"]["state"] == "alive"

        asyncio.run(asyncio.wait_for(scenario(), 60))

        # The client CLI speaks TLS with --tls-ca.
        proc = subprocess.run([sys.executable, "-m", "llmgw", "client", "--target", gw.grpc_address, "--tls-ca",
                               cert_file, "--max-tokens", "2", "--prompt", "cli"], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "token_1 [replica-1] (final)" in proc.stdout


def test_http_front_with_client_ca_requires_a_client_certificate(cert):
    """--tls-client-ca: mutual TLS; a client without a certificate is turned away during the handshake."""
    from test_http_server import run_stack

    from llmgw.tls import server_ssl_context

    cert_file, key_file = cert

    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        front = await s.start(ssl_context=server_ssl_context(cert_file, key_file, cert_file))
        assert front.url.startswith("https://")
        url = front.url + "/healthz"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(url, ssl=client_ssl_context(cert_file)) as resp:
                    await resp.read()
            async with session.get(url, ssl=client_ssl_context(cert_file, cert_file, key_file)) as resp:
                assert resp.status == 200

    run_stack(scenario)


@pytest.mark.parametrize("host, token, headers, status", [
    ("127.0.0.1", None, {}, 200),  # no token: allowed only because the front is bound to loopback
    ("127.0.0.2", None, {}, 200),  # still loopback
    ("0.0.0.0", None, {}, 403),  # reachable from other hosts and no token: the admin API is off
    ("0.0.0.0", None, {"Authorization": "Bearer anything"}, 403),
    ("127.0.0.1", "t0k", {}, 401),  # a token, once set, is required everywhere
    ("127.0.0.1", "t0k", {"Authorization": "Bearer nope"}, 401),
    ("0.0.0.0", "t0k", {"Authorization": "Bearer nope"}, 401),
    ("0.0.0.0", "t0k", {"Authorization": "Bearer t0k"}, 200),
])
def test_admin_token_rule(host, token, headers, status, monkeypatch):
    from test_http_server import run_stack

    monkeypatch.delenv("LLMGW_ADMIN_TOKEN", raising=False)

    # HttpStack.start binds 127.0.0.1; a second front on the requested host serves the same gateway.
    async def bound(s):
        from llmgw.http import start_http

        await s.add_replica("r1", token_delay_ms=1)
        await s.start()
        front = await start_http(s.gateway, host=host, port=0, admin_token=token)
        try:
            connect = "127.0.0.2" if host == "127.0.0.2" else "127.0.0.1"
            async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
                        session.get(f"http://{connect}:{front.port}/admin/members", headers=headers) as resp):
                assert resp.status == status, await resp.text()
                if status != 200:
                    assert (await resp.json())["error"]["type"] in ("authentication_error", "permission_error")
        finally:
            await front.close()

    run_stack(bound)
