"""`python -m llmgw client`: stream one request through a gateway (gRPC, or its HTTP front with --http), or
straight to a replica with --direct, printing each token as it arrives with the replica that served it."""

from __future__ import annotations

HELP = "send one streaming request to a gateway (gRPC or --http) or --direct to a replica"


def add_arguments(p) -> None:
    from llmgw.config import add_config_argument
    from llmgw.topology import DEFAULT_PORTS

    add_config_argument(p)
    p.add_argument("--target", default=f"127.0.0.1:{DEFAULT_PORTS['gateway']['grpc']}",
                   help="gateway (or replica with --direct) host:port")
    p.add_argument("--http", default="", metavar="URL",
                   help="use the gateway's HTTP front at URL (e.g. http://127.0.0.1:"
                        f"{DEFAULT_PORTS['gateway']['http']}) and stream /v1/completions instead of gRPC")
    p.add_argument("--model", default="llmgw", help="with --http: the request's model field")
    p.add_argument("--prompt", default="Hello, world")
    p.add_argument("--max-tokens", type=int, default=10)
    p.add_argument("--direct", action="store_true", help="call LLMReplica.Generate on --target")
    p.add_argument("--hedge", action="store_true", help="ask the gateway to hedge this request")
    p.add_argument("--client-id", default="cli")
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--max-tokens-per-message", type=int, default=0,
                   help="gRPC: let the gateway coalesce up to N ready tokens per message (0 = one each)")
    p.add_argument("--tls-ca", default="", help="PEM CA: connect over TLS, trusting this CA")
    p.add_argument("--tls-cert", default="", help="PEM client certificate, for a server requiring one")
    p.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")


def run(args) -> int:
    import asyncio
    import sys

    from llmgw.tls import TlsConfigError

    if args.http and args.direct:
        print("client: --direct talks gRPC to a replica; it cannot be combined with --http", file=sys.stderr)
        return 2
    if not 0 < args.timeout_s <= 3600:
        print("client: --timeout-s must be within (0, 3600]", file=sys.stderr)
        return 2
    try:
        stream_factory = _http_stream(args) if args.http else _grpc_stream(args)
    except (TlsConfigError, ValueError) as exc:
        print(f"client: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_print_stream(stream_factory))


def _grpc_stream(args):
    """An async context manager factory yielding the token stream of one gRPC call."""
    import contextlib

    import grpc

    from llmgw import client
    from llmgw.tls import channel_credentials

    credentials = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        credentials = channel_credentials(args.tls_ca or None, args.tls_cert or None, args.tls_key or None)

    @contextlib.asynccontextmanager
    async def open_stream():
        channel = (grpc.aio.insecure_channel(args.target) if credentials is None
                   else grpc.aio.secure_channel(args.target, credentials))
        async with channel:
            if args.direct:
                yield client.stream_generate(channel, args.prompt, args.max_tokens, timeout_s=args.timeout_s,
                                             max_tokens_per_message=args.max_tokens_per_message)
            else:
                yield client.stream_infer(channel, args.prompt, args.max_tokens, hedge=args.hedge,
                                          client_id=args.client_id, timeout_s=args.timeout_s,
                                          max_tokens_per_message=args.max_tokens_per_message)

    return open_stream


def _http_stream(args):
    """An async context manager factory yielding the token stream of one streamed /v1/completions."""
    import contextlib

    from llmgw import client

    client.completions_url(args.http)  # a bad URL is a usage error before anything connects
    ssl_context = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        from llmgw.tls import client_ssl_context

        ssl_context = client_ssl_context(args.tls_ca or None, args.tls_cert or None, args.tls_key or None)

    @contextlib.asynccontextmanager
    async def open_stream():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            yield client.stream_completion_http(session, args.http, args.prompt, args.max_tokens, model=args.model,
                                                hedge=args.hedge, client_id=args.client_id,
                                                timeout_s=args.timeout_s, ssl=ssl_context)

    return open_stream


async def _print_stream(open_stream) -> int:
    """Print each token as it arrives ("index token [replica]"), then a summary line with the TTFT."""
    import sys
    import time

    import aiohttp
    import grpc

    from llmgw.client import HttpStreamError

    start = time.perf_counter()
    count, ttft, replicas = 0, None, []
    try:
        async with open_stream() as stream:
            async for tok in stream:
                if ttft is None:
                    ttft = tok.elapsed_s
                if tok.token:
                    count += 1
                if tok.replica_id and tok.replica_id not in replicas:
                    replicas.append(tok.replica_id)
                src = f" [{tok.replica_id}]" if tok.replica_id else ""
                print(f"{tok.index:>4} {tok.token}{src}{' (final)' if tok.is_final else ''}", flush=True)
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except HttpStreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    ttft_txt = f"{ttft * 1000:.1f} ms" if ttft is not None else "n/a"
    served = f", served by {', '.join(replicas)}" if replicas else ""
    print(f"{count} tokens, TTFT {ttft_txt}, total {(time.perf_counter() - start) * 1000:.1f} ms{served}")
    return 0
