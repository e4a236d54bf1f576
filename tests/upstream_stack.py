"""A gateway in front of OpenAI-compatible servers, in process: mock servers (or any base URLs), the gateway's
gRPC + HTTP fronts on ephemeral loopback ports, a membership source the test drives (no gossip), and helpers to
call the gateway and a server directly. Used by tests/test_upstream_gateway.py, test_upstream_faults.py and
test_llamacpp_gateway.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import aiohttp

from inprocess import FakeMembership, wait_for
from llmgw.gateway.api import GatewayConfig
from llmgw.gateway.app import build_server, stop_gateway
from llmgw.http import start_http
from llmgw.testing.mock_openai import MockOpenAIServer
from llmgw.upstream.backends import Backend
from llmgw.upstream.capabilities import BackendKind
from llmgw.upstream.probe import ProbeSettings

FAST_PROBES = ProbeSettings(interval_s=0.2, timeout_s=1.0, unhealthy_after=2, models_retry_max_s=0.5)


class UpstreamStack:
    def __init__(self, upstreams: list[Backend], **config: Any) -> None:
        defaults: dict[str, Any] = dict(port=0, gossip_port=None, first_token_timeout_s=5.0,
                                        inter_token_timeout_s=2.0, request_timeout_s=60.0, breaker_enabled=False)
        defaults.update(config)
        self.config = GatewayConfig(upstreams=tuple(upstreams), **defaults)
        self.membership = FakeMembership()
        self.server: Any = None
        self.front: Any = None
        self.http: aiohttp.ClientSession | None = None

    async def start(self, *, models_for: int | None = None) -> UpstreamStack:
        self.server = build_server(self.config, membership=self.membership)
        self.server.upstreams.probe = FAST_PROBES
        await self.server.start()
        self.front = await start_http(self.server.gateway, host="127.0.0.1", port=0)  # port 0: ephemeral
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        want = len(self.config.upstreams) if models_for is None else models_for
        await wait_for(lambda: sum(1 for b in self.upstreams.backends.values() if b.models) >= want, 15.0,
                       "upstreams to learn their models")
        return self

    @property
    def upstreams(self):
        return self.server.upstreams

    @property
    def url(self) -> str:
        return self.front.url

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        if self.server is not None:
            await stop_gateway(self.server, self.front)

    async def post(self, path: str, body: Any, base: str | None = None, **kw: Any) -> tuple[int, dict, bytes]:
        assert self.http is not None
        async with self.http.post((base or self.url) + path, json=body, **kw) as response:
            return response.status, dict(response.headers), await response.read()


@dataclasses.dataclass
class Streamed:
    status: int
    events: list[Any]  # parsed JSON data of each event; "[DONE]" for the sentinel
    raw: bytes

    @property
    def done_count(self) -> int:
        return self.events.count("[DONE]")

    def text(self, chat: bool) -> str:
        out = []
        for event in self.events:
            if not isinstance(event, dict):
                continue
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if piece:
                    out.append(piece)
        return "".join(out)


def parse_sse(raw: bytes) -> list[Any]:
    events: list[Any] = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append("[DONE]" if data == "[DONE]" else json.loads(data))
    return events


async def stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Streamed:
    async with session.post(url, json={**body, "stream": True}) as response:
        raw = await response.read()
        if response.status != 200:
            return Streamed(response.status, [], raw)
        return Streamed(response.status, parse_sse(raw), raw)


async def start_mocks(count: int, **kw: Any) -> list[MockOpenAIServer]:
    mocks = [MockOpenAIServer(**kw) for _ in range(count)]
    await asyncio.gather(*(mock.start() for mock in mocks))
    return mocks


def run_against_mocks(scenario: Any, *, mocks: int = 2, kind: BackendKind = BackendKind.VLLM,
                      extra_upstreams: Sequence[Backend] = (), models_for: int | None = None,
                      timeout: float = 60.0, **config: Any) -> Any:
    """Run `scenario(gateway, servers)` on a fresh event loop: `mocks` mock servers, each an upstream of `kind`
    (then `extra_upstreams`), behind an UpstreamStack built with `config` and started with `models_for`. The
    scenario gets `timeout` seconds; the gateway and the servers are stopped whatever happens."""

    async def main() -> Any:
        servers = await start_mocks(mocks)
        upstreams = [Backend(m.base_url, kind=kind) for m in servers] + list(extra_upstreams)
        gateway = UpstreamStack(upstreams, **config)
        try:
            await gateway.start(models_for=models_for)
            return await asyncio.wait_for(scenario(gateway, servers), timeout)
        finally:
            await gateway.close()
            for server in servers:
                await server.stop()

    return asyncio.run(main())
