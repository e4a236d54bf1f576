"""Hedging policy: delays (explicit, fixed, adaptive p95), the token-bucket budget, stats."""

from __future__ import annotations

import math

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from support_clock import FakeClock

from llmgw.policy.hedging import HEDGE_CANCELLED, HEDGE_LOST, HEDGE_WON, HedgeConfig, HedgePolicy


def test_default_is_off_except_explicit_hedges():
    policy = HedgePolicy(HedgeConfig(), FakeClock())
    assert policy.delay_for(False) is None
    assert policy.delay_for(True) == 0.0
    stats = policy.stats()
    assert (stats["requests"], stats["explicit_hedges"], stats["policy_hedges_issued"]) == (2, 1, 0)


def test_fixed_delay():
    policy = HedgePolicy(HedgeConfig(delay_s=0.1), FakeClock())
    assert policy.delay_for(False) == 0.1
    assert policy.delay_for(True) == 0.0


def test_explicit_hedges_do_not_spend_budget():
    policy = HedgePolicy(HedgeConfig(budget_initial=0.0), FakeClock())
    for _ in range(50):
        assert policy.delay_for(True) == 0.0
    # They still count as requests: 50 x 0.1 = 5 tokens for policy hedges.
    assert policy.budget_tokens() == pytest.approx(5.0)


def test_budget_ten_percent_exactly_despite_float_deposits():
    policy = HedgePolicy(HedgeConfig(delay_s=0.05, budget_ratio=0.1, budget_initial=0.0), FakeClock())
    granted = []
    for _ in range(100):
        policy.delay_for(False)
        granted.append(policy.try_acquire())
    # 0.1 deposited ten times is exactly one token (0.1 * 10 in floats is 0.9999999999999999).
    assert sum(granted) == 10
    assert granted.index(True) == 9
    stats = policy.stats()
    assert (stats["policy_hedges_issued"], stats["policy_hedges_denied"]) == (10, 90)


def test_budget_burst_caps_saved_tokens():
    policy = HedgePolicy(HedgeConfig(delay_s=0.05, budget_ratio=0.5, budget_burst=3, budget_initial=0), FakeClock())
    for _ in range(100):  # 50 tokens deposited, but only 3 can be saved
        policy.delay_for(False)
    assert policy.budget_tokens() == 3.0
    assert [policy.try_acquire() for _ in range(4)] == [True, True, True, False]


def test_initial_budget_allows_an_early_hedge():
    policy = HedgePolicy(HedgeConfig(delay_s=0.05), FakeClock())
    policy.delay_for(False)
    assert policy.try_acquire()  # default budget_initial = 1 token (+0.1 from this request)
    assert not policy.try_acquire()


def test_adaptive_delay_is_the_p95_after_enough_samples():
    clock = FakeClock()
    policy = HedgePolicy(HedgeConfig(delay_s=0.5, adaptive=True, adaptive_min_samples=20), clock)
    for i in range(19):
        policy.observe_ttft(0.001 * (i + 1))
    assert policy.delay_for(False) == 0.5  # too few samples: falls back to the fixed delay
    policy.observe_ttft(0.020)
    # 20 samples 1..20 ms: nearest-rank p95 = ceil(0.95 * 20) = 19th smallest.
    assert policy.delay_for(False) == pytest.approx(0.019)
    for _ in range(80):
        policy.observe_ttft(0.030)
    assert policy.delay_for(False) == pytest.approx(0.030)


def test_adaptive_delay_has_a_floor_and_falls_back_to_off():
    policy = HedgePolicy(HedgeConfig(adaptive=True, adaptive_min_samples=5, adaptive_floor_s=0.01), FakeClock())
    assert policy.delay_for(False) is None  # no fixed delay and no samples yet: no policy hedging
    for _ in range(5):
        policy.observe_ttft(0.0001)
    assert policy.delay_for(False) == 0.01


