"""OpenAI front over plain HTTP (aiohttp client): bodies, streams, headers and every error case, against real
in-process replicas and a real Gateway."""

import asyncio
import json
import logging

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from test_http_server import FakeMember, run_stack, wait_for

from llmgw.gateway import DeadlineExceeded, Gateway, InvalidArgument, ResourceExhausted, Unavailable
from llmgw.http.openai_api import (
    ApiError,
    count_prompt_tokens,
    decode_json_body,
    from_gateway_error,
    parse_chat_body,
    parse_completion_body,
    parse_hedge_header,
    render_chat_prompt,
)
from llmgw.replica import Faults

CAP = 100


def tokens(n, start=0):
    return [f"token_{i}" for i in range(start, start + n)]


def sse_events(text):
    """The data payloads of an SSE body, in order ("[DONE]" kept as a string)."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def assert_error_shape(body, code=None):
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code


# ---- pure parsing -----------------------------------------------------------------------------------------------
def test_completion_body_parses_with_defaults_and_extensions():
    p = parse_completion_body({"model": "m", "prompt": "hi"}, max_tokens_cap=CAP)
    assert (p.kind, p.prompt, p.max_tokens, p.stream, p.include_usage, p.hedge) == ("completion", "hi", 16,
                                                                                     False, False, False)
    p = parse_completion_body({"model": "m", "prompt": ["one"], "max_tokens": 7, "stream": True,
                               "stream_options": {"include_usage": True}, "hedge": True, "timeout_s": 2.5,
                               "user": "alice", "temperature": 0.2, "stop": ["\n"]}, max_tokens_cap=CAP)
    assert (p.prompt, p.max_tokens, p.stream, p.include_usage, p.hedge, p.timeout_s, p.client_id) == (
        "one", 7, True, True, True, 2.5, "alice")


@pytest.mark.parametrize("body, param", [
    ([], None),
    ({"prompt": "x"}, "model"),
    ({"model": 3, "prompt": "x"}, "model"),
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": 5}, "prompt"),
    ({"model": "m", "prompt": ""}, "prompt"),
    ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "m", "prompt": [[1, 2]]}, "prompt"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": CAP + 1}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": 2.0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "m", "prompt": "x", "n": 2}, "n"),
    ({"model": "m", "prompt": "x", "echo": True}, "echo"),
    ({"model": "m", "prompt": "x", "logprobs": 3}, "logprobs"),
    ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "m", "prompt": "x", "hedge": 1}, "hedge"),
    ({"model": "m", "prompt": "x", "timeout_s": -1}, "timeout_s"),
    ({"model": "m", "prompt": "x", "stop": 3}, "stop"),
])
def test_completion_body_rejects_bad_input_naming_the_field(body, param):
    with pytest.raises(ApiError) as err:
        parse_completion_body(body, max_tokens_cap=CAP)
    assert err.value.status == 400 and err.value.param == param


def test_chat_template_renders_roles_and_keeps_the_prefix_of_a_growing_conversation():
    turn1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert render_chat_prompt(turn1) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    turn2 = turn1 + [{"role": "assistant", "content": "hello"},
                     {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "you"}]}]
    p1 = parse_chat_body({"model": "m", "messages": turn1}, max_tokens_cap=CAP).prompt
    p2 = parse_chat_body({"model": "m", "messages": turn2, "max_completion_tokens": 3}, max_tokens_cap=CAP)
    assert p2.prompt.startswith(p1[: -len("<|assistant|>\n")] + "<|assistant|>\nhello\n")
    assert p2.prompt.endswith("<|user|>\nand you\n<|assistant|>\n") and p2.max_tokens == 3
    assert render_chat_prompt([{"role": "assistant", "content": None}]) == "<|assistant|>\n\n<|assistant|>\n"


@pytest.mark.parametrize("messages, param", [
    (None, "messages"),
    ([], "messages"),
    ("hi", "messages"),
    (["hi"], "messages[0]"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
    ([{"role": "user", "content": "x", "name": 5}], "messages[0].name"),
])
def test_chat_body_rejects_bad_messages(messages, param):
    body = {"model": "m"} if messages is None else {"model": "m", "messages": messages}
    with pytest.raises(ApiError) as err:
        parse_chat_body(body, max_tokens_cap=CAP)
    assert err.value.status == 400 and err.value.param == param


def test_small_helpers():
    assert count_prompt_tokens("  a b\nc  ") == 3
    assert parse_hedge_header(None) is None
    assert parse_hedge_header(" TRUE ") is True and parse_hedge_header("0") is False
    with pytest.raises(ApiError):
        parse_hedge_header("maybe")
    with pytest.raises(ApiError, match="UTF-8"):
        decode_json_body(b'{"a": "\xc3\x28"}')
    with pytest.raises(ApiError, match="JSON"):
        decode_json_body(b"{nope")
    with pytest.raises(ApiError, match="deeply"):
        decode_json_body(b"[" * 100_000)
    mapped = {type(e).__name__: from_gateway_error(e) for e in (
        InvalidArgument("x"), ResourceExhausted("x", retry_after_s=2.2), Unavailable("x"), DeadlineExceeded("x"))}
    assert {k: v.status for k, v in mapped.items()} == {"InvalidArgument": 400, "ResourceExhausted": 429,
                                                        "Unavailable": 503, "DeadlineExceeded": 504}
    assert mapped["ResourceExhausted"].headers == {"Retry-After": "3"}


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                               max_size=3), max_leaves=12)
FIELDS = st.sampled_from(["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "stream",
                          "stream_options", "n", "hedge", "timeout_s", "user", "stop", "temperature", "role",
                          "content", "echo", "logprobs"])


@settings(max_examples=examples(300), deadline=None)
@given(st.dictionaries(FIELDS, JSON, max_size=8) | JSON)
def test_any_json_body_is_either_valid_or_a_400_never_a_crash(body):
    for parse in (parse_completion_body, parse_chat_body):
        try:
            p = parse(body, max_tokens_cap=CAP)
        except ApiError as err:
            assert err.status == 400 and err.message
        else:
            assert isinstance(p.prompt, str) and p.prompt and 1 <= p.max_tokens <= CAP
            assert isinstance(p.stream, bool) and isinstance(p.hedge, bool)


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                       "content": st.text(max_size=20)}), min_size=1, max_size=6),
       st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                       "content": st.text(max_size=20)}), min_size=1, max_size=4))
def test_a_longer_conversation_always_extends_the_shorter_prompt(history, more):
    short = render_chat_prompt(history)
    longer = render_chat_prompt(history + more)
    assert longer.startswith(short[: -len("<|assistant|>\n")])


# ---- over HTTP ----------------------------------------------------------------------------------------------------
def test_completion_non_streaming_body_headers_and_usage():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start()
        async with s.session.post("/v1/completions", json={"model": "v1", "prompt": "say it twice", "max_tokens": 5},
                                  headers={"X-Request-Id": "req-42"}) as resp:
            body = await resp.json()
            assert resp.status == 200
            assert resp.headers["X-Request-Id"] == "req-42" and resp.headers["X-LLMGW-Replica"] == "r1"
        assert body["id"] == "cmpl-req-42" and body["object"] == "text_completion" and body["model"] == "v1"
        assert body["choices"] == [{"index": 0, "text": "".join(tokens(5)), "logprobs": None,
                                    "finish_reason": "length"}]
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}

    run_stack(scenario)


def test_completion_stream_is_sse_ending_with_usage_and_done():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start()
        async with s.session.post("/v1/completions", json={
                "model": "v1", "prompt": "stream me", "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True}}) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["X-LLMGW-Replica"] == "r1" and len(resp.headers["X-Request-Id"]) == 32
            events = sse_events(await resp.text())
        assert events[-1] == "[DONE]"
        chunks, usage_chunk = events[:-2], events[-2]
        assert [c["choices"][0]["text"] for c in chunks] == tokens(4)
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
        assert all(c["usage"] is None and c["object"] == "text_completion" for c in chunks)
        assert len({c["id"] for c in events[:-1]}) == 1
        assert usage_chunk["choices"] == [] and usage_chunk["usage"] == {
            "prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}

    run_stack(scenario)


def test_chat_stream_and_body_and_a_growing_conversation_keeps_its_replica():
    async def scenario(s):
        for rid in ("r1", "r2", "r3"):
            await s.add_replica(rid, token_delay_ms=1)
        await s.start()
        conversation = [{"role": "system", "content": "You are a helpful assistant. " * 4},
                        {"role": "user", "content": "Tell me about gateways."}]
        async with s.session.post("/v1/chat/completions", json={
                "model": "v1", "messages": conversation, "max_tokens": 3, "stream": True}) as resp:
            assert resp.status == 200
            first_replica = resp.headers["X-LLMGW-Replica"]
            events = sse_events(await resp.text())
        assert events[-1] == "[DONE]"
        deltas = [e["choices"][0]["delta"] for e in events[:-1]]
        assert deltas == [{"role": "assistant", "content": "token_0"}, {"content": "token_1"},
                          {"content": "token_2"}]
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert all(e["object"] == "chat.completion.chunk" and "usage" not in e for e in events[:-1])
        for turn in range(3):
            conversation += [{"role": "assistant", "content": f"answer {turn}"},
                             {"role": "user", "content": f"and then {turn}?"}]
            async with s.session.post("/v1/chat/completions", json={
                    "model": "v1", "messages": conversation, "max_completion_tokens": 2}) as resp:
                body = await resp.json()
                assert resp.status == 200 and resp.headers["X-LLMGW-Replica"] == first_replica
            assert body["object"] == "chat.completion"
            assert body["choices"][0]["message"] == {"role": "assistant", "content": "token_0token_1"}
            assert body["usage"]["completion_tokens"] == 2
            assert body["usage"]["prompt_tokens"] == count_prompt_tokens(render_chat_prompt(conversation))

    run_stack(scenario)


def test_hedge_flag_from_body_or_header_reaches_the_gateway():
    class RecordingGateway(Gateway):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.seen = []

        async def infer(self, request):
            self.seen.append(request)
            async for event in super().infer(request):
                yield event

    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start(gateway_cls=RecordingGateway)
        for body_hedge, header, expected in [(None, None, False), (True, None, True), (None, "1", True),
                                             (False, "true", True), (None, "0", False)]:
            body = {"model": "v1", "prompt": "h", "max_tokens": 1, "user": "u7", "timeout_s": 9}
            if body_hedge is not None:
                body["hedge"] = body_hedge
            headers = {"X-LLMGW-Hedge": header} if header is not None else {}
            async with s.session.post("/v1/completions", json=body, headers=headers) as resp:
                assert resp.status == 200
            req = s.gateway.seen[-1]
            assert (req.hedge, req.client_id, req.timeout_s) == (expected, "u7", 9)
        async with s.session.post("/v1/completions", json={"model": "v1", "prompt": "h"},
                                  headers={"X-LLMGW-Hedge": "sometimes"}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["param"] == "X-LLMGW-Hedge"

    run_stack(scenario)


def test_bad_input_is_400_in_openai_error_shape():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start(gateway={"max_tokens_cap": 50, "max_prompt_bytes": 1000}, client_max_size=4000)
        cases = [
            (b"{not json", "invalid_json"),
            (b'{"model": "m", "prompt": "\xff\xfe"}', "invalid_utf8"),
            (json.dumps({"model": "m", "prompt": "x" * 5000}).encode(), "body_too_large"),
            (json.dumps({"model": "m", "prompt": "x" * 1001}).encode(), "invalid_argument"),  # gateway's check
            (json.dumps({"model": "m", "prompt": "x", "max_tokens": 51}).encode(), None),
            (json.dumps({"model": "m", "prompt": "x", "max_tokens": 0}).encode(), None),
            (json.dumps({"model": "m", "prompt": ["a", "b"]}).encode(), None),
            (json.dumps({"model": "m", "prompt": "\ud800 lone surrogate"}).encode(), "invalid_argument"),
            (json.dumps({"prompt": "x"}).encode(), "missing_required_parameter"),
        ]
        for raw, code in cases:
            async with s.session.post("/v1/completions", data=raw,
                                      headers={"Content-Type": "application/json"}) as resp:
                body = await resp.json()
                assert resp.status == 400, (raw[:60], body)
                assert_error_shape(body, code)
                assert resp.headers["X-Request-Id"]
        async with s.session.post("/v1/chat/completions", json={"model": "m", "messages": []}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["param"] == "messages"
        assert s.replicas["r1"].served_total == 0

    run_stack(scenario)


def test_queue_full_and_queue_timeout_are_429_with_retry_after():
    async def scenario(s):
        rep = await s.add_replica("r1", capacity=1, token_delay_ms=50)
        await s.start(gateway={"queue_size": 1, "queue_timeout_s": 0.3})
        hog = asyncio.create_task(s.session.post("/v1/completions", json={"model": "m", "prompt": "hog",
                                                                          "max_tokens": 20}))
        await wait_for(lambda: rep.active == 1, what="the hog to run")
        queued = asyncio.create_task(s.session.post("/v1/completions", json={"model": "m", "prompt": "waits",
                                                                             "max_tokens": 1}))
        await wait_for(lambda: s.gateway.queued == 1, what="a waiter")
        async with s.session.post("/v1/completions", json={"model": "m", "prompt": "full", "stream": True}) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "1"
            assert_error_shape(await resp.json(), "resource_exhausted")
        async with await queued as resp:  # waited 0.3 s in the queue, then gave up
            assert resp.status == 429 and resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["type"] == "rate_limit_error"
        async with await hog as resp:
            assert resp.status == 200

    run_stack(scenario)


def test_no_routable_replica_is_503_and_deadline_is_504():
    async def scenario(s):
        rep = await s.add_replica("slow", token_delay_ms=200)
        await s.start()
        async with s.session.post("/v1/completions", json={"model": "m", "prompt": "late", "max_tokens": 20,
                                                           "timeout_s": 0.3}) as resp:
            assert resp.status == 504
            assert_error_shape(await resp.json(), "deadline_exceeded")
        s.membership.set(FakeMember("slow", rep.grpc_address, state="dead"), "dead")
        await wait_for(lambda: not s.gateway.view.routable(), what="the replica to leave routing")
        for path, body in [("/v1/completions", {"model": "m", "prompt": "x"}),
                           ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                     "stream": True})]:
            async with s.session.post(path, json=body) as resp:
                assert resp.status == 503
                assert_error_shape(await resp.json(), "unavailable")
        await wait_for(lambda: s.gateway.in_flight == {}, what="the timed-out stream to be released")

    run_stack(scenario)


def test_a_stream_that_fails_over_mid_way_delivers_each_token_exactly_once():
    async def scenario(s):
        stall = Faults(stall_after=3)  # every replica goes silent after 3 tokens of a stream
        await s.add_replica("r1", token_delay_ms=5, faults=stall)
        await s.add_replica("r2", token_delay_ms=5, faults=stall)
        await s.start(gateway={"inter_token_timeout_s": 0.3})
        async with s.session.post("/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "fail over"}], "max_tokens": 6,
                "stream": True}) as resp:
            assert resp.status == 200
            first_replica = resp.headers["X-LLMGW-Replica"]
            events = sse_events(await resp.text())
        assert events[-1] == "[DONE]"
        assert [e["choices"][0]["delta"]["content"] for e in events[:-1]] == tokens(6)
        assert first_replica in ("r1", "r2") and s.gateway.stats.failovers_total == 1

    run_stack(scenario)


def test_mid_stream_failure_ends_with_an_error_event_and_no_done():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=5, faults=Faults(stall_after=3))
        await s.start(gateway={"max_attempts": 1, "inter_token_timeout_s": 0.2})
        async with s.session.post("/v1/completions", json={"model": "m", "prompt": "doomed", "max_tokens": 10,
                                                           "stream": True}) as resp:
            assert resp.status == 200
            events = sse_events(await resp.text())
        assert [e["choices"][0]["text"] for e in events[:-1]] == tokens(3)
        assert "[DONE]" not in events
        assert_error_shape(events[-1], "unavailable")
        assert s.gateway.in_flight == {}

    run_stack(scenario)


def test_client_disconnect_mid_stream_frees_the_replica_slot():
    async def scenario(s):
        # The replica goes silent after one token: nothing will be written to the dead connection, so only the
        # handler's cancellation on disconnect can free the slot before the 5 s inter-token timeout.
        rep = await s.add_replica("r1", token_delay_ms=5, faults=Faults(stall_after=1))
        await s.start(gateway={"inter_token_timeout_s": 5.0})
        resp = await s.session.post("/v1/completions", json={"model": "m", "prompt": "bye", "max_tokens": 100,
                                                             "stream": True})
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert b"token_0" in first and rep.active == 1
        resp.close()  # drop the connection mid-stream
        await wait_for(lambda: rep.active == 0 and s.gateway.in_flight == {}, 2.0, "the slot to be freed")
        assert rep.served_total == 0  # the stream was cut, not finished

    run_stack(scenario)


def test_client_disconnect_while_queued_leaves_the_queue():
    async def scenario(s):
        rep = await s.add_replica("r1", capacity=1, token_delay_ms=30)
        await s.start()
        hog = await s.session.post("/v1/completions", json={"model": "m", "prompt": "hog", "max_tokens": 200,
                                                            "stream": True})  # runs for 6 s
        await wait_for(lambda: rep.active == 1, what="the hog")
        waiter = asyncio.create_task(s.session.post("/v1/completions", json={"model": "m", "prompt": "q",
                                                                             "stream": True}))
        await wait_for(lambda: s.gateway.queued == 1, what="the waiter to queue")
        waiter.cancel()
        await wait_for(lambda: s.gateway.queued == 0, 2.0, "the queue to empty")
        assert rep.active == 1 and s.gateway.in_flight == {"r1": 1}  # only the hog: the waiter left, unserved
        hog.close()
        await wait_for(lambda: rep.active == 0 and s.gateway.in_flight == {}, 5.0, "everything released")
        with pytest.raises(asyncio.CancelledError):
            await waiter

    run_stack(scenario)


def test_models_lists_versions_of_live_replicas_only():
    async def scenario(s):
        await s.add_replica("a", token_delay_ms=1, version="v1")
        await s.add_replica("b", token_delay_ms=1, version="v1")
        c = await s.add_replica("c", token_delay_ms=1, version="v2")
        await s.add_replica("d", token_delay_ms=1, version="v3")
        s.membership.set(FakeMember("d", s.replicas["d"].grpc_address, model_version="v3", state="dead"), "dead")
        s.membership.set(FakeMember("gateway-9", "127.0.0.1:1", role="gateway", model_version="gw"))
        s.membership.set(FakeMember("c", c.grpc_address, model_version="v2", state="suspect"))
        await s.start()
        async with s.session.get("/v1/models") as resp:
            body = await resp.json()
        assert body["object"] == "list"
        assert [(m["id"], m["object"], m["owned_by"], m["replicas"]) for m in body["data"]] == [
            ("v1", "model", "llmgw", 2), ("v2", "model", "llmgw", 1)]

    run_stack(scenario)


def test_metrics_and_one_request_log_line(caplog):
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start()
        with caplog.at_level(logging.INFO, logger="llmgw.http.openai"):
            async with s.session.post("/v1/completions", json={"model": "m", "prompt": "count me",
                                                               "max_tokens": 3, "stream": True}) as resp:
                await resp.read()
            async with s.session.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 0}) as resp:
                assert resp.status == 400
        async with s.session.get("/metrics") as resp:
            text = await resp.text()
        assert 'llmgw_gateway_requests_total{outcome="ok"} 1.0' in text
        assert 'llmgw_gateway_requests_total{outcome="invalid_argument"} 1.0' in text
        assert "llmgw_gateway_tokens_streamed_total 3.0" in text
        assert "llmgw_gateway_ttft_seconds_count 1.0" in text
        assert "llmgw_gateway_inter_token_seconds_count 2.0" in text
        lines = [r for r in caplog.records if r.name == "llmgw.http.openai" and r.getMessage() == "request"]
        assert [(r.outcome, r.status, r.tokens, r.replicas, r.prompt_chars) for r in lines] == [
            ("ok", 200, 3, ["r1"], 8), ("invalid_argument", 400, 0, [], 0)]
        assert lines[0].ttft_ms > 0 and lines[1].ttft_ms is None

    run_stack(scenario)


# ---- body read timeout (slowloris; docs/reliability.md finding 7) ----------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), "30", True, None])
def test_body_timeout_must_be_a_finite_positive_number(bad):
    from llmgw.http.openai_api import OpenAIApi

    with pytest.raises(ValueError, match="body_timeout_s"):
        OpenAIApi(object(), body_timeout_s=bad)


def test_a_slow_body_within_the_timeout_is_served_and_a_stalled_one_gets_408_and_a_closed_connection():
    async def post_in_pieces(port, pieces, pause_s):
        body = json.dumps({"model": "v1", "prompt": "slow but steady", "max_tokens": 2}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            step = -(-len(body) // pieces)
            for i in range(0, len(body), step):
                writer.write(body[i:i + step])
                await writer.drain()
                await asyncio.sleep(pause_s)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            return head, await asyncio.wait_for(reader.read(4096), 10)
        finally:
            writer.close()

    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start(body_timeout_s=0.8)
        head, _body = await post_in_pieces(s.front.port, 4, 0.1)  # 0.4 s in all: inside the limit
        assert head.startswith(b"HTTP/1.1 200"), head
        # Half the body, then silence: 408 at the limit and the server closes (EOF after the answer).
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", s.front.port)
        try:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\"")
            started = loop.time()
            answer = await asyncio.wait_for(reader.read(-1), 10)  # until EOF
            elapsed = loop.time() - started
        finally:
            writer.close()
        status, _, rest = answer.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 408"), answer[:200]
        assert_error_shape(json.loads(rest.split(b"\r\n\r\n", 1)[1]), "body_timeout")
        assert 0.75 <= elapsed < 3.0, elapsed
        # The front keeps serving.
        async with s.session.post("/v1/completions", json={"model": "v1", "prompt": "after", "max_tokens": 2}) as resp:
            assert resp.status == 200

    run_stack(scenario)



class SocketWrites:
    """What the HTTP front hands its transports, write by write, to tell headers that left with the first events
    from headers that left alone: the lean front's writes (completion routes) and aiohttp's StreamWriter's two ways
    to the socket (everything else), wrapped."""

    def __init__(self, monkeypatch):
        from aiohttp.http_writer import StreamWriter

        from llmgw.http.lean_front import LeanConnection

        self.writes = []
        write, writelines, lean_write = StreamWriter._write, StreamWriter._writelines, LeanConnection.write

        def recorded_write(writer, chunk):
            self.writes.append(bytes(chunk))
            write(writer, chunk)

        def recorded_writelines(writer, chunks):
            chunks = list(chunks)
            self.writes.append(b"".join(chunks))
            writelines(writer, chunks)

        def recorded_lean_write(connection, data):
            self.writes.append(bytes(data))
            lean_write(connection, data)

        monkeypatch.setattr(StreamWriter, "_write", recorded_write)
        monkeypatch.setattr(StreamWriter, "_writelines", recorded_writelines)
        monkeypatch.setattr(LeanConnection, "write", recorded_lean_write)

    def gateway_answers(self):
        """The writes that carried a gateway's response headers (its replica header marks them)."""
        return [w for w in self.writes if b"\r\nx-llmgw-replica: " in w.lower()]


