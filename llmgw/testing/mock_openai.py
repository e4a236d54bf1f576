"""A deterministic mock OpenAI-compatible model server (aiohttp), for tests and `llmgw bench openai`.

The answer behaves like an autoregressive model, minus the model: the next token is a function of the whole text
so far (prompt, or rendered chat, followed by the tokens already generated), computed with a running BLAKE2b
hash. So the same request always gets the same answer, and a continuation -- a completions prompt extended by
the text already generated, or a chat whose final assistant message is continued (`continue_final_message`, as
vLLM does) -- yields exactly the tokens the uninterrupted answer had from that point on. Every token is one word
with a leading space, so usage counts are whitespace word counts and add up across a continuation.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streamed and not), GET /metrics
(vLLM gauge names), GET /health (200, or 503 while `healthy` is False), and for out-of-process control
POST /mock/faults, GET /mock/requests, POST /mock/reset.

Faults are queued with `inject(Fault(...), times=n)` (or POST /mock/faults); each generation request takes the
next one. A fault's `after_chunks` counts the token chunks written before it strikes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import hashlib
import json
import logging
import socket
import struct
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

from aiohttp import web

log = logging.getLogger("llmgw.testing.mock_openai")

VOCABULARY = tuple(
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
    "romeo sierra tango uniform victor whiskey xray yankee zulu amber basalt cobalt dune ember fjord granite "
    "harbor iris jade kelp lagoon meadow nectar onyx prairie quartz reef summit tundra umber valley willow "
    "zephyr".split())
CREATED = 1_700_000_000  # fixed, so answers are byte-for-byte reproducible
DEFAULT_MAX_TOKENS = 16


class FaultKind(enum.Enum):
    RATE_LIMIT = "rate_limit"  # 429 with Retry-After
    SERVER_ERROR = "server_error"  # an HTTP 5xx (status) before anything is streamed
    CLIENT_ERROR = "client_error"  # an HTTP 4xx with `body` as the server's own error body
    RESET = "reset"  # TCP reset after `after_chunks` token chunks
    MALFORMED = "malformed"  # a data line that is not JSON after `after_chunks` token chunks
    NO_DONE = "no_done"  # the stream ends cleanly but without data: [DONE] (after `after_chunks`, or the whole answer)
    STALL = "stall"  # silence after `after_chunks` token chunks, until the client leaves or `stall_seconds` pass
    ERROR_EVENT = "error_event"  # a vLLM-style `data: {"error": ...}` event after `after_chunks` token chunks
    TRUNCATED = "truncated"  # data: [DONE] after `after_chunks` token chunks, no finish_reason (llama.cpp, interrupted)


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: FaultKind
    after_chunks: int | None = 0
    status: int | None = None
    retry_after: str = "1"
    body: bytes | None = None
    stall_seconds: float = 300.0

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Fault:
        body = value.get("body")
        return cls(kind=FaultKind(value["kind"]), after_chunks=value.get("after_chunks", 0),
                   status=value.get("status"), retry_after=str(value.get("retry_after", "1")),
                   body=body.encode() if isinstance(body, str) else None,
                   stall_seconds=float(value.get("stall_seconds", 300.0)))


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: Mapping[str, str]
    raw: bytes
    body: Any  # the parsed JSON (None when the body was not JSON)


class BadRequest(Exception):
    def __init__(self, message: str, *, status: int = 400, error_type: str = "BadRequestError") -> None:
        super().__init__(message)
        self.message, self.status, self.error_type = message, status, error_type


def error_body(message: str, status: int, error_type: str) -> bytes:
    """An HTTP error body in OpenAI's shape (as current vLLM writes it)."""
    return json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": status}}).encode()


def flat_error_body(message: str, status: int, error_type: str) -> bytes:
    """Older vLLM's flat error object, which it also sends as an event inside a broken stream."""
    return json.dumps({"object": "error", "message": message, "type": error_type, "param": None,
                       "code": status}).encode()


# --- the deterministic "model" ------------------------------------------------------------------------------

