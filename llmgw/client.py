"""Small asyncio client for the gateway (InferenceGateway.Infer, or its HTTP front's streamed /v1/completions)
and replicas (LLMReplica.Generate)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from llmgw._proto import llmgateway_pb2 as pb
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    import ssl as ssl_module

    import aiohttp

DEFAULT_TIMEOUT_S = 60.0


@dataclasses.dataclass
class StreamedToken:
    index: int
    token: str
    replica_id: str
    is_final: bool
    elapsed_s: float  # since the call started


@dataclasses.dataclass
class StreamResult:
    tokens: list[StreamedToken]
    code: grpc.StatusCode
    details: str
    ttft_s: float | None
    total_s: float

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    @property
    def texts(self) -> list[str]:
        return [t.token for t in self.tokens if t.token or not t.is_final]

    @property
    def replicas(self) -> set[str]:
        return {t.replica_id for t in self.tokens if t.replica_id}


async def stream_infer(channel: grpc.aio.Channel, prompt: str, max_tokens: int, *, hedge: bool = False,
                       client_id: str = "", request_id: str = "", timeout_s: float = DEFAULT_TIMEOUT_S,
                       max_tokens_per_message: int = 0) -> AsyncIterator[StreamedToken]:
    """Yield tokens from the gateway as they arrive; raises grpc.aio.AioRpcError on a non-OK end.

    max_tokens_per_message > 1 lets the gateway coalesce ready tokens into one message; they are still yielded
    one StreamedToken each (is_final only on the very last)."""
    stub = pb_grpc.InferenceGatewayStub(channel)
    start = time.perf_counter()
    call = stub.Infer(pb.InferRequest(client_id=client_id, prompt=prompt, max_tokens=max_tokens, hedge=hedge,
                                      request_id=request_id, max_tokens_per_message=max_tokens_per_message),
                     timeout=timeout_s)
    async for msg in call:
        elapsed = time.perf_counter() - start
        if msg.more_tokens:
            yield StreamedToken(msg.index, msg.token, msg.replica_id, False, elapsed)
            last = len(msg.more_tokens)
            for k, tok in enumerate(msg.more_tokens, 1):
                yield StreamedToken(msg.index + k, tok, msg.replica_id, msg.is_final and k == last, elapsed)
        else:
            yield StreamedToken(msg.index, msg.token, msg.replica_id, msg.is_final, elapsed)


async def stream_generate(channel: grpc.aio.Channel, prompt: str, max_tokens: int, *, already: int = 0,
                          request_id: str = "", timeout_s: float = DEFAULT_TIMEOUT_S,
                          max_tokens_per_message: int = 0) -> AsyncIterator[StreamedToken]:
    """Yield tokens straight from a replica's Generate (replica_id is left empty)."""
    stub = pb_grpc.LLMReplicaStub(channel)
    start = time.perf_counter()
    call = stub.Generate(pb.GenerateRequest(request_id=request_id, prompt=prompt, max_tokens=max_tokens,
                                            tokens_already_generated=already,
                                            max_tokens_per_message=max_tokens_per_message), timeout=timeout_s)
    async for msg in call:
        elapsed = time.perf_counter() - start
        if msg.more_tokens:
            yield StreamedToken(msg.index, msg.token, "", False, elapsed)
            last = len(msg.more_tokens)
            for k, tok in enumerate(msg.more_tokens, 1):
                yield StreamedToken(msg.index + k, tok, "", msg.is_final and k == last, elapsed)
        else:
            yield StreamedToken(msg.index, msg.token, "", msg.is_final, elapsed)


async def collect(stream: AsyncIterator[StreamedToken]) -> StreamResult:
    """Drain a stream into a StreamResult, turning a gRPC error into its status code."""
    start = time.perf_counter()
    tokens: list[StreamedToken] = []
    code, details = grpc.StatusCode.OK, ""
    try:
        async for tok in stream:
            tokens.append(tok)
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
    ttft = tokens[0].elapsed_s if tokens else None
    return StreamResult(tokens, code, details, ttft, time.perf_counter() - start)


def open_channel(target: str, *, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to `target`: plaintext, or TLS when any of the PEM files is given (`ca_file` = the CA
    to trust, None = the system roots; `cert_file` + `key_file` = a client certificate for mutual TLS)."""
    if not (ca_file or cert_file or key_file):
        return grpc.aio.insecure_channel(target)
    from llmgw.tls import channel_credentials

    return grpc.aio.secure_channel(target, channel_credentials(ca_file, cert_file, key_file))


# ---- HTTP front (OpenAI-compatible) ---------------------------------------------------------------------------
REPLICA_HEADER = "X-LLMGW-Replica"  # the replica that served the first token (llmgw.http.openai_api)


class HttpStreamError(Exception):
    """A streamed completion over HTTP did not end complete: an error status before the stream (`status` is the
    HTTP status), an error event in it, or a stream cut before `data: [DONE]` (`status` 0 for those two)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


def completions_url(base_url: str) -> str:
    """The /v1/completions URL of a gateway's HTTP front given as http(s)://host:port (a trailing /v1 is fine)."""
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"the HTTP front's URL must start with http:// or https://, got {base_url!r}")
    base = base_url.rstrip("/")
    return (base if base.endswith("/v1") else base + "/v1") + "/completions"


async def stream_completion_http(session: aiohttp.ClientSession, base_url: str, prompt: str, max_tokens: int, *,
                                 model: str = "llmgw", hedge: bool = False, client_id: str = "",
                                 timeout_s: float = DEFAULT_TIMEOUT_S,
                                 ssl: ssl_module.SSLContext | None = None) -> AsyncIterator[StreamedToken]:
    """Yield tokens of a streamed /v1/completions (Server-Sent Events) from a gateway's HTTP front as they arrive.

    `session` is an aiohttp.ClientSession; `ssl` an ssl.SSLContext for https (llmgw.tls.client_ssl_context).
    Each token carries the serving replica (the X-LLMGW-Replica header) and the time since the request was sent;
    the one with a finish_reason is final. Raises HttpStreamError unless the stream ends with `data: [DONE]`."""
    import aiohttp

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "hedge": hedge}
    if client_id:
        body["user"] = client_id
    start = time.perf_counter()
    index = 0
    async with session.post(completions_url(base_url), json=body, ssl=True if ssl is None else ssl,
                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        if resp.status != 200:
            raise HttpStreamError(resp.status, _error_message(await resp.read()))
        replica = resp.headers.get(REPLICA_HEADER, "")
        try:
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue  # the blank line ending each event, or an SSE comment
                data = line[6:].strip()
                if data == b"[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise HttpStreamError(0, f"stream failed after {index} tokens: "
                                             f"{event['error'].get('message', event['error'])}")
                choice = event["choices"][0]
                final = choice.get("finish_reason") is not None
                yield StreamedToken(index, choice.get("text", ""), replica, final, time.perf_counter() - start)
                index += 1
        except aiohttp.ClientPayloadError as exc:
            raise HttpStreamError(0, f"stream cut after {index} tokens: {exc}") from None
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise HttpStreamError(0, f"not an OpenAI completion stream: {type(exc).__name__}: {exc}") from None
    raise HttpStreamError(0, f"stream ended after {index} tokens without data: [DONE]")


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI-shaped error body, or the body itself."""
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace").strip()[:500] or "(empty body)"
