"""One gRPC channel per replica address, shared by every request, closed when the replica leaves."""

from __future__ import annotations

import asyncio
import logging

import grpc

from llmgw._proto import llmgateway_pb2 as pb

log = logging.getLogger("llmgw.gateway.pool")

GENERATE_METHOD = "/llmgateway.LLMReplica/Generate"

CHANNEL_OPTIONS = [
    # Replicas come and go: notice a dead connection quickly instead of waiting on TCP timeouts.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class ChannelPool:
    """`credentials` (grpc.ChannelCredentials, see llmgw.replica.wire.channel_credentials) reaches replicas over
    TLS; None = plaintext."""

    def __init__(self, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.credentials = credentials
        self._channels: dict[str, tuple[grpc.aio.Channel, grpc.aio.UnaryStreamMultiCallable]] = {}
        self._closing: set[asyncio.Task] = set()

    def generate(self, address: str) -> grpc.aio.UnaryStreamMultiCallable:
        entry = self._channels.get(address)
        if entry is None:
            if self.credentials is None:
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.secure_channel(address, self.credentials, options=CHANNEL_OPTIONS)
            call = channel.unary_stream(GENERATE_METHOD, request_serializer=pb.GenerateRequest.SerializeToString,
                                        response_deserializer=pb.GenerateResponse.FromString)
            entry = self._channels[address] = (channel, call)
        return entry[1]

    def __contains__(self, address: str) -> bool:
        return address in self._channels

    def discard(self, address: str) -> None:
        """Close the channel to a replica that left; calls still running on it end with an error."""
        entry = self._channels.pop(address, None)
        if entry is not None:
            task = asyncio.get_running_loop().create_task(entry[0].close(grace=None))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels = [c for c, _ in self._channels.values()]
        self._channels.clear()
        for channel in channels:
            await channel.close(grace=None)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=5.0)
