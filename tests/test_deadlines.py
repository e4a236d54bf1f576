"""Adaptive stall deadlines (llmgw/policy/deadlines.py): the estimator, its config, the stall race, and 60 s
synthetic traces of 30 concurrent streams proving the issue-14 cases: no false alarm for a jittery replica (a), a
uniformly 10x slower one (b) and one pausing 100 ms every second (c); a freeze detected well within 1 s (d)."""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from support_clock import FakeClock

from llmgw.policy.deadlines import (
    DISCARD,
    FAIL_OVER,
    FORWARD,
    KEEP_WAITING,
    START_CONTINUATION,
    DeadlineConfig,
    DecayingHistogram,
    StallDeadlines,
    StallRace,
)


def feed_gaps(deadlines: StallDeadlines, clock: FakeClock, gaps, replica: str = "r1") -> None:
    for gap in gaps:
        clock.advance(gap)
        deadlines.record_gap(replica, gap)


# ---- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field_name, value", [
    ("enabled", 1), ("first_token_ceiling_s", 0), ("inter_token_ceiling_s", -1.0), ("inter_token_ceiling_s", math.inf),
    ("gap_quantile", 0), ("gap_quantile", 1.5), ("ttft_quantile", math.nan), ("gap_factor", 0.9),
    ("ttft_factor", math.inf), ("gap_margin_s", -0.01), ("gap_floor_s", -1), ("ttft_floor_s", math.nan),
    ("min_gap_samples", 0), ("min_ttft_samples", 2.5), ("prompt_unit_chars", True), ("half_life_s", 0),
    ("recompute_every", 0), ("recompute_interval_s", -1), ("gap_floor_s", 6.0), ("ttft_floor_s", 11.0),
])
def test_config_rejects_bad_values_naming_the_knob(field_name, value):
    with pytest.raises(ValueError, match=field_name):
        DeadlineConfig(**{field_name: value})


def test_config_from_timeouts_uses_them_as_ceilings_and_lowers_floors_above_them():
    cfg = DeadlineConfig.from_timeouts(10.0, 5.0)
    assert (cfg.first_token_ceiling_s, cfg.inter_token_ceiling_s) == (10.0, 5.0)
    assert (cfg.ttft_floor_s, cfg.gap_floor_s) == (1.0, 0.2)
    tight = DeadlineConfig.from_timeouts(0.5, 0.1, gap_factor=2.0)
    assert (tight.ttft_floor_s, tight.gap_floor_s, tight.gap_factor) == (0.5, 0.1, 2.0)
    with pytest.raises(ValueError, match="ceilings"):
        DeadlineConfig.from_timeouts(10.0, 5.0, inter_token_ceiling_s=1.0)
    with pytest.raises(ValueError, match="inter_token_ceiling_s"):
        DeadlineConfig.from_timeouts(10.0, 0.0)


# ---- inter-token deadline -------------------------------------------------------------------------------------
def test_ceiling_until_enough_samples_then_adaptive():
    clock = FakeClock()
    # No ageing here (huge half-life), so the sample count is exact.
    deadlines = StallDeadlines(DeadlineConfig(half_life_s=1e9), clock)
    assert deadlines.inter_token_deadline("r1") == 5.0  # never seen
    feed_gaps(deadlines, clock, [0.02] * 49)
    assert deadlines.inter_token_deadline("r1") == 5.0  # 49 < min_gap_samples
    feed_gaps(deadlines, clock, [0.02])
    clock.advance(1.0)  # let the lazy recompute happen (interval)
    # p99 of 20 ms gaps is the 20.5 ms bucket edge: x3 + 50 ms = 111 ms, below the 200 ms floor.
    assert deadlines.inter_token_deadline("r1") == pytest.approx(0.2)


def test_deadline_is_quantile_times_factor_plus_margin_between_floor_and_ceiling():
    clock = FakeClock()
    deadlines = StallDeadlines(DeadlineConfig(), clock)
    feed_gaps(deadlines, clock, [0.2] * 200)
    clock.advance(1.0)
    value = deadlines.inter_token_deadline("r1")
    # The bucket edge is within 9 % above 200 ms.
    assert 0.2 * 3 + 0.05 <= value <= 0.2 * 1.0905 * 3 + 0.05
    feed_gaps(deadlines, clock, [4.0] * 400)
    clock.advance(1.0)
    assert deadlines.inter_token_deadline("r1") == 5.0  # 4 s x 3 is capped at the configured timeout


