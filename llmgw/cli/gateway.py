"""`python -m llmgw gateway`: run the inference gateway (reference-compatible flags plus llmgw's own)."""

from __future__ import annotations

import argparse

from llmgw import eventloop
from llmgw.cli.membership_args import add_membership_arguments

HELP = "run the inference gateway (gRPC InferenceGateway + OpenAI-compatible HTTP front + gossip member)"


def add_arguments(p) -> None:
    from llmgw.config import DEFAULT_PORTS, add_config_argument, structured_list
    from llmgw.gateway.api import GatewayConfig
    from llmgw.gateway.shutdown import DEFAULT_SHUTDOWN_GRACE_S

    d = GatewayConfig()
    add_config_argument(p)
    p.add_argument("--id", default="gateway-1", help="member id (should start with 'gateway')")
    p.add_argument("--port", type=int, default=DEFAULT_PORTS["gateway"]["grpc"], help="gRPC port")
    p.add_argument("--gossip-port", type=int, default=0,
                   help="gossip UDP port (0 = port + 10000); worker i uses gossip port + i")
    add_membership_arguments(p)
    eventloop.add_argument(p)
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the gRPC port (SO_REUSEPORT), each its own gossip member")
    p.add_argument("--shutdown-grace-s", type=float, default=DEFAULT_SHUTDOWN_GRACE_S,
                   help="on SIGTERM: readiness fails and new requests are refused at once; open streams get this "
                        "long to finish, then end with UNAVAILABLE (an SSE error event) the client can retry on "
                        "(fit it into the pod's terminationGracePeriodSeconds minus its preStop sleep)")
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
    p.add_argument("--replica-sessions", action=argparse.BooleanOptionalAction, default=d.replica_sessions,
                   help="multiplex requests to a replica on one GenerateSession call (replicas without it get "
                        "one Generate call per request)")
    p.add_argument("--vnodes", type=int, default=d.vnodes, help="virtual nodes per replica on the hash ring")
    p.add_argument("--balance", type=float, default=d.balance,
                   help="bounded-loads factor: affinity yields when a replica exceeds balance x average load")
    p.add_argument("--prefix-chars", type=int, default=d.prefix_chars,
                   help="prompt characters hashed for prefix affinity")
    p.add_argument("--max-tokens-cap", type=int, default=d.max_tokens_cap,
                   help="largest max_tokens accepted (INVALID_ARGUMENT above)")
    p.add_argument("--max-prompt-bytes", type=int, default=d.max_prompt_bytes,
                   help="largest prompt accepted, in UTF-8 bytes (INVALID_ARGUMENT above)")
    p.add_argument("--log-level", default="WARNING",
                   help="logging level (DEBUG, INFO, WARNING, ERROR); INFO logs one line per request")
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    p.add_argument("--otel", action="store_true", default=None,
                   help="trace requests with OpenTelemetry (also LLMGW_OTEL=1; needs pip install 'llmgw[otel]'): "
                        "W3C traceparent accepted on HTTP and gRPC and passed to replicas, spans exported as the "
                        "standard OTEL_* environment says (OTLP/HTTP by default)")
    http = p.add_argument_group("HTTP front (OpenAI API, /metrics, /healthz, /readyz, /admin)")
    http.add_argument("--http-port", type=int, default=None,
                      help=f"HTTP port (default: {DEFAULT_PORTS['gateway']['http']}); 0 disables the HTTP front; "
                           "a port that cannot be bound stops the gateway with an error")
    http.add_argument("--http-host", default="", help="address the HTTP front binds (default: --host)")
    http.add_argument("--http-body-timeout-s", type=float, default=30.0,
                      help="a request body not fully received within this many seconds gets 408 and the "
                           "connection is closed (slow-body protection)")
    http.add_argument("--admin-token", default=None,
                      help="bearer token for /admin (also LLMGW_ADMIN_TOKEN); without one, /admin answers only "
                           "on a loopback address")
    http.add_argument("--restart-command", default="", metavar="TEMPLATE",
                      help="command restarting a replica for a rolling update, with {replica_id} and {version} "
                           "placeholders (run without a shell)")
    tenancy = p.add_argument_group("tenancy (API keys, per-tenant limits, fair sharing; docs/tenancy.md)")
    tenancy.add_argument("--keys", default="", metavar="PATH",
                         help="key file (TOML, sha256 of each key: `llmgw keys hash`): both fronts then require "
                              "'Authorization: Bearer <key>' and enforce each tenant's limits across the gateways; "
                              "SIGHUP or POST /admin/keys/reload reloads it. A bad file: exit 2 naming the line")
    models = p.add_argument_group("OpenAI-compatible model servers (docs/backends.md)")
    upstream = models.add_argument(
        "--upstream", action="append", default=[], metavar="URL[,key=value...]",
        help="a model server the gateway streams from directly (vLLM, SGLang, llama.cpp, TGI, Ollama...); "
             "repeatable. URL alone learns its models from /v1/models; options: kind, model, alias=NAME=SERVER_NAME, "
             "weight, capacity, chat_prefill, id; dns://NAME:PORT re-resolves a name (refresh, scheme). In the config "
             "file: [[upstream]] tables (url, models, aliases, ...) or upstream = [\"URL\", ...]; in the environment: "
             "whitespace-separated. Flags replace the file's list")
    structured_list(upstream, _parse_upstream_item)
    tls = p.add_argument_group("TLS")
    tls.add_argument("--tls-cert", default="", help="PEM certificate: serve gRPC and HTTP over TLS")
    tls.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    tls.add_argument("--tls-client-ca", default="",
                     help="PEM CA: require client certificates signed by it (gRPC and HTTP)")
    tls.add_argument("--replica-tls-ca", default="",
                     help="PEM CA: reach replicas over TLS, trusting this CA (the gateway presents --tls-cert "
                          "to replicas that require client certificates)")
    _add_resilience_arguments(p, d)
    p.add_argument("--worker-index", type=int, default=-1, help=argparse_suppress())


