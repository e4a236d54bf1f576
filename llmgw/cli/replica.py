"""`python -m llmgw replica`: run one simulated replica (reference-compatible flags plus llmgw's own)."""

from __future__ import annotations

HELP = "run a simulated LLM replica (gRPC LLMReplica + gossip member)"


def add_arguments(p) -> None:
    from llmgw.config import DEFAULT_PORTS

    p.add_argument("--id", default="replica-1", help="member id (ids starting with 'gateway' are gateways)")
    p.add_argument("--port", type=int, default=DEFAULT_PORTS["replica"]["grpc"], help="gRPC port (0 = any free)")
    p.add_argument("--gossip-port", type=int, default=0, help="gossip UDP port (0 = port + 10000)")
    p.add_argument("--no-gossip", action="store_true", help="run standalone, without joining a cluster")
    p.add_argument("--seeds", default="", help="comma-separated gossip seeds host:port")
    p.add_argument("--host", "--bind", dest="host", default="127.0.0.1", help="address to bind")
    p.add_argument("--advertise", default="", help="host other nodes use to reach this one (default: --host)")
    p.add_argument("--gossip-config", default="lan", choices=("lan", "local", "wan"), help="gossip timing preset")
    p.add_argument("--token-delay-ms", type=float, default=100.0, help="time per generated token")
    p.add_argument("--prefill-ms-per-kchar", type=float, default=1.0,
                   help="prefill cost per 1,000 prompt characters not in the prefix cache")
    p.add_argument("--prefix-cache-size", type=int, default=1024, help="prefix cache entries (64-char blocks)")
    p.add_argument("--max-capacity", type=int, default=4, help="concurrent streams; excess -> RESOURCE_EXHAUSTED")
    p.add_argument("--model-version", default="v1", help="version published through gossip")
    p.add_argument("--weight", type=float, default=1.0, help="routing weight published through gossip")
    p.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens accepted")
    p.add_argument("--max-prompt-bytes", type=int, default=1 << 20, help="largest prompt accepted (UTF-8 bytes)")
    p.add_argument("--error-rate", type=float, default=0.0,
                   help="probability that a stream fails (INTERNAL) at a random token")
    p.add_argument("--reject-all", action="store_true", help="answer every Generate with UNAVAILABLE")
    p.add_argument("--stall-after", type=int, default=-1, help="go silent after N tokens per stream (-1 = off)")
    p.add_argument("--crash-after", type=int, default=-1, help="exit the process after N tokens (-1 = off)")
    p.add_argument("--slow-factor", type=float, default=1.0, help="multiplies the per-token delay")
    p.add_argument("--stall-before-first-ms", type=float, default=0.0, help="extra delay before the first token")
    p.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ERROR)")


def config_from_args(args):
    from llmgw.replica import Faults, Limits, ReplicaConfig

    if not 0.0 <= args.error_rate <= 1.0:
        raise SystemExit("--error-rate must be within [0, 1]")
    if args.max_capacity < 1:
        raise SystemExit("--max-capacity must be >= 1")
    if args.token_delay_ms < 0 or args.prefill_ms_per_kchar < 0 or args.slow_factor < 0:
        raise SystemExit("delays and --slow-factor must be >= 0")
    return ReplicaConfig(
        replica_id=args.id, host=args.host, port=args.port, advertise=args.advertise,
        gossip_port=None if args.no_gossip else args.gossip_port,
        seeds=tuple(s.strip() for s in args.seeds.split(",") if s.strip()),
        gossip_config=args.gossip_config, token_delay_ms=args.token_delay_ms,
        prefill_ms_per_kchar=args.prefill_ms_per_kchar, prefix_cache_size=args.prefix_cache_size,
        max_capacity=args.max_capacity, model_version=args.model_version, weight=args.weight,
        limits=Limits(max_tokens_cap=args.max_tokens_cap, max_prompt_bytes=args.max_prompt_bytes),
        faults=Faults(error_rate=args.error_rate, reject_all=args.reject_all, stall_after=args.stall_after,
                      crash_after=args.crash_after, slow_factor=args.slow_factor,
                      stall_before_first_ms=args.stall_before_first_ms),
    )


def run(args) -> int:
    import asyncio
    import logging

    from llmgw.replica import Replica
    from llmgw.replica.wire import serve_until_signalled

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    replica = Replica(config_from_args(args))

    async def main() -> None:
        await replica.start()
        # One machine-readable line so launchers learn the bound ports without guessing.
        print(f"READY replica {args.id} grpc={replica.grpc_address} "
              f"gossip={replica.gossip.address if replica.gossip else ''} pid={__import__('os').getpid()}",
              flush=True)
        await serve_until_signalled(replica.stop)

    asyncio.run(main())
    return 0
