"""Multi-process cluster launcher for integration tests: replicas and gateways as real subprocesses on loopback.

    with Cluster(tmp_path) as c:
        r1 = c.start_replica("replica-1", token_delay_ms=50)
        r2 = c.start_replica("replica-2")
        gw = c.start_gateway("gateway-1")
        c.wait_converged([gw, r1, r2])
        result = c.infer(gw, "hello", 5)

Every process gets explicitly chosen free ports, logs to tmp_path/<name>.log, and is killed in close() (the
context manager and the `cluster` fixtures call it) whatever happened. Every wait is bounded. The processes
themselves are llmgw.cluster.MemberProcess, the launcher `llmgw cluster` uses too: own session, READY line read
from the log, stop = SIGTERM to the group, bounded wait, SIGKILL of the group.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from socket import SOCK_DGRAM

import grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llmgw import client  # noqa: E402
from llmgw._proto import llmgateway_pb2 as pb  # noqa: E402
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc  # noqa: E402
from llmgw.cluster import ClusterError, MemberProcess, free_port  # noqa: E402

READY_TIMEOUT_S = 30.0


def free_tcp_port() -> int:
    """A free loopback TCP port (llmgw.cluster.free_port, the one helper)."""
    return free_port("127.0.0.1")


def free_udp_port() -> int:
    """A free loopback UDP port (llmgw.cluster.free_port, the one helper)."""
    return free_port("127.0.0.1", SOCK_DGRAM)


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1, what: str = "condition",
               retry_on: tuple[type[BaseException], ...] = (grpc.RpcError, OSError)):
    """Poll `predicate` until it returns something truthy (returned) or `timeout` passes (AssertionError).

    An exception of a `retry_on` type counts as "not yet" (by default: a node still starting or just killed);
    `retry_on=()` lets every exception of `predicate` end the wait at once."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except retry_on as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}"
                                 + (f" (last error: {last_exc})" if last_exc else ""))
        time.sleep(interval)


@dataclasses.dataclass
class Node:
    name: str
    role: str  # "replica" | "gateway"
    process: MemberProcess  # this life of the node; a node started again under the same name gets a new one
    grpc_port: int
    gossip_port: int
    ready_at: float | None = None  # time.monotonic() when wait_ready saw this life's READY line

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    def argv(self) -> list[str]:
        return self.process.argv

    @property
    def log_offset(self) -> int:
        """Where this life's output starts in log_path (the log of a node started again is appended to)."""
        return self.process.log_offset

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def gossip_address(self) -> str:
        return f"127.0.0.1:{self.gossip_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.alive()

    def log_tail(self, n: int = 30) -> str:
        return self.process.log_tail(n)