def test_recompute_is_lazy_every_k_samples():
    clock = FakeClock()
    deadlines = StallDeadlines(DeadlineConfig(recompute_every=32, recompute_interval_s=1000.0), clock)
    feed_gaps(deadlines, clock, [0.02] * 64)
    first = deadlines.inter_token_deadline("r1")
    assert first == pytest.approx(0.2)
    feed_gaps(deadlines, clock, [1.0] * 31)  # 31 < 32 new samples: the cached value stands
    assert deadlines.inter_token_deadline("r1") == first
    feed_gaps(deadlines, clock, [1.0])
    assert deadlines.inter_token_deadline("r1") > 3.0


def test_disabled_is_always_the_ceiling_and_records_nothing():
    clock = FakeClock()
    deadlines = StallDeadlines(DeadlineConfig(enabled=False), clock)
    feed_gaps(deadlines, clock, [0.02] * 500)
    deadlines.record_first_token("r1", 0.05, 100)
    assert deadlines.inter_token_deadline("r1") == 5.0
    assert deadlines.first_token_deadline("r1", 100) == 10.0
    assert deadlines.snapshot() == {"enabled": False, "first_token_ceiling_s": 10.0, "inter_token_ceiling_s": 5.0,
                                    "replicas": {}}


def test_replicas_are_independent_and_pool_their_own_streams():
    clock = FakeClock()
    deadlines = StallDeadlines(DeadlineConfig(), clock)
    for _ in range(300):
        clock.advance(0.001)
        deadlines.record_gap("fast", 0.02)
        deadlines.record_gap("slow", 0.3)
    clock.advance(1.0)
    assert deadlines.inter_token_deadline("fast") == pytest.approx(0.2)
    assert deadlines.inter_token_deadline("slow") > 0.9


def test_old_samples_age_out_back_to_the_ceiling_and_new_behaviour_takes_over():
    clock = FakeClock()
    deadlines = StallDeadlines(DeadlineConfig(half_life_s=10.0), clock)
    feed_gaps(deadlines, clock, [0.3] * 400)
    clock.advance(1.0)
    slow = deadlines.inter_token_deadline("r1")
    assert slow > 0.9
    # The replica turns fast: within a few half-lives the slow gaps fall under 1 % of the weight.
    for _ in range(60):
        feed_gaps(deadlines, clock, [0.02] * 50)
    assert deadlines.inter_token_deadline("r1") == pytest.approx(0.2)
    # Silence: 400 gaps' weight decays below min_gap_samples (50) after 3 half-lives and a bit.
    clock.advance(100.0)
    assert deadlines.inter_token_deadline("r1") == 5.0


def test_a_slow_phase_raises_the_deadline_within_a_few_seconds():
    clock = FakeClock()
    deadlines = StallDeadlines(DeadlineConfig(), clock)
    for _ in range(30):  # 30 s of 30 streams at 20 ms: 45 000 gaps
        for _ in range(1500):
            clock.advance(1 / 1500)
            deadlines.record_gap("r1", 0.02)
    assert deadlines.inter_token_deadline("r1") == pytest.approx(0.2)
    seconds = 0
    while deadlines.inter_token_deadline("r1") < 0.6:  # now 200 ms per token: 150 gaps/s
        for _ in range(150):
            clock.advance(1 / 150)
            deadlines.record_gap("r1", 0.2)
        seconds += 1
        assert seconds < 10
    assert seconds >= 1


def test_abandoned_waits_teach_a_real_slowdown_but_a_one_off_freeze_moves_nothing():
    clock = FakeClock()
    deadlines = StallDeadlines(DeadlineConfig(), clock)
    for _ in range(20 * 1500):  # 20 s of 30 streams at 20 ms
        clock.advance(1 / 1500)
        deadlines.record_gap("r1", 0.02)
    assert deadlines.inter_token_deadline("r1") == pytest.approx(0.2)
    deadlines.mark_stalled("r1")
    for _ in range(30):  # the freeze: every stream given up on after 200 ms
        deadlines.record_abandoned_wait("r1", 0.2)
    clock.advance(1.0)
    assert deadlines.inter_token_deadline("r1") == pytest.approx(0.2)
    assert deadlines.stalled("r1")  # an abandoned wait is no sign of life
    # A replica that became 10x slower and loses every race still lifts its own deadline within a few seconds.
    seconds = 0
    while deadlines.inter_token_deadline("r1") < 0.6:
        for _ in range(150):
            clock.advance(1 / 150)
            deadlines.record_abandoned_wait("r1", 0.2)
        seconds += 1
        assert seconds <= 5


