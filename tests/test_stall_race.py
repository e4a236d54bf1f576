"""Adaptive stall deadlines wired into the request path (llmgw.gateway.stall_race), over in-memory replicas: a
stream that goes quiet past its replica's learnt deadline is raced by a continuation from the next index, the
first to deliver wins, the loser is cancelled and its slot freed; exactly-once delivery whatever the timing."""

from __future__ import annotations

import asyncio

import pytest
from conftest import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from replica_fakes import answer, chunk, fake_gateway

from llmgw.gateway import GatewayConfig, InferenceRequest
from llmgw.gateway.events import AttemptOutcome, RequestListener
from llmgw.gateway.stall_race import (
    CONTINUATION_STARTED,
    CONTINUATION_WON,
    NO_REPLICA,
    ORIGINAL_WON,
    STALL_EVENTS,
    SUSPECTED,
)

GAP_S = 0.005  # the replicas' usual time per token


class Events(RequestListener):
    def __init__(self) -> None:
        self.attempts: list[tuple[str, AttemptOutcome]] = []

    def attempt_event(self, replica_id, outcome, ttft_s):
        self.attempts.append((replica_id, outcome))


def teach(gateway, replicas, gap_s=GAP_S, samples=200):
    """What the replicas have been doing: `samples` gaps of `gap_s` each (the deadlines then sit at the floor)."""
    deadlines = gateway.stall_guard.deadlines
    for rid in replicas:
        for _ in range(samples):
            deadlines.record_gap(rid, gap_s)


def scripted(first_stream, later_streams):
    """The first stream opened (on whichever replica) plays first_stream(resume, max_tokens), later ones
    later_streams(resume, max_tokens)."""
    opened = []

    def script(resume, max_tokens):
        opened.append(resume)
        return (first_stream if len(opened) == 1 else later_streams)(resume, max_tokens)

    return script


def quiet_after(tokens, silence_s, then_gap_s=GAP_S):
    """Tokens 0..tokens-1, then `silence_s` of silence, then the rest (a hiccup, or a freeze if long)."""
    def steps(resume, max_tokens):
        head = answer(resume, resume + tokens, gap_s=GAP_S)
        head[-1] = chunk(resume + tokens - 1)  # not final: more follows
        return [*head, silence_s, *answer(resume + tokens, max_tokens, gap_s=then_gap_s)]

    return steps


def starting_after(delay_s):
    def steps(resume, max_tokens):
        return [delay_s, *answer(resume, max_tokens, gap_s=GAP_S)]

    return steps


async def timed(gateway, prompt, max_tokens):
    """The answer's events and the longest wait between two of them (seconds)."""
    loop = asyncio.get_running_loop()
    events, gaps, last = [], [], None
    async for event in gateway.infer(InferenceRequest(prompt=prompt, max_tokens=max_tokens)):
        now = loop.time()
        if last is not None:
            gaps.append(now - last)
        last = now
        events.append(event)
    return events, max(gaps, default=0.0)


def assert_exact(events, n):
    assert [e.index for e in events] == list(range(n))
    assert [e.token for e in events] == [f"token_{i}" for i in range(n)]
    assert [e.is_final for e in events] == [False] * (n - 1) + [True]


