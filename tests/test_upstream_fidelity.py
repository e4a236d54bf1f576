"""The body rules: only gateway-owned fields change, in requests and in chunks; continuation is exact or refused."""

import copy

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from llmgw.upstream.capabilities import CAPABILITIES, UNKNOWN, BackendKind, ChatPrefill, capabilities_for
from llmgw.upstream.client import Endpoint
from llmgw.upstream.fidelity import (
    GATEWAY_OWNED_REQUEST_FIELDS,
    AnswerComplete,
    CannotContinue,
    continuation_body,
    continued_usage,
    prepare_request,
    rewrite_chunk,
    rewrite_response,
)

VLLM = capabilities_for(BackendKind.VLLM)
LLAMACPP = capabilities_for("llamacpp")
LLAMACPP_OPEN = LLAMACPP.with_chat_prefill(ChatPrefill.OPEN_TEMPLATE)

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {
    "q": {"type": "string"}}}}}]

# Every field a client may send that the gateway must not touch, with a non-default value.
PASSTHROUGH = {
    "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 1234, "stop": ["\n\n", "END"],
    "presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.15, "repeat_penalty": 1.2,
    "logit_bias": {"50256": -100, "13": 2.5}, "n": 3, "logprobs": True, "top_logprobs": 5, "tools": TOOLS,
    "tool_choice": {"type": "function", "function": {"name": "lookup"}}, "parallel_tool_calls": False,
    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    "user": "user-42", "max_tokens": 77, "max_completion_tokens": 66, "echo": False, "suffix": "tail",
    "best_of": 1, "ignore_eos": True, "min_tokens": 3, "skip_special_tokens": False,
    "chat_template_kwargs": {"enable_thinking": False}, "x_vendor_field": {"nested": [1, {"deep": None}]},
    "metadata": {"trace": "abc"},
}


def chat_request(**fields):
    return {"model": "alias", "messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hello"}], **fields}


@pytest.mark.parametrize("field", sorted(PASSTHROUGH))
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("need_usage", [True, False])
def test_every_client_field_passes_through_unchanged(field, stream, need_usage):
    client = chat_request(stream=stream, **{field: PASSTHROUGH[field]})
    original = copy.deepcopy(client)
    prepared = prepare_request(client, upstream_model="org/real-model-7b", need_usage=need_usage)
    assert client == original  # the input is never modified
    assert prepared.body[field] == PASSTHROUGH[field]
    assert prepared.body["messages"] == client["messages"]
    assert prepared.body["model"] == "org/real-model-7b"
    changed = {k for k in prepared.body if prepared.body.get(k) != client.get(k)}
    assert changed <= {"model", "stream_options"}
    assert all(k.split(".")[0] in {f.split(".")[0] for f in GATEWAY_OWNED_REQUEST_FIELDS} for k in changed)


def test_all_passthrough_fields_together_and_completions_prompt():
    client = {"model": "alias", "prompt": "Once upon", "stream": True, **PASSTHROUGH}
    prepared = prepare_request(client, upstream_model="m", need_usage=False)
    assert prepared.body == {**client, "model": "m"}
    assert not prepared.usage_added


@pytest.mark.parametrize(("stream", "options", "need_usage", "expected_options", "added"), [
    (True, None, True, {"include_usage": True}, True),
    (True, {"continuous_usage_stats": True}, True, {"continuous_usage_stats": True, "include_usage": True}, True),
    (True, {"include_usage": False}, True, {"include_usage": True}, True),
    (True, {"include_usage": True}, True, {"include_usage": True}, False),  # the client asked: it gets it
    (True, None, False, None, False),
    (False, None, True, None, False),  # non-streamed answers always carry usage; vLLM refuses the option here
    (True, "not-an-object", True, "not-an-object", False),  # the client's own mistake: the server answers it
])
def test_stream_options_include_usage(stream, options, need_usage, expected_options, added):
    client = chat_request(stream=stream)
    if options is not None:
        client["stream_options"] = options
    prepared = prepare_request(client, upstream_model="m", need_usage=need_usage)
    assert prepared.body.get("stream_options") == expected_options
    assert prepared.usage_added is added
    if isinstance(options, dict):
        assert client["stream_options"] == options  # copied, not modified


