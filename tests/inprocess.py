"""In-process building blocks for gateway tests: real simulated replicas (grpc.aio) published through a membership
source the test drives instead of gossip, a fresh event loop per scenario, and a bounded polling wait.

tests/test_gateway.py (GatewayServer over gRPC) and tests/test_http_server.py (Gateway + HTTP front) build their
stacks on these.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import aiohttp
import grpc

from harness import free_tcp_port
from llmgw.gateway import GatewayConfig
from llmgw.gateway.app import HttpSettings, build_server, start_gateway, stop_gateway
from llmgw.replica import Replica, ReplicaConfig


@dataclasses.dataclass(frozen=True)
class FakeMember:
    member_id: str
    grpc_address: str
    address: str = ""
    role: str = "replica"
    state: str = "alive"
    incarnation: int = 0
    model_version: str = "v1"
    active_requests: int = 0
    max_capacity: int = 4
    weight: float = 1.0
    draining: bool = False


@dataclasses.dataclass(frozen=True)
class FakeEvent:
    kind: str
    member: FakeMember


class FakeMembership:
    """The members()/subscribe() surface of llmgw.gossip.GossipNode, driven by the test."""

    def __init__(self) -> None:
        self._members: dict[str, FakeMember] = {}
        self._subscribers = []

    def members(self, include_self: bool = False):
        return list(self._members.values())

    def subscribe(self, cb):
        self._subscribers.append(cb)
        return lambda: self._subscribers.remove(cb)

    def set(self, member: FakeMember, kind: str = "updated") -> None:
        self._members[member.member_id] = member
        for cb in list(self._subscribers):
            cb(FakeEvent(kind, member))

    def get(self, member_id: str) -> FakeMember:
        return self._members[member_id]


class ReplicaPool:
    """Real replicas without gossip, each published to `membership` as it starts (unless publish=False)."""

    def __init__(self) -> None:
        self.replicas: dict[str, Replica] = {}
        self.membership = FakeMembership()

    async def add_replica(self, rid, *, capacity=4, version="v1", port=0, incarnation=0, publish=True,
                          **kw) -> Replica:
        rep = Replica(ReplicaConfig(replica_id=rid, port=port, gossip_port=None, max_capacity=capacity,
                                    model_version=version, **kw))
        await rep.start()
        self.replicas[rid] = rep
        if publish:
            self.membership.set(FakeMember(rid, rep.grpc_address, max_capacity=capacity, model_version=version,
                                           incarnation=incarnation), "joined")
        return rep

    async def close(self) -> None:
        for rep in self.replicas.values():
            await rep.stop(0.1)


class ComposedStack(ReplicaPool):
    """Replicas + the gateway as the composition root wires it (llmgw.gateway.app.build_server and start_gateway:
    gRPC front, Gateway with its metrics listener, HTTP front), an aiohttp session on the HTTP front and a gRPC
    channel to the gRPC front. `build` then `start_fronts`, so a test can add listeners to the Gateway between."""

    def __init__(self) -> None:
        super().__init__()
        self.server: Any = None
        self.front: Any = None
        self.session: aiohttp.ClientSession | None = None
        self.channel: grpc.aio.Channel | None = None

    def build(self, config: GatewayConfig, *, tenancy: Any = None) -> Any:
        self.server = build_server(config, tenancy=tenancy, membership=self.membership)
        return self.server

    async def start_fronts(self, *, host: str = "127.0.0.1", admin_token: str | None = None,
                           session_timeout_s: float = 30.0) -> None:
        """Start the built server and its HTTP front on a free port (`host` "": the gRPC front's host)."""
        self.front = await start_gateway(self.server, HttpSettings(port=free_tcp_port(), host=host,
                                                                     admin_token=admin_token))
        self.session = aiohttp.ClientSession(base_url=self.front.url,
                                             timeout=aiohttp.ClientTimeout(total=session_timeout_s))
        self.channel = grpc.aio.insecure_channel(self.server.grpc_address)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.session is not None:
            await self.session.close()
        if self.server is not None:
            await stop_gateway(self.server, self.front)
        await super().close()


def run_with(make_stack, scenario, timeout: float, close_timeout: float = 15.0):
    """Run `scenario(stack)` on a fresh event loop with `make_stack()`, whose close() always runs afterwards."""

    async def wrapper():
        stack = make_stack()
        try:
            return await asyncio.wait_for(scenario(stack), timeout)
        finally:
            await asyncio.wait_for(stack.close(), close_timeout)

    return asyncio.run(wrapper())


def run_bounded(coro, timeout: float = 30.0):
    """Run `coro` on a fresh event loop; asyncio.TimeoutError if it takes longer than `timeout` seconds."""

    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def wait_for(predicate, timeout=5.0, what="condition", interval: float = 0.01):
    """Poll `predicate` every `interval` seconds until it is truthy (returned); AssertionError after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := predicate()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)
    return value
