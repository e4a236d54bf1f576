"""Acceptance of issue 12 against a real model server no one here wrote: three llama-cpp-python servers serving a
tiny random-weight GGUF model, behind the gateway (`--upstream URL` alone: each learns its model from /v1/models).

Through the gateway, answers equal the direct ones (streamed and whole, chat and completions, greedy and seeded,
stop / max_tokens / logprobs); SIGKILL of the serving server mid-stream leaves the client with the uninterrupted
text, byte for byte, in order, with one [DONE] (completions, and chat: the model's template leaves a final
assistant message open, so the server continues it).
"""

import asyncio
import json
import os
import subprocess

import pytest
from upstream_stack import UpstreamStack, parse_sse, stream

from llmgw.testing.llamacpp import REPO_ROOT, LlamaCppServer, find_llamacpp_python
from llmgw.upstream.backends import Backend
from llmgw.upstream.capabilities import BackendKind, ChatPrefill

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
CHAT = [{"role": "system", "content": "You are tiny."}, {"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    subprocess.run([find_llamacpp_python(), "-m", "llmgw.testing.tiny_gguf", str(path)], check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True)
    return path


@pytest.fixture(scope="module")
def servers(model_path):
    started = []
    try:
        for _ in range(3):
            server = LlamaCppServer(model_path, alias="tiny")
            server.start()
            started.append(server)
        yield started
    finally:
        for server in started:
            server.stop()


def run(servers, scenario, timeout=240):
    upstreams = [Backend(s.base_url, kind=BackendKind.LLAMACPP, chat_prefill=ChatPrefill.OPEN_TEMPLATE)
                 for s in servers if s.pid is not None]

    async def main():
        gateway = UpstreamStack(upstreams, first_token_timeout_s=30.0, inter_token_timeout_s=10.0)
        try:
            await gateway.start()
            return await asyncio.wait_for(scenario(gateway), timeout)
        finally:
            await gateway.close()
    return asyncio.run(main())


def without_volatile(body):
    """An answer minus what differs between two runs of the same request (the id, the creation time)."""
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def test_answers_through_the_gateway_equal_the_direct_ones(servers):
    direct = servers[0].base_url
    cases = [
        ("/v1/completions", {"model": "tiny", "prompt": "Hello world", "max_tokens": 40, **GREEDY}),
        ("/v1/completions", {"model": "tiny", "prompt": "Seeded", "max_tokens": 40, "temperature": 0.9,
                             "seed": 1234}),
        ("/v1/completions", {"model": "tiny", "prompt": "Stop here", "max_tokens": 60, "stop": ["e", "a"],
                             **GREEDY}),
        ("/v1/completions", {"model": "tiny", "prompt": "Logprobs", "max_tokens": 8, "logprobs": 2, **GREEDY}),
        ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 30, **GREEDY}),
        ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 30, "temperature": 1.0,
                                  "top_k": 20, "seed": 99}),
    ]

    async def scenario(gw):
        for path, body in cases:
            status, _, via = await gw.post(path, body)
            _, _, mine = await gw.post(path, body, base=direct)
            assert status == 200, via
            via, mine = json.loads(via), json.loads(mine)
            assert without_volatile(via) == without_volatile(mine), path  # text, finish_reason, logprobs, usage
            chat = "messages" in body
            streamed = await stream(gw.http, gw.url + path, body)
            streamed_direct = await stream(gw.http, direct + path, body)
            assert streamed.done_count == 1 and streamed.text(chat) == streamed_direct.text(chat)
            assert [without_volatile(e) for e in streamed.events if isinstance(e, dict)] == \
                [without_volatile(e) for e in streamed_direct.events if isinstance(e, dict)]
            whole = via["choices"][0]["message"]["content"] if chat else via["choices"][0]["text"]
            assert streamed.text(chat) == whole
    run(servers, scenario)


def test_usage_is_the_servers_and_a_stream_without_it_gets_the_gateways_count(servers):
    async def scenario(gw):
        body = {"model": "tiny", "prompt": "Count me", "max_tokens": 17, **GREEDY}
        _, _, whole = await gw.post("/v1/completions", body)
        assert json.loads(whole)["usage"]["completion_tokens"] == 17
        streamed = await stream(gw.http, gw.url + "/v1/completions",
                                {**body, "stream_options": {"include_usage": True}})
        (usage_event,) = [e for e in streamed.events if isinstance(e, dict) and e.get("usage")]
        assert usage_event["usage"]["completion_tokens"] == 17 and usage_event["llmgw_usage"] == "gateway_count"
        assert usage_event["choices"] == [] and streamed.events[-1] == "[DONE]"
    run(servers, scenario)


async def killed_mid_stream(gw, servers, path, body, after_events):
    """Stream `body` through the gateway, SIGKILL the serving server after `after_events` events; the raw answer."""
    assert gw.http is not None
    async with gw.http.post(gw.url + path, json={**body, "stream": True}) as response:
        assert response.status == 200
        serving = response.headers["X-LLMGW-Replica"]
        victim = next(s for s in servers if Backend(s.base_url).id == serving)
        raw = b""
        while raw.count(b"\n\n") < after_events:
            part = await response.content.readany()
            assert part, "the stream ended before the kill"
            raw += part
        victim.kill()
        raw += await response.content.read()
    return raw, victim


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_sigkill_of_the_serving_server_mid_stream_leaves_the_answer_byte_exact(servers, path):
    chat = path == "/v1/chat/completions"
    if chat:
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 600, **GREEDY}
    else:
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 600, **GREEDY}

    async def scenario(gw):
        uninterrupted = await stream(gw.http, gw.url + path, body)
        assert uninterrupted.done_count == 1
        failovers = gw.server.gateway.stats.failovers_total
        raw, victim = await killed_mid_stream(gw, servers, path, body, after_events=12)
        events = parse_sse(raw)
        assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
        got = "".join((c.get("delta") or {}).get("content") or "" if chat else c.get("text") or ""
                      for e in events if isinstance(e, dict) for c in e["choices"])
        assert got == uninterrupted.text(chat)  # byte for byte, in order
        assert gw.server.gateway.stats.failovers_total == failovers + 1  # the answer really crossed servers
        assert victim.pid is not None
        return victim

    victim = run(servers, scenario)
    victim.stop()  # reaped; the next test's gateway lists only the servers still running


def test_the_killed_servers_are_gone_and_the_rest_still_serve(servers):
    alive = [s for s in servers if s.pid is not None]
    assert len(alive) == 1

    async def scenario(gw):
        status, headers, _ = await gw.post("/v1/completions", {"model": "tiny", "prompt": "still", "max_tokens": 4})
        assert status == 200 and headers["X-LLMGW-Replica"] == Backend(alive[0].base_url).id
    run(alive, scenario)

