"""`python -m llmgw client`: stream one request through a gateway (or straight to a replica with --direct)."""

from __future__ import annotations

HELP = "send one streaming request to a gateway (or --direct to a replica)"


def add_arguments(p) -> None:
    from llmgw.config import DEFAULT_PORTS, add_config_argument

    add_config_argument(p)
    p.add_argument("--target", default=f"127.0.0.1:{DEFAULT_PORTS['gateway']['grpc']}",
                   help="gateway (or replica with --direct) host:port")
    p.add_argument("--prompt", default="Hello, world")
    p.add_argument("--max-tokens", type=int, default=10)
    p.add_argument("--direct", action="store_true", help="call LLMReplica.Generate on --target")
    p.add_argument("--hedge", action="store_true", help="ask the gateway to hedge this request")
    p.add_argument("--client-id", default="cli")
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--max-tokens-per-message", type=int, default=0,
                   help="let the gateway coalesce up to N ready tokens per message (0 = one each)")
    p.add_argument("--tls-ca", default="", help="PEM CA: connect over TLS, trusting this CA")
    p.add_argument("--tls-cert", default="", help="PEM client certificate, for a server requiring one")
    p.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")


def run(args) -> int:
    import asyncio
    import sys
    import time

    import grpc

    from llmgw import client
    from llmgw.replica.wire import TlsConfigError, channel_credentials

    credentials = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        try:
            credentials = channel_credentials(args.tls_ca or None, args.tls_cert or None, args.tls_key or None)
        except TlsConfigError as exc:
            print(f"client: {exc}", file=sys.stderr)
            return 2

    async def main() -> int:
        channel = (grpc.aio.insecure_channel(args.target) if credentials is None
                   else grpc.aio.secure_channel(args.target, credentials))
        async with channel:
            if args.direct:
                stream = client.stream_generate(channel, args.prompt, args.max_tokens, timeout_s=args.timeout_s,
                                                max_tokens_per_message=args.max_tokens_per_message)
            else:
                stream = client.stream_infer(channel, args.prompt, args.max_tokens, hedge=args.hedge,
                                             client_id=args.client_id, timeout_s=args.timeout_s,
                                             max_tokens_per_message=args.max_tokens_per_message)
            start = time.perf_counter()
            count, ttft = 0, None
            try:
                async for tok in stream:
                    if ttft is None:
                        ttft = tok.elapsed_s
                    if tok.token:
                        count += 1
                    src = f" [{tok.replica_id}]" if tok.replica_id else ""
                    print(f"{tok.index:>4} {tok.token}{src}{' (final)' if tok.is_final else ''}", flush=True)
            except grpc.aio.AioRpcError as exc:
                print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
            ttft_txt = f"{ttft * 1000:.1f} ms" if ttft is not None else "n/a"
            print(f"{count} tokens, TTFT {ttft_txt}, total {(time.perf_counter() - start) * 1000:.1f} ms")
            return 0

    return asyncio.run(main())
