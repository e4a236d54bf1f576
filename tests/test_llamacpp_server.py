"""A real model server no one here wrote: llama-cpp-python's, serving a tiny random-weight GGUF model.

These facts are what the gateway's failover rests on (and what llmgw.upstream.capabilities says of llama.cpp):
temperature 0 is deterministic; generated text re-tokenizes to the same tokens; a completion continued from a
prefix of its own output (prompt + text so far, max_tokens reduced, repeat_penalty 1.0) equals the uninterrupted
text byte for byte, across two server processes and after SIGKILL mid-stream; chat prefill works with a template
that leaves the final assistant message open; streams carry no usage; there is no /health.

The server's Python comes from $LLMGW_LLAMACPP_PYTHON or the repository's .venv-llamacpp (`make llamacpp`); the
model is written with that Python too (it has `gguf`), so the test environment needs neither package.
"""

import asyncio
import os
import subprocess

import aiohttp
import pytest

from llmgw.testing.llamacpp import REPO_ROOT, LlamaCppServer, find_llamacpp_python
from llmgw.upstream.capabilities import ChatPrefill, capabilities_for
from llmgw.upstream.client import Endpoint, UpstreamClient, UpstreamTimeouts
from llmgw.upstream.errors import FailureKind, UpstreamError
from llmgw.upstream.fidelity import CannotContinue, continuation_body, prepare_request

pytestmark = pytest.mark.slow

LLAMACPP = capabilities_for("llamacpp").with_chat_prefill(ChatPrefill.OPEN_TEMPLATE)
TIMEOUTS = UpstreamTimeouts(connect=5, first_byte=60, idle=30)
PROMPTS = ["Hello world", "The quick brown fox", "x", "0123456789" * 4]
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    subprocess.run([find_llamacpp_python(), "-m", "llmgw.testing.tiny_gguf", str(path)], check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True)
    assert 200_000 < path.stat().st_size < 1_000_000
    return path


@pytest.fixture(scope="module")
def server(model_path):
    with LlamaCppServer(model_path, alias="tiny") as running:
        yield running


def run(scenario, timeout=240):
    async def main():
        async with UpstreamClient(timeouts=TIMEOUTS) as client:
            return await asyncio.wait_for(scenario(client), timeout)
    return asyncio.run(main())


async def stream_pieces(client, url, endpoint, body, *, stop_after=None):
    stream = await client.open_stream(url, endpoint, {**body, "stream": True})
    pieces, finish = [], None
    async for chunk in stream:
        for choice in chunk.data["choices"]:
            piece = choice.get("text") if endpoint is Endpoint.COMPLETIONS else choice["delta"].get("content")
            if piece:
                pieces.append(piece)
            finish = choice.get("finish_reason") or finish
        if stop_after is not None and len(pieces) >= stop_after:
            stream.cancel()
            break
    return pieces, finish


def chat(prompt, **fields):
    return {"model": "tiny", "messages": [{"role": "system", "content": "You are tiny."},
                                          {"role": "user", "content": prompt}], **fields}


def test_temperature_zero_is_deterministic_and_streamed_equals_whole(server):
    async def scenario(client):
        results = []
        for prompt in PROMPTS:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 40, **GREEDY}
            first, finish = await stream_pieces(client, server.base_url, Endpoint.COMPLETIONS, body)
            second, _ = await stream_pieces(client, server.base_url, Endpoint.COMPLETIONS, body)
            whole = await client.complete(server.base_url, Endpoint.COMPLETIONS, body)
            chat_first, _ = await stream_pieces(client, server.base_url, Endpoint.CHAT, chat(prompt, max_tokens=30,
                                                                                            **GREEDY))
            chat_whole = await client.complete(server.base_url, Endpoint.CHAT, chat(prompt, max_tokens=30, **GREEDY))
            results.append((first, finish, second, whole.data, chat_first, chat_whole.data))
        return results

    answers = set()
    for first, finish, second, whole, chat_first, chat_whole in run(scenario):
        assert first == second and len(first) == 40 and finish == "length"
        assert whole["choices"][0]["text"] == "".join(first)
        assert whole["usage"]["completion_tokens"] == 40
        assert chat_whole["choices"][0]["message"]["content"] == "".join(chat_first) and len(chat_first) == 30
        answers.add("".join(first))
    assert len(answers) == len(PROMPTS)  # different prompts, different answers: the model is not constant


def test_generated_text_retokenizes_exactly(server):
    async def scenario(client):
        async with aiohttp.ClientSession() as http:
            checks = []
            for prompt in PROMPTS:
                pieces, _ = await stream_pieces(client, server.base_url, Endpoint.COMPLETIONS,
                                                {"model": "tiny", "prompt": prompt, "max_tokens": 48, **GREEDY})
                tokens = []
                for piece in pieces:  # each streamed piece is one generated token
                    async with http.post(server.base_url + "/extras/tokenize",
                                         json={"input": piece, "model": "tiny"}) as response:
                        tokens.append((await response.json())["tokens"])
                async with http.post(server.base_url + "/extras/tokenize",
                                     json={"input": "".join(pieces), "model": "tiny"}) as response:
                    whole = (await response.json())["tokens"]
                checks.append((pieces, tokens, whole))
            return checks

    for pieces, tokens, whole in run(scenario):
        bos = whole[0]
        assert all(len(t) == 2 and t[0] == bos for t in tokens), tokens  # BOS + exactly one token per piece
        assert whole[1:] == [t[1] for t in tokens]  # the whole text tokenizes to the same sequence
        assert all(piece.isascii() and piece.isprintable() for piece in pieces)


