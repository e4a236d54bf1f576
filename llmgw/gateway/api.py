"""The gateway's public vocabulary: requests, token events, errors, configuration.

Front-ends (gRPC here, an OpenAI-style HTTP front elsewhere) translate their wire format into InferenceRequest,
iterate `Gateway.infer()` and translate TokenEvent / GatewayError back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import AsyncGenerator
from typing import Any


@dataclasses.dataclass
class InferenceRequest:
    prompt: str
    max_tokens: int
    hedge: bool = False
    request_id: str = ""
    client_id: str = ""
    timeout_s: float | None = None  # None or <= 0: the gateway's default request timeout
    # Who is calling, as the front authenticated it (llmgw.gateway.tenancy_gate); "" = no key file (open).
    tenant: str = ""
    key_id: str = ""  # the key's short id for logs (never the key)
    # For metrics, the request log and tracing: the front it came in on ("grpc" | "http"), the model it named
    # ("" = none: the gRPC front has no model field), its prompt tokens as the front counted them (None = count
    # words here), and where the caller's W3C traceparent is (HTTP headers or gRPC invocation metadata).
    front: str = "grpc"
    model: str = ""
    prompt_tokens: int | None = None
    trace_carrier: Any = dataclasses.field(default=None, repr=False)
    # OpenAI-compatible model servers (llmgw.gateway.http_transport): the client's body as it sent it, the API it
    # came in on ("chat" | "completions") and whether it wants a stream. With `body` set, `prompt` is only the
    # routing key (llmgw.gateway.upstreams.affinity_key) and the server applies its own token limits; `model`
    # selects the backends that may serve the request (docs/backends.md).
    body: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    # `body` as the client's bytes (the HTTP front): sent as they came when the gateway changes nothing in it.
    body_bytes: bytes | None = dataclasses.field(default=None, repr=False)
    api: str = ""
    stream: bool = True


@dataclasses.dataclass(slots=True)  # slotted: one is built per streamed token, in half the time of a dict-backed one
class TokenEvent:
    index: int
    token: str
    replica_id: str
    is_final: bool = False
    finish_reason: str | None = None  # "length" | "stop" on the final event
    raw: Any = None  # on the last event of a batch: the transport's own messages behind it (ReplicaChunk.raw)


async def one_event_each(batches: AsyncGenerator[list[TokenEvent], None]) -> AsyncGenerator[TokenEvent, None]:
    """`infer_batches()` as `infer()`: the events of each batch one by one; closing this closes `batches`."""
    async with contextlib.aclosing(batches) as source:
        async for batch in source:
            for event in batch:
                yield event


class ErrorKind(enum.Enum):
    """Why a request ended without a complete answer, in no transport's terms: the gRPC front maps a kind to a
    status code (gateway/server.py), the HTTP front to a status and an OpenAI error (http/openai_api.py). The value is
    the outcome label of metrics and the request log."""

    INVALID_ARGUMENT = "invalid_argument"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    INTERNAL = "internal"
    UNKNOWN = "unknown"


class GatewayError(Exception):
    """A request ended without a complete answer; `kind` says why (each front reports it in its own terms)."""

    kind = ErrorKind.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(GatewayError):
    kind = ErrorKind.INVALID_ARGUMENT


class ResourceExhausted(GatewayError):
    kind = ErrorKind.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(GatewayError):
    kind = ErrorKind.UNAVAILABLE


class DeadlineExceeded(GatewayError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class Unauthenticated(GatewayError):
    """No valid API key (HTTP 401 / UNAUTHENTICATED); `reason` is a fixed label (missing, malformed, ...)."""

    kind = ErrorKind.UNAUTHENTICATED

    def __init__(self, message: str, reason: str = "unknown") -> None:
        super().__init__(message)
        self.reason = reason


class PermissionDenied(GatewayError):
    """A valid key that may not use this model (HTTP 403 / PERMISSION_DENIED)."""

    kind = ErrorKind.PERMISSION_DENIED


ROUTING_POLICIES = ("affinity", "least_connections", "random")


@dataclasses.dataclass
class GatewayConfig:
    gateway_id: str = "gateway-1"
    host: str = "127.0.0.1"
    port: int = 50050
    advertise: str = ""
    gossip_port: int | None = 0  # 0 = port + 10000, None = no gossip (a membership source is injected)
    seeds: tuple[str, ...] = ()
    gossip_config: str = "lan"
    reuse_port: bool = False  # --workers: several processes share the gRPC port
    # Shared gossip key (HMAC-signed datagrams, llmgw.gossip.auth); None = unsigned gossip. Every member of a
    # cluster needs the same key: a member with another key is never seen, and never sees the others.
    gossip_key: bytes | None = dataclasses.field(default=None, repr=False)
    queue_size: int = 100
    queue_timeout_s: float = 30.0
    max_attempts: int = 3
    first_token_timeout_s: float = 10.0
    inter_token_timeout_s: float = 5.0
    request_timeout_s: float = 300.0
    vnodes: int = 160
    balance: float = 1.25
    prefix_chars: int = 64
    max_tokens_cap: int = 4096
    max_prompt_bytes: int = 1 << 20
    # "affinity" (the Router: prefix affinity with bounded loads, then least connections); "least_connections"
    # and "random" ignore the prompt -- baselines for benchmarks and a fallback for prompt-independent workloads.
    routing: str = "affinity"
    # Tokens per replica message the gateway asks for (GenerateRequest.max_tokens_per_message): when a replica
    # has several tokens ready at once they cross the internal hop in one message. 1 = one message per token.
    upstream_batch: int = 64
    # Requests to a replica share one GenerateSession call (llmgw.gateway.session) when the replica serves it:
    # no call set-up per request, and one message carries the ready tokens of every stream. False = one
    # Generate call per request, as the reference did.
    replica_sessions: bool = True
    # A replica that answered RESOURCE_EXHAUSTED is treated as full for this long unless gossip says otherwise.
    busy_backoff_s: float = 0.25
    # ---- resilience (docs/resilience.md) ----
    # Policy hedging: also start the next replica when no first token came within this delay. None = off (only
    # requests with hedge=true hedge). hedge_adaptive: the observed p95 TTFT instead, once 20 samples exist.
    hedge_delay_ms: float | None = None
    hedge_adaptive: bool = False
    # Token bucket for policy hedges: each request deposits hedge_budget, a hedge spends 1, at most
    # hedge_budget_burst saved. The bucket starts full: a fresh gateway can cover a short run of slow requests
    # (e.g. a replica that just began stalling, before its breaker has seen enough to eject it).
    hedge_budget: float = 0.1
    hedge_budget_burst: float = 10.0
    breaker_enabled: bool = True
    breaker_window: int = 10
    breaker_failure_rate: float = 0.5
    breaker_consecutive: int = 5
    breaker_cooldown_s: float = 5.0
    breaker_slow_detection: bool = True
    # Adaptive stall deadlines (llmgw.gateway.stall_race, docs/resilience.md): each replica's inter-token limit is
    # p99 of its recent message gaps x stall_factor + 50 ms, at least stall_floor_ms; its first-token limit p99 of
    # its recent TTFTs (same prompt size) x 4, at least stall_first_token_floor_s; the timeouts above are the
    # ceilings. Past it, a continuation races the quiet replica from the next token. False = the timeouts only.
    adaptive_deadlines: bool = True
    stall_floor_ms: float = 200.0
    stall_factor: float = 3.0
    stall_first_token_floor_s: float = 1.0
    # Restart hook of rolling updates started through GatewayAdmin.StartRollout: a llmgw.rollout
    # CommandTemplateRestart template with {replica_id} and {version}; "" = rolling updates unavailable.
    restart_command: str = ""
    # OpenAI-compatible model servers: llmgw.upstream.backends Backend / DnsUpstream values (parsed from
    # `--upstream` and `[[upstream]]`); the gateway streams from them directly (llmgw.gateway.http_transport).
    upstreams: tuple[Any, ...] = ()

    def hedge_config(self):
        from llmgw.policy import HedgeConfig

        return HedgeConfig(delay_s=None if self.hedge_delay_ms is None else self.hedge_delay_ms / 1000.0,
                           adaptive=self.hedge_adaptive, budget_ratio=self.hedge_budget,
                           budget_burst=self.hedge_budget_burst, budget_initial=self.hedge_budget_burst)

    def deadline_config(self):
        from llmgw.policy.deadlines import DeadlineConfig

        return DeadlineConfig.from_timeouts(self.first_token_timeout_s, self.inter_token_timeout_s,
                                            enabled=self.adaptive_deadlines, gap_floor_s=self.stall_floor_ms / 1000.0,
                                            gap_factor=self.stall_factor, ttft_floor_s=self.stall_first_token_floor_s)

    def breaker_config(self):
        from llmgw.policy import BreakerConfig

        window = self.breaker_window
        return BreakerConfig(window_size=window, min_window_outcomes=window,
                             failure_rate_threshold=self.breaker_failure_rate,
                             consecutive_failures=self.breaker_consecutive, cooldown_s=self.breaker_cooldown_s,
                             max_cooldown_s=max(2 * self.breaker_cooldown_s, 10.0),
                             slow_detection=self.breaker_slow_detection)

    def validate(self) -> None:
        if self.queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        if self.upstream_batch < 1:
            raise ValueError("upstream_batch must be >= 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {ROUTING_POLICIES}, got {self.routing!r}")
        for name in ("queue_timeout_s", "first_token_timeout_s", "inter_token_timeout_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.hedge_delay_ms is not None and not 0 <= self.hedge_delay_ms < 3_600_000:
            raise ValueError(f"hedge_delay_ms must be within [0, 3600000) ms or None, got {self.hedge_delay_ms}")
        # The policy cores check their own knobs; name the gateway setting in the message.
        for what, build in (("hedge", self.hedge_config), ("breaker", self.breaker_config),
                            ("adaptive deadline", self.deadline_config)):
            try:
                build()
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{what} settings: {exc}") from None
        if self.restart_command:
            from llmgw.rollout import CommandTemplateRestart

            try:
                CommandTemplateRestart(self.restart_command)
            except ValueError as exc:
                raise ValueError(f"restart_command: {exc}") from None


def check_request(req: InferenceRequest, cfg: GatewayConfig) -> None:
    """Raise InvalidArgument with a reason when `req` cannot be served."""
    if not isinstance(req.prompt, str) or not req.prompt:
        raise InvalidArgument("prompt must not be empty")
    if not isinstance(req.max_tokens, int) or req.max_tokens <= 0:
        raise InvalidArgument(f"max_tokens must be positive, got {req.max_tokens}")
    if req.max_tokens > cfg.max_tokens_cap and req.body is None:  # a model server applies its own limits
        raise InvalidArgument(f"max_tokens {req.max_tokens} exceeds the cap of {cfg.max_tokens_cap}")
    try:
        size = len(req.prompt.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument("prompt is not valid UTF-8 (lone surrogate)") from None
    if size > cfg.max_prompt_bytes:
        raise InvalidArgument(f"prompt is {size} bytes, over the cap of {cfg.max_prompt_bytes}")
    if req.timeout_s is not None and req.timeout_s < 0:
        raise InvalidArgument("timeout_s must not be negative")
