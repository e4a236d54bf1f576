"""OpenAI-compatible completions API on top of `Gateway.infer()`.

    POST /v1/completions        prompt -> text (stream: true = Server-Sent Events)
    POST /v1/chat/completions   messages -> one prompt (template below) -> assistant message
    GET  /v1/models             the model versions live replicas advertise

Requests go through the same routing, queueing, failover and hedging as gRPC: the handlers only translate. Parsing
and validation are plain functions (no aiohttp) so they can be tested without a server; docs/api.md is the
user-facing reference.

Chat template: each message becomes "<|{role}|>\\n{content}\\n" and "<|assistant|>\\n" is appended. A longer
conversation is therefore an extension of the shorter one's prompt, which keeps its prefix-affinity replica (and
that replica's prefix cache).

Usage: prompt_tokens is the number of whitespace-separated words of the rendered prompt (the gateway has no
tokenizer; it is a documented approximation), completion_tokens the number of tokens streamed.

A stream that fails after its headers were sent ends with one `data: {"error": {...}}` event and WITHOUT
`data: [DONE]`, so a client can tell a truncated answer from a complete one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
from typing import Any

from aiohttp import web

from llmgw.gateway.api import ErrorKind, GatewayError, InferenceRequest
from llmgw.http import passthrough
from llmgw.http.sse_stream import SSE_DONE, end_with_error_event, start_event_stream
from llmgw.logs import request_log
from llmgw.metrics import observe_zeros
from llmgw.topology import is_routable_replica
from llmgw.upstream.sse import NOT_CERTAIN, loads_where_json_agrees

log = logging.getLogger("llmgw.http.openai")

DEFAULT_MAX_TOKENS = 16  # OpenAI's own default for /v1/completions; used for chat too
# Time allowed for a whole request body to arrive (the body of a 2 MiB prompt takes ~0.2 s at 100 Mbit/s).
DEFAULT_BODY_TIMEOUT_S = 30.0
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# Sampling knobs the backend decides on its own: type-checked so a typo'd value is an error, otherwise ignored.
IGNORED_NUMBERS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed")
HEDGE_HEADER = "X-LLMGW-Hedge"
REPLICA_HEADER = "X-LLMGW-Replica"
REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


# ---- errors -------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, extra_headers: dict[str, str] | None = None) -> web.Response:
        headers = dict(self.headers)
        if extra_headers:
            headers.update(extra_headers)
        return web.json_response(self.body(), status=self.status, headers=headers, dumps=compact_json)


class _BodyTimeout(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(408, message, code="body_timeout", headers={"Connection": "close"})


async def _answer_and_close(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Send `response`, then drop the connection at once. Returning it normally would let aiohttp keep reading
    the unfinished body for its lingering time (10 s) before closing -- the slow client would stay connected."""
    answer_and_close = getattr(request, "answer_and_close", None)
    if answer_and_close is not None:  # llmgw.http.lean_front writes it, then closes
        answer_and_close()
        return response
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# The one table from a gateway outcome to HTTP: status and OpenAI error type (the error's `code` is the kind's
# name). 400 bad input, 429 queue full/timed out (with Retry-After), 503 no replica, 504 deadline.
HTTP_ERRORS: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID_ARGUMENT: (400, "invalid_request_error"),
    ErrorKind.NOT_FOUND: (404, "invalid_request_error"),
    ErrorKind.UNAUTHENTICATED: (401, "invalid_request_error"),
    ErrorKind.PERMISSION_DENIED: (403, "permission_error"),
    ErrorKind.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    ErrorKind.UNAVAILABLE: (503, "service_unavailable"),
    ErrorKind.DEADLINE_EXCEEDED: (504, "timeout"),
    ErrorKind.INTERNAL: (500, "server_error"),
    ErrorKind.UNKNOWN: (500, "server_error"),
}


def from_gateway_error(exc: GatewayError) -> ApiError:
    """The HTTP answer to a gateway outcome (HTTP_ERRORS); a retry delay becomes a Retry-After header."""
    status, type_ = HTTP_ERRORS.get(exc.kind, (500, "server_error"))
    retry_after_s = getattr(exc, "retry_after_s", None)
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return ApiError(status, exc.message, type=type_, code=exc.kind.value, headers=headers)