def test_prepare_request_rejects_bad_arguments():
    with pytest.raises(TypeError):
        prepare_request([], upstream_model="m", need_usage=False)
    with pytest.raises(ValueError):
        prepare_request({}, upstream_model="", need_usage=False)


# --- chunks -----------------------------------------------------------------------------------------------------

CHUNKS = [
    {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "org/real", "system_fingerprint": "fp",
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}]},
    {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "org/real",
     "choices": [{"index": 0, "delta": {"content": "Hi", "reasoning_content": "hmm"},
                  "logprobs": {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
                                            "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": None}]}]},
                  "finish_reason": None, "stop_reason": None}], "vendor_extra": {"k": [1, 2]}},
    {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "org/real",
     "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                        "function": {"name": "lookup", "arguments": "{\"q"}}]},
                  "finish_reason": None}]},
    {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "org/real",
     "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls", "stop_reason": 128008}],
     "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
    {"id": "cmpl-up", "object": "text_completion", "created": 1, "model": "org/real",
     "choices": [{"index": 0, "text": " world", "logprobs": {"tokens": [" world"], "token_logprobs": [-0.5]},
                  "finish_reason": None}]},
]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunks_change_only_id_and_model(chunk):
    original = copy.deepcopy(chunk)
    out = rewrite_chunk(chunk, response_id="chatcmpl-stable", client_model="alias", drop_usage=False)
    assert chunk == original
    assert out == {**chunk, "id": "chatcmpl-stable", "model": "alias"}


def test_an_unchanged_chunk_is_returned_as_is_so_its_bytes_can_pass_through():
    chunk = {"id": "same", "model": "alias", "choices": [{"index": 0, "delta": {"content": "x"}}]}
    assert rewrite_chunk(chunk, response_id="same", client_model="alias", drop_usage=False) is chunk
    no_ids = {"choices": []}  # fields that are absent are not added
    assert rewrite_chunk(no_ids, response_id="r", client_model="a", drop_usage=False) is no_ids


def test_usage_the_gateway_added_is_not_forwarded():
    usage_only = {"id": "u", "model": "m", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                                                     "total_tokens": 3}}
    with_null = {"id": "u", "model": "m", "choices": [{"index": 0, "delta": {"content": "a"}}], "usage": None}
    assert rewrite_chunk(usage_only, response_id="r", client_model="a", drop_usage=True) is None
    assert rewrite_chunk(with_null, response_id="r", client_model="a", drop_usage=True) == {
        "id": "r", "model": "a", "choices": [{"index": 0, "delta": {"content": "a"}}]}
    # The client asked for usage itself: everything is forwarded as the server wrote it.
    assert rewrite_chunk(usage_only, response_id="r", client_model="a", drop_usage=False) == {
        **usage_only, "id": "r", "model": "a"}
    assert rewrite_chunk(with_null, response_id="r", client_model="a", drop_usage=False)["usage"] is None
    # Usage riding on a chunk with choices is the server's own: kept even when dropping.
    final = CHUNKS[3]
    assert rewrite_chunk(final, response_id="r", client_model="a", drop_usage=True)["usage"] == final["usage"]


def test_non_streamed_answer():
    body = {"id": "up", "object": "chat.completion", "model": "org/real", "usage": {"prompt_tokens": 1},
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x", "tool_calls": []},
                         "finish_reason": "stop"}], "prompt_logprobs": None, "kv_transfer_params": None}
    assert rewrite_response(body, response_id="r", client_model="alias") == {**body, "id": "r", "model": "alias"}


