"""GenerateSession: many streams to a replica on one call (llmgw.gateway.session, llmgw.replica.server._Session).

In-process replicas and gateway over real gRPC. Each test first waits until the gateway's session to the replica is
open, so what it checks runs on the session and not on the Generate calls used while a session opens.
"""

import asyncio

import grpc
import pytest
from test_gateway import assert_exactly_once, run

from inprocess import wait_for
from llmgw._proto import llmgateway_pb2 as pb
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc
from llmgw.gateway.replica_stream import AttemptError, AttemptErrorKind
from llmgw.gateway.session import ReplicaSession, SessionStream, SessionUnsupported
from llmgw.replica import Faults


async def open_session(s, rid, timeout=10.0):
    """Send requests to `rid` until the gateway's session to it is open; returns the session."""
    address = s.replicas[rid].grpc_address
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pool = s.server.transport.pool
    while pool.session(address) is None:
        assert loop.time() < deadline, f"no session to {rid} within {timeout} s"
        pool.generate(address)  # starts the opening when none is under way
        await asyncio.sleep(0.02)
    return pool.session(address)


def test_concurrent_streams_share_one_session_and_get_every_token_once():
    async def scenario(s):
        rep = await s.add_replica("r1", capacity=64, token_delay_ms=3)
        await s.start_gateway()
        await open_session(s, "r1")
        before = rep.session_streams_total
        results = await asyncio.gather(*(s.infer(f"prompt {i}", 12) for i in range(40)))
        for res in results:
            assert_exactly_once(res, 12)
        assert rep.session_streams_total - before == 40  # every one of them on the session
        assert rep.sessions_open == 1 and rep.served_total == 40
        await wait_for(lambda: rep.active == 0 and s.gateway.in_flight == {}, 5.0, "everything released")

    run(scenario)


def test_replica_without_sessions_is_served_by_generate_calls():
    async def scenario(s):
        rep = await s.add_replica("r1", capacity=8, token_delay_ms=1, sessions=False)
        await s.start_gateway()
        address = rep.grpc_address
        for i in range(5):
            assert_exactly_once(await s.infer(f"p{i}", 4), 4)
        pool = s.server.transport.pool
        await wait_for(lambda: pool._replica(address).sessions_unsupported, 5.0, "fallback decided")
        assert pool.session(address) is None
        assert_exactly_once(await s.infer("after", 4), 4)
        assert rep.session_streams_total == 0 and rep.served_total == 6

    run(scenario)


def test_gateway_with_sessions_off_uses_generate_calls():
    async def scenario(s):
        rep = await s.add_replica("r1", capacity=8, token_delay_ms=1)
        await s.start_gateway(replica_sessions=False)
        for i in range(4):
            assert_exactly_once(await s.infer(f"p{i}", 3), 3)
        assert rep.sessions_open == 0 and rep.session_streams_total == 0 and rep.served_total == 4

    run(scenario)


def test_client_that_goes_away_frees_the_replica_slot_through_a_cancel():
    async def scenario(s):
        rep = await s.add_replica("r1", capacity=4, token_delay_ms=50)
        await s.start_gateway()
        await open_session(s, "r1")
        async with grpc.aio.insecure_channel(s.server.grpc_address) as ch:
            call = pb_grpc.InferenceGatewayStub(ch).Infer(pb.InferRequest(prompt="long", max_tokens=200), timeout=20)
            first = await call.read()
            assert first.index == 0
            assert rep.active == 1
            call.cancel()
        await wait_for(lambda: rep.active == 0, 5.0, "replica stream cancelled through the session")
        assert rep.sessions_open == 1  # the session itself stays up for the next requests
        assert_exactly_once(await s.infer("next", 3), 3)

    run(scenario)


def test_replica_going_away_fails_every_session_stream_over_token_exactly():
    async def scenario(s):
        r1 = await s.add_replica("r1", capacity=16, token_delay_ms=30)
        r2 = await s.add_replica("r2", capacity=16, token_delay_ms=30)
        await s.start_gateway()
        await open_session(s, "r1")
        await open_session(s, "r2")
        tasks = [asyncio.ensure_future(s.infer(f"failover {i}", 30, timeout=30)) for i in range(10)]
        await wait_for(lambda: r1.active + r2.active == 10, 10.0, "all streams running")
        victim, survivor = (r1, r2) if r1.active >= r2.active else (r2, r1)
        streams_on_victim = victim.active
        assert streams_on_victim > 0
        await asyncio.sleep(0.2)  # a few tokens each
        await victim.stop(0)  # ends its session under the gateway
        results = await asyncio.gather(*tasks)
        for res in results:
            assert_exactly_once(res, 30)
        moved = [res for res in results if len(res.replicas) == 2]
        assert len(moved) == streams_on_victim
        assert s.gateway.stats.failovers_total >= streams_on_victim
        assert survivor.served_total == 10 and victim.served_total == 0

    run(scenario)