def test_clock_stepping_back_neither_crashes_nor_overweights():
    clock = FakeClock()
    deadlines = StallDeadlines(DeadlineConfig(half_life_s=10.0), clock)
    feed_gaps(deadlines, clock, [0.02] * 100)
    clock.t -= 50.0  # samples "from the past" count as taken at the latest time seen, not 5 half-lives heavier
    feed_gaps(deadlines, clock, [0.02] * 10)
    assert 100 <= deadlines.snapshot()["replicas"]["r1"]["gap_samples"] <= 110
    clock.advance(1.0)
    assert deadlines.inter_token_deadline("r1") == pytest.approx(0.2)


@pytest.mark.parametrize("bad, error", [(-0.001, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                                        (True, TypeError), ("0.1", TypeError), (None, TypeError)])
def test_bad_samples_are_rejected(bad, error):
    deadlines = StallDeadlines(DeadlineConfig(), FakeClock())
    with pytest.raises(error):
        deadlines.record_gap("r1", bad)
    with pytest.raises(error):
        deadlines.record_first_token("r1", bad, 10)
    assert deadlines.snapshot()["replicas"] == {}


def test_bad_replica_ids_and_prompt_sizes_are_rejected():
    deadlines = StallDeadlines(DeadlineConfig(), FakeClock())
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match="replica_id"):
            deadlines.record_gap(bad, 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        deadlines.record_abandoned_wait("r1", -1.0)
    for bad_chars in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="prompt_chars"):
            deadlines.first_token_deadline("r1", bad_chars)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="prompt_chars"):
            deadlines.record_first_token("r1", 0.1, bad_chars)  # type: ignore[arg-type]


def test_forget_and_set_replicas_drop_history():
    clock = FakeClock()
    deadlines = StallDeadlines(DeadlineConfig(), clock)
    for rid in ("a", "b", "c"):
        feed_gaps(deadlines, clock, [0.02] * 100, rid)
    clock.advance(1.0)
    deadlines.set_replicas(["a", "c"])
    deadlines.forget("c")
    deadlines.forget("never-seen")
    assert list(deadlines.snapshot()["replicas"]) == ["a"]
    assert deadlines.inter_token_deadline("b") == 5.0
    assert deadlines.inter_token_deadline("a") == pytest.approx(0.2)


def test_stalled_mark_lasts_until_the_replica_delivers_again():
    clock = FakeClock()
    deadlines = StallDeadlines(DeadlineConfig(), clock)
    deadlines.mark_stalled("r1")
    clock.advance(0.5)
    deadlines.mark_stalled("r1")  # a second stream noticing it keeps the first time
    assert deadlines.stalled("r1") and deadlines.stalled_replicas() == ["r1"]
    assert deadlines.snapshot()["replicas"]["r1"]["stalled_for_s"] == pytest.approx(0.5)
    deadlines.record_gap("r1", 0.7)
    assert not deadlines.stalled("r1") and deadlines.stalled_replicas() == []
    deadlines.mark_stalled("r1")
    deadlines.record_first_token("r1", 0.1, 10)
    assert not deadlines.stalled("r1")
    assert not deadlines.stalled("unknown")


# ---- first-token deadline -------------------------------------------------------------------------------------
def test_first_token_deadline_scales_with_prompt_size_class_and_has_a_1s_floor():
    clock = FakeClock()
    deadlines = StallDeadlines(DeadlineConfig(), clock)
    assert deadlines.first_token_deadline("r1", 100) == 10.0
    for _ in range(40):
        clock.advance(0.1)
        deadlines.record_first_token("r1", 0.05, 500)  # class 0 (<= 1024 chars)
        deadlines.record_first_token("r1", 1.2, 30_000)  # class 5 (16k..32k chars)
    clock.advance(1.0)
    assert deadlines.first_token_deadline("r1", 10) == 1.0  # 4 x 50 ms is below the floor
    # 2k..16k chars: no samples in their own class, so the next larger one with enough speaks for them.
    big = deadlines.first_token_deadline("r1", 5000)
    assert 4 * 1.2 <= big <= 4 * 1.2 * 1.0905
    assert deadlines.first_token_deadline("r1", 32 * 1024) == big
    # Longer than anything seen: no evidence, the ceiling.
    assert deadlines.first_token_deadline("r1", 32 * 1024 + 1) == 10.0
    snap = deadlines.snapshot()["replicas"]["r1"]
    assert snap["first_token_deadline_s"] == 1.0
    assert snap["first_token_deadline_by_chars_s"] == {1024: 1.0, 32 * 1024: big}
    assert snap["ttft_samples"] == pytest.approx(80, rel=0.1)


