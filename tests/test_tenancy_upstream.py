"""A tenant's tokens over OpenAI-compatible model servers are the server's usage (prompt + completion), not the
gateway's word count: streamed (the gateway asks the server for usage and does not forward what the client did not
ask for), streamed with the client's own include_usage, and not streamed. Mock servers in process
(llmgw.testing.mock_openai: usage counts the rendered prompt and every generated token)."""

from __future__ import annotations

import asyncio
import json

from upstream_stack import UpstreamStack, start_mocks, stream

from llmgw.gateway.tenancy_gate import TenancyGate
from llmgw.gateway.upstreams import affinity_key
from llmgw.tenancy.keys import hash_key, parse_key_file
from llmgw.upstream.backends import Backend
from llmgw.upstream.capabilities import BackendKind

KEY = "sk-llmgw-test-upstream-usage-01"
AUTH = {"Authorization": f"Bearer {KEY}"}
# A conversation's later turn: the server counts every message, the gateway's routing key only the opening.
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three rivers."},
        {"role": "assistant", "content": "Nile, Amazon, Yangtze."},
        {"role": "user", "content": "And three more, longer ones, from another continent please?"}]


def tokens_counted(gate: TenancyGate) -> int:
    tenants = gate.usage(asyncio.get_running_loop().time())["tenants"]
    return tenants["team"]["local"]["tokens"] if "team" in tenants else 0


def run(scenario, *, keys: bool = True):
    async def main():
        servers = await start_mocks(1)
        gateway = UpstreamStack([Backend(servers[0].base_url, kind=BackendKind.VLLM)])
        try:
            await gateway.start()
            gate = None
            if keys:
                gate = TenancyGate("gateway-1", parse_key_file(
                    f'[[key]]\nsha256 = "{hash_key(KEY)}"\ntenant = "team"\ntokens_per_minute = 1000000\n'))
                gateway.server.gateway.set_tenancy(gate)
            return await asyncio.wait_for(scenario(gateway, servers[0], gate), 60)
        finally:
            await gateway.close()
            await servers[0].stop()
    return asyncio.run(main())


async def server_usage(gw, server, path: str, body: dict) -> dict:
    """The server's usage for `body`, asked of the server directly (the mock answers the same body the same way)."""
    status, _, raw = await gw.post(path, {**body, "stream": False}, base=server.base_url)
    assert status == 200, raw
    return json.loads(raw)["usage"]


def test_a_tenants_tokens_are_the_servers_usage_streamed_or_not():
    async def scenario(gw, server, gate):
        chat = {"model": "mock-model", "messages": CHAT, "max_tokens": 6}
        completion = {"model": "mock-model", "prompt": "one two three", "max_tokens": 5, "n": 2}
        for path, api, body in (("/v1/chat/completions", "chat", chat), ("/v1/completions", "completions",
                                                                          completion)):
            usage = await server_usage(gw, server, path, body)
            before = tokens_counted(gate)
            async with gw.http.post(gw.url + path, json={**body, "stream": True}, headers=AUTH) as response:
                raw = await response.read()
            assert response.status == 200, raw
            events = [json.loads(block[6:]) for block in raw.decode().split("\n\n")
                      if block.startswith("data: {")]
            # The gateway asked for usage; the client did not, so it sees none of it (not even "usage": null).
            assert not [e for e in events if "usage" in e], events
            asked = server.generation_requests()[-1].body
            assert asked["stream_options"] == {"include_usage": True}
            relayed = sum(1 for e in events for c in e["choices"] if (c.get("delta") or {}).get("content")
                          or c.get("text"))
            assert tokens_counted(gate) - before == usage["total_tokens"]
            # What the gateway would count without the server's usage (its routing key's words + the content it
            # relayed) differs: the test tells the two apart.
            assert len(affinity_key(api, body).split()) + relayed != usage["total_tokens"]

        # The client asked for usage itself: it gets the server's, and the tenant is counted the same.
        usage = await server_usage(gw, server, "/v1/chat/completions", chat)
        before = tokens_counted(gate)
        async with gw.http.post(gw.url + "/v1/chat/completions", headers=AUTH,
                                json={**chat, "stream": True, "stream_options": {"include_usage": True}}) as resp:
            raw = await resp.read()
        reported = [json.loads(b[6:]) for b in raw.decode().split("\n\n") if b.startswith("data: {")]
        assert [e["usage"] for e in reported if e.get("usage")] == [usage]
        assert tokens_counted(gate) - before == usage["total_tokens"]

        # Not streamed: the usage in the body.
        before = tokens_counted(gate)
        async with gw.http.post(gw.url + "/v1/completions", json=completion, headers=AUTH) as resp:
            body = await resp.json()
        assert resp.status == 200 and "stream_options" not in server.generation_requests()[-1].body
        assert tokens_counted(gate) - before == body["usage"]["total_tokens"] == (
            await server_usage(gw, server, "/v1/completions", completion))["total_tokens"]
    run(scenario)


def test_without_keys_the_gateway_asks_the_server_for_nothing_more():
    async def scenario(gw, server, gate):
        answer = await stream(gw.http, gw.url + "/v1/chat/completions",
                              {"model": "mock-model", "messages": CHAT, "max_tokens": 3})
        assert answer.status == 200 and answer.done_count == 1
        assert "stream_options" not in server.generation_requests()[-1].body
        assert not [e for e in answer.events if isinstance(e, dict) and "usage" in e]
    run(scenario, keys=False)
