"""Operator actions on a running gateway: taking replicas out of routing and rolling updates.

A gateway has exactly one drain set (`Gateway.drains`, a RoutingDrains) and one RolloutController (owned by the
GatewayServer and handed to the HTTP front): the gRPC GatewayAdmin RPCs and the HTTP /admin routes are two doors
to the same state, so a rolling update started through one is visible, and refuses a second start, through the
other, and a replica drained over HTTP shows as drained in GatewayAdmin.Members.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

from llmgw.gateway.capacity import RoutingDrains
from llmgw.topology import is_replica, is_routable

log = logging.getLogger("llmgw.gateway.operations")

__all__ = ["GatewayRolloutTarget", "RolloutController", "RolloutRefused", "RoutingDrains"]

# An abort interrupts the current step and restores routing within this.
ROLLOUT_STOP_TIMEOUT_S = 15.0
RestartHook = Callable[[str, str], Awaitable[None]]
# Asks the replica at an address to drain, waiting at most the given seconds; False when it did not finish in time
# (llmgw.gateway.grpc_transport.GrpcTransport.drain_replica).
DrainReplica = Callable[[str, float], Awaitable[bool]]


class GatewayRolloutTarget:
    """llmgw.rollout.RolloutTarget over a running gateway: routing drains here, the Drain RPC to the replica
    (over TLS when the gateway reaches its replicas over TLS), membership for the rejoin check; the restart itself
    is the injected hook."""

    def __init__(self, gateway, drains: RoutingDrains, restart: RestartHook,
                 order: list[str] | None = None, drain_replica: DrainReplica | None = None) -> None:
        self.gateway = gateway
        self.drains = drains
        self._restart = restart
        self._order = order
        self._drain_replica = drain_replica

    def _member(self, replica_id: str):
        for member in self.gateway.members():
            if member.member_id == replica_id and is_replica(member):
                return member
        return None

    def replicas(self) -> list[str]:
        if self._order is not None:
            return list(self._order)
        return sorted(m.member_id for m in self.gateway.members()
                      if is_replica(m) and is_routable(m.state))

    async def drain_in_routing(self, replica_id: str) -> None:
        self.drains.drain(replica_id)

    async def undrain_in_routing(self, replica_id: str) -> None:
        self.drains.undrain(replica_id)

    async def drain_rpc(self, replica_id: str, timeout_s: float) -> bool:
        member = self._member(replica_id)
        if member is None or not member.grpc_address:
            raise RuntimeError(f"replica {replica_id} has no known gRPC address")
        if self._drain_replica is None:
            raise RuntimeError("this gateway cannot ask replicas to drain")
        return await self._drain_replica(member.grpc_address, timeout_s)

    async def restart(self, replica_id: str, new_version: str) -> None:
        await self._restart(replica_id, new_version)

    def member_info(self, replica_id: str) -> tuple[str, str, int] | None:
        member = self._member(replica_id)
        if member is None:
            return None
        return str(member.state).lower(), member.model_version, int(member.incarnation)


class RolloutRefused(Exception):
    """A rolling update cannot start; `reason` is "no_restart_hook", "running" or "invalid"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class RolloutController:
    """The one rolling update of a gateway at a time, whichever admin front starts, watches or aborts it.

    `restart` is the async (replica_id, version) hook restarting a replica on the new version (e.g. a
    llmgw.rollout.CommandTemplateRestart); None = rolling updates are refused with reason "no_restart_hook".
    """

    def __init__(self, gateway, drains: RoutingDrains, restart: RestartHook | None = None, *,
                 drain_replica: DrainReplica | None = None) -> None:
        self.gateway = gateway
        self.drains = drains
        self.restart = restart
        self.drain_replica = drain_replica
        self.rollout = None  # the current or last llmgw.rollout.Rollout
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, version: str, *, replicas: list[str] | None = None, **options):
        """Start a rolling update on its own task and return its llmgw.rollout.Rollout. `options` are Rollout's
        keyword arguments (timeouts, skip_up_to_date, require_another_alive). Raises RolloutRefused."""
        rollout = self._create(version, replicas, options)
        self._launch(rollout)
        return rollout

    def start_watched(self, version: str, *, replicas: list[str] | None = None,
                      **options) -> AsyncGenerator:
        """Like start(), but return the update's progress events (llmgw.rollout.RolloutEvent) from its very
        first one to "finished". Refusals raise here, before anything runs. Closing the iterator early stops
        only the watching: the update runs on (abort() stops it)."""
        rollout = self._create(version, replicas, options)
        events = rollout.events()
        # The subscription happens inside the generator; scheduling its first step before the update's task
        # makes it subscribe before the update can emit anything.
        first = asyncio.ensure_future(events.__anext__())
        self._launch(rollout)
        return self._watch(events, first)

    @staticmethod
    async def _watch(events, first) -> AsyncGenerator:
        try:
            try:
                event = await first
            except StopAsyncIteration:
                return
            yield event
            async for event in events:
                yield event
        finally:
            first.cancel()
            await events.aclose()

    def _create(self, version, replicas, options):
        from llmgw.rollout import Rollout

        if self.restart is None:
            raise RolloutRefused("no_restart_hook", "rolling updates need a restart hook: start the gateway with "
                                                    "--restart-command")
        if self.running:
            assert self.rollout is not None
            raise RolloutRefused("running", f"a rolling update to {self.rollout.new_version} is already running")
        if not isinstance(version, str) or not version.strip():
            raise RolloutRefused("invalid", "version must be a non-empty string")
        if replicas is not None:
            known = {m.member_id for m in self.gateway.members() if is_replica(m)}
            unknown = [r for r in replicas if r not in known]
            if unknown:
                raise RolloutRefused("invalid", f"unknown replicas: {', '.join(unknown)}")
            if not replicas or len(set(replicas)) != len(replicas):
                raise RolloutRefused("invalid", "replicas must be a non-empty list of distinct replica ids")
        target = GatewayRolloutTarget(self.gateway, self.drains, self.restart,
                                      list(replicas) if replicas is not None else None, self.drain_replica)
        try:
            return Rollout(target, version.strip(), **options)
        except (ValueError, TypeError) as exc:
            raise RolloutRefused("invalid", str(exc)) from None

    def _launch(self, rollout) -> None:
        self.rollout = rollout
        self._task = asyncio.get_running_loop().create_task(rollout.run(), name="llmgw-rollout")

    async def abort(self, timeout_s: float = ROLLOUT_STOP_TIMEOUT_S) -> None:
        """Abort the running update (routing is restored) and wait for it to stop; TimeoutError after
        `timeout_s`. Nothing running: nothing to do."""
        task = self._task
        if task is None or task.done():
            return
        assert self.rollout is not None  # set with the task
        self.rollout.cancel()
        async with asyncio.timeout(timeout_s):
            await asyncio.shield(task)

    async def close(self) -> None:
        """Abort a running update on shutdown; one that does not stop in time has its task cancelled."""
        task = self._task
        if task is None or task.done():
            return
        try:
            await self.abort()
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=5.0)