def test_completion_continued_from_its_own_prefix_is_byte_exact(server):
    async def scenario(client):
        failures = []
        for prompt in PROMPTS:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 64, **GREEDY}
            full, _ = await stream_pieces(client, server.base_url, Endpoint.COMPLETIONS, body)
            for k in (1, 7, 32, 63):
                continued = continuation_body(body, Endpoint.COMPLETIONS, sent_text="".join(full[:k]),
                                              sent_tokens=k, capabilities=LLAMACPP)
                assert continued["prompt"] == prompt + "".join(full[:k]) and continued["max_tokens"] == 64 - k
                rest, finish = await stream_pieces(client, server.base_url, Endpoint.COMPLETIONS, continued)
                if "".join(full[:k] + rest) != "".join(full) or finish != "length":
                    failures.append((prompt, k))
        return failures

    assert run(scenario) == []


def test_chat_prefill_continuation_is_byte_exact(server):
    async def scenario(client):
        failures = []
        for prompt in PROMPTS:
            body = chat(prompt, max_tokens=48, **GREEDY)
            full, _ = await stream_pieces(client, server.base_url, Endpoint.CHAT, body)
            for k in (1, 20, 47):
                for capabilities in (LLAMACPP, capabilities_for("vllm")):
                    # llama.cpp ignores vLLM's continue_final_message fields; the open template does the work.
                    continued = continuation_body(body, Endpoint.CHAT, sent_text="".join(full[:k]), sent_tokens=k,
                                                  capabilities=capabilities)
                    rest, _ = await stream_pieces(client, server.base_url, Endpoint.CHAT, continued)
                    if "".join(full[:k] + rest) != "".join(full):
                        failures.append((prompt, k, capabilities.kind))
        return failures

    assert run(scenario) == []


def test_default_repeat_penalty_breaks_continuations_which_is_why_fidelity_refuses_it(server):
    body = {"model": "tiny", "max_tokens": 64, "temperature": 0}  # repeat_penalty absent: the server's 1.1
    with pytest.raises(CannotContinue, match=r"repeat_penalty = 1\.1"):
        continuation_body({**body, "prompt": "p"}, Endpoint.COMPLETIONS, sent_text="a", sent_tokens=1,
                          capabilities=LLAMACPP)

    async def scenario(client):
        differing = 0
        for prompt in PROMPTS:
            full, _ = await stream_pieces(client, server.base_url, Endpoint.COMPLETIONS, {**body, "prompt": prompt})
            naive = {**body, "prompt": prompt + "".join(full[:32]), "max_tokens": 32}
            rest, _ = await stream_pieces(client, server.base_url, Endpoint.COMPLETIONS, naive)
            differing += "".join(full[:32] + rest) != "".join(full)
        return differing

    assert run(scenario) > 0


def test_streams_carry_no_usage_and_there_is_no_health_endpoint(server):
    async def scenario(client):
        prepared = prepare_request({"prompt": "u", "max_tokens": 4, "stream": True}, upstream_model="tiny",
                                   need_usage=True)
        assert prepared.body["stream_options"] == {"include_usage": True}
        stream = await client.open_stream(server.base_url, Endpoint.COMPLETIONS, prepared.body)
        chunks = [c.data async for c in stream]
        health, _ = await client.get(server.base_url, "/health")
        metrics, _ = await client.get(server.base_url, "/metrics")
        models = await client.list_models(server.base_url)
        return chunks, health, metrics, models.data

    chunks, health, metrics, models = run(scenario)
    assert not any(c.get("usage") for c in chunks)  # stream_options is ignored
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert (health, metrics) == (404, 404)
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_quirks_the_gateway_must_know(server):
    """Validation errors are HTTP 500 (not 4xx), n > 1 is ignored, any model name is accepted and echoed."""
    async def scenario(client):
        with pytest.raises(UpstreamError) as invalid:
            await client.complete(server.base_url, Endpoint.CHAT, {"model": "tiny", "messages": "not a list"})
        several = await client.complete(server.base_url, Endpoint.COMPLETIONS,
                                        {"model": "tiny", "prompt": "n", "n": 2, "max_tokens": 2, **GREEDY})
        renamed = await client.complete(server.base_url, Endpoint.COMPLETIONS,
                                        {"model": "no-such-model", "prompt": "n", "max_tokens": 2, **GREEDY})
        return invalid.value, several.data, renamed.data

    invalid, several, renamed = run(scenario)
    assert (invalid.kind, invalid.status) == (FailureKind.SERVER_ERROR, 500)
    assert b"validation error" in invalid.body
    assert len(several["choices"]) == 1
    assert renamed["model"] == "no-such-model"
    assert renamed["choices"][0]["text"] == several["choices"][0]["text"]


