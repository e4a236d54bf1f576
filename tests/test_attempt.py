"""One attempt (llmgw.gateway.attempt) over an in-memory ReplicaStream: limits, order, counts, failure kinds."""

from __future__ import annotations

import asyncio

import pytest
from replica_fakes import ScriptedTransport, answer, chunk

from llmgw.gateway.api import DeadlineExceeded, InferenceRequest, InvalidArgument
from llmgw.gateway.attempt import Attempt, Job, StaticLimits
from llmgw.gateway.capacity import Ticket
from llmgw.gateway.replica_stream import AttemptError, AttemptErrorKind

FAST = StaticLimits(first_token_s=0.2, inter_token_s=0.2)


def run(coro, timeout=5.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def attempt_on(steps, *, max_tokens=4, forwarded=(), limits=FAST, deadline_s=5.0):
    transport = ScriptedTransport({"r1": lambda resume, mt: list(steps)})
    ticket = Ticket("p", set(), replica_id="r1", address="fake:r1")
    job = Job(InferenceRequest(prompt="p", max_tokens=max_tokens), "req-1",
              asyncio.get_running_loop().time() + deadline_s)
    job.forwarded.extend(forwarded)
    return Attempt(job, ticket, transport, limits), transport


async def relay_all(attempt):
    batches = []
    await attempt.open()
    async for batch in attempt.relay():
        batches.append([(e.index, e.token, e.is_final, e.finish_reason) for e in batch])
    return batches


def test_a_complete_answer_in_batches_with_its_verdict():
    async def scenario():
        attempt, transport = await attempt_on([chunk(0), chunk(1, 2), 0.01, chunk(3, 0, final=True, reason="stop")])
        batches = await relay_all(attempt)
        assert batches == [[(0, "token_0", False, None)], [(1, "token_1", False, None), (2, "token_2", False, None)],
                           [(3, "", True, "stop")]]
        assert attempt.job.forwarded == ["token_0", "token_1", "token_2"]
        assert attempt.finished and attempt.ttft_s >= 0 and attempt.mean_itl_s is not None
        assert transport.streams[0].cancelled is False  # a finished stream is never cancelled

    run(scenario())


def test_a_resumed_attempt_continues_at_the_next_index_and_reference_zero_indices_pass():
    async def scenario():
        attempt, transport = await attempt_on(answer(2, 4), forwarded=["token_0", "token_1"])
        assert [b[0][0] for b in await relay_all(attempt)] == [2, 3]
        assert transport.opened == [("r1", 2)]
        # Reference replicas send index 0 on every message: order is the index then.
        reference, _ = await attempt_on([chunk(0), chunk(0), chunk(0, final=True)], max_tokens=3)
        assert [b[0][0] for b in await relay_all(reference)] == [0, 1, 2]

    run(scenario())


def test_silence_before_the_first_token_is_a_stall_and_the_stream_is_cancelled():
    async def scenario():
        attempt, transport = await attempt_on([1.0, chunk(0)], limits=StaticLimits(0.05, 1.0))
        with pytest.raises(AttemptError) as err:
            await attempt.open()
        assert err.value.kind is AttemptErrorKind.STALL and "no first token within 0.05 s" in err.value.detail
        assert transport.streams[0].cancelled

    run(scenario())


def test_silence_between_tokens_is_a_stall_after_what_was_delivered():
    async def scenario():
        attempt, transport = await attempt_on([chunk(0), 1.0, chunk(1)], limits=StaticLimits(1.0, 0.05))
        delivered = []
        with pytest.raises(AttemptError) as err:
            await attempt.open()
            async for batch in attempt.relay():
                delivered += [e.index for e in batch]
        assert delivered == [0] and attempt.job.forwarded == ["token_0"]
        assert err.value.kind is AttemptErrorKind.STALL and "no token 1 within 0.05 s" in err.value.detail
        assert transport.streams[0].cancelled and not attempt.finished

    run(scenario())


@pytest.mark.parametrize("kind", [AttemptErrorKind.ERROR, AttemptErrorKind.BUSY, AttemptErrorKind.DRAINING,
                                  AttemptErrorKind.CLOSED, AttemptErrorKind.UNAVAILABLE])
def test_transport_failures_reach_the_request_path_as_they_are(kind):
    async def scenario():
        attempt, _ = await attempt_on([chunk(0), AttemptError(kind, "why")])
        with pytest.raises(AttemptError) as err:
            await relay_all(attempt)
        assert err.value.kind is kind and err.value.detail == "why"
        first, _ = await attempt_on([AttemptError(kind, "at once")])
        with pytest.raises(AttemptError) as err:
            await first.open()
        assert err.value.kind is kind

    run(scenario())


def test_a_replica_rejecting_the_request_as_invalid_fails_the_request():
    async def scenario():
        attempt, _ = await attempt_on([AttemptError(AttemptErrorKind.INVALID, "prompt too long")])
        with pytest.raises(InvalidArgument, match="replica r1: prompt too long"):
            await attempt.open()

    run(scenario())


def test_a_transport_deadline_is_the_requests_only_once_it_passed():
    async def scenario():
        early, _ = await attempt_on([AttemptError(AttemptErrorKind.DEADLINE, "DEADLINE_EXCEEDED: x")])
        with pytest.raises(AttemptError) as err:
            await early.open()
        assert err.value.kind is AttemptErrorKind.DEADLINE  # the request still has time: fail over
        late, _ = await attempt_on([0.05, AttemptError(AttemptErrorKind.DEADLINE, "DEADLINE_EXCEEDED: x")],
                                   deadline_s=0.04)
        with pytest.raises(DeadlineExceeded):
            await late.open()
        # The request's deadline bounds the first-token wait too.
        silent, _ = await attempt_on([1.0, chunk(0)], deadline_s=0.05, limits=StaticLimits(5.0, 5.0))
        with pytest.raises(DeadlineExceeded, match="after 0 tokens"):
            await silent.open()

    run(scenario())


@pytest.mark.parametrize("steps, message", [
    ([chunk(0), chunk(1, 3)], "more tokens than max_tokens"),  # 4 tokens but not final at max_tokens 4
    ([chunk(0), chunk(1, 4, final=True)], "more tokens than max_tokens"),
    ([chunk(0), chunk(2)], "replica sent index 2, expected 1"),
    ([chunk(0), chunk(0), chunk(5)], "replica sent index 5, expected 2"),
    ([chunk(0), chunk(1)], "stream ended before the final token"),
])
def test_a_misbehaving_replica_fails_its_attempt(steps, message):
    async def scenario():
        attempt, _ = await attempt_on(steps)
        with pytest.raises(AttemptError) as err:
            await relay_all(attempt)
        assert err.value.kind is AttemptErrorKind.ERROR and message in err.value.detail
        assert len(attempt.job.forwarded) <= 3 and not attempt.finished

    run(scenario())


def test_an_empty_stream_fails_before_the_first_token():
    async def scenario():
        attempt, _ = await attempt_on([])
        with pytest.raises(AttemptError, match="stream ended before the first token"):
            await attempt.open()

    run(scenario())


def test_limits_are_asked_per_replica_for_each_wait():
    class Recording:
        def __init__(self):
            self.asked = []

        def first_token_s(self, replica_id):
            self.asked.append(("first", replica_id))
            return 1.0

        def inter_token_s(self, replica_id):
            self.asked.append(("inter", replica_id))
            return 1.0

    async def scenario():
        limits = Recording()
        attempt, _ = await attempt_on(answer(0, 3), max_tokens=3, limits=limits)
        await relay_all(attempt)
        assert limits.asked == [("first", "r1"), ("inter", "r1"), ("inter", "r1")]

    run(scenario())


def test_a_consumer_that_stops_early_cancels_the_replica_stream():
    async def scenario():
        attempt, transport = await attempt_on(answer(0, 4, gap_s=0.01))
        await attempt.open()
        relay = attempt.relay()
        await relay.__anext__()
        await relay.aclose()
        assert transport.streams[0].cancelled

    run(scenario())