def run(coro, timeout=20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_a_frozen_replica_is_raced_and_the_client_waits_one_deadline_not_the_timeout():
    async def scenario():
        script = scripted(quiet_after(10, 3.0), starting_after(0.02))
        gateway, transport = await fake_gateway({"a": script, "b": script, "c": script})
        events = Events()
        gateway.add_listener(events)
        teach(gateway, "abc")
        guard = gateway.stall_guard
        assert guard.deadlines.inter_token_deadline("a") == pytest.approx(0.2)  # the floor; the timeout is 5 s
        got, longest = await timed(gateway, "freeze", 30)
        assert_exact(got, 30)
        frozen = transport.opened[0][0]
        assert transport.opened[1][1] == 10 and transport.opened[1][0] != frozen  # from the next index, elsewhere
        assert {e.replica_id for e in got[:10]} == {frozen} and frozen not in {e.replica_id for e in got[10:]}
        # One deadline (200 ms) plus the continuation's first token (20 ms) -- not the 3 s freeze, nor the 5 s
        # timeout. Generous bound for a loaded host.
        assert 0.2 <= longest < 0.6, longest
        assert guard.counts[SUSPECTED] == 1 and guard.counts[CONTINUATION_STARTED] == 1
        assert guard.counts[CONTINUATION_WON] == 1 and guard.counts[ORIGINAL_WON] == 0
        assert transport.streams[0].cancelled  # the loser's stream is cancelled ...
        assert gateway.in_flight == {} and all(s.done() for s in transport.streams)  # ... and every slot freed
        assert (frozen, AttemptOutcome.STALL) in events.attempts
        breaker = gateway.breakers.snapshot()["replicas"][frozen]  # a lost race is a timeout for its breaker
        assert (breaker["failures"], breaker["last_failure_kind"]) == (1, "timeout"), breaker
        # The frozen replica is kept off new requests until it delivers again; the others are not.
        assert guard.excluded() == [frozen]
        assert frozen not in gateway.routable()
        await gateway.stop()

    run(scenario())


def test_a_hiccup_shorter_than_the_continuations_first_token_costs_nothing():
    async def scenario():
        # The quiet replica pauses 400 ms (twice its deadline) and the continuation would need 2 s to start.
        script = scripted(quiet_after(10, 0.4), starting_after(2.0))
        gateway, transport = await fake_gateway({"a": script, "b": script})
        events = Events()
        gateway.add_listener(events)
        teach(gateway, "ab")
        guard = gateway.stall_guard
        got, longest = await timed(gateway, "hiccup", 30)
        assert_exact(got, 30)
        original = transport.opened[0][0]
        assert {e.replica_id for e in got} == {original}  # every token from the replica that paused
        assert 0.35 <= longest < 1.0, longest
        assert guard.counts[SUSPECTED] == 1 and guard.counts[CONTINUATION_STARTED] == 1
        assert guard.counts[ORIGINAL_WON] == 1 and guard.counts[CONTINUATION_WON] == 0
        assert transport.streams[1].cancelled  # the continuation lost: cancelled, its slot freed
        assert gateway.in_flight == {} and all(s.done() for s in transport.streams)
        assert (original, AttemptOutcome.STALL) not in events.attempts  # a suspicion that delivered: no failure
        assert gateway.stats.failovers_total == 0 and gateway.stats.served_total == 1
        assert guard.excluded() == []  # it delivered: no longer suspected
        await gateway.stop()

    run(scenario())


@pytest.mark.slow  # ~1 s of real time (the 1 s first-token floor): left out of `make test-fast`
def test_a_first_token_that_does_not_come_is_raced_too():
    async def scenario():
        script = scripted(starting_after(3.0), starting_after(0.02))
        gateway, transport = await fake_gateway({"a": script, "b": script}, first_token_timeout_s=10.0)
        guard = gateway.stall_guard
        for rid in "ab":
            for _ in range(40):
                guard.deadlines.record_first_token(rid, 0.02, 10)
        assert guard.deadlines.first_token_deadline("a", 10) == pytest.approx(1.0)  # the floor
        loop = asyncio.get_running_loop()
        started = loop.time()
        got, _ = await timed(gateway, "slow start", 5)
        assert_exact(got, 5)
        assert loop.time() - started < 2.0  # one first-token deadline (1 s) + 20 ms, not the 3 s stall
        assert transport.opened[1][1] == 0 and transport.opened[1][0] != transport.opened[0][0]
        assert guard.counts[CONTINUATION_WON] == 1
        assert gateway.in_flight == {} and all(s.done() for s in transport.streams)
        await gateway.stop()

    run(scenario())


def test_with_no_free_replica_the_quiet_stream_keeps_racing_alone():
    async def scenario():
        script = scripted(quiet_after(5, 0.5), starting_after(0.0))
        gateway, transport = await fake_gateway({"a": script}, capacity=1)
        teach(gateway, "a")
        got, _ = await timed(gateway, "alone", 12)
        assert_exact(got, 12)
        guard = gateway.stall_guard
        assert guard.counts[SUSPECTED] == 1 and guard.counts[NO_REPLICA] == 1
        assert guard.counts[CONTINUATION_STARTED] == 0 and len(transport.opened) == 1
        assert guard.excluded() == []  # never exclude every replica
        await gateway.stop()

    run(scenario())


def test_the_configured_timeout_stays_the_hard_limit_and_learning_needs_evidence():
    async def scenario():
        # No gaps learnt: the deadline is the ceiling (0.3 s here), and a silence past it is a plain failover.
        script = scripted(quiet_after(5, 5.0), starting_after(0.0))
        gateway, transport = await fake_gateway({"a": script, "b": script}, inter_token_timeout_s=0.3)
        guard = gateway.stall_guard
        assert guard.deadlines.inter_token_deadline("a") == pytest.approx(0.3)
        got, _ = await timed(gateway, "unknown replica", 12)
        assert_exact(got, 12)
        assert guard.counts[SUSPECTED] == 0 and gateway.stats.failovers_total == 1
        # ... but it learnt from the streams it relayed (a gap per message).
        assert guard.snapshot()["replicas"][transport.opened[1][0]]["gap_samples"] >= 5
        await gateway.stop()

    run(scenario())


def test_adaptive_deadlines_off_is_the_fixed_timeouts():
    async def scenario():
        gateway, _ = await fake_gateway({"a": scripted(quiet_after(3, 0.3), starting_after(0.0))},
                                        adaptive_deadlines=False)
        assert gateway.stall_guard is None
        got, longest = await timed(gateway, "off", 6)
        assert_exact(got, 6)
        assert longest >= 0.3
        await gateway.stop()

    run(scenario())


def test_config_knobs_reach_the_deadlines_and_bad_values_are_refused():
    cfg = GatewayConfig(stall_floor_ms=150, stall_factor=4, stall_first_token_floor_s=0.5)
    dc = cfg.deadline_config()
    assert (dc.gap_floor_s, dc.gap_factor, dc.ttft_floor_s) == (0.15, 4, 0.5)
    assert (dc.first_token_ceiling_s, dc.inter_token_ceiling_s) == (10.0, 5.0)
    for bad in (dict(stall_floor_ms=-1), dict(stall_factor=0.5), dict(stall_first_token_floor_s=float("nan"))):
        with pytest.raises(ValueError, match="adaptive deadline"):
            GatewayConfig(**bad).validate()


@settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens_before=st.integers(1, 8), silence_s=st.sampled_from([0.0, 0.1, 0.25, 0.4, 0.8]),
       continuation_start_s=st.sampled_from([0.0, 0.05, 0.3, 0.6]), max_tokens=st.integers(10, 16),
       continuation_fails=st.booleans())