def test_continued_usage_moves_sent_tokens_back_to_completion():
    assert continued_usage({"prompt_tokens": 15, "completion_tokens": 5, "total_tokens": 20, "x": 1},
                           sent_tokens=10) == {"prompt_tokens": 5, "completion_tokens": 15, "total_tokens": 20, "x": 1}
    assert continued_usage({"prompt_tokens": 5}, sent_tokens=3) == {"prompt_tokens": 5}  # incomplete: untouched


# --- continuation -----------------------------------------------------------------------------------------------

def test_completions_continuation():
    client = {"model": "alias", "prompt": "Once upon", "max_tokens": 20, "temperature": 0, "stop": ["."],
              "logit_bias": {"5": 1}, "x_vendor": 1, "stream": True, "repeat_penalty": 1.0}
    body = continuation_body(client, Endpoint.COMPLETIONS, sent_text=" a time", sent_tokens=2, capabilities=LLAMACPP)
    assert body == {**client, "prompt": "Once upon a time", "max_tokens": 18}
    assert client["prompt"] == "Once upon"
    single = {**client, "prompt": ["Once upon"]}
    assert continuation_body(single, Endpoint.COMPLETIONS, sent_text="!", sent_tokens=1,
                             capabilities=LLAMACPP)["prompt"] == "Once upon!"


def test_nothing_sent_is_a_plain_retry_even_when_continuing_would_be_refused():
    client = chat_request(n=2, logprobs=True, seed=1, temperature=1.0)
    assert continuation_body(client, Endpoint.CHAT, sent_text="", sent_tokens=0, capabilities=LLAMACPP) == client


def test_default_max_tokens_of_the_server_is_made_explicit_or_left_alone():
    client = {"prompt": "p", "temperature": 0, "repeat_penalty": 1.0}
    body = continuation_body(client, Endpoint.COMPLETIONS, sent_text="ab", sent_tokens=2, capabilities=LLAMACPP)
    assert body["max_tokens"] == 14  # llama.cpp's completions default is 16
    chat = chat_request(temperature=0)
    body = continuation_body(chat, Endpoint.CHAT, sent_text="ab", sent_tokens=2, capabilities=VLLM)
    assert "max_tokens" not in body and "max_completion_tokens" not in body  # until end of sequence, as before
    generic = capabilities_for("openai")
    assert generic.default_completion_max_tokens == UNKNOWN
    with pytest.raises(CannotContinue, match="default is unknown"):
        continuation_body(client, Endpoint.COMPLETIONS, sent_text="ab", sent_tokens=2, capabilities=generic)


def test_chat_continuation_vllm_style():
    client = chat_request(max_completion_tokens=50, max_tokens=60, min_tokens=5, temperature=0, tools=TOOLS,
                          tool_choice="auto", top_k=3)
    body = continuation_body(client, Endpoint.CHAT, sent_text="Hi the", sent_tokens=2, capabilities=VLLM)
    assert body == {**client, "messages": [*client["messages"], {"role": "assistant", "content": "Hi the"}],
                    "max_completion_tokens": 48, "max_tokens": 58, "min_tokens": 3,
                    "continue_final_message": True, "add_generation_prompt": False}
    assert len(client["messages"]) == 2


def test_tgi_gets_only_the_field_it_takes():
    client = chat_request(max_tokens=10, temperature=0)
    body = continuation_body(client, Endpoint.CHAT, sent_text="ab", sent_tokens=2, capabilities=capabilities_for("tgi"))
    assert body == {**client, "messages": [*client["messages"], {"role": "assistant", "content": "ab"}],
                    "max_tokens": 8, "continue_final_message": True}


def test_chat_continuation_open_template_adds_no_fields():
    client = chat_request(max_tokens=10, temperature=0, repeat_penalty=1.0)
    body = continuation_body(client, Endpoint.CHAT, sent_text="ab", sent_tokens=2, capabilities=LLAMACPP_OPEN)
    assert body == {**client, "messages": [*client["messages"], {"role": "assistant", "content": "ab"}],
                    "max_tokens": 8}


