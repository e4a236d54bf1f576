"""The body rules: what the gateway may change in a request and in the chunks coming back, and nothing more.

A request reaches the server as the client sent it, except the fields the gateway owns:
- `model`: the client's name (an alias) becomes the server's model name;
- `stream_options.include_usage`: added to a streamed request when the gateway needs the server's usage and the
  client did not ask for it; the usage-only chunk this produces is then not forwarded to the client;
- on failover, the continuation fields (`continuation_body`): completions get `prompt` + the text already sent and
  `max_tokens` reduced by the tokens already sent; chat gets the partial answer as a final assistant message to
  continue (with the server's own request fields, e.g. vLLM's `continue_final_message: true,
  add_generation_prompt: false`, or relying on a chat template that leaves the final message open).

A chunk (or a non-streamed answer) reaches the client as the server sent it, except `id` (one stable id for the
whole answer, across a failover) and `model` (back to the client's name). Content, tool-call deltas, logprobs,
finish_reason, usage and fields this file has never heard of pass through.

All functions are pure: they return new dicts and never modify their arguments (nested values are shared with the
input, never mutated).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from llmgw.upstream.capabilities import UNKNOWN, Capabilities, ChatPrefill
from llmgw.upstream.client import Endpoint

# Request fields the gateway may set or change; every other field is the client's and passes through unchanged.
GATEWAY_OWNED_REQUEST_FIELDS = frozenset({
    "model", "stream_options.include_usage",
    # continuation on failover only:
    "prompt", "messages", "max_tokens", "max_completion_tokens", "min_tokens",
    "continue_final_message", "add_generation_prompt",
})
GATEWAY_OWNED_CHUNK_FIELDS = frozenset({"id", "model"})

# Constrained decoding restarts its grammar at the first generated token: a continuation would be checked against
# the grammar from the wrong place.
_CONSTRAINED_DECODING_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                "structured_outputs", "grammar", "json_schema")


class CannotContinue(Exception):
    """An exact continuation of this answer is impossible; the gateway ends the stream with a retryable error
    instead of splicing two different answers together. `reason` says why, for the client and the logs."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot continue the answer exactly: {reason}")
        self.reason = reason


class AnswerComplete(CannotContinue):
    """Nothing is left to generate (the tokens already sent reach max_tokens): the gateway finishes the answer
    itself (finish_reason "length") rather than asking a server for zero tokens."""


@dataclasses.dataclass(frozen=True)
class PreparedRequest:
    body: dict[str, Any]
    usage_added: bool  # the gateway added include_usage: drop the usage the client did not ask for
    unchanged: bool = False  # the body is the client's as it was: its own bytes may be sent as they came


def prepare_request(client_body: Mapping[str, Any], *, upstream_model: str, need_usage: bool) -> PreparedRequest:
    """The body to send to a server whose name for the model is `upstream_model`."""
    if not isinstance(client_body, Mapping):
        raise TypeError(f"a request body is a JSON object, got {type(client_body).__name__}")
    if not isinstance(upstream_model, str) or not upstream_model:
        raise ValueError(f"upstream_model must be a non-empty string, got {upstream_model!r}")
    body = dict(client_body)
    body["model"] = upstream_model
    usage_added = False
    # stream_options is only valid on streamed requests (vLLM refuses it otherwise); a non-streamed answer always
    # carries usage.
    if need_usage and body.get("stream") is True:
        options = body.get("stream_options")
        if options is None:
            body["stream_options"] = {"include_usage": True}
            usage_added = True
        elif isinstance(options, Mapping) and options.get("include_usage") is not True:
            body["stream_options"] = {**options, "include_usage": True}
            usage_added = True
        # Anything else is the client's malformed value: the server's 4xx about it reaches the client verbatim.
    unchanged = not usage_added and type(client_body.get("model")) is str and client_body["model"] == upstream_model
    return PreparedRequest(body, usage_added, unchanged)