def test_first_token_class_needs_its_own_minimum():
    clock = FakeClock()
    deadlines = StallDeadlines(DeadlineConfig(half_life_s=1e9), clock)
    for _ in range(19):
        deadlines.record_first_token("r1", 0.05, 100)
    clock.advance(1.0)
    assert deadlines.first_token_deadline("r1", 100) == 10.0
    deadlines.record_first_token("r1", 0.05, 100)
    clock.advance(1.0)
    assert deadlines.first_token_deadline("r1", 100) == 1.0


def test_snapshot_reports_current_deadlines():
    clock = FakeClock()
    deadlines = StallDeadlines(DeadlineConfig(), clock)
    feed_gaps(deadlines, clock, [0.02] * 100)
    clock.advance(1.0)
    snap = deadlines.snapshot()
    assert snap["enabled"] is True and snap["inter_token_ceiling_s"] == 5.0
    r1 = snap["replicas"]["r1"]
    assert r1["inter_token_deadline_s"] == pytest.approx(0.2)
    assert 0.02 <= r1["gap_quantile_s"] <= 0.022
    assert r1["gap_samples"] == pytest.approx(100, rel=0.05)
    assert r1["first_token_deadline_s"] == 10.0 and r1["ttft_quantile_s"] is None
    assert r1["stalled_for_s"] is None


# ---- histogram ------------------------------------------------------------------------------------------------
@settings(max_examples=examples(150), deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=20.0), min_size=1, max_size=300),
       st.floats(min_value=0.01, max_value=1.0))
def test_histogram_quantile_is_the_sample_quantile_rounded_up_at_most_9_percent(values, q):
    histogram = DecayingHistogram(high_s=30.0, half_life_s=1e9, now=0.0)
    for v in values:
        histogram.add(v, 0.0)
    exact = sorted(values)[max(0, math.ceil(q * len(values)) - 1)]
    got = histogram.quantile(q)
    assert got is not None
    assert got >= exact
    assert got <= max(exact * 2 ** (1 / 8) * (1 + 1e-9), 1e-4)


def test_histogram_weights_by_age_and_renormalises():
    histogram = DecayingHistogram(high_s=5.0, half_life_s=1.0, now=0.0)
    for _ in range(100):
        histogram.add(1.0, 0.0)
    assert histogram.weight(1.0) == pytest.approx(50.0)
    # 200 half-lives later (several renormalisations), 100 fresh samples of 10 ms dominate completely.
    for _ in range(100):
        histogram.add(0.01, 200.0)
    assert histogram.weight(200.0) == pytest.approx(100.0, rel=1e-6)
    assert histogram.quantile(1.0) == pytest.approx(0.01, rel=0.1)
    assert histogram.quantile(0.5) is not None


def test_histogram_clamps_out_of_range_values():
    histogram = DecayingHistogram(high_s=5.0, half_life_s=10.0, now=0.0)
    assert histogram.quantile(0.5) is None
    histogram.add(0.0, 0.0)
    assert histogram.quantile(1.0) == pytest.approx(1e-4)
    histogram.add(1e6, 0.0)
    assert histogram.quantile(1.0) == 5.0


# ---- properties -----------------------------------------------------------------------------------------------
gap_lists = st.lists(st.tuples(st.floats(min_value=0.0, max_value=3.0), st.floats(min_value=0.0, max_value=30.0)),
                     min_size=0, max_size=250)