def test_a_client_prefill_is_extended_not_repeated():
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "The answer", "name": "bot"}]
    client = {"messages": messages, "continue_final_message": True, "add_generation_prompt": False,
              "max_tokens": 9, "temperature": 0}
    body = continuation_body(client, Endpoint.CHAT, sent_text=" is", sent_tokens=1, capabilities=VLLM)
    assert body["messages"] == [messages[0], {"role": "assistant", "content": "The answer is", "name": "bot"}]
    assert body["max_tokens"] == 8


@pytest.mark.parametrize(("endpoint", "fields", "reason"), [
    (Endpoint.CHAT, {"n": 2}, "n = 2"),
    (Endpoint.COMPLETIONS, {"n": 3}, "n = 3"),
    (Endpoint.COMPLETIONS, {"best_of": 2}, "best_of"),
    (Endpoint.CHAT, {"logprobs": True}, "logprobs"),
    (Endpoint.CHAT, {"top_logprobs": 2}, "logprobs"),
    (Endpoint.COMPLETIONS, {"logprobs": 0}, "logprobs"),
    (Endpoint.COMPLETIONS, {"echo": True}, "echo"),
    (Endpoint.CHAT, {"prompt_logprobs": 1}, "prompt_logprobs"),
    (Endpoint.CHAT, {"tools": TOOLS, "tool_choice": "required"}, "forced tool call"),
    (Endpoint.CHAT, {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "lookup"}}},
     "forced tool call"),
    (Endpoint.CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
    (Endpoint.COMPLETIONS, {"guided_regex": "a+"}, "guided_regex"),
    (Endpoint.CHAT, {"seed": 7, "temperature": 0.8}, "seeded"),
    (Endpoint.CHAT, {"seed": 7}, "seeded"),  # the server's default temperature samples
    (Endpoint.CHAT, {"presence_penalty": 0.5}, "presence_penalty"),
    (Endpoint.COMPLETIONS, {"frequency_penalty": 0.1}, "frequency_penalty"),
    (Endpoint.COMPLETIONS, {"prompt": ["a", "b"]}, "not a single string"),
    (Endpoint.COMPLETIONS, {"prompt": [1, 2, 3]}, "not a single string"),
    (Endpoint.COMPLETIONS, {"max_tokens": "10"}, "not an integer"),
])
def test_refusals(endpoint, fields, reason):
    base = ({"prompt": "p", "max_tokens": 10} if endpoint is Endpoint.COMPLETIONS else chat_request(max_tokens=10))
    client = {**base, "temperature": 0, **fields}
    if "temperature" not in fields and "seed" in fields:
        del client["temperature"]
    with pytest.raises(CannotContinue, match=reason):
        continuation_body(client, endpoint, sent_text="x", sent_tokens=1, capabilities=VLLM)


def test_tool_call_in_flight_and_backends_that_cannot_prefill():
    client = chat_request(tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=5)
    with pytest.raises(CannotContinue, match="tool call was in flight"):
        continuation_body(client, Endpoint.CHAT, sent_text="", sent_tokens=3, capabilities=VLLM,
                          tool_call_started=True)
    for kind in (BackendKind.LLAMACPP, BackendKind.OLLAMA, BackendKind.OPENAI_COMPATIBLE):
        with pytest.raises(CannotContinue, match="cannot continue a partial assistant message"):
            continuation_body(chat_request(temperature=0, max_tokens=5), Endpoint.CHAT, sent_text="a",
                              sent_tokens=1, capabilities=CAPABILITIES[kind])


