"""The request path over in-memory replicas (tests/replica_fakes.py): token-exact failover, refusals, the hedge race
and the attempt events, without sockets."""

from __future__ import annotations

import asyncio

import pytest
from conftest import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from replica_fakes import answer, chunk, fake_gateway, healthy

from llmgw.gateway import InferenceRequest, Unavailable
from llmgw.gateway.events import AttemptOutcome, RequestListener, RequestOutcome, RequestRecord
from llmgw.gateway.replica_stream import AttemptError, AttemptErrorKind

FAILURES = {
    "error": lambda: AttemptError(AttemptErrorKind.ERROR, "INTERNAL: boom"),
    "unavailable": lambda: AttemptError(AttemptErrorKind.UNAVAILABLE, "UNAVAILABLE: gone"),
    "closed": lambda: AttemptError(AttemptErrorKind.CLOSED, "replica connection closed"),
    "stall": lambda: 5.0,  # silence past the inter-token limit
}


class Events(RequestListener):
    def __init__(self) -> None:
        self.attempts: list[tuple[str, AttemptOutcome]] = []

    def attempt_event(self, replica_id, outcome, ttft_s):
        self.attempts.append((replica_id, outcome))


def _failing_once(plan):
    """Streams fail as `plan` says, in opening order: (kind, after how many more tokens, per chunk); then healthy."""
    opened = []

    def script(resume, max_tokens):
        opened.append(resume)
        if len(opened) > len(plan):
            return answer(resume, max_tokens, per_chunk=3)
        kind, more, per_chunk = plan[len(opened) - 1]
        end = min(resume + more, max_tokens - 1)  # never reach the final token: this stream must fail
        steps = [chunk(i, min(per_chunk, end - i)) for i in range(resume, end, per_chunk)]
        return [*steps, FAILURES[kind]()]

    return script


@settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(st.tuples(st.sampled_from(sorted(FAILURES)), st.integers(0, 6), st.integers(1, 3)),
                     min_size=0, max_size=2),
       max_tokens=st.integers(2, 12))
def test_every_token_exactly_once_in_order_whatever_fails_where(plan, max_tokens):
    async def scenario():
        script = _failing_once(plan)
        gateway, transport = await fake_gateway({"a": script, "b": script, "c": script}, max_attempts=3,
                                                inter_token_timeout_s=0.02, first_token_timeout_s=0.02)
        events = Events()
        gateway.add_listener(events)
        got = [e async for e in gateway.infer(InferenceRequest(prompt="p", max_tokens=max_tokens))]
        assert [e.index for e in got] == list(range(max_tokens))
        assert [e.token for e in got] == [f"token_{i}" for i in range(max_tokens)]
        assert [e.is_final for e in got] == [False] * (max_tokens - 1) + [True]
        # Each failover resumed exactly where the client was, on a replica not tried before.
        resumes = [resume for _, resume in transport.opened]
        assert resumes == sorted(resumes) and len({rid for rid, _ in transport.opened}) == len(transport.opened)
        assert gateway.stats.failovers_total == len(plan) and gateway.stats.served_total == 1
        assert gateway.in_flight == {} and all(s.done() for s in transport.streams)
        failed = [o for _, o in events.attempts if o in (AttemptOutcome.ERROR, AttemptOutcome.STALL)]
        assert len(failed) == len(plan) and events.attempts[-1][1] is AttemptOutcome.OK
        await gateway.stop()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_refusals_do_not_use_up_attempts_and_failures_do():
    async def scenario():
        refusing = lambda resume, mt: [AttemptError(AttemptErrorKind.BUSY, "full")]  # noqa: E731
        draining = lambda resume, mt: [AttemptError(AttemptErrorKind.DRAINING, "replica is draining")]  # noqa: E731
        gateway, _ = await fake_gateway({"a": refusing, "b": draining, "c": healthy()}, max_attempts=1,
                                        busy_backoff_s=0.01)
        got = [e.index async for e in gateway.infer(InferenceRequest(prompt="p", max_tokens=3))]
        assert got == [0, 1, 2]  # one attempt allowed, yet two refusals on the way were fine
        broken = lambda resume, mt: [AttemptError(AttemptErrorKind.ERROR, "INTERNAL: x")]  # noqa: E731
        gateway.transport.scripts = {"a": broken, "b": broken, "c": broken}
        with pytest.raises(Unavailable, match=r"failed after 1 attempts and 0 refusals, 0 of 3 tokens sent: "
                                              r"\w: error: INTERNAL: x"):
            async for _ in gateway.infer(InferenceRequest(prompt="q", max_tokens=3)):
                pass
        assert gateway.in_flight == {}
        await gateway.stop()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_an_explicit_hedge_streams_the_first_replica_to_answer_and_cancels_the_other():
    async def scenario():
        def slow(resume, max_tokens):
            return [1.0, *answer(resume, max_tokens)]

        gateway, transport = await fake_gateway({"a": slow, "b": healthy()})
        events = Events()
        gateway.add_listener(events)
        got = [e async for e in gateway.infer(InferenceRequest(prompt="p", max_tokens=4, hedge=True))]
        assert [e.index for e in got] == [0, 1, 2, 3] and {e.replica_id for e in got} == {"b"}
        # An explicit hedge starts at once (delay 0): both replicas got the request, the slow one was cancelled.
        opened = dict(zip((rid for rid, _ in transport.opened), transport.streams, strict=True))
        assert set(opened) == {"a", "b"} and opened["a"].cancelled and not opened["b"].cancelled
        primary, hedge = transport.opened[0][0], transport.opened[1][0]
        assert (hedge, AttemptOutcome.HEDGE_STARTED) in events.attempts
        outcome = AttemptOutcome.HEDGE_WON if hedge == "b" else AttemptOutcome.HEDGE_LOST
        assert (hedge, outcome) in events.attempts and primary != hedge
        stats = gateway.hedge_stats()
        assert stats["explicit_hedges"] == 1 and stats["hedges_started"] == 1 and stats["won"] + stats["lost"] == 1
        assert gateway.in_flight == {}
        await gateway.stop()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_a_client_that_leaves_frees_the_replica_and_is_reported_cancelled():
    async def scenario():
        gateway, transport = await fake_gateway({"a": healthy(gap_s=0.05)})
        events = Events()
        gateway.add_listener(events)
        stream = gateway.infer(InferenceRequest(prompt="p", max_tokens=10))
        first = await stream.__anext__()
        await stream.aclose()
        assert first.index == 0 and transport.streams[0].cancelled and gateway.in_flight == {}
        assert events.attempts[-1] == ("a", AttemptOutcome.CANCELLED)
        await gateway.stop()

    asyncio.run(asyncio.wait_for(scenario(), 10))


