"""gRPC replica answers in the request path's terms: the one translation both gRPC streams (Generate calls and
GenerateSession streams) use for statuses and GenerateResponse messages."""

from __future__ import annotations

import grpc

from llmgw._proto import llmgateway_pb2 as pb
from llmgw.gateway.replica_stream import AttemptError, AttemptErrorKind, ReplicaChunk

FINISH_REASONS = {pb.LENGTH: "length", pb.STOP: "stop"}
# What a grpc.aio call's read() returns once the stream ended (the type stubs do not declare it).
END_OF_STREAM: object = grpc.aio.EOF  # type: ignore[attr-defined]
STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def attempt_error(code: grpc.StatusCode, details: str | None) -> AttemptError:
    """A replica's error status as an AttemptError. A replica refuses with RESOURCE_EXHAUSTED when full and with
    UNAVAILABLE "draining..." when draining; INVALID_ARGUMENT is the request's own fault."""
    details = details or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return AttemptError(AttemptErrorKind.INVALID, details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return AttemptError(AttemptErrorKind.BUSY, details or "replica at capacity")
    if code == grpc.StatusCode.UNAVAILABLE:
        if details.startswith("draining"):
            return AttemptError(AttemptErrorKind.DRAINING, "replica is draining")
        return AttemptError(AttemptErrorKind.UNAVAILABLE, f"UNAVAILABLE: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return AttemptError(AttemptErrorKind.DEADLINE, f"DEADLINE_EXCEEDED: {details}")
    return AttemptError(AttemptErrorKind.ERROR, f"{code.name}: {details}")


def chunk_from_response(msg: pb.GenerateResponse) -> ReplicaChunk:
    """One GenerateResponse as a chunk. Reference replicas leave `index` unset (0) on every message: the request
    path then relies on order alone."""
    token = msg.token
    more = msg.more_tokens
    is_final = msg.is_final
    if more:
        tokens = [token, *more]
    elif token or not is_final:
        tokens = [token]
    else:  # a final message with no token: the replica only says it is done
        tokens = []
    if is_final:
        return ReplicaChunk(msg.index, tokens, True, FINISH_REASONS.get(msg.finish_reason, "length"), msg)
    return ReplicaChunk(msg.index, tokens, False, None, msg)