def test_every_token_exactly_once_in_order_whoever_wins_the_race(tokens_before, silence_s, continuation_start_s,
                                                                max_tokens, continuation_fails):
    from llmgw.gateway.replica_stream import AttemptError, AttemptErrorKind

    def later(resume, n):
        if continuation_fails:
            return [continuation_start_s, AttemptError(AttemptErrorKind.ERROR, "INTERNAL: boom")]
        return starting_after(continuation_start_s)(resume, n)

    async def scenario():
        script = scripted(quiet_after(tokens_before, silence_s), later)
        gateway, transport = await fake_gateway({"a": script, "b": script, "c": script})
        teach(gateway, "abc")
        got, _ = await timed(gateway, "race", max_tokens)
        assert_exact(got, max_tokens)
        counts = gateway.stall_guard.counts
        assert set(counts) == set(STALL_EVENTS)
        # Every race was decided once: the quiet stream delivered first, or the continuation did.
        started = counts[CONTINUATION_STARTED]
        assert started == counts[SUSPECTED] - counts[NO_REPLICA]
        assert counts[ORIGINAL_WON] + counts[CONTINUATION_WON] == started
        assert counts["continuation_failed"] <= started
        if continuation_fails:  # a continuation that fails never takes the stream over
            assert counts[CONTINUATION_WON] == 0
        if silence_s <= 0.1:
            assert counts[SUSPECTED] == 0  # within the 200 ms deadline: not even suspected
        assert gateway.in_flight == {} and all(s.done() for s in transport.streams)
        await gateway.stop()

    run(scenario())