def test_adaptive_window_is_bounded_and_forgets_oldest():
    policy = HedgePolicy(HedgeConfig(adaptive=True, adaptive_window=10, adaptive_min_samples=10), FakeClock())
    for _ in range(10):
        policy.observe_ttft(5.0)
    for _ in range(10):
        policy.observe_ttft(0.2)
    assert policy.stats()["ttft_samples"] == 10
    assert policy.ttft_quantile(1.0) == 0.2


def test_adaptive_samples_age_out():
    clock = FakeClock()
    policy = HedgePolicy(
        HedgeConfig(delay_s=0.3, adaptive=True, adaptive_min_samples=3, adaptive_max_age_s=60), clock
    )
    for _ in range(3):
        policy.observe_ttft(0.1)
    assert policy.current_delay() == pytest.approx(0.1)
    clock.advance(60.5)
    assert policy.current_delay() == 0.3  # samples too old: back to the fixed delay
    assert policy.stats()["ttft_samples"] == 0


def test_outcomes_are_counted():
    policy = HedgePolicy(HedgeConfig(), FakeClock())
    for outcome in (HEDGE_WON, HEDGE_WON, HEDGE_LOST, HEDGE_CANCELLED):
        policy.record_outcome(outcome)
    stats = policy.stats()
    assert (stats["won"], stats["lost"], stats["cancelled"]) == (2, 1, 1)
    with pytest.raises(ValueError):
        policy.record_outcome("draw")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delay_s": -1},
        {"delay_s": math.nan},
        {"adaptive_quantile": 0},
        {"adaptive_quantile": 1.5},
        {"adaptive_window": 0},
        {"adaptive_min_samples": 0},
        {"adaptive_window": 10, "adaptive_min_samples": 11},
        {"budget_ratio": -0.1},
        {"budget_ratio": 2},
        {"budget_burst": 0.5},
        {"budget_initial": 11},
        {"adaptive_max_age_s": 0},
    ],
)
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        HedgeConfig(**kwargs)


def test_bad_input_is_rejected():
    policy = HedgePolicy(HedgeConfig(), FakeClock())
    with pytest.raises(TypeError):
        policy.delay_for("yes")
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError):
            policy.observe_ttft(bad)
    with pytest.raises(ValueError):
        policy.observe_ttft(None)
    with pytest.raises(ValueError):
        policy.ttft_quantile(0)


# ---- properties ----------------------------------------------------------------------------------------------------
@settings(max_examples=examples(200), deadline=None)
@given(
    ratio=st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.2, 1 / 3, 0.5, 1.0]),
    burst=st.integers(1, 20),
    initial_frac=st.floats(0, 1),
    events=st.lists(st.sampled_from(["request", "explicit", "hedge"]), max_size=300),
)
def test_policy_hedges_never_exceed_the_budget(ratio, burst, initial_frac, events):
    initial = initial_frac * burst
    policy = HedgePolicy(
        HedgeConfig(delay_s=0.1, budget_ratio=ratio, budget_burst=burst, budget_initial=initial), FakeClock()
    )
    requests = issued = 0
    for event in events:
        if event == "hedge":
            issued += policy.try_acquire()
        else:
            policy.delay_for(event == "explicit")
            requests += 1
        # The bucket bound, with a hair of slack only for the micro-token rounding of the ratio.
        assert issued <= initial + ratio * requests + 1e-6 * (requests + 1)
        assert 0 <= policy.budget_tokens() <= burst
    assert policy.stats()["policy_hedges_issued"] == issued


@settings(max_examples=examples(100), deadline=None)
@given(samples=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=80), q=st.floats(0.01, 1))
def test_quantile_matches_a_sorted_list_model(samples, q):
    window = 50
    policy = HedgePolicy(HedgeConfig(adaptive=True, adaptive_window=window, adaptive_min_samples=1), FakeClock())
    for s in samples:
        policy.observe_ttft(s)
    recent = sorted(samples[-window:])
    assert policy.ttft_quantile(q) == recent[max(0, math.ceil(q * len(recent)) - 1)]
