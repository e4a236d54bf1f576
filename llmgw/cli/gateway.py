"""`python -m llmgw gateway`: run the inference gateway (reference-compatible flags plus llmgw's own)."""

from __future__ import annotations

HELP = "run the inference gateway (gRPC InferenceGateway + gossip member)"


def add_arguments(p) -> None:
    from llmgw.config import DEFAULT_PORTS
    from llmgw.gateway.api import GatewayConfig

    d = GatewayConfig()
    p.add_argument("--id", default="gateway-1", help="member id (should start with 'gateway')")
    p.add_argument("--port", type=int, default=DEFAULT_PORTS["gateway"]["grpc"], help="gRPC port")
    p.add_argument("--gossip-port", type=int, default=0,
                   help="gossip UDP port (0 = port + 10000); worker i uses gossip port + i")
    p.add_argument("--seeds", default="", help="comma-separated gossip seeds host:port")
    p.add_argument("--host", "--bind", dest="host", default="127.0.0.1", help="address to bind")
    p.add_argument("--advertise", default="", help="host other nodes use to reach this one (default: --host)")
    p.add_argument("--gossip-config", default="lan", choices=("lan", "local", "wan"), help="gossip timing preset")
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the gRPC port (SO_REUSEPORT), each its own gossip member")
    p.add_argument("--queue-size", type=int, default=d.queue_size, help="admission queue waiters")
    p.add_argument("--queue-timeout-s", type=float, default=d.queue_timeout_s,
                   help="longest wait for replica capacity before RESOURCE_EXHAUSTED")
    p.add_argument("--max-attempts", type=int, default=d.max_attempts, help="replicas tried per request")
    p.add_argument("--first-token-timeout-s", type=float, default=d.first_token_timeout_s,
                   help="a replica silent this long before its first token is failed over")
    p.add_argument("--inter-token-timeout-s", type=float, default=d.inter_token_timeout_s,
                   help="a replica silent this long between tokens is failed over")
    p.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s,
                   help="upper bound on a request's deadline (clients may ask for less)")
    p.add_argument("--routing", default=d.routing, choices=("affinity", "least_connections", "random"),
                   help="replica choice: prefix affinity (default) or a prompt-blind baseline")
    p.add_argument("--upstream-batch", type=int, default=d.upstream_batch,
                   help="max tokens per replica->gateway message when several are ready (1 = one each)")
    p.add_argument("--vnodes", type=int, default=d.vnodes, help="virtual nodes per replica on the hash ring")
    p.add_argument("--balance", type=float, default=d.balance,
                   help="bounded-loads factor: affinity yields when a replica exceeds balance x average load")
    p.add_argument("--prefix-chars", type=int, default=d.prefix_chars,
                   help="prompt characters hashed for prefix affinity")
    p.add_argument("--max-tokens-cap", type=int, default=d.max_tokens_cap,
                   help="largest max_tokens accepted (INVALID_ARGUMENT above)")
    p.add_argument("--max-prompt-bytes", type=int, default=d.max_prompt_bytes,
                   help="largest prompt accepted, in UTF-8 bytes (INVALID_ARGUMENT above)")
    p.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    p.add_argument("--worker-index", type=int, default=-1, help=argparse_suppress())


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def config_from_args(args, worker: int | None = None):
    from llmgw.gateway.api import GatewayConfig

    gateway_id, gossip_port, reuse = args.id, args.gossip_port, args.workers > 1
    if worker is not None:
        gateway_id = f"{args.id}-w{worker}"
        base = gossip_port or args.port + 10000
        gossip_port = base + worker
    cfg = GatewayConfig(
        gateway_id=gateway_id, host=args.host, port=args.port, advertise=args.advertise, gossip_port=gossip_port,
        seeds=tuple(s.strip() for s in args.seeds.split(",") if s.strip()), gossip_config=args.gossip_config,
        reuse_port=reuse, queue_size=args.queue_size, queue_timeout_s=args.queue_timeout_s,
        max_attempts=args.max_attempts, first_token_timeout_s=args.first_token_timeout_s,
        inter_token_timeout_s=args.inter_token_timeout_s, request_timeout_s=args.request_timeout_s,
        routing=args.routing, upstream_batch=args.upstream_batch, vnodes=args.vnodes, balance=args.balance, prefix_chars=args.prefix_chars,
        max_tokens_cap=args.max_tokens_cap, max_prompt_bytes=args.max_prompt_bytes,
    )
    try:
        cfg.validate()
    except ValueError as exc:
        raise SystemExit(f"gateway: {exc}") from None
    return cfg


def run(args) -> int:
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    if args.workers > 1 and args.worker_index < 0:
        if args.port == 0:
            raise SystemExit("--workers > 1 needs an explicit --port (the workers share it)")
        return _supervise(args)
    return _serve(args, args.worker_index if args.workers > 1 else None)


def _serve(args, worker: int | None) -> int:
    import asyncio
    import logging
    import os

    from llmgw.gateway.server import GatewayServer
    from llmgw.replica.wire import serve_until_signalled

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = GatewayServer(config_from_args(args, worker))

    async def main() -> None:
        await server.start()
        gw = server.gateway
        print(f"READY gateway {server.config.gateway_id} grpc={server.grpc_address} "
              f"gossip={gw.gossip.address if gw.gossip else ''} pid={os.getpid()}", flush=True)
        await serve_until_signalled(server.stop)

    asyncio.run(main())
    return 0


def _supervise(args) -> int:
    """Start one process per worker (same flags plus --worker-index) and stop them all on SIGTERM/SIGINT."""
    import signal
    import subprocess
    import sys
    import time

    argv = [a for a in sys.argv[1:]]
    if "gateway" in argv:
        argv = argv[argv.index("gateway") + 1:]
    procs = [subprocess.Popen([sys.executable, "-m", "llmgw", "gateway", *argv, "--worker-index", str(i)])
             for i in range(args.workers)]
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5.0)
    return 0 if stopping else 1
