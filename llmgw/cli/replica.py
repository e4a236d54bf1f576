"""`llmgw replica`: run one replica (reference-compatible flags plus llmgw's own).

This module only turns flags into a ReplicaConfig; llmgw.replica.app builds and runs the replica.
"""

from __future__ import annotations

from llmgw import eventloop
from llmgw.cli.membership_args import add_membership_arguments, gossip_key_from_args

__all__ = ["HELP", "add_arguments", "config_from_args", "gossip_key_from_args", "run"]

HELP = "run an LLM replica (gRPC LLMReplica + gossip member): simulated, or in front of an OpenAI-compatible server"


def add_arguments(p) -> None:
    from llmgw.config import add_config_argument
    from llmgw.topology import DEFAULT_PORTS, GOSSIP_PORT_OFFSET

    add_config_argument(p)
    p.add_argument("--id", default="replica-1", help="member id (ids starting with 'gateway' are gateways)")
    p.add_argument("--port", type=int, default=DEFAULT_PORTS["replica"]["grpc"], help="gRPC port (0 = any free)")
    p.add_argument("--gossip-port", type=int, default=0,
                   help=f"gossip UDP port (0 = port + {GOSSIP_PORT_OFFSET})")
    p.add_argument("--no-gossip", action="store_true", help="run standalone, without joining a cluster")
    p.add_argument("--no-sessions", action="store_true",
                   help="serve Generate only, not GenerateSession (gateways then open one call per request, "
                        "as with the reference replica)")
    add_membership_arguments(p)
    eventloop.add_argument(p)
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
    p.add_argument("--jitter", type=float, default=0.0,
                   help="each token's delay varies uniformly within +/- this fraction of it (0.5 = +/-50%%)")
    p.add_argument("--pause-every-ms", type=float, default=0.0,
                   help="the engine pauses every stream at once this often (0 = never; see --pause-ms)")
    p.add_argument("--pause-ms", type=float, default=0.0, help="length of each engine pause")
    p.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus /metrics on this port (0 = off)")
    tls = p.add_argument_group("TLS")
    tls.add_argument("--tls-cert", default="", help="PEM certificate: serve gRPC over TLS")
    tls.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    tls.add_argument("--tls-client-ca", default="", help="PEM CA: require client certificates signed by it")


def config_from_args(args):
    from llmgw.replica import Faults, Limits, ReplicaConfig

    if not 0.0 <= args.error_rate <= 1.0:
        raise SystemExit("--error-rate must be within [0, 1]")
    if args.max_capacity < 1:
        raise SystemExit("--max-capacity must be >= 1")
    if args.token_delay_ms < 0 or args.prefill_ms_per_kchar < 0 or args.slow_factor < 0:
        raise SystemExit("delays and --slow-factor must be >= 0")
    if not 0.0 <= args.jitter <= 1.0:
        raise SystemExit("--jitter must be within [0, 1]")
    if args.pause_every_ms < 0 or args.pause_ms < 0 or (args.pause_ms and args.pause_ms >= args.pause_every_ms):
        raise SystemExit("--pause-ms must be >= 0 and shorter than --pause-every-ms")
    if not 0 <= args.metrics_port <= 65535:
        raise SystemExit("--metrics-port must be within 0..65535")
    return ReplicaConfig(
        replica_id=args.id, host=args.host, port=args.port, advertise=args.advertise,
        gossip_port=None if args.no_gossip else args.gossip_port,
        seeds=tuple(s.strip() for s in args.seeds.split(",") if s.strip()),
        gossip_config=args.gossip_config, gossip_key=gossip_key_from_args(args, "replica"),
        token_delay_ms=args.token_delay_ms,
        prefill_ms_per_kchar=args.prefill_ms_per_kchar, prefix_cache_size=args.prefix_cache_size,
        max_capacity=args.max_capacity, model_version=args.model_version, weight=args.weight,
        limits=Limits(max_tokens_cap=args.max_tokens_cap, max_prompt_bytes=args.max_prompt_bytes),
        faults=Faults(error_rate=args.error_rate, reject_all=args.reject_all, stall_after=args.stall_after,
                      crash_after=args.crash_after, slow_factor=args.slow_factor,
                      stall_before_first_ms=args.stall_before_first_ms, jitter=args.jitter,
                      pause_every_ms=args.pause_every_ms, pause_ms=args.pause_ms),
        server_credentials=_credentials_from_args(args),
        sessions=not args.no_sessions,
    )


def _credentials_from_args(args):
    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise SystemExit("TLS needs both --tls-cert and --tls-key")
    from llmgw.tls import TlsConfigError, server_credentials

    try:
        return server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca or None)
    except TlsConfigError as exc:
        raise SystemExit(f"replica: {exc}") from None


def run(args) -> int:
    from llmgw.logs import setup_logging
    from llmgw.replica.app import ReplicaStartError
    from llmgw.replica.app import run as run_replica

    try:
        setup_logging(args.log_level, json=args.log_json)
    except ValueError as exc:
        raise SystemExit(f"replica: {exc}") from None
    config = config_from_args(args)
    try:
        return run_replica(config, metrics_port=args.metrics_port or None, event_loop=args.event_loop)
    except ReplicaStartError as exc:
        raise SystemExit(f"replica: {exc}") from None