def is_usage_only_chunk(chunk: Mapping[str, Any]) -> bool:
    """The chunk `stream_options.include_usage` adds at the end of a stream: usage and no choices."""
    return chunk.get("usage") is not None and chunk.get("choices") == []


def chunk_usage(chunk: Mapping[str, Any]) -> dict[str, Any] | None:
    usage = chunk.get("usage")
    return usage if isinstance(usage, dict) else None


def rewrite_chunk(chunk: Mapping[str, Any], *, response_id: str, client_model: str,
                  drop_usage: bool) -> Mapping[str, Any] | None:
    """The chunk to forward to the client, or None when it is not forwarded (the usage-only chunk of a stream
    whose include_usage the gateway added: `drop_usage`). Returns `chunk` itself when nothing changes, so the
    caller can forward the server's bytes as they were."""
    if drop_usage and is_usage_only_chunk(chunk):
        return None
    changes: dict[str, Any] = {}
    if "id" in chunk and chunk["id"] != response_id:
        changes["id"] = response_id
    if "model" in chunk and chunk["model"] != client_model:
        changes["model"] = client_model
    # With include_usage on, servers put "usage": null on every other chunk; a client that did not ask for usage
    # would not have seen that key.
    strip_null_usage = drop_usage and "usage" in chunk and chunk["usage"] is None
    if not changes and not strip_null_usage:
        return chunk
    rewritten = {**chunk, **changes}
    if strip_null_usage:
        del rewritten["usage"]
    return rewritten


def rewrite_response(body: Mapping[str, Any], *, response_id: str, client_model: str) -> Mapping[str, Any]:
    """A non-streamed answer for the client: the same two gateway-owned fields as a chunk."""
    result = rewrite_chunk(body, response_id=response_id, client_model=client_model, drop_usage=False)
    assert result is not None  # drop_usage=False never drops
    return result


def continued_usage(usage: Mapping[str, Any], *, sent_tokens: int) -> dict[str, Any]:
    """The usage of a continued answer as the client's request would have had it: the server counted the text
    already sent as prompt, the client's answer counts it as completion."""
    result = dict(usage)
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        result["prompt_tokens"] = max(0, prompt - sent_tokens)
        result["completion_tokens"] = completion + sent_tokens
        if isinstance(usage.get("total_tokens"), int):
            result["total_tokens"] = result["prompt_tokens"] + result["completion_tokens"]
    return result


def continuation_body(client_body: Mapping[str, Any], endpoint: Endpoint, *, sent_text: str, sent_tokens: int,
                      capabilities: Capabilities, tool_call_started: bool = False) -> dict[str, Any]:
    """The request that makes a server continue an answer whose first `sent_tokens` tokens (`sent_text`) already
    reached the client. The result is a client-side body: pass it through `prepare_request` for the target server.

    Raises CannotContinue when the continuation could differ from the uninterrupted answer, and AnswerComplete
    when no tokens are left to generate.
    """
    if not isinstance(client_body, Mapping):
        raise TypeError(f"a request body is a JSON object, got {type(client_body).__name__}")
    if not isinstance(sent_tokens, int) or sent_tokens < 0:
        raise ValueError(f"sent_tokens must be an integer >= 0, got {sent_tokens!r}")
    if not sent_text and sent_tokens == 0 and not tool_call_started:
        return dict(client_body)  # nothing reached the client: the request is simply sent again
    _check_exact(client_body, endpoint, capabilities, tool_call_started)
    body = dict(client_body)
    _reduce_length_limits(body, endpoint, sent_tokens, capabilities)
    if endpoint is Endpoint.COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise CannotContinue("the prompt is not a single string (a batch or token ids)")
        body["prompt"] = prompt + sent_text
    else:
        body["messages"] = _messages_with_prefill(body, sent_text)
        if capabilities.chat_prefill is ChatPrefill.CONTINUE_FINAL_MESSAGE:
            body.update(capabilities.prefill_fields)
    return body