def test_status_shows_each_replicas_deadlines_and_the_stall_counts():
    from llmgw._proto import llmgateway_pb2 as pb
    from llmgw.cli import status

    gw = status.gateway_dict(pb.GatewayStatus(
        gateway_id="g", inter_token_deadline_by_replica={"r2": 0.85, "r1": 0.2},
        first_token_deadline_by_replica={"r1": 1.0, "r2": 3.25}, stall_suspicions=4, stall_failovers=3))
    assert gw["stall_deadlines"] == {"r1": {"inter_token_s": 0.2, "first_token_s": 1.0},
                                     "r2": {"inter_token_s": 0.85, "first_token_s": 3.25}}
    text = status.render({"self_id": "g", "members": [], "gateway": gw}, "g:1")
    lines = text.splitlines()
    at = lines.index("adaptive stall deadlines (suspicions 4, stall failovers 3):")
    assert [line.split() for line in lines[at + 1:]] == [["REPLICA", "INTER-TOKEN", "FIRST-TOKEN"],
                                                         ["r1", "200", "ms", "1.00", "s"],
                                                         ["r2", "850", "ms", "3.25", "s"]]
    # Off (or an older gateway): no section.
    off = status.gateway_dict(pb.GatewayStatus(gateway_id="g"))
    assert "adaptive" not in status.render({"self_id": "g", "members": [], "gateway": off}, "g:1")


def test_the_simulated_replicas_gray_behaviours():
    from llmgw.replica import model

    assert model.token_step(0.02, 0.0, 0.9) == 0.02
    steps = [model.token_step(0.02, 0.5, u / 100) for u in range(100)]
    assert min(steps) == pytest.approx(0.01) and max(steps) == pytest.approx(0.0299, abs=1e-4)
    # Engine pauses of 100 ms every second from t=10: a token due inside one comes out at its end.
    assert model.after_pause(10.05, 10.0, 1.0, 0.1) == pytest.approx(10.1)
    assert model.after_pause(12.02, 10.0, 1.0, 0.1) == pytest.approx(12.1)
    assert model.after_pause(12.5, 10.0, 1.0, 0.1) == 12.5
    assert model.after_pause(9.95, 10.0, 1.0, 0.1) == 9.95  # before the schedule's origin
    assert model.after_pause(10.05, 10.0, 0.0, 0.1) == 10.05  # off


def test_replica_flags_for_the_gray_behaviours_and_their_checks():
    import argparse

    from llmgw.cli import replica

    parser = argparse.ArgumentParser()
    replica.add_arguments(parser)
    cfg = replica.config_from_args(parser.parse_args(["--jitter", "0.5", "--pause-every-ms", "1000",
                                                     "--pause-ms", "100"]))
    assert (cfg.faults.jitter, cfg.faults.pause_every_ms, cfg.faults.pause_ms) == (0.5, 1000, 100)
    for bad in (["--jitter", "1.5"], ["--jitter", "-0.1"], ["--pause-ms", "100"],
                ["--pause-every-ms", "100", "--pause-ms", "100"], ["--pause-every-ms", "-1"]):
        with pytest.raises(SystemExit):
            replica.config_from_args(parser.parse_args(bad))


@pytest.mark.slow  # ~1.6 s of real time (two 80-token scenarios): left out of `make test-fast`
def test_a_silence_every_active_replica_shares_is_not_one_replicas_stall():
    """Two streams on two replicas go quiet together (the gateway's host or network, not a replica): no
    suspicion. One quiet while the other keeps streaming: suspected as usual."""
    async def scenario(together):
        def plan(resume, max_tokens):
            return quiet_after(10, 0.6)(resume, max_tokens) if together or not plan.opened else \
                answer(resume, max_tokens, gap_s=GAP_S)

        plan.opened = []

        def script(resume, max_tokens):
            steps = plan(resume, max_tokens)
            plan.opened.append(resume)
            return steps

        gateway, transport = await fake_gateway({"a": script, "b": script}, routing="least_connections")
        teach(gateway, "ab")
        first, second = await asyncio.gather(timed(gateway, "one", 80), timed(gateway, "two", 80))
        assert_exact(first[0], 80)
        assert_exact(second[0], 80)
        assert {transport.opened[0][0], transport.opened[1][0]} == {"a", "b"}  # one stream on each
        guard = gateway.stall_guard
        await gateway.stop()
        return guard

    together = run(scenario(True))
    assert together.counts[SUSPECTED] == 0 and together.shared_silences >= 2
    alone = run(scenario(False))
    assert alone.counts[SUSPECTED] == 1 and alone.counts[CONTINUATION_WON] == 1