def test_stalled_session_stream_fails_over_and_its_slot_is_freed():
    async def scenario(s):
        r1 = await s.add_replica("r1", capacity=4, token_delay_ms=5, faults=Faults(stall_after=3))
        await s.add_replica("r2", capacity=4, token_delay_ms=5)
        await s.start_gateway(inter_token_timeout_s=0.5)
        await open_session(s, "r1")
        await open_session(s, "r2")
        prompt = next(p for p in (f"stall {i}" for i in range(200))
                      if s.gateway.router.route(p).member == "r1")
        res = await s.infer(prompt, 10, timeout=20)
        assert_exactly_once(res, 10)
        assert res.replicas == {"r1", "r2"}
        await wait_for(lambda: r1.active == 0, 5.0, "stalled stream cancelled on the replica")

    run(scenario)


def _session_call(address, request_serializer=pb.SessionRequest.SerializeToString):
    """A raw GenerateSession call to a replica, as a gateway would open it: (channel, call)."""
    channel = grpc.aio.insecure_channel(address)
    call = channel.stream_stream("/llmgateway.LLMReplica/GenerateSession", request_serializer=request_serializer,
                                 response_deserializer=pb.SessionResponse.FromString)()
    return channel, call


async def _events(call, until, timeout=10.0):
    """Read events until `until(events so far)` holds; returns them all."""
    events = []
    async with asyncio.timeout(timeout):
        while not until(events):
            msg = await call.read()
            assert msg is not grpc.aio.EOF
            events.extend(msg.events)
    return events


def test_replica_session_refusals_arrive_as_stream_events():
    async def scenario(s):
        rep = await s.add_replica("r1", capacity=1, token_delay_ms=200)
        channel, call = _session_call(rep.grpc_address)
        try:
            hello = await asyncio.wait_for(call.read(), 5)
            assert list(hello.events) == []
            gen = pb.GenerateRequest(prompt="p", max_tokens=50)
            await call.write(pb.SessionRequest(start=[
                pb.SessionStart(stream_id=1, request=gen),
                pb.SessionStart(stream_id=2, request=gen),  # over capacity
                pb.SessionStart(stream_id=3, request=pb.GenerateRequest(prompt="", max_tokens=5)),  # invalid
                pb.SessionStart(stream_id=1, request=gen),  # id in use
            ]))
            events = await _events(call, lambda evs: sum(1 for ev in evs if ev.status_code) >= 3)
            by_id = {}
            for ev in events:
                by_id.setdefault(ev.stream_id, []).append(ev)
            assert by_id[2][0].status_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert by_id[3][0].status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "prompt" in by_id[3][0].status_details
            assert any(ev.status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                       and "already in use" in ev.status_details for ev in by_id[1])
            assert rep.active == 1
            rep.draining = True
            await call.write(pb.SessionRequest(start=[pb.SessionStart(stream_id=9, request=gen)],
                                               cancel=[1]))
            events = await _events(call, lambda evs: any(ev.stream_id == 9 for ev in evs))
            ev = next(ev for ev in events if ev.stream_id == 9)
            assert ev.status_code == grpc.StatusCode.UNAVAILABLE.value[0] and ev.status_details == "draining"
            await wait_for(lambda: rep.active == 0, 5.0, "cancelled stream released")
            await call.done_writing()
            async with asyncio.timeout(5):  # gateway closed its side, nothing running: the session ends
                while (msg := await call.read()) is not grpc.aio.EOF:
                    assert all(ev.stream_id == 1 and not ev.status_code for ev in msg.events)
        finally:
            call.cancel()
            await channel.close()

    run(scenario)


def test_undecodable_session_message_ends_the_session_with_invalid_argument():
    async def scenario(s):
        rep = await s.add_replica("r1", capacity=2, token_delay_ms=1)
        channel, call = _session_call(rep.grpc_address, request_serializer=lambda raw: raw)
        try:
            await asyncio.wait_for(call.read(), 5)
            await call.write(b"\x0a\x05\xff\xff\xff\xff\xff")  # start: truncated, invalid
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async with asyncio.timeout(5):
                    while await call.read() is not grpc.aio.EOF:
                        pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            call.cancel()
            await channel.close()

    run(scenario)


def test_session_to_a_replica_without_it_is_unsupported():
    async def scenario(s):
        rep = await s.add_replica("r1", sessions=False)
        async with grpc.aio.insecure_channel(rep.grpc_address) as channel:
            with pytest.raises(SessionUnsupported):
                await ReplicaSession(channel, rep.grpc_address).open(timeout_s=5)

    run(scenario)


class _FakeSession:
    def __init__(self):
        self.cancelled, self.forgotten = [], []

    def _cancel(self, stream_id):
        self.cancelled.append(stream_id)

    def _forget(self, stream_id):
        self.forgotten.append(stream_id)