def render_chat(messages: list[Any]) -> str:
    """The conversation as the model sees it, up to and including the start of the assistant's answer."""
    parts = []
    for message in messages:
        content = message.get("content")
        text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
        parts.append(f"<|{message.get('role')}|> {text} <|end|>")
    return "\n".join(parts) + "\n<|assistant|>"


def token_stream(context: str, stop_probability: float = 0.0) -> Iterator[tuple[str, float, bool]]:
    """(token, logprob, is_end) forever: token i depends only on `context` + the tokens before it."""
    state = hashlib.blake2b(digest_size=16, person=b"llmgw-mock")
    state.update(context.encode("utf-8"))
    while True:
        digest = state.copy().digest()
        word = VOCABULARY[int.from_bytes(digest[:8], "big") % len(VOCABULARY)]
        draw = int.from_bytes(digest[8:12], "big") / 2**32
        logprob = -round(int.from_bytes(digest[12:14], "big") / 65536 * 5.0, 4)
        token = " " + word
        yield token, logprob, draw < stop_probability
        state.update(token.encode("utf-8"))


def word_count(text: str) -> int:
    return len(text.split())


@dataclasses.dataclass
class _Job:
    """One parsed generation request."""
    chat: bool
    model: str
    stream: bool
    max_tokens: int
    contexts: list[str]  # one per choice (n)
    include_usage: bool
    want_logprobs: bool
    tool_name: str | None
    prompt_tokens: int