def test_metrics_show_each_replicas_deadlines_and_count_suspicions_and_races():
    from prometheus_client.parser import text_string_to_metric_families

    from llmgw.gateway.observability import MetricsListener
    from llmgw.metrics import GatewayMetrics, render

    async def scenario():
        script = scripted(quiet_after(10, 3.0), starting_after(0.02))
        gateway, _ = await fake_gateway({"a": script, "b": script})
        teach(gateway, "ab", gap_s=0.1)  # b's deadline: p99 of 100 ms gaps x 3 + 50 ms
        metrics = GatewayMetrics(process_metrics=False)
        listener = MetricsListener(gateway, metrics)
        gateway.add_listener(listener)
        got, _ = await timed(gateway, "frozen", 20)
        assert_exact(got, 20)
        metrics.refresh()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(render(metrics.registry)[0].decode())
                   for s in family.samples}
        listener.detach()
        await gateway.stop()
        return samples, gateway.stall_guard.deadlines

    samples, deadlines = run(scenario())
    assert samples[("llmgw_gateway_stall_suspicions_total", ())] == 1
    assert samples[("llmgw_gateway_stall_failovers_total", ())] == 1
    assert samples[("llmgw_gateway_stall_races_total", (("result", "continuation_won"),))] == 1
    assert samples[("llmgw_gateway_stall_races_total", (("result", "original_won"),))] == 0
    assert samples[("llmgw_gateway_failovers_total", ())] == 0  # a race is not counted as an attempt failure
    for rid in "ab":
        value = samples[("llmgw_gateway_inter_token_deadline_seconds", (("replica", rid),))]
        assert value == pytest.approx(deadlines.inter_token_deadline(rid)) and 0.3 < value < 5.0
        assert samples[("llmgw_gateway_first_token_deadline_seconds", (("replica", rid),))] == 10.0  # no TTFTs


def test_every_member_replica_is_listed_even_without_evidence():
    async def scenario():
        gateway, _ = await fake_gateway({"a": scripted(quiet_after(3, 0.0), starting_after(0.0)), "b": None})
        teach(gateway, "a")
        snapshot = gateway.stall_guard.snapshot()
        await gateway.stop()
        return snapshot

    replicas = run(scenario())["replicas"]
    assert replicas["a"]["inter_token_deadline_s"] == pytest.approx(0.2)
    assert (replicas["b"]["inter_token_deadline_s"], replicas["b"]["first_token_deadline_s"]) == (5.0, 10.0)


def test_a_suspected_replica_is_kept_off_new_requests_only_for_a_while(monkeypatch):
    from llmgw.gateway import stall_race

    monkeypatch.setattr(stall_race, "STALL_PROBATION_S", 0.1)

    async def scenario():
        gateway, _ = await fake_gateway({"a": scripted(quiet_after(3, 0.0), starting_after(0.0)), "b": None})
        guard = gateway.stall_guard
        guard._suspected("a", asyncio.get_running_loop().time())
        assert guard.excluded() == ["a"] and gateway.routable() == {"b"}
        await asyncio.sleep(0.15)  # probation over, though "a" has not delivered: it may be tried again
        assert guard.excluded() == [] and gateway.routable() == {"a", "b"}
        guard._suspected("a", asyncio.get_running_loop().time())
        guard.deadlines.record_gap("a", 0.01)  # it delivered: no longer suspected
        assert guard.excluded() == []
        await gateway.stop()

    run(scenario())


def test_a_finished_request_leaves_nothing_for_the_garbage_collector():
    """Reference counting alone frees a served request's attempt and its wait timer: a cycle between them would
    leave every request's attempt, stream and buffers for the cyclic collector, whose collections then cost the
    gateway more CPU than much of its request path -- with a stall race on the way, too."""
    import gc

    from llmgw.gateway.attempt import Attempt
    from llmgw.gateway.stall_race import WaitTimer

    def left_over():
        return [o for o in gc.get_objects() if isinstance(o, (Attempt, WaitTimer))]

    async def scenario():
        script = scripted(quiet_after(3, 0.5), starting_after(0.0))
        gateway, _ = await fake_gateway({"a": script, "b": script})
        teach(gateway, "ab")  # the adaptive deadlines are in force: the waits go through the wait timers
        gc.collect()
        gc.disable()
        try:
            raced, _ = await timed(gateway, "raced", 8)  # a stall race, won by the continuation
            plain, _ = await timed(gateway, "plain", 8)
            left = left_over()
        finally:
            gc.enable()
        assert_exact(raced, 8)
        assert_exact(plain, 8)
        assert gateway.stall_guard.counts[CONTINUATION_WON] == 1
        assert left == [], left
        await gateway.stop()

    run(scenario())
