"""HTTP front lifecycle and the in-process stack the other test_http_* / SDK / backend tests build on.

HttpStack = real simulated replicas (grpc.aio, in-process) + a real Gateway (no gossip: a membership object the
test drives) + the real HTTP front, all on one event loop, every piece stopped in close().
"""

import asyncio
import socket

import aiohttp
import pytest

from inprocess import FakeMember, ReplicaPool, run_with, wait_for  # noqa: F401 - other test modules import these
from llmgw.gateway import Gateway, GatewayConfig
from llmgw.gateway.grpc_transport import GrpcTransport
from llmgw.http import start_http


class HttpStack(ReplicaPool):
    """Replicas + a bare Gateway + its HTTP front, over the test-driven membership."""

    def __init__(self) -> None:
        super().__init__()
        self.gateway: Gateway | None = None
        self.front = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self, *, gateway=None, gateway_cls=Gateway, **http_kw):
        cfg = GatewayConfig(port=0, gossip_port=None, **(gateway or {}))
        self.gateway = gateway_cls(cfg, GrpcTransport(upstream_batch=cfg.upstream_batch), membership=self.membership)
        await self.gateway.start()
        self.front = await start_http(self.gateway, host="127.0.0.1", port=0, **http_kw)
        self.session = aiohttp.ClientSession(base_url=self.front.url, timeout=aiohttp.ClientTimeout(total=30))
        return self.front

    @property
    def url(self) -> str:
        return self.front.url

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.front is not None:
            await self.front.close()
        if self.gateway is not None:
            await self.gateway.stop()
        await super().close()


def run_stack(scenario, timeout=30.0):
    """Run `scenario(stack)` on a fresh event loop with a fresh HttpStack, always closed afterwards."""
    return run_with(HttpStack, scenario, timeout)


# ---- lifecycle tests ------------------------------------------------------------------------------------------
def test_front_binds_a_free_port_serves_and_releases_it_on_close():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        front = await s.start()
        assert front.port > 0 and front.url == f"http://127.0.0.1:{front.port}"
        async with s.session.get("/healthz") as resp:
            assert resp.status == 200 and (await resp.json()) == {"status": "ok"}
        await front.close()
        await front.close()  # idempotent
        with socket.socket() as sock:  # the port is free again (SO_REUSEADDR: our client's TIME_WAIT remains)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", front.port))
        # The drain set is the gateway's, not the front's: it outlives the front (a restarted front keeps drains).
        assert front.drains is s.gateway.drains and s.gateway.drains.excluded in s.gateway.exclusion_sources

    run_stack(scenario)


def test_port_in_use_is_a_clear_error_and_leaves_nothing_registered():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        front = await s.start()
        sources_before = list(s.gateway.exclusion_sources)  # the gateway's own (breakers) + the running front's
        with pytest.raises(OSError):
            await start_http(s.gateway, host="127.0.0.1", port=front.port)
        assert s.gateway.exclusion_sources == sources_before
        with pytest.raises(ValueError, match="port"):
            await start_http(s.gateway, port=70000)

    run_stack(scenario)


def test_unknown_route_and_wrong_method_answer_in_openai_error_shape():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start()
        async with s.session.get("/v1/nothing") as resp:
            body = await resp.json()
            assert resp.status == 404 and body["error"]["code"] == "not_found"
        async with s.session.get("/v1/completions") as resp:
            body = await resp.json()
            assert resp.status == 405 and "POST" in resp.headers["Allow"]
            assert set(body["error"]) == {"message", "type", "param", "code"}

    run_stack(scenario)


def test_close_with_a_stream_in_flight_ends_it_and_frees_the_slot():
    async def scenario(s):
        from llmgw.replica import Faults

        rep = await s.add_replica("r1", token_delay_ms=5, faults=Faults(stall_after=1))
        front = await s.start(gateway={"inter_token_timeout_s": 30.0}, shutdown_timeout_s=0.5)
        resp = await s.session.post("/v1/completions", json={"model": "m", "prompt": "p", "max_tokens": 50,
                                                             "stream": True})
        assert b"token_0" in await resp.content.readuntil(b"\n\n") and rep.active == 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(front.close(), 5.0)
        assert loop.time() - started < 3.0
        await wait_for(lambda: rep.active == 0 and s.gateway.in_flight == {}, 3.0, "the slot to be freed")
        with pytest.raises(aiohttp.ClientPayloadError):  # cut mid-body, never reported complete
            await resp.content.read()
        resp.close()

    run_stack(scenario)


def test_http_front_shares_the_loop_and_the_gateway_with_the_grpc_server():
    async def scenario(s):
        import grpc

        from llmgw import client
        from llmgw.gateway.server import GatewayServer

        await s.add_replica("r1", token_delay_ms=1)
        server = GatewayServer(GatewayConfig(port=0, gossip_port=None), membership=s.membership)
        await server.start()
        try:
            front = await start_http(server.gateway, host="127.0.0.1", port=0)
            try:
                async with grpc.aio.insecure_channel(server.grpc_address) as ch:
                    via_grpc = await client.collect(client.stream_infer(ch, "both", 3, timeout_s=10))
                async with aiohttp.ClientSession() as session, session.post(
                        front.url + "/v1/completions", json={"model": "m", "prompt": "both", "max_tokens": 3}) as resp:
                    via_http = await resp.json()
                assert via_grpc.ok and "".join(via_grpc.texts) == via_http["choices"][0]["text"]
                assert server.gateway.stats.served_total == 2  # one Gateway served both fronts
            finally:
                await front.close()
        finally:
            await server.stop(0.1)

    run_stack(scenario)
