"""In-process building blocks for gateway tests: real simulated replicas (grpc.aio) published through a membership
source the test drives instead of gossip, a fresh event loop per scenario, and a bounded polling wait.

tests/test_gateway.py (GatewayServer over gRPC) and tests/test_http_server.py (Gateway + HTTP front) build their
stacks on these.
"""

from __future__ import annotations

import asyncio
import dataclasses

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


def run_with(make_stack, scenario, timeout: float, close_timeout: float = 15.0):
    """Run `scenario(stack)` on a fresh event loop with `make_stack()`, whose close() always runs afterwards."""

    async def wrapper():
        stack = make_stack()
        try:
            return await asyncio.wait_for(scenario(stack), timeout)
        finally:
            await asyncio.wait_for(stack.close(), close_timeout)

    return asyncio.run(wrapper())


async def wait_for(predicate, timeout=5.0, what="condition"):
    """Poll `predicate` every 10 ms until it is truthy; AssertionError after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
