"""`gateway --workers 2`: the gRPC GatewayAdmin rollout RPCs answer for the whole worker group, as HTTP does.

The workers share the gRPC port (SO_REUSEPORT): each new connection lands on one of them. The test pins a channel
to a connection (a subchannel pool of its own, so no two channels share one), asks GetStatus which worker it
reached, starts a rolling update on one worker and reads and aborts it through the other. The update is held in
its first replica's drain by a long stream on that replica (no restart command runs: the hook only has to exist).
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import sys
from collections.abc import AsyncIterator

import grpc
import pytest

from harness import Cluster, wait_until
from llmgw._proto import llmgateway_pb2 as pb
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc

WORKERS = ("gateway-1-w0", "gateway-1-w1")
MAX_CONNECTIONS = 200  # fresh connections tried to reach a given worker (each lands on either, at random)
# Configured so that rolling updates are allowed; the update is aborted before any restart.
RESTART = f"{shlex.quote(sys.executable)} -c 'import sys; sys.exit(3)' {{replica_id}} {{version}}"
LONG_STREAM_TOKENS = 2000  # at 50 ms a token: far longer than the test, so replica-0's drain cannot finish


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path) as c:
        yield c


@contextlib.asynccontextmanager
async def channel_to(address: str, worker: str) -> AsyncIterator[pb_grpc.GatewayAdminStub]:
    """A GatewayAdmin stub on a connection that landed on `worker` (bounded number of tries)."""
    for _ in range(MAX_CONNECTIONS):
        channel = grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        stub = pb_grpc.GatewayAdminStub(channel)
        status = await stub.GetStatus(pb.GatewayStatusRequest(), timeout=10)
        if status.gateway_id == worker:
            try:
                yield stub
            finally:
                await channel.close()
            return
        await channel.close()
    raise AssertionError(f"no connection reached {worker} in {MAX_CONNECTIONS} tries")


async def routable_replicas(stub: pb_grpc.GatewayAdminStub) -> list[str]:
    members = await stub.Members(pb.MembersRequest(), timeout=10)
    return sorted(m.member_id for m in members.members if m.role == "replica" and m.state == "alive")


def test_grpc_rollout_status_and_abort_answer_for_the_whole_worker_group(cluster):
    c = cluster
    busy = c.start_replica("replica-0", token_delay_ms=50)
    c.start_replica("replica-1", token_delay_ms=50)
    gateway = c.start_gateway("gateway-1", extra=["--workers", "2", "--restart-command", RESTART],
                              wait_ready=False)
    wait_until(lambda: gateway.log_path.read_text().count("READY") == 2, 60, what="both workers ready")
    address = gateway.grpc_address

    async def scenario():
        async with channel_to(address, WORKERS[0]) as first, channel_to(address, WORKERS[1]) as second:
            for stub in (first, second):
                for _ in range(150):
                    if await routable_replicas(stub) == ["replica-0", "replica-1"]:
                        break
                    await asyncio.sleep(0.2)
                else:
                    raise AssertionError("a worker never saw both replicas alive")
            # Nothing started anywhere yet: both say so.
            for stub in (first, second):
                assert (await stub.GetRollout(pb.GetRolloutRequest(), timeout=10)).state == "none"

            # A long stream on replica-0 holds the update's drain of it (the Drain RPC waits for it).
            replica_channel = grpc.aio.insecure_channel(busy.grpc_address)
            stream = pb_grpc.LLMReplicaStub(replica_channel).Generate(
                pb.GenerateRequest(request_id="long", prompt="hold the drain", max_tokens=LONG_STREAM_TOKENS),
                timeout=120)
            assert not (await stream.read()).is_final
            # Started on worker 0, followed there until it waits in the drain of replica-0.
            events: list[pb.RolloutEvent] = []
            in_drain = asyncio.Event()

            async def watch() -> None:
                async for event in first.StartRollout(pb.RolloutRequest(version="v2"), timeout=60):
                    events.append(event)
                    if event.step == "drain_rpc":
                        in_drain.set()

            watcher = asyncio.ensure_future(watch())
            try:
                await asyncio.wait_for(in_drain.wait(), 30)
                # Worker 1 did not start it, yet its GetRollout shows it, as its HTTP /admin/rollout would.
                state = await second.GetRollout(pb.GetRolloutRequest(), timeout=10)
                assert (state.state, state.version, state.current_replica) == ("running", "v2", "replica-0")
                assert [(r.replica_id, r.step) for r in state.replicas] == [("replica-0", "drain_rpc"),
                                                                            ("replica-1", "pending")]
                # It refuses a second update for the group ...
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in second.StartRollout(pb.RolloutRequest(version="v3"), timeout=10):
                        pass
                assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
                # ... and aborts the one running in worker 0.
                aborted = await second.AbortRollout(pb.GetRolloutRequest(), timeout=30)
                assert (aborted.state, aborted.version, aborted.restored) == ("aborted", "v2", True)
                await asyncio.wait_for(watcher, 20)  # worker 0's stream ends with the abort
            finally:
                watcher.cancel()
                stream.cancel()
                await replica_channel.close()
            assert events[-1].kind == "finished" and events[-1].state == "aborted"
            # Both workers report the group's last update; an abort with none running answers with it too.
            for stub in (first, second):
                state = await stub.GetRollout(pb.GetRolloutRequest(), timeout=10)
                assert (state.state, state.version, state.restored) == ("aborted", "v2", True)
            again = await first.AbortRollout(pb.GetRolloutRequest(), timeout=30)
            assert (again.state, again.version) == ("aborted", "v2")

    asyncio.run(asyncio.wait_for(scenario(), 150))
    assert c.stop(gateway, timeout=30) == 0