def test_penalties_that_count_only_generated_tokens_depend_on_the_server():
    # llama.cpp's repeat_penalty defaults to 1.1 and sees only the request's own tokens: absent -> refused.
    client = {"prompt": "p", "max_tokens": 10, "temperature": 0}
    with pytest.raises(CannotContinue, match=r"repeat_penalty = 1\.1"):
        continuation_body(client, Endpoint.COMPLETIONS, sent_text="x", sent_tokens=1, capabilities=LLAMACPP)
    assert continuation_body({**client, "repeat_penalty": 1.0}, Endpoint.COMPLETIONS, sent_text="x",
                             sent_tokens=1, capabilities=LLAMACPP)["prompt"] == "px"
    # vLLM's repetition_penalty covers prompt and output alike, so it survives a continuation.
    assert continuation_body({**client, "repetition_penalty": 1.3}, Endpoint.COMPLETIONS, sent_text="x",
                             sent_tokens=1, capabilities=VLLM)["repetition_penalty"] == 1.3
    with pytest.raises(CannotContinue, match="repetition_penalty"):
        continuation_body({**client, "repetition_penalty": 1.3}, Endpoint.COMPLETIONS, sent_text="x",
                          sent_tokens=1, capabilities=capabilities_for("sglang"))


def test_unseeded_sampling_and_seed_at_temperature_zero_continue():
    assert continuation_body({"prompt": "p", "max_tokens": 4, "temperature": 0.9}, Endpoint.COMPLETIONS,
                             sent_text="x", sent_tokens=1, capabilities=VLLM)["max_tokens"] == 3
    assert continuation_body({"prompt": "p", "max_tokens": 4, "temperature": 0, "seed": 3}, Endpoint.COMPLETIONS,
                             sent_text="x", sent_tokens=1, capabilities=VLLM)["seed"] == 3


def test_an_answer_that_reached_max_tokens_is_complete():
    with pytest.raises(AnswerComplete):
        continuation_body({"prompt": "p", "max_tokens": 4, "temperature": 0}, Endpoint.COMPLETIONS,
                          sent_text="abcd", sent_tokens=4, capabilities=VLLM)
    with pytest.raises(ValueError):
        continuation_body({"prompt": "p"}, Endpoint.COMPLETIONS, sent_text="a", sent_tokens=-1, capabilities=VLLM)
    with pytest.raises(CannotContinue, match="no messages"):
        continuation_body({"messages": [], "max_tokens": 3, "temperature": 0}, Endpoint.CHAT, sent_text="a",
                          sent_tokens=1, capabilities=VLLM)


def test_capabilities_lookup():
    assert capabilities_for("vllm").chat_prefill is ChatPrefill.CONTINUE_FINAL_MESSAGE
    assert set(CAPABILITIES) == set(BackendKind)
    with pytest.raises(ValueError, match="unknown backend kind"):
        capabilities_for("triton")


_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
_client_keys = st.text(min_size=1, max_size=12).filter(lambda k: k not in {"model", "stream", "stream_options"})


@settings(max_examples=examples(300), deadline=None)
@given(st.dictionaries(_client_keys, _json_values, max_size=8), st.booleans(), st.booleans())
def test_any_client_fields_survive_prepare_request(fields, stream, need_usage):
    client = {"model": "alias", "stream": stream, **fields}
    original = copy.deepcopy(client)
    prepared = prepare_request(client, upstream_model="real", need_usage=need_usage)
    assert client == original
    assert {k: v for k, v in prepared.body.items() if k not in ("model", "stream_options")} == \
        {k: v for k, v in client.items() if k != "model"}
    assert ("stream_options" in prepared.body) == (stream and need_usage)


@settings(max_examples=examples(300), deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k not in ("id", "model", "usage")),
                       _json_values, max_size=8))
def test_any_chunk_fields_survive_rewrite(fields):
    chunk = {"id": "up", "model": "real", **fields}
    out = rewrite_chunk(chunk, response_id="stable", client_model="alias", drop_usage=False)
    assert out == {**fields, "id": "stable", "model": "alias"}