class Records(Events):
    """Attempt events and the request records as the listeners get them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[RequestRecord] = []

    def request_finished(self, record):
        self.records.append(record)


@pytest.mark.parametrize("shape", ["batches", "events", "one_chunk"])
def test_a_front_that_closes_at_the_final_batch_still_books_a_success(shape):
    """The HTTP fronts and the gRPC front may aclose() the stream as soon as they hold the final batch: the
    request is served all the same -- counted, its attempt reported OK (never CANCELLED), the breaker told."""
    async def scenario():
        per_chunk = 6 if shape == "one_chunk" else 2
        gateway, transport = await fake_gateway({"a": lambda resume, mt: answer(resume, mt, per_chunk=per_chunk)})
        seen = Records()
        gateway.add_listener(seen)
        successes = []
        record_success = gateway.breakers.record_success
        gateway.breakers.record_success = lambda *args, **kw: (successes.append(args[0]), record_success(*args, **kw))
        request = InferenceRequest(prompt="p", max_tokens=6)
        tokens = []
        if shape == "events":
            stream = gateway.infer(request)
            async for event in stream:
                tokens.append(event.index)
                if event.is_final:
                    break
        else:
            stream = gateway.infer_batches(request)
            async for batch in stream:
                tokens.extend(event.index for event in batch)
                if batch[-1].is_final:
                    break
        # Served before the front lets go: the counters a status call reads already say so.
        assert tokens == list(range(6)) and gateway.stats.served_total == 1 and successes == ["a"]
        await stream.aclose()  # what a front does right after the final batch
        assert gateway.stats.served_total == 1 and gateway.stats.failed_total == 0
        assert [o for _, o in seen.attempts] == [AttemptOutcome.FIRST_TOKEN, AttemptOutcome.OK]
        assert successes == ["a"] and gateway.breakers.state("a") == "closed"
        assert len(seen.records) == 1 and seen.records[0].outcome is RequestOutcome.OK
        assert seen.records[0].complete and seen.records[0].tokens == 6
        assert gateway.in_flight == {} and not transport.streams[0].cancelled
        await gateway.stop()

    asyncio.run(asyncio.wait_for(scenario(), 10))