def test_a_second_request_does_not_cut_a_running_stream(server):
    async def scenario(client):
        long_body = {"model": "tiny", "prompt": "long", "max_tokens": 300, **GREEDY}
        expected, _ = await stream_pieces(client, server.base_url, Endpoint.COMPLETIONS, long_body)
        stream = await client.open_stream(server.base_url, Endpoint.COMPLETIONS, {**long_body, "stream": True})
        pieces = []
        short = None
        async for chunk in stream:
            pieces.append(chunk.data["choices"][0]["text"])
            if len(pieces) == 5:
                short = asyncio.create_task(client.complete(
                    server.base_url, Endpoint.COMPLETIONS, {"model": "tiny", "prompt": "s", "max_tokens": 3}))
        return expected, "".join(pieces), (await short).data

    expected, streamed, short = run(scenario)
    assert streamed == "".join(expected)
    assert short["usage"]["completion_tokens"] == 3


def test_without_the_launcher_flag_a_second_request_truncates_a_stream_that_still_ends_with_done(model_path):
    """Why LlamaCppServer passes --interrupt_requests False: with the server's default, a new request cuts a
    running stream, which then ends with data: [DONE] and no finish_reason -- the client reports INCOMPLETE."""
    with LlamaCppServer(model_path, alias="tiny", extra_args=("--interrupt_requests", "True")) as interrupting:
        async def scenario(client):
            body = {"model": "tiny", "prompt": "long", "max_tokens": 300, "stream": True, **GREEDY}
            stream = await client.open_stream(interrupting.base_url, Endpoint.COMPLETIONS, body)
            received = 0
            short = None
            with pytest.raises(UpstreamError) as truncated:
                async for _ in stream:
                    received += 1
                    if received == 5:
                        short = asyncio.create_task(client.complete(
                            interrupting.base_url, Endpoint.COMPLETIONS, {"prompt": "s", "max_tokens": 3}))
            await short
            return truncated.value, received

        error, received = run(scenario)
    assert error.kind is FailureKind.INCOMPLETE and "finish_reason" in error.detail
    assert 5 <= received < 300


def test_failover_after_sigkill_mid_stream_is_byte_exact(model_path, server):
    """The gateway's failover at the upstream level: a server dies mid-stream (SIGKILL); the text received so far
    is continued on another server process; the client's text equals the uninterrupted answer."""
    cases = [(Endpoint.COMPLETIONS, {"model": "tiny", "prompt": "Failover", "max_tokens": 200, **GREEDY}),
             (Endpoint.CHAT, chat("Failover", max_tokens=200, **GREEDY))]
    with LlamaCppServer(model_path, alias="tiny") as doomed_completions, \
            LlamaCppServer(model_path, alias="tiny") as doomed_chat:
        doomed = {Endpoint.COMPLETIONS: doomed_completions, Endpoint.CHAT: doomed_chat}

        async def scenario(client):
            results = []
            for endpoint, body in cases:
                victim = doomed[endpoint]
                uninterrupted, _ = await stream_pieces(client, server.base_url, endpoint, body)
                stream = await client.open_stream(victim.base_url, endpoint, {**body, "stream": True})
                received = []
                with pytest.raises(UpstreamError) as broken:
                    async for chunk in stream:
                        choice = chunk.data["choices"][0]
                        piece = choice.get("text") if endpoint is Endpoint.COMPLETIONS else \
                            choice["delta"].get("content")
                        if piece:
                            received.append(piece)
                        if len(received) == 50:
                            victim.kill()
                continued = continuation_body(body, endpoint, sent_text="".join(received),
                                              sent_tokens=len(received), capabilities=LLAMACPP)
                rest, finish = await stream_pieces(client, server.base_url, endpoint, continued)
                with pytest.raises(UpstreamError) as refused:
                    await client.open_stream(victim.base_url, endpoint, {**body, "stream": True})
                results.append((endpoint, uninterrupted, received, rest, finish, broken.value.kind,
                                refused.value.kind))
            return results

        for endpoint, uninterrupted, received, rest, finish, kind, refused in run(scenario):
            assert kind is FailureKind.RESET, endpoint  # the chunked body ends mid-transfer
            assert refused is FailureKind.CONNECT
            assert 50 <= len(received) < 200
            assert "".join(received + rest) == "".join(uninterrupted), endpoint
            assert finish == "length"


def test_the_tiny_model_file_is_reproducible(model_path, tmp_path):
    again = tmp_path / "again.gguf"
    subprocess.run([find_llamacpp_python(), "-m", "llmgw.testing.tiny_gguf", str(again)], check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True)
    assert again.read_bytes() == model_path.read_bytes()
