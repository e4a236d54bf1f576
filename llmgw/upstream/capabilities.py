"""What each kind of OpenAI-compatible server can do, as far as the gateway's rules depend on it.

One row per server kind; docs/backends.md is the same table for people. Where a server's behaviour depends on the
deployed model (llama.cpp continues a final assistant message only if the model's chat template leaves it open),
the row says so and the backend's configuration decides (`with_chat_prefill`).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Final, Literal

# A server default the gateway does not know: a continuation that would depend on it is refused.
UNKNOWN: Final = "unknown"
MaxTokensDefault = int | None | Literal["unknown"]  # None: until end of sequence or the context is full


class BackendKind(enum.Enum):
    VLLM = "vllm"
    SGLANG = "sglang"
    LLAMACPP = "llamacpp"  # llama-cpp-python's server (python -m llama_cpp.server)
    TGI = "tgi"
    OLLAMA = "ollama"
    OPENAI_COMPATIBLE = "openai"  # anything else that speaks the OpenAI API: assume nothing beyond it


class ChatPrefill(enum.Enum):
    """How a partial assistant message is continued on failover."""
    NONE = "none"  # the server cannot continue a message: a failed chat stream ends with a retryable error
    CONTINUE_FINAL_MESSAGE = "continue_final_message"  # request fields ask for it (`Capabilities.prefill_fields`)
    OPEN_TEMPLATE = "open_template"  # a final assistant message is left open by the model's chat template


@dataclasses.dataclass(frozen=True)
class Capabilities:
    kind: BackendKind
    chat_prefill: ChatPrefill
    # The request fields that make the server continue the final assistant message (CONTINUE_FINAL_MESSAGE).
    prefill_fields: tuple[tuple[str, bool], ...]
    # Sampling penalties a server computes over the tokens generated in *this request* only: after a failover
    # the text already sent moves into the prompt, so the continuation is exact only at the neutral value.
    # field -> (neutral value, the server's default when the field is absent)
    output_only_penalties: tuple[tuple[str, float, float], ...]
    # The server's max_tokens when a request has none, per endpoint.
    default_completion_max_tokens: MaxTokensDefault
    default_chat_max_tokens: MaxTokensDefault
    usage_in_stream: bool  # honours stream_options.include_usage
    health_path: str | None  # a readiness endpoint other than /v1/models
    metrics_path: str | None  # Prometheus metrics with queue/KV load

    def with_chat_prefill(self, chat_prefill: ChatPrefill) -> Capabilities:
        return dataclasses.replace(self, chat_prefill=chat_prefill)


_OPENAI_PENALTIES = (("presence_penalty", 0.0, 0.0), ("frequency_penalty", 0.0, 0.0))
# vLLM refuses continue_final_message together with its default add_generation_prompt=true; SGLang takes the same
# pair (its own example sends continue_final_message alone; an unknown field is ignored).
_CONTINUE_AND_NO_GENERATION_PROMPT = (("continue_final_message", True), ("add_generation_prompt", False))

CAPABILITIES: dict[BackendKind, Capabilities] = {
    BackendKind.VLLM: Capabilities(
        BackendKind.VLLM, ChatPrefill.CONTINUE_FINAL_MESSAGE, _CONTINUE_AND_NO_GENERATION_PROMPT,
        # vLLM's repetition_penalty counts prompt and output tokens alike, so it survives a continuation.
        output_only_penalties=_OPENAI_PENALTIES, default_completion_max_tokens=16, default_chat_max_tokens=None,
        usage_in_stream=True, health_path="/health", metrics_path="/metrics"),
    BackendKind.SGLANG: Capabilities(
        BackendKind.SGLANG, ChatPrefill.CONTINUE_FINAL_MESSAGE, _CONTINUE_AND_NO_GENERATION_PROMPT,
        output_only_penalties=_OPENAI_PENALTIES + (("repetition_penalty", 1.0, 1.0),),
        default_completion_max_tokens=16, default_chat_max_tokens=None, usage_in_stream=True,
        health_path="/health", metrics_path="/metrics"),
    BackendKind.LLAMACPP: Capabilities(
        BackendKind.LLAMACPP, ChatPrefill.NONE, (),  # OPEN_TEMPLATE where the model's template allows it
        # Measured: repeat_penalty (default 1.1) only sees the current request's tokens.
        output_only_penalties=_OPENAI_PENALTIES + (("repeat_penalty", 1.0, 1.1),),
        default_completion_max_tokens=16, default_chat_max_tokens=None, usage_in_stream=False,
        health_path=None, metrics_path=None),
    BackendKind.TGI: Capabilities(
        # TGI 3.x takes continue_final_message (its integration tests); older versions do not.
        BackendKind.TGI, ChatPrefill.CONTINUE_FINAL_MESSAGE, (("continue_final_message", True),),
        output_only_penalties=_OPENAI_PENALTIES + (("repetition_penalty", 1.0, 1.0),),
        default_completion_max_tokens=UNKNOWN, default_chat_max_tokens=UNKNOWN, usage_in_stream=True,
        health_path="/health", metrics_path="/metrics"),
    BackendKind.OLLAMA: Capabilities(
        BackendKind.OLLAMA, ChatPrefill.NONE, (),
        output_only_penalties=_OPENAI_PENALTIES, default_completion_max_tokens=UNKNOWN,
        default_chat_max_tokens=UNKNOWN, usage_in_stream=True, health_path=None, metrics_path=None),
    BackendKind.OPENAI_COMPATIBLE: Capabilities(
        BackendKind.OPENAI_COMPATIBLE, ChatPrefill.NONE, (),
        output_only_penalties=_OPENAI_PENALTIES + (("repetition_penalty", 1.0, 1.0), ("repeat_penalty", 1.0, 1.0)),
        default_completion_max_tokens=UNKNOWN, default_chat_max_tokens=UNKNOWN, usage_in_stream=False,
        health_path=None, metrics_path=None),
}


def capabilities_for(kind: BackendKind | str) -> Capabilities:
    try:
        return CAPABILITIES[BackendKind(kind)]
    except ValueError:
        known = ", ".join(k.value for k in BackendKind)
        raise ValueError(f"unknown backend kind {kind!r} (known: {known})") from None
