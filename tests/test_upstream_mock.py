"""The deterministic mock OpenAI server, checked through the upstream client."""

import asyncio
import json
import subprocess
import sys

import aiohttp
import pytest

from llmgw.testing.mock_openai import Fault, FaultKind, MockOpenAIServer, expected_text, render_chat, token_stream
from llmgw.upstream.capabilities import capabilities_for
from llmgw.upstream.client import Endpoint, UpstreamClient, UpstreamTimeouts
from llmgw.upstream.errors import FailureKind, UpstreamError
from llmgw.upstream.fidelity import continuation_body, continued_usage

VLLM = capabilities_for("vllm")


def run(scenario, **options):
    async def main():
        async with MockOpenAIServer(**options) as mock, UpstreamClient() as client:
            return await asyncio.wait_for(scenario(mock, client), timeout=60)
    return asyncio.run(main())


async def stream_pieces(client, url, endpoint, body):
    stream = await client.open_stream(url, endpoint, {**body, "stream": True})
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        usage = chunk.data.get("usage") or usage
        for choice in chunk.data["choices"]:
            piece = choice.get("text") if endpoint is Endpoint.COMPLETIONS else choice["delta"].get("content")
            if piece:
                pieces.append(piece)
            finish = choice.get("finish_reason") or finish
    return pieces, finish, usage


def test_tokens_depend_only_on_the_text_so_far():
    tokens = [t for t, _, _ in zip_n(token_stream("Hello"), 20)]
    assert len(set(tokens)) > 5 and all(t.startswith(" ") and " " not in t[1:] for t in tokens)
    for k in range(20):
        assert [t for t, _, _ in zip_n(token_stream("Hello" + "".join(tokens[:k])), 20 - k)] == tokens[k:]
    assert expected_text("Hello", 20) == "".join(tokens)
    assert expected_text("Hellp", 20) != expected_text("Hello", 20)


def zip_n(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("endpoint", [Endpoint.COMPLETIONS, Endpoint.CHAT])
def test_a_continuation_from_any_point_yields_the_rest(endpoint):
    body = ({"model": "mock-model", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
            if endpoint is Endpoint.COMPLETIONS else
            {"model": "mock-model", "messages": [{"role": "system", "content": "Be terse."},
                                                 {"role": "user", "content": "Hi"}], "max_tokens": 12,
             "temperature": 0})

    async def scenario(mock, client):
        full, finish, usage = await stream_pieces(client, mock.base_url, endpoint,
                                                  {**body, "stream_options": {"include_usage": True}})
        again, _, _ = await stream_pieces(client, mock.base_url, endpoint, body)
        assert again == full and len(full) == 12 and finish == "length"
        whole = await client.complete(mock.base_url, endpoint, body)
        results = []
        for k in range(1, 12):
            continued = continuation_body(body, endpoint, sent_text="".join(full[:k]), sent_tokens=k,
                                          capabilities=VLLM)
            rest, rest_finish, rest_usage = await stream_pieces(
                client, mock.base_url, endpoint, {**continued, "stream_options": {"include_usage": True}})
            results.append((k, rest, rest_finish, rest_usage))
        return full, usage, whole.data, results

    full, usage, whole, results = run(scenario)
    choice = whole["choices"][0]
    assert (choice.get("text") or choice.get("message", {}).get("content")) == "".join(full)
    assert whole["usage"] == usage
    for k, rest, finish, rest_usage in results:
        assert full[:k] + rest == full, k
        assert finish == "length"
        assert continued_usage(rest_usage, sent_tokens=k) == usage


def test_chat_rendering_and_prefill_rules():
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " partial"}]

    async def scenario(mock, client):
        # A closed final assistant message (no continue_final_message) starts a new assistant turn, as in vLLM.
        closed = await client.complete(mock.base_url, Endpoint.CHAT, {"messages": messages, "max_tokens": 3})
        opened = await client.complete(mock.base_url, Endpoint.CHAT, {
            "messages": messages, "max_tokens": 3, "continue_final_message": True, "add_generation_prompt": False})
        with pytest.raises(UpstreamError) as both:
            await client.complete(mock.base_url, Endpoint.CHAT, {"messages": messages,
                                                                 "continue_final_message": True})
        return closed.data, opened.data, both.value

    closed, opened, both = run(scenario)
    assert closed["choices"][0]["message"]["content"] == expected_text(render_chat(messages), 3)
    assert opened["choices"][0]["message"]["content"] == expected_text(render_chat(messages[:1]) + " partial", 3)
    assert both.kind is FailureKind.CLIENT_ERROR and b"add_generation_prompt" in both.body


