"""Mixed cluster, multi-process: an llmgw gateway joined to two reference-shaped replicas (issue 14, part 1).

No reference binary exists here, so each "reference replica" is two halves: an llmgw simulated replica process
with its own gossip off and sessions off (it serves Generate as the reference does), and a small speaker in this
process that gossips for it exactly as the reference does (tests/reference_peer.py): its load, capacity and
version -- read from the replica's GetStatus -- appended last to every datagram at an unchanged incarnation, its
gossip port = gRPC port + 10000 (the reference convention; it advertises no gRPC address), and `seed-<host:port>`
placeholders for its seeds, gossiped on. As in the report behind the issue, the second replica is seeded with the
first one's address, so its placeholder points at a real replica.

Acceptance: capacity from the reference replicas is enforced (8 requests x 10 tokens at 100 ms/token against two
capacity-2 replicas take two waves, >= 2 s), versions are visible, no placeholder is ever a member (so none can be
routed to), and `llmgw status` shows one row per real node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import grpc
import pytest
from reference_peer import PROTOCOL_PERIOD_S, ReferencePeer

from harness import free_tcp_port, free_udp_port
from llmgw import client
from llmgw._core.codec import CodecError
from llmgw._proto import llmgateway_pb2 as pb
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc
from llmgw.cluster import ClusterError, MemberProcess
from llmgw.topology import GOSSIP_PORT_OFFSET

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CAPACITY = 2
VERSION = "ref-v7"
TOKEN_DELAY_MS = 100
REQUESTS, TOKENS = 8, 10
STARTUP_TIMEOUT_S = 30.0
CONVERGE_TIMEOUT_S = 20.0
LOAD_POLL_S = 0.05


def reference_ports() -> tuple[socket.socket, int]:
    """A bound UDP socket for the speaker and a free TCP port for the replica, related as the reference relates
    them: gossip port = gRPC port + 10000."""
    for _ in range(200):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((HOST, 0))
        grpc_port = udp.getsockname()[1] - GOSSIP_PORT_OFFSET
        if grpc_port >= 1024:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((HOST, grpc_port))
                    return udp, grpc_port
                except OSError:
                    pass
        udp.close()
    raise RuntimeError("no UDP port P + 10000 with P free for TCP")


class Processes:
    """llmgw processes of this test (llmgw.cluster.MemberProcess): logs in tmp_path, always killed at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, MemberProcess] = {}

    def start(self, name: str, *argv: str) -> None:
        self.procs[name] = MemberProcess([sys.executable, "-m", "llmgw", *argv, "--log-level", "INFO"],
                                         self.workdir / f"{name}.log", name=name, cwd=ROOT)

    async def wait_ready(self, name: str) -> None:
        try:
            await self.procs[name].wait_ready_async(STARTUP_TIMEOUT_S)
        except ClusterError as exc:
            raise AssertionError(str(exc)) from None

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()


class Speaker(asyncio.DatagramProtocol):
    """Gossips for one replica process the way a reference replica does, on the replica's gossip port."""

    def __init__(self, peer: ReferencePeer, replica_grpc: str) -> None:
        self.peer = peer
        self.replica_grpc = replica_grpc
        self.transport: asyncio.DatagramTransport | None = None
        self.undecodable = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            replies = self.peer.receive(data, f"{addr[0]}:{addr[1]}")
        except CodecError:
            self.undecodable += 1
            return
        for address, reply in replies:
            self._send(address, reply)

    def _send(self, address: str, data: bytes) -> None:
        host, _, port = address.rpartition(":")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, (host, int(port)))

    async def run(self) -> None:
        """Probe once per protocol period; keep the replica's real load, capacity and version in every datagram."""
        async with grpc.aio.insecure_channel(self.replica_grpc) as channel:
            admin = pb_grpc.ReplicaAdminStub(channel)
            next_probe = time.monotonic()
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    status = await admin.GetStatus(pb.StatusRequest(), timeout=1.0)
                    self.peer.active_requests = status.active_requests
                    self.peer.max_capacity = status.max_capacity
                    self.peer.model_version = status.model_version
                if time.monotonic() >= next_probe:
                    next_probe += PROTOCOL_PERIOD_S
                    probe = self.peer.probe()
                    if probe is not None:
                        self._send(*probe)
                await asyncio.sleep(LOAD_POLL_S)


async def gateway_members(channel: grpc.aio.Channel) -> dict[str, pb.MemberInfo]:
    response = await pb_grpc.GatewayAdminStub(channel).Members(pb.MembersRequest(), timeout=2.0)
    return {m.member_id: m for m in response.members}


@pytest.mark.timeout(120)
def test_gateway_enforces_reference_capacity_shows_versions_and_never_lists_placeholders(tmp_path):
    asyncio.run(asyncio.wait_for(scenario(tmp_path), timeout=100))


