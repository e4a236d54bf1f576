"""The gateway's composition root: one running gateway process built from its configuration.

`build_server` wires the parts (gRPC front, Gateway, metrics listener); `start_gateway` starts gRPC (+ gossip)
and the HTTP front on one event loop; `stop_gateway` stops them in order; `serve` runs one gateway process until
SIGTERM/SIGINT; `run_workers` supervises several such processes sharing one gRPC port. The CLI
(llmgw.cli.gateway) only parses flags into these arguments; tests and llmgw.cluster import this module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from llmgw import gc_tuning
from llmgw.gateway.api import GatewayConfig
from llmgw.gateway.shutdown import DEFAULT_SHUTDOWN_GRACE_S
from llmgw.topology import gossip_port_for

log = logging.getLogger("llmgw.gateway")


# Beyond the shutdown grace: closing the fronts and leaving gossip (the supervisor's and the signal handler's bound).
STOP_MARGIN_S = 15.0


class GatewayStartError(Exception):
    """A port the gateway was told to serve on cannot be bound; nothing is left running."""


@dataclasses.dataclass(frozen=True)
class HttpSettings:
    """The HTTP front (OpenAI API, /metrics, /healthz, /readyz, /admin). `port` None = the default HTTP port,
    0 = no HTTP front; `host` "" = the gateway's gRPC host; `admin_token` None = $LLMGW_ADMIN_TOKEN or loopback
    only."""

    port: int | None = None
    host: str = ""
    admin_token: str | None = None
    body_timeout_s: float = 30.0

    def validate(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError("--http-port must be within 0..65535")
        if not self.body_timeout_s > 0:
            raise ValueError("--http-body-timeout-s must be > 0")


class TlsSettings:
    """TLS material, loaded once at start so a bad file fails before anything binds (TlsConfigError/ValueError).

    `cert`/`key` serve gRPC and HTTP over TLS, `client_ca` requires client certificates signed by it,
    `replica_ca` reaches replicas over TLS (the gateway's own certificate doubles as its client certificate)."""

    def __init__(self, cert: str = "", key: str = "", client_ca: str = "", replica_ca: str = "") -> None:
        from llmgw.tls import channel_credentials, server_credentials, server_ssl_context

        self.grpc_server: Any = None
        self.http_server: Any = None
        self.replica_channel: Any = None
        if cert or key or client_ca:
            if not (cert and key):
                raise ValueError("TLS needs both --tls-cert and --tls-key")
            self.grpc_server = server_credentials(cert, key, client_ca or None)
            self.http_server = server_ssl_context(cert, key, client_ca or None)
        if replica_ca:
            self.replica_channel = channel_credentials(replica_ca, cert or None, key if cert else None)


class _NoTls:
    grpc_server = http_server = replica_channel = None


NO_TLS: Any = _NoTls()


def worker_config(config: GatewayConfig, worker: int) -> GatewayConfig:
    """Worker `worker`'s configuration when several processes share the gRPC port: its own member id and gossip
    port (the base gossip port + worker), SO_REUSEPORT on."""
    base = config.gossip_port or gossip_port_for(config.port)
    return dataclasses.replace(config, gateway_id=f"{config.gateway_id}-w{worker}", gossip_port=base + worker,
                               reuse_port=True)


def build_server(config: GatewayConfig, tls: TlsSettings | None = None, *, metrics=None, membership=None,
                 tenancy=None):
    """A GatewayServer whose Gateway reports every request to a metrics listener (metrics + one log line per
    request), with TLS when asked. `membership` replaces gossip (see llmgw.gateway.Gateway), e.g. for tests.
    `tenancy` (a llmgw.gateway.tenancy_gate.TenancyGate, e.g. TenancyGate.from_key_file) turns on API keys and
    per-tenant limits; without one the gateway is open."""
    from llmgw.gateway.observability import MetricsListener
    from llmgw.gateway.server import GatewayServer
    from llmgw.gateway.tenancy_gate import bind_metrics
    from llmgw.gateway.worker_wiring import WorkerParts
    from llmgw.metrics import GatewayMetrics

    tls = tls or NO_TLS
    server = GatewayServer(config, membership=membership, server_credentials=tls.grpc_server,
                           replica_credentials=tls.replica_channel)
    metrics = metrics or GatewayMetrics(gateway_id=config.gateway_id)
    # Both fronts call the same Gateway: every request is counted and logged once, whichever front it came in on.
    server.metrics_listener = MetricsListener(server.gateway, metrics)
    server.gateway.add_listener(server.metrics_listener)
    # One worker of `--workers N` (llmgw.workers environment): shared metrics files, drains and rollouts.
    server.worker_parts = WorkerParts.for_process(server)
    if tenancy is not None:
        server.gateway.set_tenancy(tenancy)
    bind_metrics(server.gateway.tenancy, metrics)
    return server


async def start_gateway(server, http: HttpSettings | None = None, tls: TlsSettings | None = None, *,
                        reuse_port: bool = False):
    """Start gRPC (+ gossip), then the HTTP front on the same loop; returns the HttpFront or None (port 0).

    Every port must bind, the default HTTP port too: a gateway quietly serving without its HTTP front is worse
    than one that refuses to start. GatewayStartError says which port and why, after stopping what did start."""
    from llmgw.config import DEFAULT_PORTS
    from llmgw.http import start_http

    http = http or HttpSettings()
    tls = tls or NO_TLS
    try:
        await server.start()
    except (OSError, RuntimeError) as exc:  # grpc reports a failed bind as RuntimeError, gossip as OSError
        await server.stop(0)
        raise GatewayStartError(f"cannot start on gRPC {server.config.host}:{server.config.port}: "
                                f"{getattr(exc, 'strerror', None) or exc}") from None
    listener = getattr(server, "metrics_listener", None)
    metrics = listener.metrics if listener is not None else None
    gossip = server.gossip
    if gossip is not None and metrics is not None:
        metrics.watch_gossip(gossip.stats, lambda: gossip.members(include_self=True))
    parts = getattr(server, "worker_parts", None)
    if parts is not None:
        await parts.start()
    http_port = DEFAULT_PORTS["gateway"]["http"] if http.port is None else http.port
    await start_usage_gossip(server, http.host or server.config.host if http_port else "")
    if http_port == 0:
        return None
    host = http.host or server.config.host
    gateway = server.gateway
    try:
        return await start_http(
            gateway, host=host, port=http_port, admin_token=http.admin_token, metrics=metrics,
            breakers=gateway.breakers, rollouts=server.rollouts, record_requests=listener is None,
            reuse_port=reuse_port, ssl_context=tls.http_server, body_timeout_s=http.body_timeout_s,
            worker_rollouts=parts.rollouts if parts is not None else None)
    except OSError as exc:
        if server.usage_gossip is not None:
            await server.usage_gossip.stop()
        await server.stop()
        if parts is not None:
            await parts.close()
        hint = " (choose another with --http-port, or --http-port 0 to serve gRPC only)" \
            if exc.errno == errno.EADDRINUSE else ""
        raise GatewayStartError(f"cannot serve HTTP on {host}:{http_port}: {exc.strerror or exc}{hint}") from None


async def start_usage_gossip(server, http_host: str = "") -> None:
    """With a key file, share tenant usage with the other gateways over this gateway's gossip (cluster-wide
    limits, llmgw.gateway.tenancy_gossip); without one, warn when the gateway listens beyond loopback."""
    from llmgw.gateway.tenancy_gossip import UsageGossip
    from llmgw.http.admin import is_loopback_host

    gate = server.gateway.tenancy
    server.usage_gossip = None
    if not gate.enabled:
        exposed = [h for h in (server.config.host, http_host) if h and not is_loopback_host(h)]
        if exposed:
            log.warning("gateway listens on %s without API keys: anyone who reaches it may use every model "
                        "(--keys PATH requires keys)", ", ".join(dict.fromkeys(exposed)))
        return
    if server.gossip is not None and hasattr(server.gossip, "send_user"):
        server.usage_gossip = UsageGossip(gate, server.gossip)
        await server.usage_gossip.start()


async def stop_gateway(server, front, grace_s: float = DEFAULT_SHUTDOWN_GRACE_S) -> None:
    """Drain (not ready at once, new requests refused, open streams given `grace_s` to finish, then ended with
    UNAVAILABLE: llmgw.gateway.shutdown), then HTTP, then gRPC, then gossip."""
    report = await server.drain(grace_s)
    if report.open_at_start:
        log.info("drained: %d open request(s), %d ended by the shutdown grace, in %.1f s", report.open_at_start,
                 report.cut, report.seconds)
    if front is not None:
        await front.close()
    usage_gossip = getattr(server, "usage_gossip", None)
    if usage_gossip is not None:
        await usage_gossip.stop()
    await server.stop()
    parts = getattr(server, "worker_parts", None)
    if parts is not None:
        await parts.close()
    listener = getattr(server, "metrics_listener", None)
    if listener is not None:
        server.gateway.remove_listener(listener)
        listener.detach()


def serve(config: GatewayConfig, *, tls: TlsSettings | None = None, http: HttpSettings | None = None,
          reuse_port: bool = False, event_loop: str | None = None, key_file: str = "",
          shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S) -> int:
    """Run one gateway process until SIGTERM/SIGINT: prints its READY line once every port is bound; exit code 2
    when a port cannot be bound or the key file (`key_file`, API keys; SIGHUP reloads it) is bad. On the signal,
    open streams get `shutdown_grace_s` to finish (stop_gateway)."""
    from llmgw import eventloop
    from llmgw.signals import serve_until_signalled

    # SIGHUP's default action ends the process: a reload signal that arrives before the loop's handler exists (a
    # worker just started, or an operator's `kill -HUP` on a gateway without keys) must not stop a gateway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    tenancy = None
    if key_file:
        from llmgw.gateway.tenancy_gate import TenancyGate
        from llmgw.tenancy.keys import KeyFileError

        try:
            tenancy = TenancyGate.from_key_file(config.gateway_id, key_file)
        except KeyFileError as exc:
            print(f"gateway: {exc}", file=sys.stderr, flush=True)
            return 2
    server = build_server(config, tls, tenancy=tenancy)

    async def main() -> int:
        try:
            front = await start_gateway(server, http, tls, reuse_port=reuse_port)
        except GatewayStartError as exc:
            print(f"gateway: {exc}", file=sys.stderr, flush=True)
            return 2
        gc_tuning.settle_after_start()
        gossip = server.gossip
        http_part = f" http={front.url}" if front is not None else ""
        print(f"READY gateway {server.config.gateway_id} grpc={server.grpc_address} "
              f"gossip={gossip.address if gossip else ''}{http_part} pid={os.getpid()}", flush=True)

        async def stop() -> None:
            await stop_gateway(server, front, shutdown_grace_s)

        loop = asyncio.get_running_loop()
        # SIGHUP: reload the key file (a bad file keeps the keys in use; logged); without one there is nothing to
        # reload, and the signal is logged rather than ending the process.
        loop.add_signal_handler(signal.SIGHUP, tenancy.reload if tenancy is not None else _no_key_file)
        try:
            await serve_until_signalled(stop, stop_timeout_s=shutdown_grace_s + STOP_MARGIN_S)
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
        return 0

    return eventloop.run(main(), event_loop)


def _no_key_file() -> None:
    log.warning("SIGHUP: this gateway has no key file (--keys) to reload")


def run_workers(argv: list[str], workers: int, shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S) -> int:
    """Start `workers` gateway processes (`python -m llmgw gateway *argv --worker-index i`) and stop them all on
    SIGTERM/SIGINT (each drains for up to `shutdown_grace_s`); returns 0 after a signal, 1 when a worker exited by
    itself. The workers share one llmgw.workers.WorkerGroup: one /metrics and admin actions for all of them."""
    from llmgw.workers import WorkerGroup

    with WorkerGroup(workers) as group:
        return _supervise(argv, workers, group, shutdown_grace_s)


def _supervise(argv: list[str], workers: int, group, shutdown_grace_s: float) -> int:
    procs: list[subprocess.Popen] = []
    stopping = False

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    def reload_keys(signum, frame) -> None:  # each worker reloads its own key ring
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGHUP)

    # Handlers first: a signal while the workers start is handled, not the default (which ends the supervisor).
    # SIGHUP is ignored while they are spawned: an ignored signal stays ignored across exec, so a worker cannot be
    # killed by a reload forwarded before its own handler exists (serve() keeps ignoring it until then).
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for i in range(workers):
        procs.append(subprocess.Popen([sys.executable, "-m", "llmgw", "gateway", *argv, "--worker-index", str(i)],
                                      env={**os.environ, **group.env(i)}))
    signal.signal(signal.SIGHUP, reload_keys)
    try:
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            else:  # exited by itself: its live gauges leave the aggregate
                group.worker_exited(p.pid)
        deadline = time.monotonic() + shutdown_grace_s + STOP_MARGIN_S
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5.0)
    return 0 if stopping else 1
