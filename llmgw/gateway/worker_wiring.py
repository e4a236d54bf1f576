"""One process of ``gateway --workers N``: the parts that let any worker answer for the whole group.

The supervisor (llmgw.gateway.app.run_workers) starts each worker inside a llmgw.workers.WorkerGroup, which puts
the group's directory in the worker's environment. A worker then, besides being a whole gateway of its own:

- exports its metrics through the group's multiprocess files (its one GatewayMetrics, also handed to the HTTP
  front), copied in every second by a MetricsPublisher, so any worker's /metrics is the aggregate of all;
- keeps its drain set in the shared state (SharedDrains over the gateway's RoutingDrains): an admin drain or
  undrain received by one worker reaches every worker, and the answer says which applied it;
- runs rolling updates through WorkerRollouts: at most one in the group, status and abort from any worker.

`WorkerParts.for_process(server)` is None in a single-process gateway, and nothing here runs then.
"""

from __future__ import annotations

from typing import Any

from llmgw.gateway.operations import RolloutController
from llmgw.workers import MetricsPublisher, SharedDrains, WorkerBus, WorkerInfo, WorkerRollouts


class WorkerParts:
    """Rewires a built GatewayServer as worker `info.index` of its group (before it starts): its rollout
    controller is rebuilt on the shared drain set. `await start()` before serving, `await close()` after."""

    def __init__(self, server: Any, info: WorkerInfo, *, publish_interval_s: float = 1.0) -> None:
        self.info = info
        self.bus = WorkerBus(info)
        self.drains = SharedDrains(server.gateway.drains, self.bus)
        # The update's drains must reach every worker: the controller drains through the shared set.
        previous = server.rollouts
        shared: Any = self.drains  # the drain-set interface of RoutingDrains, kept equal in every worker
        server.rollouts = RolloutController(server.gateway, shared, previous.restart,
                                            drain_replica=previous.drain_replica)
        self.rollouts = WorkerRollouts(server.rollouts, self.bus)
        self.rollouts.register()
        listener = server.metrics_listener
        if listener is None:
            raise ValueError("a worker needs the server's metrics listener (llmgw.gateway.app.build_server)")
        self.publisher = MetricsPublisher(listener.metrics, publish_interval_s)

    @classmethod
    def for_process(cls, server: Any) -> WorkerParts | None:
        """This process's parts when it is a worker of a group (llmgw.workers environment), else None."""
        info = WorkerInfo.from_env()
        return None if info is None else cls(server, info)

    async def start(self) -> None:
        await self.drains.start()  # loads the group's drain state before the first request
        await self.bus.start()
        self.publisher.start()

    async def close(self) -> None:
        await self.publisher.close()
        await self.rollouts.close()
        await self.drains.close()
        await self.bus.close()