def _check_exact(body: Mapping[str, Any], endpoint: Endpoint, capabilities: Capabilities,
                 tool_call_started: bool) -> None:
    if body.get("n") not in (None, 1):
        raise CannotContinue(f"n = {body.get('n')!r}: several answers cannot be continued as one")
    if body.get("best_of") not in (None, 1):
        raise CannotContinue(f"best_of = {body.get('best_of')!r}")
    if endpoint is Endpoint.COMPLETIONS:
        if body.get("logprobs") is not None:
            raise CannotContinue("logprobs were requested (the continuation's would be conditioned differently)")
        if body.get("echo"):
            raise CannotContinue("echo would repeat the extended prompt")
    else:
        if capabilities.chat_prefill is ChatPrefill.NONE:
            raise CannotContinue(f"a {capabilities.kind.value} backend cannot continue a partial assistant message")
        if body.get("logprobs") or body.get("top_logprobs") is not None:
            raise CannotContinue("logprobs were requested (the continuation's would be conditioned differently)")
        if body.get("echo"):
            raise CannotContinue("echo would repeat the partial answer")
        tool_choice = body.get("tool_choice")
        if tool_call_started:
            raise CannotContinue("a tool call was in flight")
        if body.get("tools") and (tool_choice == "required" or isinstance(tool_choice, Mapping)):
            raise CannotContinue("the answer is a forced tool call")
    if body.get("prompt_logprobs") is not None:
        raise CannotContinue("prompt_logprobs were requested")
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") not in (None, "text"):
        raise CannotContinue(f"response_format {response_format.get('type')!r} constrains the whole answer")
    for field in _CONSTRAINED_DECODING_FIELDS:
        if body.get(field) is not None:
            raise CannotContinue(f"{field} constrains the whole answer")
    if body.get("seed") is not None and body.get("temperature", 1.0) != 0:
        raise CannotContinue("a seeded sampled answer cannot be reproduced from its middle")
    for field, neutral, default in capabilities.output_only_penalties:
        value = body.get(field, default)
        if value is None:
            value = default
        if value != neutral:
            raise CannotContinue(f"{field} = {value!r} counts only the tokens generated in one request "
                                 f"on a {capabilities.kind.value} backend (exact only at {neutral})")


def _reduce_length_limits(body: dict[str, Any], endpoint: Endpoint, sent_tokens: int,
                          capabilities: Capabilities) -> None:
    fields: tuple[str, ...]
    if endpoint is Endpoint.COMPLETIONS:
        fields, default = ("max_tokens",), capabilities.default_completion_max_tokens
    else:
        fields, default = ("max_completion_tokens", "max_tokens"), capabilities.default_chat_max_tokens
    present = [f for f in fields if body.get(f) is not None]
    if not present:
        if default == UNKNOWN:
            raise CannotContinue(f"no max_tokens and a {capabilities.kind.value} backend's default is unknown")
        if default is None:
            return  # the server stops at end of sequence or a full context: the same place after a continuation
        assert isinstance(default, int)
        body["max_tokens"] = default
        present = ["max_tokens"]
    for field in present:
        limit = body[field]
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise CannotContinue(f"{field} is not an integer: {limit!r}")
        remaining = limit - sent_tokens
        if remaining < 1:
            raise AnswerComplete(f"{sent_tokens} tokens already sent of {field} = {limit}")
        body[field] = remaining
    min_tokens = body.get("min_tokens")
    if isinstance(min_tokens, int) and not isinstance(min_tokens, bool):
        body["min_tokens"] = max(0, min_tokens - sent_tokens)


def _messages_with_prefill(body: Mapping[str, Any], sent_text: str) -> list[Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise CannotContinue("the request has no messages list")
    last = messages[-1]
    if body.get("continue_final_message") is True and isinstance(last, Mapping) and last.get("role") == "assistant":
        # The client already prefilled the answer: the text sent continues its message.
        content = last.get("content")
        if not isinstance(content, str):
            raise CannotContinue("the client's prefilled assistant message has no plain-text content")
        return [*messages[:-1], {**last, "content": content + sent_text}]
    return [*messages, {"role": "assistant", "content": sent_text}]