def _tok(index, final=False, token=None):
    return pb.SessionEvent(stream_id=1, response=pb.GenerateResponse(
        token=f"t{index}" if token is None else token, index=index, is_final=final,
        finish_reason=pb.LENGTH if final else pb.FINISH_UNSPECIFIED))


def test_session_stream_merges_consecutive_buffered_tokens_only():
    async def scenario():
        fake = _FakeSession()
        stream = SessionStream(fake, 1)
        for ev in (_tok(0), _tok(1), _tok(2)):
            stream._deliver(ev)
        chunk = await stream.read()
        assert (chunk.index, chunk.tokens, chunk.is_final) == (0, ["t0", "t1", "t2"], False)
        stream._deliver(_tok(3))
        stream._deliver(_tok(5))  # a gap: not merged, the request path rejects it as out of order
        chunk = await stream.read()
        assert (chunk.index, chunk.tokens) == (3, ["t3"])
        assert (await stream.read()).index == 5
        stream._deliver(_tok(6))
        stream._deliver(_tok(7, final=True, token=""))  # an empty final stays a chunk of its own
        assert (await stream.read()).index == 6
        last = await stream.read()
        assert last.is_final and last.tokens == [] and last.finish_reason == "length" and fake.forgotten == [1]
        assert await stream.read() is None and stream.done()
        assert stream.cancel() is False and fake.cancelled == []

    asyncio.run(scenario())


def test_session_stream_error_cancel_and_final_merge():
    async def scenario():
        fake = _FakeSession()
        stream = SessionStream(fake, 1)
        stream._deliver(_tok(0))
        stream._deliver(_tok(1, final=True))
        chunk = await stream.read()
        assert chunk.is_final and chunk.tokens == ["t0", "t1"] and chunk.finish_reason == "length"

        failing = SessionStream(fake, 2)
        failing._deliver(pb.SessionEvent(stream_id=2, response=pb.GenerateResponse(token="a", index=0)))
        failing._deliver(pb.SessionEvent(stream_id=2, status_code=grpc.StatusCode.INTERNAL.value[0],
                                         status_details="boom"))
        assert (await failing.read()).tokens == ["a"]  # tokens before the error still arrive
        with pytest.raises(AttemptError) as err:
            await failing.read()
        assert err.value.kind is AttemptErrorKind.ERROR and err.value.detail == "INTERNAL: boom"
        refused = SessionStream(fake, 5)
        refused._deliver(pb.SessionEvent(stream_id=5, status_code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                                         status_details="full"))
        with pytest.raises(AttemptError) as err:
            await refused.read()
        assert (err.value.kind, err.value.detail) == (AttemptErrorKind.BUSY, "full")

        waiting = SessionStream(fake, 3)
        reader = asyncio.ensure_future(waiting.read())
        await asyncio.sleep(0)
        assert waiting.cancel() is True and fake.cancelled == [3]
        with pytest.raises(asyncio.CancelledError):
            await reader
        broken = SessionStream(fake, 4)
        broken._fail("replica session ended: gone")
        with pytest.raises(AttemptError) as err:
            await broken.read()
        assert err.value.kind is AttemptErrorKind.UNAVAILABLE and "replica session ended: gone" in err.value.detail

    asyncio.run(scenario())


def test_replica_status_reports_sessions():
    async def scenario(s):
        await s.add_replica("r1", capacity=4, token_delay_ms=1)
        await s.start_gateway()
        await open_session(s, "r1")
        assert_exactly_once(await s.infer("x", 2), 2)
        async with grpc.aio.insecure_channel(s.replicas["r1"].grpc_address) as ch:
            st = await pb_grpc.ReplicaAdminStub(ch).GetStatus(pb.StatusRequest(), timeout=5)
        assert st.sessions_open == 1 and st.session_streams_total >= 1

    run(scenario)


def test_a_burst_of_long_prompts_is_split_under_the_message_limit():
    # Six starts of ~900 KB queued at once: one SessionRequest would be ~5.4 MB, over grpc's 4 MiB default, and
    # the replica would end the session for every stream on it.
    async def scenario(s):
        rep = await s.add_replica("r1", capacity=8, token_delay_ms=1, prefill_ms_per_kchar=0)
        async with grpc.aio.insecure_channel(rep.grpc_address) as channel:
            session = ReplicaSession(channel, rep.grpc_address)
            await session.open(timeout_s=5)
            try:
                streams = [session.start(pb.GenerateRequest(prompt=f"{i}" + "x" * 900_000, max_tokens=3))
                           for i in range(6)]
                for stream in streams:
                    tokens = []
                    async with asyncio.timeout(20):
                        while (chunk := await stream.read()) is not None:
                            tokens += chunk.tokens
                    assert tokens == ["token_0", "token_1", "token_2"]
                assert rep.session_streams_total == 6 and rep.sessions_open == 1
            finally:
                await session.close()

    run(scenario)