configs = st.builds(
    DeadlineConfig,
    gap_quantile=st.floats(min_value=0.5, max_value=1.0),
    gap_factor=st.floats(min_value=1.0, max_value=5.0),
    gap_margin_s=st.floats(min_value=0.0, max_value=0.2),
    gap_floor_s=st.floats(min_value=0.0, max_value=1.0),
    inter_token_ceiling_s=st.floats(min_value=1.0, max_value=10.0),
    min_gap_samples=st.integers(min_value=1, max_value=60),
    half_life_s=st.floats(min_value=0.5, max_value=100.0),
    recompute_every=st.integers(min_value=1, max_value=64),
)


@settings(max_examples=examples(150), deadline=None)
@given(configs, gap_lists)
def test_property_deadline_always_within_floor_and_ceiling(cfg, samples):
    clock = FakeClock()
    deadlines = StallDeadlines(cfg, clock)
    for gap, wait in samples:
        clock.advance(wait)
        deadlines.record_gap("r1", gap)
        value = deadlines.inter_token_deadline("r1")
        assert cfg.gap_floor_s <= value <= cfg.inter_token_ceiling_s
    clock.advance(cfg.recompute_interval_s)
    assert cfg.gap_floor_s <= deadlines.inter_token_deadline("r1") <= cfg.inter_token_ceiling_s


@settings(max_examples=examples(150), deadline=None)
@given(configs, gap_lists, st.floats(min_value=1.0, max_value=20.0))
def test_property_deadline_monotone_in_gap_scale(cfg, samples, scale):
    clock_a, clock_b = FakeClock(), FakeClock()
    base, scaled = StallDeadlines(cfg, clock_a), StallDeadlines(cfg, clock_b)
    for gap, wait in samples:
        clock_a.advance(wait)
        clock_b.advance(wait)
        base.record_gap("r1", gap)
        scaled.record_gap("r1", gap * scale)
        assert scaled.inter_token_deadline("r1") >= base.inter_token_deadline("r1")


@settings(max_examples=examples(50), deadline=None)
@given(st.lists(st.tuples(st.floats(min_value=0.0, max_value=20.0), st.integers(min_value=0, max_value=1 << 40)),
                min_size=1, max_size=400))
def test_property_memory_is_bounded_whatever_the_samples(samples):
    clock = FakeClock()
    deadlines = StallDeadlines(DeadlineConfig(), clock)
    for value, chars in samples:
        clock.advance(0.01)
        deadlines.record_gap("r1", value)
        deadlines.record_first_token("r1", value, chars)
        assert cfg_floor() <= deadlines.first_token_deadline("r1", chars) <= 10.0
    # One inter-token histogram plus at most 26 prompt-size classes (0..25) of fixed size, whatever the samples.
    cells = deadlines.snapshot()["replicas"]["r1"]["histogram_buckets"]
    assert cells <= DecayingHistogram(5.0, 30.0, 0.0).buckets + 26 * DecayingHistogram(10.0, 30.0, 0.0).buckets


def cfg_floor() -> float:
    return DeadlineConfig().ttft_floor_s


# ---- stall race -----------------------------------------------------------------------------------------------
def test_race_real_stall_continuation_wins_and_primary_is_cancelled():
    race = StallRace(next_index=7)
    decision = race.suspect(0)
    assert (decision.action, decision.from_index) == (START_CONTINUATION, 7)
    leg = race.continuation_started()
    assert leg == 1 and race.live_legs == (0, 1)
    decision = race.message(1, 7)
    assert (decision.action, decision.winner, decision.cancel) == (FORWARD, 1, (0,))
    assert race.done and race.suspicions == 1
    assert race.message(0, 7).action == DISCARD  # a late message of the cancelled leg
    assert race.message(1, 8).action == FORWARD


def test_race_brief_hiccup_primary_wins_and_continuation_is_cancelled():
    race = StallRace(next_index=3)
    assert race.suspect(0).action == START_CONTINUATION
    race.continuation_started()
    decision = race.message(0, 3)
    assert (decision.action, decision.winner, decision.cancel) == (FORWARD, 0, (1,))
    assert race.message(1, 3).action == DISCARD


def test_race_both_quiet_keeps_waiting_then_failures_fail_over():
    race = StallRace(next_index=0, max_legs=2)
    race.suspect(0)
    race.continuation_started()
    assert race.suspect(1).action == KEEP_WAITING  # two legs running already: wait for one of them
    assert race.suspect(1).action == KEEP_WAITING and race.suspicions == 2
    assert race.failed(0).action == KEEP_WAITING
    decision = race.failed(1)
    assert (decision.action, decision.from_index) == (FAIL_OVER, 0)
    assert race.failed(1).action == DISCARD


