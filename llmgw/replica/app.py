"""The replica's composition root: one running replica process built from its configuration.

`start_replica` wires and starts the parts (the Replica with its gRPC server and gossip member, Prometheus metrics
when asked); `RunningReplica.stop` stops them in order; `serve` runs one replica process until SIGTERM/SIGINT,
announcing itself with one READY line. The CLI (llmgw.cli.replica) only parses flags into these arguments; tests
and llmgw.cluster use this module.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from llmgw import eventloop, gc_tuning
from llmgw.metrics import MetricsServer, ReplicaMetrics, start_metrics_server
from llmgw.replica.server import Replica, ReplicaConfig
from llmgw.signals import serve_until_signalled


class ReplicaStartError(Exception):
    """A port the replica was told to serve on cannot be bound; nothing is left running."""


@dataclasses.dataclass
class RunningReplica:
    replica: Replica
    metrics: ReplicaMetrics | None = None
    metrics_server: MetricsServer | None = None

    def ready_line(self) -> str:
        """One machine-readable line, so launchers (llmgw.cluster) learn the bound ports without guessing."""
        replica = self.replica
        gossip = replica.gossip.address if replica.gossip is not None else ""
        metrics = (f" metrics={replica.config.host}:{self.metrics_server.port}"
                   if self.metrics_server is not None else "")
        return (f"READY replica {replica.config.replica_id} grpc={replica.grpc_address} gossip={gossip}{metrics} "
                f"pid={os.getpid()}")

    async def stop(self) -> None:
        try:
            await self.replica.stop()
        finally:
            if self.metrics_server is not None:
                self.metrics_server.close()
                self.metrics_server = None


async def start_replica(config: ReplicaConfig, *, metrics_port: int | None = None) -> RunningReplica:
    """Start a replica (gRPC, then gossip) and, with `metrics_port` (0 = any free port), its /metrics server on
    the replica's host. ReplicaStartError names the port that could not be bound, after stopping what started."""
    metrics = metrics_server = None
    if metrics_port is not None:
        if not 0 <= metrics_port <= 65535:
            raise ValueError("metrics port must be within 0..65535")
        metrics = ReplicaMetrics(replica_id=config.replica_id)
        try:
            metrics_server = start_metrics_server(metrics.registry, metrics_port, host=config.host)
        except OSError as exc:
            raise ReplicaStartError(f"cannot serve metrics on {config.host}:{metrics_port}: "
                                    f"{exc.strerror or exc}") from None
    running = RunningReplica(Replica(config, metrics=metrics), metrics, metrics_server)
    try:
        await running.replica.start()
    except (OSError, RuntimeError) as exc:  # grpc reports a failed bind as OSError (RpcServer), gossip too
        await running.stop()
        raise ReplicaStartError(f"replica {config.replica_id}: {getattr(exc, 'strerror', None) or exc}") from None
    gossip = running.replica.gossip
    if metrics is not None and gossip is not None:
        metrics.watch_gossip(gossip.stats, lambda: gossip.members(include_self=True))
    return running


async def serve(config: ReplicaConfig, *, metrics_port: int | None = None,
                announce: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
    """One replica process: start, announce the READY line, run until SIGTERM/SIGINT, stop (bounded)."""
    running = await start_replica(config, metrics_port=metrics_port)
    gc_tuning.settle_after_start()
    announce(running.ready_line())
    await serve_until_signalled(running.stop)


def run(config: ReplicaConfig, *, metrics_port: int | None = None, event_loop: str = "auto") -> int:
    """Run `serve` on the chosen event loop; exit status 0 after a signal."""
    eventloop.run(serve(config, metrics_port=metrics_port), event_loop)
    return 0