class MockOpenAIServer:
    """Start with `await server.start()` (or `async with`); `base_url` is then "http://127.0.0.1:<port>"."""

    def __init__(self, *, models: tuple[str, ...] = ("mock-model",), token_delay: float = 0.0,
                 first_token_delay: float = 0.0, stop_probability: float = 0.0, max_running: int = 256,
                 host: str = "127.0.0.1", port: int = 0, record: bool = True) -> None:
        if not models:
            raise ValueError("the mock needs at least one model name")
        if token_delay < 0 or first_token_delay < 0:
            raise ValueError("delays must be >= 0")
        if not 0.0 <= stop_probability <= 1.0:
            raise ValueError("stop_probability must be within [0, 1]")
        self.models = tuple(models)
        self.token_delay = token_delay
        self.first_token_delay = first_token_delay
        self.stop_probability = stop_probability
        self.max_running = max_running
        self.host, self.port = host, port
        self.record = record
        self.healthy = True
        self.requests: list[RecordedRequest] = []
        self.faults: deque[Fault] = deque()
        self.running = 0
        self.waiting = 0
        self.client_disconnects = 0
        self._slots = asyncio.Semaphore(max_running)
        self._counter = 0
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    # --- lifecycle -----------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_post("/mock/faults", self._add_faults)
        app.router.add_get("/mock/requests", self._list_requests)
        app.router.add_post("/mock/reset", self._reset)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)  # a benchmark opens 256 at once
        await site.start()
        self.port = self._runner.addresses[0][1]  # the port the OS chose for port 0
        return self.base_url

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MockOpenAIServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- control -------------------------------------------------------------------------------------------
    def inject(self, fault: Fault, times: int = 1) -> None:
        for _ in range(times):
            self.faults.append(fault)

    def generation_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.startswith("/v1/") and r.method == "POST"]

    def reset(self) -> None:
        self.requests.clear()
        self.faults.clear()
        self.client_disconnects = 0

    async def _add_faults(self, request: web.Request) -> web.Response:
        spec = await request.json()
        try:
            self.inject(Fault.from_json(spec), int(spec.get("times", 1)))
        except (KeyError, ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"queued": len(self.faults)})

    async def _list_requests(self, request: web.Request) -> web.Response:
        return web.json_response([{"method": r.method, "path": r.path, "body": r.body} for r in self.requests])

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    # --- endpoints -----------------------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        self._record(request, b"", None)
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": CREATED, "owned_by": "llmgw-mock"} for name in self.models]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        model = self.models[0]
        lines = []
        gauges = (
            ("vllm:num_requests_running", self.running, "Number of requests in model execution batches."),
            ("vllm:num_requests_waiting", self.waiting, "Number of requests waiting to be processed."),
            ("vllm:kv_cache_usage_perc", self.running / self.max_running, "KV-cache usage. 1 means 100 percent usage."),
        )
        for name, value, help_text in gauges:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge",
                      f'{name}{{model_name="{model}"}} {float(value)}']
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    def _record(self, request: web.Request, raw: bytes, body: Any) -> None:
        if self.record:
            self.requests.append(RecordedRequest(request.method, request.path, dict(request.headers), raw, body))

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self._record(request, raw, body)
        fault = self.faults.popleft() if self.faults else None
        if fault is not None and fault.kind in (FaultKind.RATE_LIMIT, FaultKind.SERVER_ERROR, FaultKind.CLIENT_ERROR):
            return self._http_fault(fault)
        try:
            job = self._parse(body, chat=chat)
        except BadRequest as exc:
            return web.Response(body=error_body(exc.message, exc.status, exc.error_type), status=exc.status,
                                content_type="application/json")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            if self.first_token_delay:
                await asyncio.sleep(self.first_token_delay)
            if job.stream:
                return await self._stream(request, job, fault)
            answer = await self._whole_answer(job)
            if fault is not None:
                # Non-streamed answers: RESET, MALFORMED and STALL apply; the stream-only faults do not.
                if fault.kind is FaultKind.RESET:
                    _reset_connection(request)
                    return web.Response(status=500)  # never reaches the client: the connection is gone
                if fault.kind is FaultKind.MALFORMED:
                    return web.Response(body=b"{this is not json", content_type="application/json")
                if fault.kind is FaultKind.STALL:
                    await self._stall(request, fault)
                    return web.Response(status=500)
            return web.json_response(answer)
        finally:
            self.running -= 1
            self._slots.release()

    def _http_fault(self, fault: Fault) -> web.Response:
        if fault.kind is FaultKind.RATE_LIMIT:
            return web.Response(body=error_body("rate limited by the mock", 429, "RateLimitError"), status=429,
                                headers={"Retry-After": fault.retry_after}, content_type="application/json")
        status = fault.status or (503 if fault.kind is FaultKind.SERVER_ERROR else 400)
        body = fault.body if fault.body is not None else error_body(f"injected {status}", status, "MockError")
        return web.Response(body=body, status=status, content_type="application/json")

    def _parse(self, body: Any, *, chat: bool) -> _Job:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model", self.models[0])
        if model not in self.models:
            raise BadRequest(f"The model `{model}` does not exist.", status=404, error_type="NotFoundError")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be a boolean")
        options = body.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict)):
            raise BadRequest("Stream options can only be defined when `stream=True`.")
        limit = body.get("max_completion_tokens") if chat else None
        if limit is None:
            limit = body.get("max_tokens")
        if limit is None:
            limit = DEFAULT_MAX_TOKENS
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise BadRequest(f"max_tokens must be an integer >= 1, got {limit!r}")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 16:
            raise BadRequest(f"n must be an integer in [1, 16], got {n!r}")
        tool_name = None
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
                raise BadRequest("messages must be a non-empty list of objects with a role")
            context = self._chat_context(body, messages)
            tool_choice = body.get("tool_choice")
            if body.get("tools") and isinstance(tool_choice, dict):
                tool_name = str((tool_choice.get("function") or {}).get("name", "tool"))
            want_logprobs = bool(body.get("logprobs"))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise BadRequest("prompt must be a string")
            context = prompt
            want_logprobs = body.get("logprobs") is not None
        contexts = [context if j == 0 else f"{context}\x00choice {j}" for j in range(n)]
        include_usage = bool(stream and isinstance(options, dict) and options.get("include_usage"))
        return _Job(chat, model, stream, limit, contexts, include_usage, want_logprobs, tool_name,
                    word_count(context))

    @staticmethod
    def _chat_context(body: Mapping[str, Any], messages: list[Any]) -> str:
        last = messages[-1]
        if body.get("continue_final_message") is True:
            if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
                raise BadRequest("continue_final_message needs a final assistant message with text content")
            if body.get("add_generation_prompt", True) is not False:
                raise BadRequest("continue_final_message and add_generation_prompt cannot both be true")
            # The open message's text is already part of the answer: the model continues right after it.
            return render_chat(messages[:-1]) + last["content"]
        return render_chat(messages)

    def _next_id(self, chat: bool) -> str:
        self._counter += 1
        return f"{'chatcmpl' if chat else 'cmpl'}-mock-{self._counter}"

    def _choice_tokens(self, job: _Job, context: str) -> tuple[list[tuple[str, float]], str]:
        tokens: list[tuple[str, float]] = []
        finish = "length"
        for token, logprob, is_end in token_stream(context, self.stop_probability):
            if is_end:
                finish = "stop"
                break
            tokens.append((token, logprob))
            if len(tokens) >= job.max_tokens:
                break
        if job.tool_name is not None:
            finish = "tool_calls"
        return tokens, finish

    async def _whole_answer(self, job: _Job) -> dict[str, Any]:
        choices = []
        completion_tokens = 0
        for index, context in enumerate(job.contexts):
            tokens, finish = self._choice_tokens(job, context)
            if self.token_delay:
                await asyncio.sleep(self.token_delay * len(tokens))
            completion_tokens += len(tokens)
            text = "".join(t for t, _ in tokens)
            if job.chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if job.tool_name is not None:
                    message = {"role": "assistant", "content": None, "tool_calls": [_tool_call(job.tool_name, text)]}
                choice: dict[str, Any] = {"index": index, "message": message, "finish_reason": finish,
                                          "logprobs": _chat_logprobs(tokens) if job.want_logprobs else None}
            else:
                choice = {"index": index, "text": text, "finish_reason": finish,
                          "logprobs": _completion_logprobs(tokens) if job.want_logprobs else None}
            choices.append(choice)
        return {"id": self._next_id(job.chat), "object": "chat.completion" if job.chat else "text_completion",
                "created": CREATED, "model": job.model, "choices": choices,
                "usage": _usage(job.prompt_tokens * len(job.contexts), completion_tokens)}

    async def _stream(self, request: web.Request, job: _Job, fault: Fault | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        response_id = self._next_id(job.chat)
        usage_field = {"usage": None} if job.include_usage else {}
        base = {"id": response_id, "object": "chat.completion.chunk" if job.chat else "text_completion",
                "created": CREATED, "model": job.model}
        per_choice = [self._choice_tokens(job, context) for context in job.contexts]
        written = 0
        try:
            if job.chat:
                for index in range(len(job.contexts)):
                    await _send(response, {**base, "choices": [{"index": index, "delta": {"role": "assistant",
                                           "content": ""}, "logprobs": None, "finish_reason": None}], **usage_field})
            longest = max(len(tokens) for tokens, _ in per_choice)
            for position in range(longest):
                for index, (tokens, _) in enumerate(per_choice):
                    if position >= len(tokens):
                        continue
                    if fault is not None and fault.after_chunks is not None and written >= fault.after_chunks:
                        return await self._strike(request, response, fault)
                    if self.token_delay:
                        await asyncio.sleep(self.token_delay)
                    token, logprob = tokens[position]
                    await _send(response, {**base, "choices": [
                        self._stream_choice(job, index, position, token, logprob)], **usage_field})
                    written += 1
            if fault is not None and fault.kind is not FaultKind.NO_DONE:
                return await self._strike(request, response, fault)  # struck after the last chunk
            completion_tokens = 0
            for index, (tokens, finish) in enumerate(per_choice):
                completion_tokens += len(tokens)
                final: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
                if job.chat:
                    final["delta"] = {}
                else:
                    final["text"] = ""
                await _send(response, {**base, "choices": [final], **usage_field})
            if job.include_usage:
                await _send(response, {**base, "choices": [],
                                       "usage": _usage(job.prompt_tokens * len(job.contexts), completion_tokens)})
            if fault is None:
                await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            self.client_disconnects += 1
        return response

    def _stream_choice(self, job: _Job, index: int, position: int, token: str, logprob: float) -> dict[str, Any]:
        if not job.chat:
            return {"index": index, "text": token, "finish_reason": None,
                    "logprobs": _completion_logprobs([(token, logprob)]) if job.want_logprobs else None}
        if job.tool_name is not None:
            call: dict[str, Any] = {"index": 0, "function": {"arguments": token}}
            if position == 0:
                call = {"index": 0, "id": f"call_{index}", "type": "function",
                        "function": {"name": job.tool_name, "arguments": token}}
            delta: dict[str, Any] = {"tool_calls": [call]}
        else:
            delta = {"content": token}
        return {"index": index, "delta": delta, "finish_reason": None,
                "logprobs": _chat_logprobs([(token, logprob)]) if job.want_logprobs else None}

    async def _strike(self, request: web.Request, response: web.StreamResponse, fault: Fault) -> web.StreamResponse:
        if fault.kind is FaultKind.RESET:
            _reset_connection(request)
        elif fault.kind is FaultKind.MALFORMED:
            await response.write(b"data: {this is not json\n\n")
            await response.write_eof()
        elif fault.kind is FaultKind.ERROR_EVENT:
            await response.write(b"data: " + flat_error_body("injected error mid-stream", 500, "InternalServerError")
                                 + b"\n\n")
            await response.write_eof()
        elif fault.kind is FaultKind.NO_DONE:
            await response.write_eof()
        elif fault.kind is FaultKind.TRUNCATED:
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        elif fault.kind is FaultKind.STALL:
            await self._stall(request, fault)
        return response

    async def _stall(self, request: web.Request, fault: Fault) -> None:
        """Say nothing until the client leaves, the server stops, or `stall_seconds` pass; then close."""
        disconnected = asyncio.ensure_future(_wait_disconnect(request))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({disconnected, stopping}, timeout=fault.stall_seconds,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnected.cancel()
            stopping.cancel()
        if request.transport is not None and not request.transport.is_closing():
            request.transport.close()
        self.client_disconnects += 1


async def _send(response: web.StreamResponse, chunk: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")


async def _wait_disconnect(request: web.Request) -> None:
    """Returns when the client closed the connection (polled: aiohttp exposes no disconnect event to handlers)."""
    while request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(0.02)


def _reset_connection(request: web.Request) -> None:
    """Close with a TCP RST (SO_LINGER 0), the way a killed server's kernel ends its connections."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_0", "type": "function", "function": {"name": name, "arguments": arguments}}


def _chat_logprobs(tokens: list[tuple[str, float]]) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, lp in tokens]}


def _completion_logprobs(tokens: list[tuple[str, float]]) -> dict[str, Any]:
    return {"tokens": [t for t, _ in tokens], "token_logprobs": [lp for _, lp in tokens],
            "top_logprobs": [{t: lp} for t, lp in tokens], "text_offset": []}


def expected_text(context: str, count: int) -> str:
    """The mock's first `count` tokens after `context` (tests compare answers against this)."""
    out: list[str] = []
    for token, _, _ in token_stream(context):
        if len(out) == count:
            break
        out.append(token)
    return "".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmgw.testing.mock_openai",
                                     description="Run the deterministic mock OpenAI-compatible server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", action="append", dest="models", help="a served model name (repeatable)")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between streamed tokens")
    parser.add_argument("--first-token-delay", type=float, default=0.0)
    parser.add_argument("--no-record", action="store_true", help="do not keep request bodies (long benchmarks)")
    args = parser.parse_args(argv)

    async def serve() -> None:
        server = MockOpenAIServer(models=tuple(args.models or ("mock-model",)), token_delay=args.token_delay,
                                  first_token_delay=args.first_token_delay, host=args.host, port=args.port,
                                  record=not args.no_record)
        print(await server.start(), flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