# What the model-server path (llmgw.http.passthrough) answers its errors with.
_FRONT_ERRORS = passthrough.FrontErrors(ApiError, from_gateway_error, REPLICA_HEADER)


# ---- request parsing (pure) ---------------------------------------------------------------------------------
@dataclasses.dataclass
class CompletionParams:
    """A validated completions or chat completions request."""

    kind: str  # "completion" | "chat"
    model: str
    prompt: str
    max_tokens: int
    stream: bool = False
    include_usage: bool = False
    hedge: bool = False
    timeout_s: float | None = None
    client_id: str = ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bool_field(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean, got {type(value).__name__}", name)
    return value


def _common(body: Any, kind: str, max_tokens_cap: int, default_max_tokens: int) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise bad_request("missing required field 'model'", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must be a non-empty string", "model")
    names = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    max_tokens, param = default_max_tokens, "max_tokens"
    for name in names:
        if body.get(name) is not None:
            max_tokens, param = body[name], name
            break
    if not _is_int(max_tokens):
        raise bad_request(f"'{param}' must be an integer, got {type(max_tokens).__name__}", param)
    if not 1 <= max_tokens <= max_tokens_cap:
        raise bad_request(f"'{param}' must be between 1 and {max_tokens_cap}, got {max_tokens}", param)
    stream = _bool_field(body, "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object", "stream_options")
        include_usage = _bool_field(options, "include_usage")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad_request("only n = 1 is supported", "n")
    for name in IGNORED_NUMBERS:
        if body.get(name) is not None and not _is_number(body[name]):
            raise bad_request(f"'{name}' must be a number", name)
    for name in ("echo",):
        if _bool_field(body, name):
            raise bad_request(f"'{name}' is not supported", name)
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") is not None:
        raise bad_request("logprobs are not supported", "logprobs")
    if body.get("best_of") not in (None, 1):
        raise bad_request("only best_of = 1 is supported", "best_of")
    for name in ("tools", "functions", "tool_choice", "function_call", "suffix"):
        if body.get(name):
            raise bad_request(f"'{name}' is not supported", name)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("'user' must be a string", "user")
    timeout_s = body.get("timeout_s")
    if timeout_s is not None and (not _is_number(timeout_s) or timeout_s <= 0):
        raise bad_request("'timeout_s' must be a positive number of seconds", "timeout_s")
    return dict(model=model, max_tokens=max_tokens, stream=stream, include_usage=include_usage,
                hedge=_bool_field(body, "hedge"), timeout_s=timeout_s, client_id=user or "")


def parse_completion_body(body: Any, *, max_tokens_cap: int,
                          default_max_tokens: int = DEFAULT_MAX_TOKENS) -> CompletionParams:
    """Validate a /v1/completions body (raises ApiError 400 naming the offending field)."""
    common = _common(body, "completion", max_tokens_cap, default_max_tokens)
    if "prompt" not in body:
        raise bad_request("missing required field 'prompt'", "prompt", "missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad_request("'prompt' must be a string or a list of exactly one string (no batches, no token "
                              "arrays)", "prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request(f"'prompt' must be a string, got {type(prompt).__name__}", "prompt")
    if not prompt:
        raise bad_request("'prompt' must not be empty", "prompt")
    return CompletionParams(kind="completion", prompt=prompt, **common)


def _message_text(message: dict, index: int) -> str:
    content = message.get("content")
    where = f"messages[{index}].content"
    if content is None:
        if message.get("role") == "assistant":
            return ""
        raise bad_request(f"'{where}' is required", where)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"'{where}[{k}]' must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                                  "other content types are not supported", where)
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"'{where}' must be a string or a list of text parts", where)


def render_chat_prompt(messages: list[dict]) -> str:
    """The documented chat template: "<|role|>\\ncontent\\n" per message, then "<|assistant|>\\n"."""
    out = []
    for index, message in enumerate(messages):
        out.append(f"<|{message['role']}|>\n{_message_text(message, index)}\n")
    out.append("<|assistant|>\n")
    return "".join(out)


def parse_chat_body(body: Any, *, max_tokens_cap: int,
                    default_max_tokens: int = DEFAULT_MAX_TOKENS) -> CompletionParams:
    """Validate a /v1/chat/completions body and render its messages to a prompt."""
    common = _common(body, "chat", max_tokens_cap, default_max_tokens)
    messages = body.get("messages")
    if messages is None:
        raise bad_request("missing required field 'messages'", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"'messages[{index}]' must be an object", f"messages[{index}]")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"'messages[{index}].role' must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                              f"messages[{index}].role")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise bad_request(f"'messages[{index}].name' must be a string", f"messages[{index}].name")
    return CompletionParams(kind="chat", prompt=render_chat_prompt(messages), **common)


def count_prompt_tokens(prompt: str) -> int:
    """Approximate prompt tokens: whitespace-separated words (the gateway has no tokenizer)."""
    return len(prompt.split())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def decode_json_body(raw: bytes) -> Any:
    """The JSON value of a request body; ApiError 400 for invalid UTF-8 or invalid JSON. orjson reads it where it
    is known to give json's value (a few times faster); anything else is json's, value or error."""
    value = loads_where_json_agrees(raw)
    if value is not NOT_CERTAIN:
        return value
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not valid UTF-8 (byte {exc.start})", code="invalid_utf8") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise bad_request("the request body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def parse_hedge_header(value: str | None) -> bool | None:
    """X-LLMGW-Hedge: 1/true/yes/on or 0/false/no/off; None when absent."""
    if value is None:
        return None
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise bad_request(f"header {HEDGE_HEADER} must be 1 or 0 (true/false), got {value!r}", HEDGE_HEADER)


def request_id_from(headers) -> str:
    """The caller's X-Request-Id when it is a sane token, else a fresh one (a random UUID's hex)."""
    given = headers.get(REQUEST_ID_HEADER)
    if given and _REQUEST_ID_RE.fullmatch(given):
        return given
    return _uuid4_hex()


def _uuid4_hex() -> str:
    """uuid.uuid4().hex without building a UUID object (it is on every request's way to its first token): the
    same 16 random bytes, with the version (4) and variant (RFC 4122) bits set as uuid4 sets them."""
    value = int.from_bytes(os.urandom(16), "big")
    value = (value & _UUID4_CLEAR) | _UUID4_SET
    return f"{value:032x}"


_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def compact_json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def sse(obj: Any) -> bytes:
    return b"data: " + compact_json(obj).encode() + b"\n\n"




# ---- response bodies ----------------------------------------------------------------------------------------
class _Shape:
    """Builds the completion or chat body / chunks for one request."""

    def __init__(self, params: CompletionParams, request_id: str) -> None:
        self.chat = params.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.model = params.model
        self.created = int(time.time())
        self.include_usage = params.include_usage
        self._role_sent = False

    def _envelope(self, obj: str, choices: list) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text or not finish_reason else {}
            if not self._role_sent:
                delta = {"role": "assistant", **delta}
                self._role_sent = True
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("text_completion", [choice])
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = use
        return body

    def full(self, text: str, finish_reason: str | None, use: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("text_completion", [choice])
        body["usage"] = use
        return body


# ---- handlers -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Outcome:
    """What the request log line and the metrics say about one request."""

    outcome: str = "ok"
    status: int = 200
    tokens: int = 0
    ttft_s: float | None = None
    last_token_at: float = 0.0
    replicas: list[str] = dataclasses.field(default_factory=list)
    reached_gateway: bool = False
    tenant: str = ""


class OpenAIApi:
    """The /v1 handlers for one gateway. `metrics` (a GatewayMetrics) gets requests, TTFT, inter-token times and
    tokens when `record_requests` is true."""

    def __init__(self, gateway, *, metrics=None, record_requests: bool = True,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        if isinstance(body_timeout_s, bool) or not _is_number(body_timeout_s) or not (
                0 < body_timeout_s < float("inf")):
            raise ValueError(f"body_timeout_s must be a finite number of seconds > 0, got {body_timeout_s!r}")
        self.gateway = gateway
        # aiohttp has no body-read timeout of its own: without this, a client trickling its body a byte at a
        # time holds its connection and handler for as long as it likes (slowloris).
        self.body_timeout_s = float(body_timeout_s)
        # With record_requests false the gateway (its llmgw.gateway.observability.MetricsListener) measures and logs
        # every request that reaches it; this front still counts and logs the ones refused before that (bad
        # JSON, bad fields), which the gateway never sees.
        self.record_requests = record_requests
        self.request_metrics = metrics
        self.metrics = metrics if record_requests else None
        self.default_max_tokens = default_max_tokens

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, parse_completion_body, "completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, parse_chat_body, "chat")

    async def models(self, request: web.Request) -> web.Response:
        try:
            self._authenticate(request)  # with a key file, listing models takes a key too (as OpenAI's does)
        except ApiError as err:
            return err.response()
        versions: dict[str, int] = {}
        for member in self.gateway.members():
            if not is_routable_replica(member):
                continue
            version = getattr(member, "model_version", "") or "unknown"
            versions[version] = versions.get(version, 0) + 1
        data = [{"id": version, "object": "model", "created": 0, "owned_by": "llmgw", "replicas": count}
                for version, count in sorted(versions.items())]
        upstreams = getattr(self.gateway, "upstreams", None)
        if upstreams is not None:  # what the model servers serve, under every name a client may use
            data += [{"id": name, "object": "model", "created": 0, "owned_by": "llmgw", "upstreams": count}
                     for name, count in upstreams.models().items() if name not in versions]
        return web.json_response({"object": "list", "data": data}, dumps=compact_json)

    # ---- one request --------------------------------------------------------------------------------------
    async def _handle(self, request: web.Request, parse, api: str) -> web.StreamResponse:
        request_id = request_id_from(request.headers)
        id_header = {REQUEST_ID_HEADER: request_id}
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = _Outcome()
        prompt_chars = 0
        try:
            caller = self._authenticate(request)  # before the body is read: a stranger's body is not worth reading
            try:
                if request.content.is_eof():  # the whole body came with the headers: nothing to wait for
                    raw = await request.read()
                else:
                    async with asyncio.timeout(self.body_timeout_s):
                        raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise bad_request(f"the request body is larger than {request.client_max_size} bytes",
                                  code="body_too_large") from None
            except TimeoutError:
                raise _BodyTimeout(f"the request body did not arrive within {self.body_timeout_s:g} s") from None
            body = decode_json_body(raw)
            if self._for_model_servers(body):  # the body goes to a model server as the client wrote it
                hedge = bool(parse_hedge_header(request.headers.get(HEDGE_HEADER)))
                if caller is not None:
                    result.tenant = caller.tenant
                    self._authorize(caller, body.get("model") if isinstance(body.get("model"), str) else "")
                return await passthrough.serve(self, request, body, "chat" if api == "chat" else "completions",
                                               request_id, id_header, result, started, hedge, _FRONT_ERRORS,
                                               caller, body_bytes=raw)
            params = parse(body, max_tokens_cap=self.gateway.config.max_tokens_cap,
                           default_max_tokens=min(self.default_max_tokens, self.gateway.config.max_tokens_cap))
            header_hedge = parse_hedge_header(request.headers.get(HEDGE_HEADER))
            if header_hedge is not None:
                params.hedge = params.hedge or header_hedge
            prompt_chars = len(params.prompt)
            if caller is not None:
                result.tenant = caller.tenant
                self._authorize(caller, params.model)
            result.reached_gateway = True
            infer_request = InferenceRequest(prompt=params.prompt, max_tokens=params.max_tokens, hedge=params.hedge,
                                             request_id=request_id, client_id=params.client_id,
                                             timeout_s=params.timeout_s,
                                             tenant=caller.tenant if caller else "",
                                             key_id=caller.key_id if caller else "",
                                             front="http", model=params.model,
                                             prompt_tokens=count_prompt_tokens(params.prompt),
                                             trace_carrier=request.headers)
            if params.stream:
                return await self._stream(request, params, infer_request, id_header, result, started)
            return await self._complete(params, infer_request, id_header, result, started)
        except _BodyTimeout as err:
            result.outcome, result.status = "deadline_exceeded", err.status
            return await _answer_and_close(request, err.response(id_header))
        except ApiError as err:
            result.outcome = _outcome_name(err)
            result.status = err.status
            return err.response(id_header)
        except asyncio.CancelledError:
            result.outcome, result.status = "cancelled", 499  # nginx's "client closed request"
            raise
        except Exception:
            log.exception("request %s: unexpected error", request_id)
            result.outcome, result.status = "internal", 500
            return ApiError(500, "internal error", type="server_error", code="internal").response(id_header)
        finally:
            self._finished(request_id, api, result, prompt_chars)

    def _for_model_servers(self, body: Any) -> bool:
        """Whether a request is served by the gateway's OpenAI-compatible model servers (llmgw.http.passthrough):
        its model is one they serve, or the gateway has model servers and no simulated gRPC replica (which would
        take any model name). Everything else keeps the simulated replicas' path below."""
        upstreams = getattr(self.gateway, "upstreams", None)
        if upstreams is None or not upstreams.configured or not isinstance(body, dict):
            return False
        model = body.get("model")
        return (isinstance(model, str) and upstreams.serves(model)) or not upstreams.simulated_replicas()

    def _authenticate(self, request: web.Request):
        """The caller's tenant (llmgw.gateway.tenancy_gate.Caller) from `Authorization: Bearer <key>`; None
        without a key file; ApiError 401 otherwise."""
        tenancy = getattr(self.gateway, "tenancy", None)
        if tenancy is None:
            return None
        try:
            return tenancy.authenticate(request.headers.items())
        except GatewayError as exc:
            err = from_gateway_error(exc)
            err.headers["WWW-Authenticate"] = 'Bearer realm="llmgw"'
            raise err from None

    def _authorize(self, caller, model: str) -> None:
        try:
            self.gateway.tenancy.authorize(caller, model)
        except GatewayError as exc:
            raise from_gateway_error(exc) from None

    async def _complete(self, params: CompletionParams, infer_request: InferenceRequest, id_header: dict,
                        result: _Outcome, started: float) -> web.Response:
        shape = _Shape(params, infer_request.request_id)
        texts: list[str] = []
        finish_reason = None
        try:
            async for event in self.gateway.infer(infer_request):
                self._token(event, result, started)
                texts.append(event.token)
                if event.is_final:
                    finish_reason = event.finish_reason or "length"
        except GatewayError as exc:
            raise from_gateway_error(exc) from None
        headers = dict(id_header)
        if result.replicas:
            headers[REPLICA_HEADER] = result.replicas[0]
        body = shape.full("".join(texts), finish_reason, usage(count_prompt_tokens(params.prompt), result.tokens))
        return web.json_response(body, headers=headers, dumps=compact_json)

    async def _stream(self, request: web.Request, params: CompletionParams, infer_request: InferenceRequest,
                      id_header: dict, result: _Outcome, started: float) -> web.StreamResponse:
        shape = _Shape(params, infer_request.request_id)
        batches = _batches(self.gateway, infer_request)
        response: Any = None
        try:
            try:
                batch = await anext(batches)
            except GatewayError as exc:
                raise from_gateway_error(exc) from None
            except StopAsyncIteration:
                raise ApiError(502, "the gateway ended the stream without a token", type="server_error",
                               code="empty_stream") from None
            # Headers go out with the first token: only then is the serving replica known, and an error before
            # it can still be a proper HTTP status.
            # ... and they leave in the same write as the first events (start_event_stream).
            response = await start_event_stream(request, {
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                REPLICA_HEADER: batch[0].replica_id, **id_header})
            while True:
                # Tokens that arrived together leave in one write: one SSE event each, one syscall per batch.
                self._tokens(batch, result, started)
                out = []
                for event in batch:
                    finish = (event.finish_reason or "length") if event.is_final else None
                    out.append(sse(shape.chunk(event.token, finish)))
                if batch[-1].is_final:
                    if params.include_usage:
                        out.append(sse(shape.usage_chunk(usage(count_prompt_tokens(params.prompt), result.tokens))))
                    out.append(SSE_DONE)
                    # The last events, [DONE] and the end of the chunked body leave in one write.
                    await response.write_eof(b"".join(out))
                    return response
                await response.write(b"".join(out))
                try:
                    batch = await anext(batches)
                except StopAsyncIteration:  # Gateway.infer always ends on a final event; never report OK without
                    raise GatewayError("stream ended without a final token") from None
        except GatewayError as exc:
            err = from_gateway_error(exc)
            if response is None:
                raise err from None
            # Too late for a status code: one error event, and no [DONE] so the client knows it is truncated.
            result.outcome, result.status = _outcome_name(err), err.status
            log.info("request %s: stream failed after %d tokens: %s", infer_request.request_id, result.tokens,
                     exc.message)
            await end_with_error_event(response, sse(err.body()))
            return response
        except ConnectionError:
            # The client went away between tokens; closing `batches` below frees the replica slot.
            result.outcome, result.status = "cancelled", 499
            return response if response is not None else web.Response(status=499)
        finally:
            await batches.aclose()

    def _token(self, event, result: _Outcome, started: float) -> None:
        self._tokens((event,), result, started)

    def _tokens(self, batch, result: _Outcome, started: float) -> None:
        """Counts events that reached the client together: one clock read per batch (per streamed write), so
        the gaps between them are 0, as the client sees them."""
        now = asyncio.get_running_loop().time()
        metrics = self.metrics
        if metrics is not None:  # (the gateway's MetricsListener measures instead when record_requests is off)
            if result.ttft_s is None:
                metrics.ttft.observe(now - started)
            else:
                metrics.inter_token.observe(now - result.last_token_at)
            if len(batch) > 1:  # the others came with it: gaps of 0
                observe_zeros(metrics.inter_token, len(batch) - 1)
        if result.ttft_s is None:
            result.ttft_s = now - started
        result.last_token_at = now
        tokens = len(batch)
        replicas = result.replicas
        for event in batch:
            if event.is_final and not event.token:  # a final event without a token is no token
                tokens -= 1
            if not replicas or replicas[-1] != event.replica_id:
                replicas.append(event.replica_id)
        result.tokens += tokens

    def _finished(self, request_id: str, api: str, result: _Outcome, prompt_chars: int) -> None:
        counted = self.record_requests or not result.reached_gateway
        if counted and self.request_metrics is not None:
            self.request_metrics.request_finished(result.outcome, tokens=result.tokens)
        # The request's line (or, when the gateway wrote it, its HTTP details at debug), if anyone reads it.
        if not log.isEnabledFor(logging.INFO if counted else logging.DEBUG):
            return
        fields = dict(id=request_id, api=api, replicas=result.replicas, outcome=result.outcome,
                      status=result.status, tokens=result.tokens, prompt_chars=prompt_chars,
                      ttft_ms=round(result.ttft_s * 1000, 3) if result.ttft_s is not None else None)
        if result.tenant:
            fields["tenant"] = result.tenant
        if counted:
            request_log(log, **fields)
        else:  # the gateway wrote this request's info line; the HTTP details (status, api) stay available at debug
            log.debug("http request", extra=fields)


async def _batches(gateway, request: InferenceRequest):
    """Token events grouped as they arrived (Gateway.infer_batches), or one per group from a gateway without it."""
    infer_batches = getattr(gateway, "infer_batches", None)
    if infer_batches is not None:
        async with contextlib.aclosing(infer_batches(request)) as batches:
            async for batch in batches:
                if batch:
                    yield batch
        return
    async with contextlib.aclosing(gateway.infer(request)) as events:
        async for event in events:
            yield [event]


def _outcome_name(err: ApiError) -> str:
    """gRPC status name for the metrics' outcome label."""
    return {400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied", 429: "resource_exhausted",
            503: "unavailable", 504: "deadline_exceeded", 499: "cancelled"}.get(err.status, "internal")