def test_race_failed_continuation_while_primary_quiet_asks_for_another_within_the_leg_budget():
    race = StallRace(next_index=5, max_legs=3)
    race.suspect(0)
    race.continuation_started()
    assert race.failed(1).action == START_CONTINUATION  # the primary is still suspected, one more leg allowed
    assert race.continuation_started() == 2
    assert race.suspect(2).action == KEEP_WAITING  # 3 legs started: the budget is spent


def test_race_asks_for_one_continuation_at_a_time_and_again_after_none_could_start():
    race = StallRace(next_index=2, max_legs=3)
    assert race.suspect(0).action == START_CONTINUATION
    assert race.suspect(0).action == KEEP_WAITING  # the first request for a continuation is still pending
    race.continuation_not_started()  # no replica free
    with pytest.raises(RuntimeError):
        race.continuation_started()
    assert race.suspect(0).action == START_CONTINUATION  # the next watchdog round asks again
    assert race.continuation_started() == 1


def test_race_wrong_index_counts_as_a_failed_leg():
    race = StallRace(next_index=4)
    race.suspect(0)
    race.continuation_started()
    assert race.message(1, 5).action == KEEP_WAITING  # leg 1 skipped a token: dropped, leg 0 still races
    assert race.live_legs == (0,)
    assert race.message(0, 4).action == FORWARD


