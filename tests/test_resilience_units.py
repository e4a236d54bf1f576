"""Unit tests of the resilience wiring: the hedge race, the breaker's slow-start evidence, the gateway's
settings, and the in-process request path with hedging and breakers (in-process replicas, fake membership)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from test_gateway import run

from llmgw._proto import llmgateway_pb2 as pb
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc
from llmgw.gateway import GatewayConfig, InferenceRequest
from llmgw.gateway.events import AttemptOutcome, RequestListener
from llmgw.gateway.hedging import RaceFailed, race_first_token
from llmgw.policy import BreakerBoard, BreakerConfig


class Boom(Exception):
    pass


class Fatal(Exception):
    pass


def race(plan: dict, *, delay_s: float, hedge_ticket="hedge", timeout_s: float = 5.0):
    """Run a race whose legs follow `plan[ticket] = (seconds, result or exception)`; returns
    (winner ticket or exception, legs, discarded, {ticket: "cancelled" | "done"})."""
    ends: dict = {}
    discarded: list = []

    async def open_leg(ticket):
        seconds, outcome = plan[ticket]
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            ends[ticket] = "cancelled"
            raise
        ends[ticket] = "done"
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def main():
        legs = []
        try:
            async with asyncio.timeout(timeout_s):
                winner = await race_first_token(open_leg, "primary", delay_s=delay_s,
                                                start_hedge=lambda: hedge_ticket, recoverable=Boom, legs=legs,
                                                discard=discarded.append)
            result = winner.ticket
        except (RaceFailed, Fatal) as exc:
            result = exc
        assert all(leg.task.done() for leg in legs), "a leg outlived the race"
        return result, legs, discarded, ends

    return asyncio.run(main())


def test_race_primary_answers_before_the_delay_no_hedge_starts():
    winner, legs, _, ends = race({"primary": (0.01, "p")}, delay_s=0.2)
    assert winner == "primary" and len(legs) == 1 and ends == {"primary": "done"}


def test_race_hedge_wins_and_the_silent_primary_is_cancelled_at_once():
    winner, legs, _, ends = race({"primary": (3.0, "p"), "hedge": (0.02, "h")}, delay_s=0.05)
    assert winner == "hedge" and [leg.is_hedge for leg in legs] == [False, True]
    assert ends == {"primary": "cancelled", "hedge": "done"}
    assert legs[1].started - legs[0].started >= 0.045


def test_race_primary_wins_after_the_hedge_started_and_the_hedge_is_cancelled():
    winner, _legs, _, ends = race({"primary": (0.08, "p"), "hedge": (3.0, "h")}, delay_s=0.02)
    assert winner == "primary" and ends == {"primary": "done", "hedge": "cancelled"}


def test_race_failed_leg_does_not_end_the_race_while_the_other_runs():
    winner, legs, _, _ = race({"primary": (0.2, "p"), "hedge": (0.01, Boom("hedge down"))}, delay_s=0.0)
    assert winner == "primary" and isinstance(legs[1].failure, Boom)
    winner, legs, _, _ = race({"primary": (0.05, Boom("primary down")), "hedge": (0.2, "h")}, delay_s=0.01)
    assert winner == "hedge" and isinstance(legs[0].failure, Boom)


def test_race_primary_failing_before_the_delay_fails_at_once_without_a_hedge():
    result, legs, _, _ = race({"primary": (0.01, Boom("down"))}, delay_s=1.0)
    assert isinstance(result, RaceFailed) and len(legs) == 1 and len(result.legs) == 1


def test_race_every_leg_failing_is_a_race_failure_naming_both():
    result, _legs, _, _ = race({"primary": (0.05, Boom("a")), "hedge": (0.01, Boom("b"))}, delay_s=0.0)
    assert isinstance(result, RaceFailed) and len(result.legs) == 2
    assert "primary: a" in str(result) and "hedge: b" in str(result)


def test_race_non_recoverable_error_ends_the_race_and_cancels_the_other_leg():
    result, _legs, _, ends = race({"primary": (3.0, "p"), "hedge": (0.01, Fatal("bad request"))}, delay_s=0.0)
    assert isinstance(result, Fatal) and ends["primary"] == "cancelled"


def test_race_without_a_free_replica_keeps_waiting_for_the_primary():
    winner, legs, _, _ = race({"primary": (0.1, "p")}, delay_s=0.01, hedge_ticket=None)
    assert winner == "primary" and len(legs) == 1


def test_race_simultaneous_successes_keep_the_primary_and_discard_the_other():
    winner, _legs, discarded, _ = race({"primary": (0.05, "p"), "hedge": (0.05, "h")}, delay_s=0.0)
    assert winner == "primary" and discarded == ["h"]


def test_race_cancelled_from_outside_cancels_every_leg():
    ends = {}

    async def open_leg(ticket):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            ends[ticket] = "cancelled"
            raise

    async def main():
        legs = []
        task = asyncio.ensure_future(race_first_token(open_leg, "primary", delay_s=0.0, start_hedge=lambda: "hedge",
                                                      recoverable=Boom, legs=legs))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return legs

    legs = asyncio.run(main())
    assert ends == {"primary": "cancelled", "hedge": "cancelled"} and all(leg.task.done() for leg in legs)


def test_race_rejects_a_negative_delay():
    async def main():
        with pytest.raises(ValueError):
            await race_first_token(lambda t: None, "p", delay_s=-1, start_hedge=lambda: None, recoverable=Boom,
                                   legs=[])

    asyncio.run(main())


# ---- breaker: lost hedge races as slow-start evidence ----------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def board_with_peers(clock: Clock) -> BreakerBoard:
    board = BreakerBoard(BreakerConfig(cooldown_s=5.0), clock=clock)
    board.set_replicas(["a", "b", "c"])
    for _ in range(5):
        board.record_success("b", 0.02, 0.01)
        board.record_success("c", 0.02, 0.01)
    return board


def test_lost_races_eject_a_replica_that_never_answers_first():
    clock = Clock()
    board = board_with_peers(clock)
    for i in range(4):
        board.record_slow_start("a", 0.12)
        assert board.state("a") == "closed", f"ejected after {i + 1} samples, before the minimum"
    board.record_slow_start("a", 0.12)
    assert board.state("a") == "open" and board.snapshot()["replicas"]["a"]["reason"] == "slow_ttft"


def test_lost_races_by_a_small_margin_eject_nobody():
    board = board_with_peers(Clock())
    for _ in range(20):
        board.record_slow_start("a", 0.04)  # 2x the peers but below 3x: ordinary variance between replicas
    assert board.state("a") == "closed"


def test_a_half_open_probe_that_loses_a_race_reopens_when_slow_and_frees_the_slot_otherwise():
    clock = Clock()
    board = board_with_peers(clock)
    for _ in range(5):
        board.record_slow_start("a", 0.2)
    assert board.state("a") == "open"
    clock.now += 5.0
    assert board.allow("a") and not board.allow("a")
    board.record_slow_start("a", 0.2, started_at=clock.now)
    assert board.state("a") == "open" and board.snapshot()["replicas"]["a"]["reason"] == "probe_slow_ttft"
    clock.now += 10.0
    assert board.allow("a")
    board.record_slow_start("a", 0.03, started_at=clock.now)  # a small lower bound proves nothing either way
    assert board.state("a") == "half_open" and board.allow("a")


def test_slow_start_rejects_bad_values():
    board = BreakerBoard()
    for bad in (None, -1.0, float("nan")):
        with pytest.raises(ValueError):
            board.record_slow_start("a", bad)


# ---- gateway settings -----------------------------------------------------------------------------------------
def test_gateway_resilience_settings_map_to_the_policy_cores_and_are_checked():
    cfg = GatewayConfig(hedge_delay_ms=100, hedge_budget=0.2, hedge_budget_burst=4, breaker_window=20,
                        breaker_consecutive=3, breaker_cooldown_s=7, breaker_slow_detection=False)
    hedge, breaker = cfg.hedge_config(), cfg.breaker_config()
    assert (hedge.delay_s, hedge.budget_ratio, hedge.budget_burst, hedge.budget_initial) == (0.1, 0.2, 4, 4)
    assert (breaker.window_size, breaker.min_window_outcomes, breaker.consecutive_failures) == (20, 20, 3)
    assert (breaker.cooldown_s, breaker.max_cooldown_s, breaker.slow_detection) == (7, 14, False)
    assert GatewayConfig().hedge_config().delay_s is None
    for bad, message in ((dict(hedge_delay_ms=-1), "hedge_delay_ms"), (dict(hedge_budget=2.0), "budget_ratio"),
                         (dict(breaker_window=0), "window_size"), (dict(breaker_failure_rate=1.5), "failure_rate"),
                         (dict(restart_command="restart {host}"), "restart_command")):
        with pytest.raises(ValueError, match=message):
            GatewayConfig(**bad).validate()


# ---- in-process request path ----------------------------------------------------------------------------------
async def collect(gw, prompt, n, *, hedge=False):
    out = []
    async for ev in gw.infer(InferenceRequest(prompt=prompt, max_tokens=n, hedge=hedge)):
        out.append(ev)
    return out


def test_explicit_hedge_streams_the_fast_replica_and_frees_the_loser_at_once():
    async def scenario(s):
        fast = await s.add_replica("fast", token_delay_ms=5)
        slow = await s.add_replica("slow", token_delay_ms=5)
        slow.faults.stall_before_first_ms = 2000
        await s.start_gateway()
        gw = s.gateway
        outcomes = []

        class Outcomes(RequestListener):
            def attempt_event(self, replica_id, outcome, ttft_s):
                outcomes.append((replica_id, outcome))

        gw.add_listener(Outcomes())
        for i in range(4):
            events = await asyncio.wait_for(collect(gw, f"p{i}", 5, hedge=True), 1.5)
            assert [e.index for e in events] == list(range(5)) and {e.replica_id for e in events} == {"fast"}
            assert gw.in_flight == {}
            await asyncio.sleep(0.05)
            assert slow.active == 0 and fast.active == 0
        stats = gw.hedge_stats()
        assert stats["hedges_started"] == 4 and stats["won"] + stats["lost"] == 4
        assert stats["explicit_hedges"] == 4 and stats["policy_hedges_issued"] == 0
        assert sum(1 for _, o in outcomes if o is AttemptOutcome.HEDGE_STARTED) == 4
        assert sum(1 for _, o in outcomes if o in (AttemptOutcome.HEDGE_WON, AttemptOutcome.HEDGE_LOST)) == 4
        async with grpc.aio.insecure_channel(s.server.grpc_address) as ch:
            status = await pb_grpc.GatewayAdminStub(ch).GetStatus(pb.GatewayStatusRequest(), timeout=5)
        assert status.hedges_started == 4 and status.hedges_won + status.hedges_lost == 4

    run(scenario)


def test_policy_hedge_budget_denies_and_the_request_still_completes_on_its_primary():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=60)
        await s.add_replica("r2", token_delay_ms=60)
        await s.start_gateway(hedge_delay_ms=10, hedge_budget=0.0, hedge_budget_burst=1)
        gw = s.gateway
        results = [await collect(gw, f"q{i}", 2) for i in range(3)]
        for events in results:
            assert [e.index for e in events] == [0, 1]
        stats = gw.hedge_stats()
        # Every request's first token takes ~60 ms > 10 ms: each asks; the bucket held one hedge and never refills.
        assert stats["policy_hedges_issued"] == 1 and stats["policy_hedges_denied"] == 2
        assert gw.in_flight == {}

    run(scenario)


def test_a_hedge_never_jumps_the_admission_queue():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=40, capacity=1)
        await s.add_replica("r2", token_delay_ms=40, capacity=1)
        await s.start_gateway()
        gw = s.gateway
        tasks = [asyncio.create_task(collect(gw, f"x{i}", 3, hedge=True)) for i in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        for events in results:
            assert [e.index for e in events] == [0, 1, 2]
        stats = gw.hedge_stats()
        assert stats["denied_no_capacity"] >= 1
        assert gw.in_flight == {}

    run(scenario)


def test_breaker_excludes_an_open_replica_and_members_show_it():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        bad = await s.add_replica("r2", token_delay_ms=1)
        await s.add_replica("r3", token_delay_ms=1)
        bad.faults.reject_all = True
        await s.start_gateway(breaker_consecutive=2)
        gw = s.gateway
        for i in range(12):
            assert [e.index for e in await collect(gw, f"b{i}", 2)] == [0, 1]
        assert gw.breakers.state("r2") == "open"
        assert gw.breaker_states() == {"r1": "closed", "r2": "open", "r3": "closed"}
        rejected = bad.rejected_total
        assert rejected >= 2
        for i in range(10):
            events = await collect(gw, f"c{i}", 2)
            assert {e.replica_id for e in events} <= {"r1", "r3"}
        assert bad.rejected_total == rejected, "an open breaker's replica still got requests"
        async with grpc.aio.insecure_channel(s.server.grpc_address) as ch:
            resp = await pb_grpc.GatewayAdminStub(ch).Members(pb.MembersRequest(), timeout=5)
        assert {m.member_id: m.breaker for m in resp.members} == {"r1": "closed", "r2": "open", "r3": "closed"}

    run(scenario)


def test_start_rollout_without_a_restart_hook_is_refused_and_get_rollout_says_none():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start_gateway()
        async with grpc.aio.insecure_channel(s.server.grpc_address) as ch:
            stub = pb_grpc.GatewayAdminStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.StartRollout(pb.RolloutRequest(version="v2"), timeout=5):
                    pass
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert (await stub.GetRollout(pb.GetRolloutRequest(), timeout=5)).state == "none"

    run(scenario)