# Flags of the resilience features (hedging, circuit breakers; docs/resilience.md), each mapped onto the
# GatewayConfig field named by its dest. (flag, dest, kind, help); kind "bool" = --x/--no-x.
RESILIENCE_FLAGS: tuple[tuple[str, str, object, str], ...] = (
    ("--hedge-delay-ms", "hedge_delay_ms", float,
     "policy hedging: also start the next replica when no first token came within this many ms (default off)"),
    ("--hedge-adaptive", "hedge_adaptive", "store_true",
     "hedge delay = observed p95 TTFT once 20 samples exist (--hedge-delay-ms until then)"),
    ("--hedge-budget", "hedge_budget", float,
     "most policy hedges per request (token bucket; 0.1 = at most ~10%% of requests)"),
    ("--hedge-budget-burst", "hedge_budget_burst", float,
     "policy hedges that may be saved up (the bucket starts full)"),
    ("--breaker", "breaker_enabled", "bool",
     "per-replica circuit breakers with slow-replica ejection (--no-breaker turns them off)"),
    ("--breaker-window", "breaker_window", int, "outcomes in the breaker's sliding window"),
    ("--breaker-failure-rate", "breaker_failure_rate", float,
     "breaker opens when more than this fraction of the window failed"),
    ("--breaker-consecutive", "breaker_consecutive", int, "breaker opens after this many failures in a row"),
    ("--breaker-cooldown-s", "breaker_cooldown_s", float, "seconds an open breaker waits before one half-open probe"),
    ("--breaker-slow-detection", "breaker_slow_detection", "bool",
     "eject replicas whose TTFT or inter-token latency is far above their peers'"),
    ("--adaptive-deadlines", "adaptive_deadlines", "bool",
     ("per-replica stall deadlines learnt from each replica's recent gaps (the timeouts stay the ceilings); past "
      "one, a continuation races the quiet replica from the next token (--no-adaptive-deadlines: timeouts only)")),
    ("--stall-floor-ms", "stall_floor_ms", float, "shortest adaptive inter-token deadline"),
    ("--stall-factor", "stall_factor", float,
     "adaptive inter-token deadline = p99 of the replica's recent gaps x this + 50 ms"),
    ("--stall-first-token-floor-s", "stall_first_token_floor_s", float, "shortest adaptive first-token deadline"),
)


def _add_resilience_arguments(p, defaults) -> None:
    import argparse

    group = p.add_argument_group("resilience (hedging, circuit breakers, adaptive stall deadlines)")
    for flag, dest, kind, text in RESILIENCE_FLAGS:
        default = getattr(defaults, dest)
        if kind == "bool":
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif kind == "store_true":
            group.add_argument(flag, dest=dest, action="store_true", default=default, help=text)
        else:
            group.add_argument(flag, dest=dest, type=kind, default=default, help=text)


