"""The gateway's composition root: one running gateway process built from its configuration.

`build_server` wires the parts (gRPC front, Gateway, metrics listener); `start_gateway` starts gRPC (+ gossip)
and the HTTP front on one event loop; `stop_gateway` stops them in order; `serve` runs one gateway process until
SIGTERM/SIGINT; `run_workers` supervises several such processes sharing one gRPC port. The CLI
(llmgw.cli.gateway) only parses flags into these arguments; tests and llmgw.cluster import this module.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import subprocess
import sys
import time
from typing import Any

from llmgw.gateway.api import GatewayConfig
from llmgw.topology import gossip_port_for


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


def build_server(config: GatewayConfig, tls: TlsSettings | None = None, *, metrics=None, membership=None):
    """A GatewayServer whose Gateway reports every request to a metrics listener (metrics + one log line per
    request), with TLS when asked. `membership` replaces gossip (see llmgw.gateway.Gateway), e.g. for tests."""
    from llmgw.gateway.observability import MetricsListener
    from llmgw.gateway.server import GatewayServer
    from llmgw.metrics import GatewayMetrics

    tls = tls or NO_TLS
    server = GatewayServer(config, membership=membership, server_credentials=tls.grpc_server,
                           replica_credentials=tls.replica_channel)
    metrics = metrics or GatewayMetrics(gateway_id=config.gateway_id)
    # Both fronts call the same Gateway: every request is counted and logged once, whichever front it came in on.
    server.metrics_listener = MetricsListener(server.gateway, metrics)
    server.gateway.add_listener(server.metrics_listener)
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
    http_port = DEFAULT_PORTS["gateway"]["http"] if http.port is None else http.port
    if http_port == 0:
        return None
    host = http.host or server.config.host
    gateway = server.gateway
    try:
        return await start_http(
            gateway, host=host, port=http_port, admin_token=http.admin_token, metrics=metrics,
            breakers=gateway.breakers, rollouts=server.rollouts, record_requests=listener is None,
            reuse_port=reuse_port, ssl_context=tls.http_server, body_timeout_s=http.body_timeout_s)
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
    listener = getattr(server, "metrics_listener", None)
    if listener is not None:
        server.gateway.remove_listener(listener)
        listener.detach()


def serve(config: GatewayConfig, *, tls: TlsSettings | None = None, http: HttpSettings | None = None,
          reuse_port: bool = False, event_loop: str | None = None) -> int:
    """Run one gateway process until SIGTERM/SIGINT: prints its READY line once every port is bound; exit code 2
    when a port cannot be bound."""
    from llmgw import eventloop
    from llmgw.signals import serve_until_signalled

    server = build_server(config, tls)

    async def main() -> int:
        try:
            front = await start_gateway(server, http, tls, reuse_port=reuse_port)
        except GatewayStartError as exc:
            print(f"gateway: {exc}", file=sys.stderr, flush=True)
            return 2
        gossip = server.gossip
        http_part = f" http={front.url}" if front is not None else ""
        print(f"READY gateway {server.config.gateway_id} grpc={server.grpc_address} "
              f"gossip={gossip.address if gossip else ''}{http_part} pid={os.getpid()}", flush=True)

        async def stop() -> None:
            await stop_gateway(server, front)

        await serve_until_signalled(stop)
        return 0

    return eventloop.run(main(), event_loop)


def run_workers(argv: list[str], workers: int) -> int:
    """Start `workers` gateway processes (`python -m llmgw gateway *argv --worker-index i`) and stop them all on
    SIGTERM/SIGINT; returns 0 after a signal, 1 when a worker exited by itself."""
    procs = [subprocess.Popen([sys.executable, "-m", "llmgw", "gateway", *argv, "--worker-index", str(i)])
             for i in range(workers)]
    stopping = False

    def on_signal(signum, frame) -> None:
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
