"""Upstream faults through the gateway (item 6 of issue 12), each against deterministic mock servers: the client
gets the uninterrupted answer -- no piece duplicated or missing, in order, one [DONE] -- or a clear error; a
continuation goes to another server exactly once, and only where it can be exact."""

import asyncio
import json

import pytest
from upstream_stack import run_against_mocks, stream

from llmgw.testing.mock_openai import Fault, FaultKind, expected_text, render_chat
from llmgw.upstream.backends import Backend
from llmgw.upstream.capabilities import BackendKind

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count sheep."}]
MAX = 12


def run(scenario, **options):
    """Two mock servers behind a gateway that gives up on a silent stream after 0.5 s (the faults stall it)."""
    return run_against_mocks(scenario, mocks=2, models_for=2, inter_token_timeout_s=0.5, **options)


async def serving(gw, servers, path, body):
    """The mock the gateway sends `body` to (found with one clean request; affinity keeps it there)."""
    clean = {k: v for k, v in body.items() if k != "stream_options"}  # only valid on a stream
    status, headers, _ = await gw.post(path, {**clean, "stream": False})
    assert status == 200
    by_id = {Backend(s.base_url).id: s for s in servers}
    chosen = by_id[headers["X-LLMGW-Replica"]]
    for server in servers:
        server.reset()
    return chosen, next(s for s in servers if s is not chosen)


def completion(prompt="The sheep"):
    return {"model": "mock-model", "prompt": prompt, "max_tokens": MAX, "temperature": 0}


def chat(**fields):
    return {"model": "mock-model", "messages": CHAT, "max_tokens": MAX, "temperature": 0, **fields}


MID_STREAM = [Fault(FaultKind.RESET, after_chunks=4), Fault(FaultKind.MALFORMED, after_chunks=3),
              Fault(FaultKind.NO_DONE, after_chunks=5), Fault(FaultKind.TRUNCATED, after_chunks=2),
              Fault(FaultKind.ERROR_EVENT, after_chunks=6), Fault(FaultKind.STALL, after_chunks=3, stall_seconds=10)]


@pytest.mark.parametrize("fault", MID_STREAM, ids=lambda f: f.kind.value)
def test_a_completion_broken_mid_stream_continues_exactly_once_elsewhere(fault):
    async def scenario(gw, servers):
        body = completion()
        first, other = await serving(gw, servers, "/v1/completions", body)
        first.inject(fault)
        answer = await stream(gw.http, gw.url + "/v1/completions", body)
        assert answer.status == 200 and answer.done_count == 1 and answer.events[-1] == "[DONE]"
        assert answer.text(False) == expected_text("The sheep", MAX)
        sent = fault.after_chunks
        (continued,) = other.generation_requests()
        assert continued.body["prompt"] == "The sheep" + expected_text("The sheep", sent)
        assert continued.body["max_tokens"] == MAX - sent
        assert len({e["id"] for e in answer.events if isinstance(e, dict)}) == 1
        finishes = [c["finish_reason"] for e in answer.events if isinstance(e, dict) for c in e["choices"]
                    if c.get("finish_reason")]
        assert finishes == ["length"]
    run(scenario)


@pytest.mark.parametrize("fault", MID_STREAM[:3], ids=lambda f: f.kind.value)
def test_a_chat_broken_mid_stream_continues_from_the_partial_message(fault):
    async def scenario(gw, servers):
        body = chat()
        first, other = await serving(gw, servers, "/v1/chat/completions", body)
        first.inject(fault)
        answer = await stream(gw.http, gw.url + "/v1/chat/completions", body)
        assert answer.done_count == 1 and answer.text(True) == expected_text(render_chat(CHAT), MAX)
        roles = [c["delta"].get("role") for e in answer.events if isinstance(e, dict) for c in e["choices"]]
        assert roles.count("assistant") == 1  # the continuation's opening role delta is not repeated
        (continued,) = other.generation_requests()
        sent_text = expected_text(render_chat(CHAT), fault.after_chunks)
        assert continued.body["messages"] == CHAT + [{"role": "assistant", "content": sent_text}]
        assert continued.body["continue_final_message"] is True and continued.body["add_generation_prompt"] is False
    run(scenario)


def test_usage_after_a_continuation_counts_the_text_already_sent_as_completion():
    async def scenario(gw, servers):
        body = {**completion(), "stream_options": {"include_usage": True}}
        first, _ = await serving(gw, servers, "/v1/completions", body)
        first.inject(Fault(FaultKind.RESET, after_chunks=5))
        answer = await stream(gw.http, gw.url + "/v1/completions", body)
        (usage,) = [e["usage"] for e in answer.events if isinstance(e, dict) and e.get("usage")]
        assert usage == {"prompt_tokens": 2, "completion_tokens": MAX, "total_tokens": MAX + 2}
    run(scenario)