async def scenario(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    procs = Processes(tmp_path)
    tasks: list[asyncio.Task] = []
    transports: list[asyncio.DatagramTransport] = []
    try:
        gw_grpc, gw_gossip = free_tcp_port(), free_udp_port()
        gw_gossip_address = f"{HOST}:{gw_gossip}"
        speakers: dict[str, Speaker] = {}
        seeds_of = {"replica-r1": [gw_gossip_address]}
        for name in ("replica-r1", "replica-r2"):
            udp, grpc_port = reference_ports()
            gossip_address = f"{HOST}:{udp.getsockname()[1]}"
            if name == "replica-r1":
                seeds_of["replica-r2"] = [gossip_address]  # the second is seeded with the first, as reported
            procs.start(name, "replica", "--id", name, "--host", HOST, "--port", str(grpc_port), "--no-gossip",
                        "--no-sessions", "--max-capacity", str(CAPACITY), "--model-version", VERSION,
                        "--token-delay-ms", str(TOKEN_DELAY_MS))
            peer = ReferencePeer(name, gossip_address, seeds_of[name])
            speaker = Speaker(peer, f"{HOST}:{grpc_port}")
            transport, _ = await loop.create_datagram_endpoint(lambda s=speaker: s, sock=udp)
            transports.append(transport)
            speakers[name] = speaker
        for name in speakers:
            await procs.wait_ready(name)
            tasks.append(asyncio.create_task(speakers[name].run()))
        procs.start("gateway-1", "gateway", "--id", "gateway-1", "--host", HOST, "--port", str(gw_grpc),
                    "--gossip-port", str(gw_gossip), "--http-port", "0", "--gossip-config", "local",
                    "--seeds", speakers["replica-r1"].peer.address)
        await procs.wait_ready("gateway-1")

        gw_address = f"{HOST}:{gw_grpc}"
        async with grpc.aio.insecure_channel(gw_address) as channel:
            # Until both reference replicas are known with their capacity and version.
            seen_ids: set[str] = set()
            deadline = time.monotonic() + CONVERGE_TIMEOUT_S
            while True:
                members = await gateway_members(channel)
                seen_ids |= set(members)
                replicas = [m for m in members.values() if m.role == "replica"]
                if (sorted(m.member_id for m in replicas) == ["replica-r1", "replica-r2"]
                        and all(m.max_capacity == CAPACITY and m.model_version == VERSION and m.state == "alive"
                                for m in replicas)):
                    break
                assert time.monotonic() < deadline, f"gateway never saw both reference replicas: {members}"
                await asyncio.sleep(0.1)

            # The speakers did gossip their placeholders (both seed-* ids are in their tables and sent on).
            assert f"seed-{gw_gossip_address}" in speakers["replica-r1"].peer.members
            assert f"seed-{speakers['replica-r1'].peer.address}" in speakers["replica-r2"].peer.members

            peak_load = {"replica-r1": 0, "replica-r2": 0}
            incarnations: set[tuple[str, int]] = set()

            async def watch_members() -> None:
                while True:
                    members = await gateway_members(channel)
                    seen_ids.update(members)
                    for mid in peak_load:
                        if mid in members:
                            peak_load[mid] = max(peak_load[mid], members[mid].active_requests)
                            incarnations.add((mid, members[mid].incarnation))
                    await asyncio.sleep(0.05)

            watcher = asyncio.create_task(watch_members())
            tasks.append(watcher)
            started = time.monotonic()
            results = await asyncio.gather(*(
                client.collect(client.stream_infer(channel, f"mixed cluster request {i}", TOKENS, timeout_s=30.0))
                for i in range(REQUESTS)))
            elapsed = time.monotonic() - started
            assert [r.code for r in results] == [grpc.StatusCode.OK] * REQUESTS, [r.details for r in results]
            assert all(len(r.tokens) == TOKENS for r in results)
            # 4 slots for 8 one-second requests: two waves. All at once (capacity not enforced) takes ~1 s.
            assert elapsed >= 2.0, f"{REQUESTS} requests finished in {elapsed:.2f} s: capacity was not enforced"
            assert elapsed < 6.0, f"{elapsed:.2f} s for two waves"

            # Capacity was enforced by the gateway, not by the replicas refusing work.
            served = 0
            for name, speaker in speakers.items():
                async with grpc.aio.insecure_channel(speaker.replica_grpc) as replica_channel:
                    status = await pb_grpc.ReplicaAdminStub(replica_channel).GetStatus(pb.StatusRequest(),
                                                                                        timeout=2.0)
                assert status.peak_active <= CAPACITY and status.rejected_total == 0, (name, status)
                served += status.served_total
            assert served == REQUESTS

            # The reference replicas' load reached the gateway, at the incarnation they started with.
            assert all(1 <= peak <= CAPACITY for peak in peak_load.values()), peak_load
            assert incarnations == {("replica-r1", 0), ("replica-r2", 0)}
            members = await gateway_members(channel)
            assert set(members) == {"gateway-1", "replica-r1", "replica-r2"}
            assert not any(mid.startswith("seed-") for mid in seen_ids), sorted(seen_ids)
            assert sum(s.undecodable for s in speakers.values()) == 0  # every llmgw datagram decoded

        # `llmgw status`: one row per real node, load x/2 and the version of each reference replica.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmgw", "status", "--target", gw_address, "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(ROOT),
            env=dict(os.environ, PYTHONPATH=str(ROOT)))
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
        assert proc.returncode == 0, err.decode()
        rows = json.loads(out)["members"]
        assert sorted(r["member_id"] for r in rows) == ["gateway-1", "replica-r1", "replica-r2"]
        for r in rows:
            if r["role"] == "replica":
                assert (r["max_capacity"], r["model_version"]) == (CAPACITY, VERSION), r
                assert r["grpc_address"] == speakers[r["member_id"]].replica_grpc
        text_proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmgw", "status", "--target", gw_address,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(ROOT),
            env=dict(os.environ, PYTHONPATH=str(ROOT)))
        text, _ = await asyncio.wait_for(text_proc.communicate(), timeout=30)
        assert "seed-" not in text.decode() and "3 members, 2/2 replicas alive" in text.decode()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for transport in transports:
            transport.close()
        procs.close()