class Cluster:
    def __init__(self, workdir: Path | str, *, gossip_config: str = "local", log_level: str = "INFO") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.gossip_config = gossip_config
        self.log_level = log_level
        self.nodes: dict[str, Node] = {}
        self._channels: dict[str, grpc.Channel] = {}

    # ---- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def seeds(self, exclude: str | None = None, count: int = 2) -> str:
        """Gossip addresses of up to `count` live nodes (replicas first), for a newcomer's --seeds."""
        nodes = [n for n in self.nodes.values() if n.alive() and n.name != exclude]
        nodes.sort(key=lambda n: n.role != "replica")
        return ",".join(n.gossip_address for n in nodes[:count])

    def _spawn(self, name: str, role: str, args: list[str], *, grpc_port: int, gossip_port: int,
               wait_ready: bool) -> Node:
        if name in self.nodes and self.nodes[name].alive():
            raise ValueError(f"node {name} is already running")
        argv = [sys.executable, "-m", "llmgw", role, *args, "--log-level", self.log_level]
        process = MemberProcess(argv, self.workdir / f"{name}.log", name=name, cwd=ROOT)
        node = Node(name, role, process, grpc_port, gossip_port)
        self.nodes[name] = node
        if wait_ready:
            self.wait_ready(node)
        return node

    def wait_ready(self, node: Node, timeout: float = READY_TIMEOUT_S) -> float:
        """Wait for this life's READY line (printed once the node serves); returns, and records in
        node.ready_at, the monotonic time it was seen (within ~20 ms). AssertionError if the node exits first or
        `timeout` passes."""
        try:
            node.process.wait_ready(timeout)
        except ClusterError as exc:
            raise AssertionError(str(exc)) from None
        node.ready_at = time.monotonic()
        return node.ready_at

    def start_replica(self, name: str, *, token_delay_ms: float = 50, max_capacity: int = 32,
                      seeds: str | None = None, extra: tuple[str, ...] | list[str] = (), wait_ready: bool = True,
                      gossip_config: str | None = None) -> Node:
        grpc_port, gossip_port = free_tcp_port(), free_udp_port()
        seeds = self.seeds(exclude=name) if seeds is None else seeds
        args = ["--id", name, "--port", str(grpc_port), "--gossip-port", str(gossip_port),
                "--token-delay-ms", str(token_delay_ms), "--max-capacity", str(max_capacity),
                "--gossip-config", gossip_config or self.gossip_config, *extra]
        if seeds:
            args += ["--seeds", seeds]
        return self._spawn(name, "replica", args, grpc_port=grpc_port, gossip_port=gossip_port,
                           wait_ready=wait_ready)

    def start_gateway(self, name: str = "gateway-1", *, seeds: str | None = None,
                      extra: tuple[str, ...] | list[str] = (), wait_ready: bool = True,
                      gossip_config: str | None = None) -> Node:
        grpc_port, gossip_port = free_tcp_port(), free_udp_port()
        seeds = self.seeds(exclude=name) if seeds is None else seeds
        # No HTTP front unless the test asks for one with its own --http-port in `extra` (the later flag wins):
        # gateways of parallel tests would otherwise all want the default port, and a taken port stops a gateway.
        args = ["--id", name, "--port", str(grpc_port), "--gossip-port", str(gossip_port),
                "--gossip-config", gossip_config or self.gossip_config, "--http-port", "0", *extra]
        if seeds:
            args += ["--seeds", seeds]
        return self._spawn(name, "gateway", args, grpc_port=grpc_port, gossip_port=gossip_port,
                           wait_ready=wait_ready)

    def kill(self, node: Node) -> None:
        """SIGKILL: the node vanishes without a word (no gossip leave)."""
        node.process.kill()
        self._drop_channel(node)

    def stop(self, node: Node, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful: gossip leave), then SIGKILL after `timeout`; the exit status."""
        rc = node.process.stop(timeout)
        self._drop_channel(node)
        return rc

    def pause(self, node: Node) -> None:
        node.process.pause()

    def resume(self, node: Node) -> None:
        node.process.resume()

    def restart(self, node: Node, *, wait_ready: bool = True) -> Node:
        """Start a stopped or killed node again on the same ports (same argv, same log file): a process restart,
        where start_replica/start_gateway under the same name would pick fresh ports."""
        if self.nodes.get(node.name) is not node:
            raise ValueError(f"{node.name} has been started again since; restart its current Node")
        again = Node(node.name, node.role, node.process.restarted(), node.grpc_port, node.gossip_port)
        self.nodes[node.name] = again
        if wait_ready:
            self.wait_ready(again)
        return again

    def close(self) -> None:
        for node in self.nodes.values():
            node.process.kill()
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    # ---- admin RPCs (sync) -----------------------------------------------------------------------------
    def channel(self, node: Node) -> grpc.Channel:
        ch = self._channels.get(node.name)
        if ch is None:
            ch = self._channels[node.name] = grpc.insecure_channel(node.grpc_address)
        return ch

    def _drop_channel(self, node: Node) -> None:
        ch = self._channels.pop(node.name, None)
        if ch is not None:
            ch.close()

    def members(self, node: Node, timeout: float = 2.0) -> dict[str, pb.MemberInfo]:
        """The member table as `node` sees it: {member_id: MemberInfo}."""
        if node.role == "gateway":
            stub = pb_grpc.GatewayAdminStub(self.channel(node))
        else:
            stub = pb_grpc.ReplicaAdminStub(self.channel(node))
        resp = stub.Members(pb.MembersRequest(), timeout=timeout)
        return {m.member_id: m for m in resp.members}

    def states(self, node: Node) -> dict[str, str]:
        return {mid: m.state for mid, m in self.members(node).items()}

    def replica_status(self, node: Node, timeout: float = 2.0) -> pb.ReplicaStatus:
        return pb_grpc.ReplicaAdminStub(self.channel(node)).GetStatus(pb.StatusRequest(), timeout=timeout)

    def gateway_status(self, node: Node, timeout: float = 2.0) -> pb.GatewayStatus:
        return pb_grpc.GatewayAdminStub(self.channel(node)).GetStatus(pb.GatewayStatusRequest(), timeout=timeout)

    def set_faults(self, node: Node, timeout: float = 2.0, **faults) -> pb.Faults:
        msg = pb.Faults(**faults)
        for key in faults:
            name = "set_stall_before_first" if key == "stall_before_first_ms" else f"set_{key}"
            setattr(msg, name, True)
        return pb_grpc.ReplicaAdminStub(self.channel(node)).SetFaults(msg, timeout=timeout)

    def wait_converged(self, observers: list[Node], expected: dict[str, str] | None = None,
                       timeout: float = 20.0) -> None:
        """Wait until every observer sees exactly `expected` states for those ids (default: every running
        node alive)."""
        if expected is None:
            expected = {n.name: "alive" for n in self.nodes.values() if n.alive()}

        def converged():
            for obs in observers:
                seen = self.states(obs)
                if any(seen.get(mid) != state for mid, state in expected.items()):
                    return False
            return True

        wait_until(converged, timeout, 0.1, f"{[o.name for o in observers]} to see {expected}")

    # ---- requests --------------------------------------------------------------------------------------
    def infer(self, gateway: Node, prompt: str, max_tokens: int, timeout_s: float = 30.0) -> client.StreamResult:
        return asyncio.run(self.infer_many(gateway, [(prompt, max_tokens)], timeout_s=timeout_s))[0]

    async def infer_many(self, gateway: Node, requests: list[tuple[str, int]], *, timeout_s: float = 30.0,
                         spacing_s: float = 0.0) -> list[client.StreamResult]:
        """Run requests concurrently (started `spacing_s` apart) on one channel; results in request order."""
        async with grpc.aio.insecure_channel(gateway.grpc_address) as ch:
            async def one(i, prompt, n):
                if spacing_s:
                    await asyncio.sleep(i * spacing_s)
                return await client.collect(client.stream_infer(ch, prompt, n, timeout_s=timeout_s))

            return await asyncio.wait_for(
                asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(requests))),
                timeout=timeout_s + len(requests) * spacing_s + 5.0)