def first_recv_of_a_stream(port, body):
    """POST `body` to the chat endpoint on a raw socket, from a thread of its own blocked in recv() before the answer
    starts: the first recv() returns what the first write carried (or more, if the next write came quickly)."""
    import socket

    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
        return sock.recv(65536)


def assert_headers_left_with_the_first_event(first_recv, writes):
    head, sep, rest = first_recv.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and sep and b"text/event-stream" in head.lower(), first_recv
    assert rest, "the headers left alone, in a write of their own"
    size, _, chunk = rest.partition(b"\r\n")
    assert int(size, 16) > 0 and chunk.startswith(b"data: {"), first_recv
    # Deterministically, whatever the timing of the client's recv(): the write with the headers has the events.
    assert writes and all(b"\r\n\r\n" in w and b"data: {" in w.partition(b"\r\n\r\n")[2] for w in writes), writes


def test_a_streamed_answer_sends_its_headers_in_one_write_with_the_first_event(monkeypatch):
    writes = SocketWrites(monkeypatch)

    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=200)  # the first token comes late: the client waits in recv()
        await s.start()
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 2}
        for _ in range(3):
            first = await asyncio.wait_for(asyncio.to_thread(first_recv_of_a_stream, s.front.port, body), 30)
            assert_headers_left_with_the_first_event(first, writes.gateway_answers())
        assert len(writes.gateway_answers()) == 3

    run_stack(scenario)
