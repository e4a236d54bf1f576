"""Write a tiny random-weight llama-architecture GGUF model (~0.5 MB) that a real llama.cpp server can serve.

Built for exactness tests, not for language: the answer to a prompt is deterministic at temperature 0, and the
model only ever generates printable ASCII, so the text a client receives re-tokenizes to exactly the tokens the
model generated -- which is what makes "continue from the text already sent" exact.

How (the parts that matter):
- Vocabulary: GPT-2 byte-level BPE ("gpt2" tokenizer model), one token per byte, plus <s>/</s> and one merge entry.
  llama.cpp's BPE loader needs at least one merge; the only merge joins two control bytes (0x01 0x02) that the
  model never generates, so no two generated tokens ever merge when the text is tokenized again.
- Only printable ASCII is ever generated: every token embedding carries a large constant in hidden dimension 0,
  no layer writes to that dimension (its rows of attn_output and ffn_down are zero), so after the final RMS norm
  dimension 0 is a large positive constant; output rows of every other token (control bytes, non-ASCII bytes,
  newline, </s>) weigh it strongly negative. So generation always runs to max_tokens (finish_reason "length").
- The chat template renders `<|role|>content` turns and leaves a final assistant message open (no end marker, no
  new generation prompt), so a partial answer sent back as the last message is continued exactly.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if not (loop.last and message['role'] == 'assistant') %}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}<|assistant|>{% endif %}"
)

PRINTABLE = range(0x20, 0x7F)
_DIM0 = 16.0  # the constant carried in hidden dimension 0 (see the module docstring)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in visible}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def write_tiny_model(path: str | os.PathLike[str], *, seed: int = 1234, n_embd: int = 64, n_layer: int = 2,
                     n_head: int = 4, n_ff: int = 128, context_length: int = 2048,
                     weight_scale: float = 0.6) -> str:
    """Write the model to `path` and return the path. Same arguments, same bytes."""
    try:
        # Imported by name: optional dependencies that the main environment (and its type checker) lacks.
        gguf = importlib.import_module("gguf")
        np = importlib.import_module("numpy")
    except ImportError as exc:  # an optional dependency: only tests against a real server need it
        raise RuntimeError("writing a GGUF model needs the `gguf` package (pip install 'llmgw[llamacpp]')") from exc
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    rng = np.random.default_rng(seed)
    byte_chars = byte_to_unicode()
    tokens = [byte_chars[b] for b in range(256)]
    merge = f"{byte_chars[0x01]} {byte_chars[0x02]}"
    tokens.append(byte_chars[0x01] + byte_chars[0x02])
    bos_id, eos_id = len(tokens), len(tokens) + 1
    tokens += ["<s>", "</s>"]
    token_types = [gguf.TokenType.NORMAL] * (len(tokens) - 2) + [gguf.TokenType.CONTROL] * 2
    n_vocab = len(tokens)

    def random(*shape: int) -> Any:
        return (rng.standard_normal(shape) * weight_scale).astype(np.float32)

    writer = gguf.GGUFWriter(os.fspath(path), "llama")
    writer.add_name("llmgw-tiny-random")
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([merge])
    writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)

    embeddings = random(n_vocab, n_embd) * 3.0
    embeddings[:, 0] = _DIM0
    output = random(n_vocab, n_embd) * 4.0
    output[:, 0] = 0.0
    allowed = set(PRINTABLE)
    for token_id in range(n_vocab):
        if token_id not in allowed:
            output[token_id, :] = 0.0
            output[token_id, 0] = -50.0
    writer.add_tensor("token_embd.weight", embeddings)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    for layer in range(n_layer):
        attn_output = random(n_embd, n_embd)
        attn_output[0, :] = 0.0  # no layer writes hidden dimension 0
        ffn_down = random(n_embd, n_ff)
        ffn_down[0, :] = 0.0
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{layer}.attn_q.weight", random(n_embd, n_embd))
        writer.add_tensor(f"blk.{layer}.attn_k.weight", random(n_embd, n_embd))
        writer.add_tensor(f"blk.{layer}.attn_v.weight", random(n_embd, n_embd))
        writer.add_tensor(f"blk.{layer}.attn_output.weight", attn_output)
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{layer}.ffn_gate.weight", random(n_ff, n_embd))
        writer.add_tensor(f"blk.{layer}.ffn_up.weight", random(n_ff, n_embd))
        writer.add_tensor(f"blk.{layer}.ffn_down.weight", ffn_down)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)


if __name__ == "__main__":
    import sys

    print(write_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf"))