def _resilience_settings(args) -> dict:
    out = {dest: getattr(args, dest) for _, dest, _, _ in RESILIENCE_FLAGS}
    # The gateway's one rolling-update controller (gRPC GatewayAdmin and HTTP /admin/rollout) restarts replicas
    # with this template.
    out["restart_command"] = args.restart_command or ""
    return out


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def config_from_args(args, worker: int | None = None):
    from llmgw.cli.replica import gossip_key_from_args
    from llmgw.gateway.api import GatewayConfig
    from llmgw.gateway.app import worker_config

    cfg = GatewayConfig(
        gateway_id=args.id, host=args.host, port=args.port, advertise=args.advertise, gossip_port=args.gossip_port,
        seeds=tuple(s.strip() for s in args.seeds.split(",") if s.strip()), gossip_config=args.gossip_config,
        gossip_key=gossip_key_from_args(args, "gateway"),
        reuse_port=args.workers > 1, queue_size=args.queue_size, queue_timeout_s=args.queue_timeout_s,
        max_attempts=args.max_attempts, first_token_timeout_s=args.first_token_timeout_s,
        inter_token_timeout_s=args.inter_token_timeout_s, request_timeout_s=args.request_timeout_s,
        routing=args.routing, upstream_batch=args.upstream_batch,
        replica_sessions=args.replica_sessions, vnodes=args.vnodes, balance=args.balance,
        prefix_chars=args.prefix_chars,
        max_tokens_cap=args.max_tokens_cap, max_prompt_bytes=args.max_prompt_bytes,
        upstreams=_upstreams_from_args(args),
        **_resilience_settings(args),
    )
    if worker is not None:
        cfg = worker_config(cfg, worker)
    try:
        cfg.validate()
    except ValueError as exc:
        raise SystemExit(f"gateway: {exc}") from None
    return cfg


def _parse_upstream_item(value, where: str):
    from llmgw.upstream.backends import parse_upstream_item

    return parse_upstream_item(value, where)


def _upstreams_from_args(args) -> tuple:
    from llmgw.upstream.backends import UpstreamConfigError, parse_upstream_args

    try:
        return tuple(parse_upstream_args(args.upstream or ()))
    except UpstreamConfigError as exc:
        raise SystemExit(f"gateway: {exc}") from None


def http_settings_from_args(args):
    from llmgw.gateway.app import HttpSettings

    http = HttpSettings(port=args.http_port, host=args.http_host, admin_token=args.admin_token,
                        body_timeout_s=args.http_body_timeout_s)
    try:
        http.validate()
    except ValueError as exc:
        raise SystemExit(f"gateway: {exc}") from None
    return http


def tls_settings_from_args(args):
    from llmgw.gateway.app import TlsSettings
    from llmgw.tls import TlsConfigError

    try:
        return TlsSettings(args.tls_cert, args.tls_key, args.tls_client_ca, args.replica_tls_ca)
    except (TlsConfigError, ValueError) as exc:
        raise SystemExit(f"gateway: {exc}") from None


def run(args) -> int:
    from llmgw.gateway import app

    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    if not 0 <= args.shutdown_grace_s <= 3600:
        raise SystemExit("gateway: --shutdown-grace-s must be within 0..3600 seconds")
    if args.workers > 1 and args.worker_index < 0:
        if args.port == 0:
            raise SystemExit("--workers > 1 needs an explicit --port (the workers share it)")
        if args.keys and not _key_file_ok(args.keys):  # once here rather than once per worker
            return 2
        return app.run_workers(_worker_argv(), args.workers, args.shutdown_grace_s)
    worker = args.worker_index if args.workers > 1 else None
    from llmgw.logs import setup_logging

    try:
        setup_logging(args.log_level, json=args.log_json)
    except ValueError as exc:
        raise SystemExit(f"gateway: {exc}") from None
    from llmgw.tracing import TracingUnavailable, setup_tracing, shutdown_tracing

    try:  # before the gateway is built: its request path takes the process's tracing then
        setup_tracing(args.otel)  # None (no --otel): LLMGW_OTEL decides
    except (TracingUnavailable, ValueError) as exc:
        raise SystemExit(f"gateway: {exc}") from None
    try:
        http = http_settings_from_args(args)
        config = config_from_args(args, worker)
        tls = tls_settings_from_args(args)
        return app.serve(config, tls=tls, http=http, reuse_port=worker is not None, event_loop=args.event_loop,
                         key_file=args.keys, shutdown_grace_s=args.shutdown_grace_s)
    finally:
        shutdown_tracing()  # flushes the spans still batched


def _key_file_ok(path: str) -> bool:
    """Check the key file before anything starts; a bad one is reported with its file and line."""
    import sys

    from llmgw.tenancy.keys import KeyFileError, load_key_file

    try:
        load_key_file(path)
    except KeyFileError as exc:
        print(f"gateway: {exc}", file=sys.stderr, flush=True)
        return False
    return True


def _worker_argv() -> list[str]:
    """This gateway's own flags (what follows `gateway` on the command line), passed on to each worker."""
    import sys

    argv = list(sys.argv[1:])
    if "gateway" in argv:
        argv = argv[argv.index("gateway") + 1:]
    return argv
