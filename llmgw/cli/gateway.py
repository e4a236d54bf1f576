"""`python -m llmgw gateway`: run the inference gateway (reference-compatible flags plus llmgw's own)."""

from __future__ import annotations

import argparse
import errno

from llmgw import eventloop
from llmgw.cli.membership_args import add_membership_arguments

HELP = "run the inference gateway (gRPC InferenceGateway + OpenAI-compatible HTTP front + gossip member)"


def add_arguments(p) -> None:
    from llmgw.config import DEFAULT_PORTS, add_config_argument
    from llmgw.gateway.api import GatewayConfig

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
)


def _add_resilience_arguments(p, defaults) -> None:
    import argparse

    group = p.add_argument_group("resilience (hedging, circuit breakers)")
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

    gateway_id, gossip_port, reuse = args.id, args.gossip_port, args.workers > 1
    if worker is not None:
        gateway_id = f"{args.id}-w{worker}"
        base = gossip_port or args.port + 10000
        gossip_port = base + worker
    cfg = GatewayConfig(
        gateway_id=gateway_id, host=args.host, port=args.port, advertise=args.advertise, gossip_port=gossip_port,
        seeds=tuple(s.strip() for s in args.seeds.split(",") if s.strip()), gossip_config=args.gossip_config,
        gossip_key=gossip_key_from_args(args, "gateway"),
        reuse_port=reuse, queue_size=args.queue_size, queue_timeout_s=args.queue_timeout_s,
        max_attempts=args.max_attempts, first_token_timeout_s=args.first_token_timeout_s,
        inter_token_timeout_s=args.inter_token_timeout_s, request_timeout_s=args.request_timeout_s,
        routing=args.routing, upstream_batch=args.upstream_batch,
        replica_sessions=args.replica_sessions, vnodes=args.vnodes, balance=args.balance, prefix_chars=args.prefix_chars,
        max_tokens_cap=args.max_tokens_cap, max_prompt_bytes=args.max_prompt_bytes,
        **_resilience_settings(args),
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
    import os
    import sys

    from llmgw.logs import setup_logging

    try:
        setup_logging(args.log_level, json=args.log_json)
    except ValueError as exc:
        raise SystemExit(f"gateway: {exc}") from None
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        raise SystemExit("gateway: --http-port must be within 0..65535")
    if not args.http_body_timeout_s > 0:
        raise SystemExit("gateway: --http-body-timeout-s must be > 0")
    config = config_from_args(args, worker)
    tls = _tls_from_args(args)
    server = build_server(config, tls)

    async def main() -> int:
        try:
            front = await start_gateway(server, args, tls, reuse_port=worker is not None)
        except GatewayStartError as exc:
            print(f"gateway: {exc}", file=sys.stderr, flush=True)
            return 2
        gw = server.gateway
        http = f" http={front.url}" if front is not None else ""
        print(f"READY gateway {server.config.gateway_id} grpc={server.grpc_address} "
              f"gossip={gw.gossip.address if gw.gossip else ''}{http} pid={os.getpid()}", flush=True)

        async def stop() -> None:
            await stop_gateway(server, front)

        from llmgw.replica.wire import serve_until_signalled

        await serve_until_signalled(stop)
        return 0

    return eventloop.run(main(), args.event_loop)


class TlsSettings:
    """The TLS material the flags name, loaded once at start so a bad file fails before anything binds."""

    def __init__(self, args) -> None:
        from llmgw.http.tls import server_ssl_context
        from llmgw.replica.wire import channel_credentials, server_credentials

        self.grpc_server = self.http_server = self.replica_channel = None
        if args.tls_cert or args.tls_key or args.tls_client_ca:
            if not (args.tls_cert and args.tls_key):
                raise ValueError("TLS needs both --tls-cert and --tls-key")
            client_ca = args.tls_client_ca or None
            self.grpc_server = server_credentials(args.tls_cert, args.tls_key, client_ca)
            self.http_server = server_ssl_context(args.tls_cert, args.tls_key, client_ca)
        if args.replica_tls_ca:
            # The gateway's own certificate doubles as its client certificate towards replicas requiring one.
            cert = args.tls_cert or None
            self.replica_channel = channel_credentials(args.replica_tls_ca, cert, args.tls_key if cert else None)


def _tls_from_args(args) -> TlsSettings:
    from llmgw.replica.wire import TlsConfigError

    try:
        return TlsSettings(args)
    except (TlsConfigError, ValueError) as exc:
        raise SystemExit(f"gateway: {exc}") from None


def build_server(config, tls: TlsSettings | None = None, *, metrics=None, membership=None):
    """A GatewayServer whose Gateway is observed (metrics + one log line per request), with TLS when asked.
    `membership` replaces gossip (see llmgw.gateway.Gateway), e.g. for in-process tests."""
    from llmgw.gateway.observability import ObservedGateway
    from llmgw.gateway.server import GatewayServer
    from llmgw.metrics import GatewayMetrics

    tls = tls or _NO_TLS
    server = GatewayServer(config, membership=membership, server_credentials=tls.grpc_server,
                           replica_credentials=tls.replica_channel)
    metrics = metrics or GatewayMetrics(gateway_id=config.gateway_id)
    # Both fronts (the gRPC servicer reads server.gateway per request, the HTTP front is handed the same object)
    # then go through one wrapper: every request is counted and logged once, whichever front it came in on.
    server.gateway = ObservedGateway(server.gateway, metrics)
    return server


class GatewayStartError(Exception):
    """A port the gateway was told to serve on cannot be bound; nothing is left running."""


async def start_gateway(server, args, tls: TlsSettings | None = None, *, reuse_port: bool = False):
    """Start gRPC (+ gossip), then the HTTP front on the same loop; returns the HttpFront or None (--http-port 0).

    Every port must bind, the default HTTP port too: a gateway quietly serving without its HTTP front is worse
    than one that refuses to start. GatewayStartError says which port and why, after stopping what did start."""
    from llmgw.config import DEFAULT_PORTS
    from llmgw.http import start_http

    tls = tls or _NO_TLS
    try:
        await server.start()
    except (OSError, RuntimeError) as exc:  # grpc reports a failed bind as RuntimeError, gossip as OSError
        await server.stop(0)
        raise GatewayStartError(f"cannot start on gRPC {server.config.host}:{server.config.port}: "
                                f"{getattr(exc, 'strerror', None) or exc}") from None
    observed = server.gateway
    gossip = observed.gossip
    if gossip is not None:
        observed.metrics.watch_gossip(gossip.stats, lambda: gossip.members(include_self=True))
    http_port = DEFAULT_PORTS["gateway"]["http"] if args.http_port is None else args.http_port
    if http_port == 0:
        return None
    host = args.http_host or server.config.host
    try:
        return await start_http(
            observed, host=host, port=http_port, admin_token=args.admin_token, metrics=observed.metrics,
            breakers=observed.breakers, rollouts=server.rollouts, record_requests=False, reuse_port=reuse_port,
            ssl_context=tls.http_server, body_timeout_s=args.http_body_timeout_s)
    except OSError as exc:
        await server.stop()
        hint = " (choose another with --http-port, or --http-port 0 to serve gRPC only)" \
            if exc.errno == errno.EADDRINUSE else ""
        raise GatewayStartError(f"cannot serve HTTP on {host}:{http_port}: {exc.strerror or exc}{hint}") from None


async def stop_gateway(server, front) -> None:
    """HTTP first (no new requests from that side), then gRPC (grace for open streams), then gossip."""
    if front is not None:
        await front.close()
    await server.stop()
    detach = getattr(server.gateway, "detach", None)
    if detach is not None:
        detach()


class _NoTls:
    grpc_server = http_server = replica_channel = None


_NO_TLS = _NoTls()


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