def test_race_misuse_is_a_clear_error():
    race = StallRace(next_index=0)
    with pytest.raises(RuntimeError, match="START_CONTINUATION"):
        race.continuation_started()
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError):
            StallRace(next_index=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        StallRace(next_index=0, max_legs=0)
    assert StallRace(0, max_legs=1).suspect(0).action == KEEP_WAITING  # no continuation allowed at all


@settings(max_examples=examples(300), deadline=None)
@given(st.integers(min_value=1, max_value=4),
       st.lists(st.tuples(st.sampled_from(["suspect", "message", "fail", "start", "none_free"]), st.integers(0, 4),
                          st.booleans()),
                max_size=40))
def test_property_race_one_winner_exactly_once_and_bounded_legs(max_legs, events):
    race = StallRace(next_index=10, max_legs=max_legs)
    forwarded_from: set[int] = set()
    started = 1
    for kind, leg, right_index in events:
        if kind == "start":
            try:
                race.continuation_started()
            except RuntimeError:
                continue
            started += 1
        elif kind == "none_free":
            race.continuation_not_started()
        elif kind == "suspect":
            race.suspect(leg)
        elif kind == "fail":
            race.failed(leg)
        else:
            deciding = not race.done
            decision = race.message(leg, 10 if right_index else 11)
            if decision.action == FORWARD:
                assert decision.from_index == 10
                assert right_index or not deciding  # the race is only won by delivering the next index
                forwarded_from.add(leg)
                assert set(decision.cancel).isdisjoint({leg})
        assert started <= max_legs
        assert race.done == (race.winner is not None)
    assert len(forwarded_from) <= 1  # tokens of one leg only: exactly once, in order


# ---- synthetic traces -----------------------------------------------------------------------------------------
@dataclass
class Shape:
    """How a simulated replica produces tokens."""

    token_s: float = 0.02
    jitter: float = 0.5  # per-token delay uniform in token_s x [1 - jitter, 1 + jitter]
    pause_every_s: float | None = None  # replica-wide pause of pause_s starting every pause_every_s
    pause_s: float = 0.1
    ttft_base_s: float = 0.02
    prefill_s_per_char: float = 4e-5  # 32 k chars -> 1.3 s of prefill
    slow: float = 1.0  # multiplies everything (case b)
    merge_probability: float = 0.05  # the gateway reads two tokens as one message (sessions merge them)
    freeze_at: float | None = None  # every stream goes silent from then on (case d)


@dataclass
class TraceResult:
    messages: int = 0
    first_tokens: int = 0
    gap_violations: int = 0
    first_token_violations: int = 0
    closest_call: float = 0.0  # the largest waited / deadline of any message: how near a false alarm came
    gap_deadlines: list[float] = field(default_factory=list)
    first_token_deadlines: list[float] = field(default_factory=list)
    # case d: per stream mid-request when the freeze hit, (last message time, armed deadline)
    frozen_mid_stream: list[tuple[float, float]] = field(default_factory=list)
    frozen_before_first: list[tuple[float, float]] = field(default_factory=list)


def stream_events(shape: Shape, rng: random.Random, stream: int, duration: float):
    """One stream slot's requests back to back: ("send", t, stream, chars) and ("msg", t, stream, first, last)."""
    t = rng.uniform(0.0, 0.5)
    pauses_passed = 0

    def pause_delay(start: float, end: float) -> float:
        # A replica-wide pause beginning within (start, end] stops this stream too: the emission moves by pause_s.
        nonlocal pauses_passed
        if shape.pause_every_s is None:
            return 0.0
        added = 0.0
        while (pauses_passed + 1) * shape.pause_every_s <= end + added:
            at = (pauses_passed + 1) * shape.pause_every_s
            pauses_passed += 1
            if at > start:
                added += shape.pause_s
        return added

    while t < duration:
        chars = int(math.exp(rng.uniform(math.log(50), math.log(32_000))))
        yield ("send", t, stream, chars)
        ttft = (shape.ttft_base_s + shape.prefill_s_per_char * chars) * shape.slow * rng.uniform(0.7, 1.3)
        first_at = t + ttft
        first_at += pause_delay(t, first_at)
        tokens = rng.randint(20, 120)
        times = [first_at]
        for _ in range(tokens - 1):
            step = shape.token_s * shape.slow * rng.uniform(1 - shape.jitter, 1 + shape.jitter)
            nxt = times[-1] + step
            nxt += pause_delay(times[-1], nxt)
            times.append(nxt)
        messages = [times[0]]
        k = 1
        while k < len(times):
            if rng.random() < shape.merge_probability and k + 1 < len(times):
                k += 1  # the next two tokens arrive as one message, at the later one's time
            messages.append(times[k])
            k += 1
        for k, at in enumerate(messages):
            yield ("msg", at, stream, k == 0, k == len(messages) - 1)
        t = messages[-1]


def run_trace(shape: Shape, seed: int, duration: float = 60.0, streams: int = 30, first_token_timeout_s: float = 10.0,
              **overrides) -> TraceResult:
    """Replay 30 concurrent streams of one replica through StallDeadlines in time order, as the request path
    would: arm each stream's watchdog with the deadline in force after its previous message (or at the send, for
    the first token) and count every message arriving after it."""
    rng = random.Random(seed)
    clock = FakeClock(0.0)  # simulated seconds
    deadlines = StallDeadlines(DeadlineConfig.from_timeouts(first_token_timeout_s, 5.0, **overrides), clock)
    order = 0
    heap = []
    for s in range(streams):
        for event in stream_events(shape, random.Random(rng.random()), s, duration):
            if shape.freeze_at is not None and event[1] >= shape.freeze_at:
                break
            order += 1
            heap.append((event[1], order, event))
    heapq.heapify(heap)
    result = TraceResult()
    armed: dict[int, tuple[float, float, bool, int]] = {}  # stream -> (waiting since, deadline, first?, chars)
    while heap:
        at, _, event = heapq.heappop(heap)
        clock.t = at
        stream = event[2]
        if event[0] == "send":
            chars = event[3]
            deadline = deadlines.first_token_deadline("r1", chars)
            result.first_token_deadlines.append(deadline)
            armed[stream] = (at, deadline, True, chars)
            continue
        last = event[4]
        since, deadline, waiting_first, chars = armed.pop(stream)
        waited = at - since
        result.messages += 1
        result.closest_call = max(result.closest_call, waited / deadline)
        if waiting_first:
            result.first_tokens += 1
            result.first_token_violations += waited > deadline
            deadlines.record_first_token("r1", waited, chars)
        else:
            result.gap_violations += waited > deadline
            deadlines.record_gap("r1", waited)
        if not last:
            deadline = deadlines.inter_token_deadline("r1")
            result.gap_deadlines.append(deadline)
            armed[stream] = (at, deadline, False, chars)
    for since, deadline, waiting_first, _ in armed.values():  # streams the freeze caught
        (result.frozen_before_first if waiting_first else result.frozen_mid_stream).append((since, deadline))
    return result


def adapted(deadlines: list[float]) -> list[float]:
    """The deadlines in force after the first 5 s (warm-up at the ceiling excluded)."""
    return deadlines[len(deadlines) // 12:]


# Each trace is a minute of 30 streams (~0.3 s of CPU): `make test-fast` runs the first seed, `make test` all three.
SEEDS = (1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow))


@pytest.mark.parametrize("seed", SEEDS)
def test_trace_a_jitter_plus_minus_50_percent_no_false_alarm(seed):
    result = run_trace(Shape(token_s=0.02, jitter=0.5), seed)
    assert result.messages > 60_000  # 30 streams x ~45 messages/s x 60 s
    assert (result.gap_violations, result.first_token_violations) == (0, 0)
    late = adapted(result.gap_deadlines)
    assert max(late) <= 0.3  # tight: a freeze here would be caught within 300 ms
    assert min(late) >= 0.2


@pytest.mark.parametrize("seed", SEEDS)
def test_trace_b_uniformly_10x_slower_no_false_alarm(seed):
    # Prefill is 10x slower too: a 32 k-char prompt takes up to 17 s to its first token, beyond a 10 s fixed
    # timeout, so this replica's operator runs with 30 s (the ceiling; the adaptive limit is what is tested).
    result = run_trace(Shape(token_s=0.02, jitter=0.5, slow=10.0), seed, first_token_timeout_s=30.0)
    assert result.messages > 5_000
    assert (result.gap_violations, result.first_token_violations) == (0, 0)
    late = adapted(result.gap_deadlines)
    # 200 ms +/- 50 % (merged messages up to 600 ms): p99 x 3 + 50 ms, well below the 5 s ceiling.
    assert min(late) >= 0.9
    assert max(late) <= 2.5


@pytest.mark.parametrize("seed", SEEDS)
def test_trace_c_100ms_pause_every_second_no_false_alarm(seed):
    result = run_trace(Shape(token_s=0.02, jitter=0.5, pause_every_s=1.0, pause_s=0.1), seed)
    assert result.messages > 50_000
    assert (result.gap_violations, result.first_token_violations) == (0, 0)
    late = adapted(result.gap_deadlines)
    # The ~2 % of gaps that span a pause (~110-130 ms) set the p99: x3 + 50 ms.
    assert min(late) >= 0.35
    assert max(late) <= 0.6


def test_trace_counts_false_alarms_of_a_deadline_that_is_too_tight():
    # The same pausing replica as (c) judged by the bare p99 (no factor, margin or floor): the pauses and the
    # long prefills now trip it, so the zero counts above are a real result, not a blind harness.
    result = run_trace(Shape(token_s=0.02, jitter=0.5, pause_every_s=1.0, pause_s=0.1), 1, gap_factor=1.0,
                       gap_margin_s=0.0, gap_floor_s=0.0, ttft_factor=1.0, ttft_floor_s=0.0)
    assert result.gap_violations > 100
    assert result.first_token_violations > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_trace_d_freeze_detected_well_within_a_second(seed):
    freeze_at = 30.0
    result = run_trace(Shape(token_s=0.02, jitter=0.5, freeze_at=freeze_at), seed)
    assert (result.gap_violations, result.first_token_violations) == (0, 0)  # no false alarm before the freeze
    assert len(result.frozen_mid_stream) >= 20  # most of the 30 streams were mid-request
    continuation_ttft = 0.06  # another replica's first token for the resumed request, generously
    worst_client_gap = 0.0
    for last_message_at, deadline in result.frozen_mid_stream:
        detected_at = last_message_at + deadline
        assert detected_at - freeze_at <= 0.3  # suspected within 300 ms of the freeze
        race = StallRace(next_index=1)
        assert race.suspect(0).action == START_CONTINUATION
        leg = race.continuation_started()
        decision = race.message(leg, 1)  # the frozen leg never speaks again
        assert (decision.action, decision.cancel) == (FORWARD, (0,))
        worst_client_gap = max(worst_client_gap, detected_at + continuation_ttft - last_message_at)
    assert worst_client_gap <= 0.4  # issue 14: <= 1.0 s between two tokens, continuation included
    # The others were waiting for a first token: judged by the first-token deadline (1 s floor), see the docs.
    assert len(result.frozen_mid_stream) + len(result.frozen_before_first) == 30
    assert all(deadline >= 1.0 for _, deadline in result.frozen_before_first)
