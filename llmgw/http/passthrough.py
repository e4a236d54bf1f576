"""The OpenAI front for requests served by model servers: the client's body in, the server's answer out.

The gateway reads only what it needs from the body -- `model` (which servers may take it) and `stream` -- and
sends the rest to the server untouched (llmgw.upstream.fidelity lists the fields it owns). The answer comes back
as the server wrote it, event for event, with two fields rewritten: `id` (the first server's id, kept across a
failover) and `model` (the name the client asked for, when it was an alias). The server's 4xx errors reach the
client with its status and body.

Usage is the server's. For a stream whose client asked for usage (`stream_options.include_usage`) from a server
that sends none (llama.cpp), the gateway adds a usage chunk of its own count: `completion_tokens` is the number of
content events it forwarded, `prompt_tokens` and `total_tokens` are null (the gateway has no tokenizer), and
`"llmgw_usage": "gateway_count"` marks it. When the gateway itself asked the server for usage (a tenant's tokens
are counted: http_transport.asks_usage) and the client did not, that usage is not forwarded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from llmgw.gateway.api import GatewayError, TokenEvent
from llmgw.gateway.http_transport import UpstreamRejected, asks_usage
from llmgw.gateway.upstreams import passthrough_request
from llmgw.http.sse_stream import SSE_DONE, end_with_error_event, start_event_stream
from llmgw.upstream.client import StreamChunk
from llmgw.upstream.fidelity import rewrite_chunk


@dataclasses.dataclass(frozen=True)
class FrontErrors:
    """What the OpenAI front answers errors with (llmgw.http.openai_api passes its own; no import back)."""

    api_error: Callable[..., Exception]  # ApiError(status, message, *, type, param, code)
    from_gateway_error: Callable[[GatewayError], Any]  # -> an ApiError with .status, .body()
    replica_header: str


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # built once, not per json.dumps call


def _dumps(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode("utf-8")


class _Answer:
    """Turns the server's events into what the client gets, one request at a time."""

    __slots__ = ("content_events", "drop_usage", "model", "response_id", "usage_seen")

    def __init__(self, model: str, drop_usage: bool = False) -> None:
        self.model = model
        self.drop_usage = drop_usage  # the usage in the stream is the gateway's request, not the client's
        self.response_id: str | None = None
        self.usage_seen = False
        self.content_events = 0

    def encode(self, chunk: StreamChunk) -> bytes | None:
        """One event's data as the client gets it: the server's bytes when nothing needs rewriting; None when it
        is not forwarded (usage the client did not ask for)."""
        data = chunk.data
        if self.response_id is None:
            given = data.get("id")
            self.response_id = given if isinstance(given, str) else ""
        if data.get("usage") is not None:
            self.usage_seen = True
        raw = chunk.raw
        # The usual event: the server's own id and the model name the client used -- its bytes go out as they
        # came, without a call into the rewriting rules (the same test rewrite_chunk makes, per streamed event).
        if raw and not self.drop_usage and data.get("id", self.response_id) == self.response_id \
                and data.get("model", self.model) == self.model:
            return raw
        out = rewrite_chunk(data, response_id=self.response_id, client_model=self.model, drop_usage=self.drop_usage)
        if out is None:
            return None
        if out is data and chunk.raw:
            return chunk.raw
        return _dumps(out)

    def sse(self, events: list[TokenEvent]) -> bytes:
        parts = []
        for event in events:
            if event.token:
                self.content_events += 1
            for chunk in event.raw or ():
                encoded = self.encode(chunk)
                if encoded is not None:
                    parts.append(b"data: " + encoded + b"\n\n")
        return b"".join(parts)

    def gateway_usage(self, api: str) -> bytes:
        kind = "chat.completion.chunk" if api == "chat" else "text_completion"
        data: dict[str, Any] = {"id": self.response_id or "", "object": kind,
                "model": self.model, "choices": [],
                "usage": {"prompt_tokens": None, "completion_tokens": self.content_events, "total_tokens": None},
                "llmgw_usage": "gateway_count"}
        return b"data: " + _dumps(data) + b"\n\n"


def wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def serve(front: Any, request: web.Request, body: dict[str, Any], api: str, request_id: str,
                id_header: dict[str, str], result: Any, started: float, hedge: bool, errors: FrontErrors,
                caller: Any = None, *, body_bytes: bytes | None = None) -> web.StreamResponse:
    """Serve one OpenAI request from the model servers. `front` is the llmgw.http.openai_api.OpenAIApi (its
    gateway, metrics); raises `errors.api_error` for answers that are the gateway's own. `body_bytes`, the body
    as the client sent it, goes to the server as it is when the gateway changes nothing in it."""
    oa = errors
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise oa.api_error(400, "'model' must be a non-empty string", param="model",
                           code=None if "model" in body else "missing_required_parameter")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise oa.api_error(400, f"'stream' must be a boolean, got {type(stream).__name__}", param="stream")
    upstreams = front.gateway.upstreams
    if not upstreams.serves(model):
        raise oa.api_error(404, f"The model `{model}` does not exist (served here: "
                          f"{', '.join(upstreams.models()) or 'none yet'}).", param="model", code="model_not_found")
    user = body.get("user")
    infer_request = passthrough_request(api, body, request_id=request_id, hedge=hedge,
                                        client_id=user if isinstance(user, str) else "", body_bytes=body_bytes)
    infer_request.trace_carrier = request.headers  # the caller's traceparent, if any (llmgw.tracing)
    if caller is not None:
        infer_request.tenant, infer_request.key_id = caller.tenant, caller.key_id
    result.reached_gateway = True
    answer = _Answer(model, drop_usage=infer_request.stream and asks_usage(infer_request) and not wants_usage(body))
    gateway = front.gateway
    if not infer_request.stream:
        return await _complete(front, gateway, infer_request, answer, id_header, result, started, errors)
    return await _stream(front, request, gateway, infer_request, answer, id_header, result, started, api,
                         wants_usage(body), errors)


def rejected_response(exc: UpstreamRejected, id_header: dict[str, str]) -> web.Response:
    """The server's own refusal, as it wrote it."""
    return web.Response(body=exc.body, status=exc.status, headers={**id_header, "Content-Type": exc.content_type})


async def _complete(front: Any, gateway: Any, infer_request: Any, answer: _Answer, id_header: dict[str, str],
                    result: Any, started: float, oa: FrontErrors) -> web.StreamResponse:
    chunks: list[StreamChunk] = []
    try:
        async for event in gateway.infer(infer_request):
            front._token(event, result, started)
            chunks.extend(event.raw or ())
    except UpstreamRejected as exc:
        result.outcome, result.status = "invalid_argument", exc.status
        return rejected_response(exc, id_header)
    except GatewayError as exc:
        raise oa.from_gateway_error(exc) from None
    if len(chunks) != 1:
        raise oa.api_error(502, f"the model server's answer came in {len(chunks)} parts", type="server_error",
                          code="bad_upstream_answer")
    headers = dict(id_header)
    if result.replicas:
        headers[oa.replica_header] = result.replicas[0]
    body = answer.encode(chunks[0])
    assert body is not None  # only streamed usage is ever held back
    return web.Response(body=body, headers=headers, content_type="application/json")


async def _stream(front: Any, request: web.Request, gateway: Any, infer_request: Any, answer: _Answer,
                  id_header: dict[str, str], result: Any, started: float, api: str,
                  usage_wanted: bool, oa: FrontErrors) -> web.StreamResponse:
    batches = gateway.infer_batches(infer_request)
    response: Any = None
    try:
        try:
            batch = await anext(batches)
        except UpstreamRejected as exc:
            result.outcome, result.status = "invalid_argument", exc.status
            return rejected_response(exc, id_header)
        except GatewayError as exc:
            raise oa.from_gateway_error(exc) from None
        except StopAsyncIteration:
            raise oa.api_error(502, "the gateway ended the stream without a token", type="server_error",
                              code="empty_stream") from None
        # The status line and headers leave with the first events, in one write (start_event_stream).
        response = await start_event_stream(request, {
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
            oa.replica_header: batch[0].replica_id, **id_header})
        first = True
        while True:
            front._tokens(batch, result, started)
            # Events that arrived together leave in one write.
            out = answer.sse(batch)
            if batch[-1].is_final:
                if usage_wanted and not answer.usage_seen:
                    out += answer.gateway_usage(api)
                # The last events, [DONE] and the end of the chunked body leave in one write.
                await response.write_eof(out + SSE_DONE)
                return response
            if out or first:  # the headers go out now even when the first events are all held back
                await response.write(out)
                first = False
            try:
                batch = await anext(batches)
            except StopAsyncIteration:
                raise GatewayError("stream ended without a final token") from None
    except GatewayError as exc:
        if isinstance(exc, UpstreamRejected):
            err_body: Any = _error_body_of(exc)
            status = exc.status
        else:
            err = oa.from_gateway_error(exc)
            if response is None:
                raise err from None
            err_body, status = err.body(), err.status
        if response is None:
            raise oa.api_error(status, exc.message) from None
        # Too late for a status code: one error event, and no [DONE] so the client knows it is truncated.
        result.outcome, result.status = "unavailable" if status >= 500 else "invalid_argument", status
        await end_with_error_event(response, b"data: " + _dumps(err_body) + b"\n\n")
        return response
    except ConnectionError:
        result.outcome, result.status = "cancelled", 499
        return response if response is not None else web.Response(status=499)
    finally:
        await batches.aclose()


def _error_body_of(exc: UpstreamRejected) -> Any:
    try:
        return json.loads(exc.body)
    except ValueError:
        return {"error": {"message": exc.message, "type": "upstream_error", "param": None, "code": exc.status}}
