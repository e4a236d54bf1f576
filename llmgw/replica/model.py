"""The simulated model, without I/O: tokens, prefill cost, prefix cache, fault settings, request checks.

Everything here is a pure function of its inputs (time and randomness are passed in), so the gRPC shell in
server.py stays a thin loop of "ask the model, sleep, send".
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

# Prompts are cached in blocks of this many characters, like a paged KV cache: a prompt that shares its
# first N blocks with a recent one only pays prefill for the rest.
PREFIX_BLOCK_CHARS = 64


def token_for(prompt: str, index: int) -> str:
    """Token `index` of the answer to `prompt`.

    The reference emits `token_<i>`; keeping that exact text lets reference scripts compare outputs. It does not
    depend on anything but the index, so a resumed stream is identical to an uninterrupted one by construction.
    """
    return f"token_{index}"


@dataclasses.dataclass
class Faults:
    """Fault injection settings; changed by flags at start and by ReplicaAdmin.SetFaults at run time."""

    error_rate: float = 0.0  # probability that a stream fails (at a random token position)
    reject_all: bool = False  # answer every Generate with UNAVAILABLE
    stall_after: int = -1  # go silent (stream stays open) after emitting this many tokens on a stream
    crash_after: int = -1  # os._exit after emitting this many tokens on a stream
    slow_factor: float = 1.0  # multiplies the per-token delay
    stall_before_first_ms: float = 0.0  # extra delay before the first token of every stream
    # Gray behaviour that is not a failure (a stall detector must not flag it): each token's delay drawn
    # uniformly within +/- jitter x the delay, and the whole engine pausing pause_ms every pause_every_ms (as a
    # batch scheduler or a garbage collector does), every stream at once.
    jitter: float = 0.0
    pause_every_ms: float = 0.0
    pause_ms: float = 0.0

    def effective_slow_factor(self) -> float:
        return self.slow_factor if self.slow_factor > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class Limits:
    max_tokens_cap: int = 4096
    max_prompt_bytes: int = 1 << 20


def check_generate(prompt: str, max_tokens: int, already: int, limits: Limits) -> str | None:
    """Return why a Generate request is invalid, or None when it is acceptable."""
    if not prompt:
        return "prompt must not be empty"
    if max_tokens <= 0:
        return f"max_tokens must be positive, got {max_tokens}"
    if max_tokens > limits.max_tokens_cap:
        return f"max_tokens {max_tokens} exceeds the cap of {limits.max_tokens_cap}"
    if already < 0:
        return f"tokens_already_generated must not be negative, got {already}"
    if already > max_tokens:
        return f"tokens_already_generated {already} exceeds max_tokens {max_tokens}"
    size = len(prompt.encode("utf-8", "surrogatepass"))
    if size > limits.max_prompt_bytes:
        return f"prompt is {size} bytes, over the cap of {limits.max_prompt_bytes}"
    return None


class PrefixCache:
    """LRU of recently prefilled prompt prefixes, at PREFIX_BLOCK_CHARS granularity.

    `lookup_and_insert(prompt)` returns how many leading characters were already cached, then records every
    block prefix of the prompt as most recently used. Entries are prefix hashes, so memory is bounded by
    `capacity` entries whatever the prompt sizes.
    """

    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 0:
            raise ValueError("prefix cache capacity must be >= 0")
        self.capacity = capacity
        self._entries: OrderedDict[int, None] = OrderedDict()
        self.hits = 0
        self.lookups = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _block_keys(prompt: str) -> list[tuple[int, int]]:
        """(prefix length, key of that prefix) for every full block boundary, shortest first.

        A prefix's key chains the previous prefix's key with the block's own text (as vLLM's block hashes do), so
        a prompt costs time linear in its length: hashing every prefix whole cost seconds for a 1 MiB prompt.
        """
        keys = []
        key = 0
        for end in range(PREFIX_BLOCK_CHARS, len(prompt) + 1, PREFIX_BLOCK_CHARS):
            key = hash((key, prompt[end - PREFIX_BLOCK_CHARS:end]))
            keys.append((end, key))
        return keys

    def lookup_and_insert(self, prompt: str) -> int:
        self.lookups += 1
        if self.capacity == 0:
            return 0
        cached = 0
        keys = self._block_keys(prompt)
        for end, key in keys:
            if key in self._entries:
                cached = end
            else:
                break
        if cached:
            self.hits += 1
        for _, key in keys:
            self._entries[key] = None
            self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return cached


def prefill_seconds(prompt_chars: int, cached_chars: int, ms_per_kchar: float) -> float:
    """Prefill time: proportional to the characters not covered by the prefix cache."""
    uncached = max(0, prompt_chars - cached_chars)
    return ms_per_kchar * uncached / 1_000_000.0


def token_step(delay_s: float, jitter: float, rng_value: float) -> float:
    """One token's delay: `delay_s` moved by up to +/- `jitter` x itself; `rng_value` uniform in [0, 1)."""
    if jitter <= 0:
        return delay_s
    return max(0.0, delay_s * (1.0 + jitter * (2.0 * rng_value - 1.0)))


def after_pause(due: float, origin: float, every_s: float, pause_s: float) -> float:
    """When a token due at `due` comes out of an engine that pauses for `pause_s` at origin + k x every_s: `due`
    itself, or the end of the pause it falls into."""
    if every_s <= 0 or pause_s <= 0 or due < origin:
        return due
    start = origin + (due - origin) // every_s * every_s
    return start + pause_s if due < start + pause_s else due


def failure_position(rng_value: float, error_rate: float, first: int, end: int, pick: float) -> int | None:
    """Where an injected error happens on a stream emitting indices first..end-1, or None for no error.

    `rng_value` decides whether the stream fails at all, `pick` (uniform in [0, 1)) where: the returned value is
    how many tokens the stream emits before failing (0 = fails before the first token).
    """
    if error_rate <= 0 or rng_value >= error_rate:
        return None
    count = max(0, end - first)
    return min(count, int(pick * count)) if count else 0