@pytest.mark.parametrize("fault", [Fault(FaultKind.SERVER_ERROR, status=503), Fault(FaultKind.SERVER_ERROR,
                                                                                    status=500)],
                         ids=["503", "500"])
def test_a_5xx_before_anything_was_sent_is_retried_whole_elsewhere(fault):
    async def scenario(gw, servers):
        for path, body, chat_api in (("/v1/completions", completion(), False), ("/v1/chat/completions", chat(),
                                                                                 True)):
            first, other = await serving(gw, servers, path, body)
            first.inject(fault)
            answer = await stream(gw.http, gw.url + path, body)
            assert answer.done_count == 1
            assert answer.text(chat_api) == expected_text(render_chat(CHAT) if chat_api else "The sheep", MAX)
            assert other.generation_requests()[0].body == {**body, "stream": True}  # the request, unchanged
            first.inject(fault)
            status, _, raw = await gw.post(path, body)  # non-streamed: the whole answer from the other server
            assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == MAX
    run(scenario)


def test_429_goes_to_another_server_and_its_retry_after_is_honoured():
    async def scenario(gw, servers):
        body = completion()
        first, other = await serving(gw, servers, "/v1/completions", body)
        first.inject(Fault(FaultKind.RATE_LIMIT, retry_after="2"))
        answer = await stream(gw.http, gw.url + "/v1/completions", body)
        assert answer.done_count == 1 and answer.text(False) == expected_text("The sheep", MAX)
        assert len(first.generation_requests()) == 1 and len(other.generation_requests()) == 1
        for _ in range(3):  # within Retry-After, the limited server gets nothing, affinity or not
            status, _, _ = await gw.post("/v1/completions", body)
            assert status == 200
        assert len(first.generation_requests()) == 1
        await asyncio.sleep(2.2)
        status, headers, _ = await gw.post("/v1/completions", body)
        assert status == 200 and headers["X-LLMGW-Replica"] == Backend(first.base_url).id
    run(scenario)


def test_a_refused_connection_fails_over():
    dead = Backend("http://127.0.0.1:9", models=("mock-model",), models_configured=True)  # discard port: refused

    async def scenario(gw, servers):
        for k in range(6):
            prompt = f"refused {k}"
            answer = await stream(gw.http, gw.url + "/v1/completions", completion(prompt))
            assert answer.done_count == 1 and answer.text(False) == expected_text(prompt, MAX)
    run(scenario, extra_upstreams=[dead])


def test_where_no_exact_continuation_exists_the_stream_ends_with_a_retryable_error():
    async def scenario(gw, servers):
        for body, why in ((chat(logprobs=True), "logprobs"), (completion() | {"temperature": 0.8, "seed": 3},
                                                               "seeded")):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            first, other = await serving(gw, servers, path, body)
            first.inject(Fault(FaultKind.RESET, after_chunks=3))
            answer = await stream(gw.http, gw.url + path, body)
            assert answer.status == 200 and answer.done_count == 0  # truncated, and says so
            error = answer.events[-1]["error"]
            assert error["code"] == "unavailable" and why in error["message"] and "retry" in error["message"]
            assert answer.text("messages" in body) == expected_text(
                render_chat(CHAT) if "messages" in body else "The sheep", 3)  # what was sent, nothing spliced
            assert other.generation_requests() == []
    run(scenario)


def test_a_server_kind_that_cannot_prefill_ends_a_broken_chat_with_an_error():
    async def scenario(gw, servers):
        body = chat()
        first, other = await serving(gw, servers, "/v1/chat/completions", body)
        first.inject(Fault(FaultKind.RESET, after_chunks=2))
        answer = await stream(gw.http, gw.url + "/v1/chat/completions", body)
        assert answer.done_count == 0 and "cannot continue" in answer.events[-1]["error"]["message"]
        assert other.generation_requests() == []  # no continuation was attempted
        # Completions continue on the same kind of server: the prompt carries the text.
        first, _ = await serving(gw, servers, "/v1/completions", completion())
        first.inject(Fault(FaultKind.RESET, after_chunks=2))
        answer = await stream(gw.http, gw.url + "/v1/completions", completion())
        assert answer.done_count == 1 and answer.text(False) == expected_text("The sheep", MAX)
    run(scenario, kind=BackendKind.OPENAI_COMPATIBLE)


def test_every_server_failing_is_a_clear_error_not_a_hang():
    async def scenario(gw, servers):
        for server in servers:
            server.inject(Fault(FaultKind.SERVER_ERROR, status=502), times=5)
        status, _, raw = await gw.post("/v1/completions", completion())
        error = json.loads(raw)["error"]
        assert status == 503 and "502" in error["message"]
    run(scenario)