def test_n_logprobs_tool_calls_and_natural_stops():
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]

    async def scenario(mock, client):
        several = await client.complete(mock.base_url, Endpoint.COMPLETIONS, {"prompt": "a", "n": 3,
                                                                             "max_tokens": 4, "logprobs": 1})
        stream = await client.open_stream(mock.base_url, Endpoint.CHAT, {
            "messages": [{"role": "user", "content": "call it"}], "tools": tools, "stream": True,
            "tool_choice": {"type": "function", "function": {"name": "lookup"}}, "max_tokens": 3, "logprobs": True})
        tool_chunks = [c.data async for c in stream]
        stopping = await client.complete(mock.base_url, Endpoint.COMPLETIONS, {"prompt": "b", "max_tokens": 500})
        return several.data, tool_chunks, stopping.data

    several, tool_chunks, stopping = run(scenario, stop_probability=0.2)
    texts = [c["text"] for c in several["choices"]]
    assert [c["index"] for c in several["choices"]] == [0, 1, 2] and len(set(texts)) == 3
    assert all(c["logprobs"]["tokens"] and all(lp <= 0 for lp in c["logprobs"]["token_logprobs"])
               for c in several["choices"])
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in tool_chunks if "tool_calls" in
             c["choices"][0].get("delta", {})]
    assert calls[0]["function"]["name"] == "lookup" and calls[0]["id"] == "call_0"
    assert all("name" not in call["function"] for call in calls[1:])
    assert tool_chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(c["choices"][0]["logprobs"]["content"] for c in tool_chunks[1:-1])
    # With a stop probability the answer ends by itself, deterministically, before max_tokens.
    assert stopping["choices"][0]["finish_reason"] == "stop"
    assert stopping["usage"]["completion_tokens"] < 500


def test_invalid_requests_get_openai_errors():
    cases = [
        (Endpoint.CHAT, {"messages": "hi"}, 400, "messages"),
        (Endpoint.CHAT, {"messages": [{"content": "x"}]}, 400, "role"),
        (Endpoint.COMPLETIONS, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        (Endpoint.COMPLETIONS, {"prompt": "x", "stream": "yes"}, 400, "stream"),
        (Endpoint.COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "Stream options"),
        (Endpoint.COMPLETIONS, {"prompt": "x", "n": 0}, 400, "n must be"),
        (Endpoint.COMPLETIONS, {"prompt": "x", "model": "gpt-5"}, 404, "does not exist"),
    ]

    async def scenario(mock, client):
        errors = []
        for endpoint, body, _, _ in cases:
            with pytest.raises(UpstreamError) as caught:
                await client.complete(mock.base_url, endpoint, body)
            errors.append(caught.value)
        with pytest.raises(UpstreamError) as not_json:
            await client.complete(mock.base_url, Endpoint.COMPLETIONS, b"{oops")
        return errors, not_json.value

    errors, not_json = run(scenario)
    for (_, _, status, words), error in zip(cases, errors, strict=True):
        assert error.status == status and words in json.loads(error.body)["error"]["message"]
    assert not_json.status == 400


def test_faults_and_records_over_http_for_other_processes():
    async def scenario(mock, client):
        base = mock.base_url
        await client.complete(base, Endpoint.COMPLETIONS, {"prompt": "first", "max_tokens": 1})
        async with aiohttp.ClientSession() as session:
            return await control(session, mock, client)

    async def control(session, mock, client):
        base = mock.base_url
        async with session.post(base + "/mock/faults", json={"kind": "rate_limit", "retry_after": "3",
                                                             "times": 2}) as response:
            assert (await response.json()) == {"queued": 2}
        async with session.post(base + "/mock/faults", json={"kind": "no-such-fault"}) as response:
            assert response.status == 400
        kinds = []
        for _ in range(3):
            try:
                await client.complete(base, Endpoint.COMPLETIONS, {"prompt": "x", "max_tokens": 1})
                kinds.append(None)
            except UpstreamError as exc:
                kinds.append((exc.kind, exc.retry_after))
        async with session.get(base + "/mock/requests") as response:
            listed = await response.json()
        async with session.post(base + "/mock/reset") as response:
            assert response.status == 200
        return kinds, listed, len(mock.requests), len(mock.faults)

    kinds, listed, remaining, faults = run(scenario)
    assert kinds == [(FailureKind.RATE_LIMITED, 3.0)] * 2 + [None]
    assert [r["body"]["prompt"] for r in listed if r["path"] == "/v1/completions"] == ["first", "x", "x", "x"]
    assert remaining == 0 and faults == 0


def test_constructor_validation():
    with pytest.raises(ValueError):
        MockOpenAIServer(models=())
    with pytest.raises(ValueError):
        MockOpenAIServer(token_delay=-1)
    with pytest.raises(ValueError):
        MockOpenAIServer(stop_probability=2)
    with pytest.raises(ValueError):
        Fault.from_json({"kind": "nope"})


def test_runs_as_a_process():
    process = subprocess.Popen([sys.executable, "-m", "llmgw.testing.mock_openai", "--port", "0", "--model", "m1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")

        async def check():
            async with UpstreamClient() as client:
                models = await client.list_models(url)
                answer = await client.complete(url, Endpoint.COMPLETIONS, {"model": "m1", "prompt": "z",
                                                                           "max_tokens": 2})
                return models.data, answer.data
        models, answer = asyncio.run(asyncio.wait_for(check(), 30))
        assert [m["id"] for m in models["data"]] == ["m1"]
        assert answer["choices"][0]["text"] == expected_text("z", 2)
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()


@pytest.mark.parametrize(("fault", "kind"), [
    (FaultKind.RESET, FailureKind.RESET),
    (FaultKind.MALFORMED, FailureKind.MALFORMED),
    (FaultKind.STALL, FailureKind.TIMEOUT_FIRST_BYTE),  # a non-streamed answer's headers never come
])
def test_faults_on_a_non_streamed_request(fault, kind):
    async def scenario(mock, client):
        mock.inject(Fault(fault))
        with pytest.raises(UpstreamError) as caught:
            await client.complete(mock.base_url, Endpoint.COMPLETIONS, {"prompt": "x"},
                                  timeouts=UpstreamTimeouts(first_byte=0.5))
        return caught.value

    assert run(scenario).kind is kind
