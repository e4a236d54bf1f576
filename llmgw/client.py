"""Small asyncio client for the gateway (InferenceGateway.Infer) and replicas (LLMReplica.Generate)."""

from __future__ import annotations

import dataclasses
import time
from typing import AsyncIterator

import grpc

from llmgw._proto import llmgateway_pb2 as pb
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc

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
    from llmgw.replica.wire import channel_credentials

    return grpc.aio.secure_channel(target, channel_credentials(ca_file, cert_file, key_file))
