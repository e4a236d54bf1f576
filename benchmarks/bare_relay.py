"""The floor under the gateway: a bare grpc.aio relay with nothing of llmgw in it.

It serves llmgateway.LLMReplica/Generate and forwards each call, bytes untouched (no protobuf parsing, no routing,
admission, failover, metrics or logging), to one fixed replica, on the gateway's event loop. Measured side by side
with the gateway, it tells how much of the gateway's added latency and CPU is grpc.aio itself and how much is llmgw's
own work.

    python benchmarks/bare_relay.py --upstream 127.0.0.1:50051 --port 0   # prints the bound port, then serves
"""

from __future__ import annotations

import argparse
import sys

import grpc

GENERATE = "/llmgateway.LLMReplica/Generate"


def _raw(data: bytes) -> bytes:
    return data


async def serve(upstream: str, host: str, port: int, ready=None) -> None:
    channel = grpc.aio.insecure_channel(upstream)
    generate = channel.unary_stream(GENERATE, request_serializer=_raw, response_deserializer=_raw)

    async def relay(request: bytes, context):
        async for message in generate(request, timeout=context.time_remaining()):
            yield message

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("llmgateway.LLMReplica", {
        "Generate": grpc.unary_stream_rpc_method_handler(relay, request_deserializer=_raw,
                                                         response_serializer=_raw)}),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    if ready is not None:
        ready(bound)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(0)
        await channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="host:port of the replica to relay to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    # The same event loop as the gateway (uvloop when installed), so the two are compared like for like.
    from llmgw import eventloop

    eventloop.run(serve(args.upstream, args.host, args.port, ready=lambda port: print(port, flush=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
