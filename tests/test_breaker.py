"""Circuit breaker board: trip rules, cooldown/half-open cycle, slow-but-alive ejection, the ejection cap."""

from __future__ import annotations

import math

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from support_clock import FakeClock

from llmgw.policy.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    REASON_CONSECUTIVE,
    REASON_COOLDOWN,
    REASON_FAILURE_RATE,
    REASON_PROBE_FAILED,
    REASON_PROBE_OK,
    REASON_PROBE_SLOW_ITL,
    REASON_SLOW_ITL,
    REASON_SLOW_TTFT,
    BreakerBoard,
    BreakerConfig,
)
from llmgw.policy.outliers import LatencyOutliers, OutlierConfig


def make_board(replicas=("a", "b", "c"), config: BreakerConfig | None = None):
    clock = FakeClock(100.0)
    changes: list[tuple[str, str, str, str]] = []
    board = BreakerBoard(config or BreakerConfig(), clock, on_change=lambda *c: changes.append(c))
    board.set_replicas(replicas)
    return board, clock, changes


def trip_by_failures(board: BreakerBoard, rid: str, n: int = 5) -> None:
    for _ in range(n):
        board.record_failure(rid, "error")


# ---- trip rules ---------------------------------------------------------------------------------------------------
def test_new_replica_is_closed_and_allowed():
    board, _, changes = make_board()
    assert board.state("a") == CLOSED
    assert board.allow("a") and board.available("a")
    assert board.state("never-seen") == CLOSED
    assert changes == []


def test_opens_on_fifth_consecutive_failure():
    board, _, changes = make_board()
    trip_by_failures(board, "a", 4)
    assert board.state("a") == CLOSED
    board.record_failure("a", "timeout")
    assert board.state("a") == OPEN
    assert not board.allow("a") and not board.available("a")
    assert board.open_replicas() == ["a"]
    assert changes == [("a", CLOSED, OPEN, REASON_CONSECUTIVE)]
    assert board.snapshot()["replicas"]["a"]["last_failure_kind"] == "timeout"


def test_success_resets_consecutive_count():
    # Rate rule out of the way (threshold 100 %): only the consecutive rule is exercised.
    board, _, _ = make_board(config=BreakerConfig(failure_rate_threshold=1.0))
    for _ in range(3):
        trip_by_failures(board, "a", 4)
        board.record_success("a")
    assert board.state("a") == CLOSED
    assert board.snapshot()["replicas"]["a"]["consecutive_failures"] == 0
    trip_by_failures(board, "a", 5)
    assert board.state("a") == OPEN


def test_mostly_failing_replica_trips_on_rate_even_without_a_run_of_five():
    board, _, changes = make_board()
    for _ in range(3):
        trip_by_failures(board, "a", 4)
        board.record_success("a")
    assert changes == [("a", CLOSED, OPEN, REASON_FAILURE_RATE)]


def test_failure_rate_needs_a_full_window_and_more_than_half():
    board, _, changes = make_board()
    pattern = [True, True, False] * 4  # failures never 3 in a row
    for i, failed in enumerate(pattern[:9]):
        board.record_failure("a") if failed else board.record_success("a")
        assert board.state("a") == CLOSED, f"opened after only {i + 1} outcomes"
    board.record_failure("a")  # 10th outcome: 7 failures of 10
    assert board.state("a") == OPEN
    assert changes == [("a", CLOSED, OPEN, REASON_FAILURE_RATE)]


def test_exactly_half_failing_never_trips():
    board, _, _ = make_board()
    for _ in range(30):
        board.record_failure("b")
        board.record_success("b")
    assert board.state("b") == CLOSED
    snap = board.snapshot()["replicas"]["b"]
    assert (snap["window_outcomes"], snap["window_failures"]) == (10, 5)


def test_smaller_min_window_trips_earlier():
    board, _, _ = make_board(config=BreakerConfig(min_window_outcomes=4, consecutive_failures=100))
    for failed in (True, False, True):
        board.record_failure("a") if failed else board.record_success("a")
    assert board.state("a") == CLOSED  # 2 of 3, below the minimum count
    board.record_failure("a")  # 3 of 4 > 50 %
    assert board.state("a") == OPEN


# ---- cooldown, half-open, probes --------------------------------------------------------------------------------
def test_cooldown_then_single_probe_then_close():
    board, clock, changes = make_board()
    trip_by_failures(board, "a")
    clock.advance(4.999)
    assert board.state("a") == OPEN and not board.allow("a")
    clock.advance(0.001)
    assert board.available("a")  # free probe slot, nothing reserved yet
    assert board.allow("a")  # reserves the probe
    assert board.state("a") == HALF_OPEN
    assert not board.allow("a") and not board.available("a")  # exactly one probe at a time
    board.record_success("a", 0.01, 0.01)
    assert board.state("a") == CLOSED and board.allow("a")
    assert changes == [
        ("a", CLOSED, OPEN, REASON_CONSECUTIVE),
        ("a", OPEN, HALF_OPEN, REASON_COOLDOWN),
        ("a", HALF_OPEN, CLOSED, REASON_PROBE_OK),
    ]
    # A fresh start: the old failures are gone, so 4 new ones do not trip.
    trip_by_failures(board, "a", 4)
    assert board.state("a") == CLOSED


def test_failed_probe_reopens_with_doubled_cooldown_capped_and_reset_on_close():
    board, clock, changes = make_board()
    trip_by_failures(board, "a")
    cooldowns = [board.snapshot()["replicas"]["a"]["cooldown_s"]]
    for _ in range(3):
        clock.advance(cooldowns[-1])
        assert board.allow("a")
        board.record_failure("a", "error")
        assert board.state("a") == OPEN
        cooldowns.append(board.snapshot()["replicas"]["a"]["cooldown_s"])
    assert cooldowns == [5.0, 10.0, 10.0, 10.0]  # doubling, capped by max_cooldown_s
    assert changes[-1] == ("a", HALF_OPEN, OPEN, REASON_PROBE_FAILED)
    clock.advance(9.9)
    assert not board.allow("a")
    clock.advance(0.1)
    assert board.allow("a")
    board.record_success("a")
    assert board.state("a") == CLOSED
    trip_by_failures(board, "a")
    assert board.snapshot()["replicas"]["a"]["cooldown_s"] == 5.0


def test_release_frees_the_probe_slot():
    board, clock, _ = make_board()
    trip_by_failures(board, "a")
    clock.advance(5)
    assert board.allow("a")
    assert not board.allow("a")
    board.release("a")
    assert board.state("a") == HALF_OPEN
    assert board.allow("a")
    board.release("unknown")  # harmless


def test_lost_probe_slot_is_freed_after_probe_timeout():
    board, clock, _ = make_board(config=BreakerConfig(probe_timeout_s=30))
    trip_by_failures(board, "a")
    clock.advance(5)
    assert board.allow("a")
    clock.advance(29.9)
    assert not board.allow("a")
    clock.advance(0.1)
    assert board.allow("a")


def test_outcomes_while_open_and_stale_outcomes_do_not_decide():
    board, clock, _ = make_board()
    started_before_trip = clock()
    clock.advance(1)
    trip_by_failures(board, "a")
    board.record_success("a", started_at=started_before_trip)  # late success of an in-flight request
    assert board.state("a") == OPEN
    clock.advance(5)
    probe_started = clock()
    assert board.allow("a")
    board.record_success("a", started_at=started_before_trip)
    board.record_failure("a", started_at=started_before_trip)
    assert board.state("a") == HALF_OPEN  # neither late outcome was the probe's
    board.record_success("a", started_at=probe_started)
    assert board.state("a") == CLOSED


# ---- slow but alive -----------------------------------------------------------------------------------------------
def feed(board: BreakerBoard, rid: str, n: int, ttft: float, itl: float) -> None:
    for _ in range(n):
        board.record_success(rid, ttft, itl)


def test_replica_ten_times_slower_per_token_is_ejected_without_errors():
    board, _, changes = make_board()
    feed(board, "a", 5, 0.02, 0.01)
    feed(board, "b", 5, 0.02, 0.01)
    feed(board, "c", 4, 0.02, 0.10)
    assert board.state("c") == CLOSED  # 4 samples: below min_samples
    board.record_success("c", 0.02, 0.10)
    assert board.state("c") == OPEN
    assert changes == [("c", CLOSED, OPEN, REASON_SLOW_ITL)]
    assert board.snapshot()["replicas"]["c"]["failures"] == 0


def test_slow_ttft_is_ejected():
    board, _, changes = make_board()
    feed(board, "a", 5, 0.03, 0.01)
    feed(board, "b", 5, 0.03, 0.01)
    feed(board, "c", 5, 0.5, 0.01)
    assert changes == [("c", CLOSED, OPEN, REASON_SLOW_TTFT)]


def test_uniformly_slow_cluster_ejects_nobody():
    board, _, changes = make_board()
    for _ in range(20):
        for rid in ("a", "b", "c"):
            board.record_success(rid, 2.0, 0.5)
    assert changes == [] and board.open_replicas() == []


def test_tiny_absolute_differences_stay_below_the_floor():
    board, _, changes = make_board()
    feed(board, "a", 10, 0.001, 0.001)
    feed(board, "b", 10, 0.001, 0.001)
    feed(board, "c", 10, 0.04, 0.015)  # 40x and 15x slower, yet under the 50 ms / 20 ms floors
    assert changes == []


def test_moderately_slower_replica_is_not_ejected():
    board, _, changes = make_board()
    feed(board, "a", 10, 0.1, 0.05)
    feed(board, "b", 10, 0.1, 0.05)
    feed(board, "c", 10, 0.25, 0.14)  # 2.5x / 2.8x: under the 3x ratio
    assert changes == []


def test_slow_replica_is_taken_back_once_its_probe_is_fast():
    board, clock, changes = make_board()
    feed(board, "a", 5, 0.02, 0.01)
    feed(board, "b", 5, 0.02, 0.01)
    feed(board, "c", 5, 0.02, 0.10)
    assert board.state("c") == OPEN
    clock.advance(5)
    assert board.allow("c")
    board.record_success("c", 0.02, 0.10)  # still slow: judged again against the median
    assert board.state("c") == OPEN
    assert changes[-1] == ("c", HALF_OPEN, OPEN, REASON_PROBE_SLOW_ITL)
    clock.advance(10)
    assert board.allow("c")
    board.record_success("c", 0.02, 0.011)  # recovered
    assert board.state("c") == CLOSED
    feed(board, "c", 20, 0.02, 0.011)
    assert board.state("c") == CLOSED  # the pre-recovery EWMA does not come back to haunt it


def test_slow_detection_can_be_disabled():
    board, _, changes = make_board(config=BreakerConfig(slow_detection=False))
    feed(board, "a", 5, 0.02, 0.01)
    feed(board, "b", 5, 0.02, 0.01)
    feed(board, "c", 10, 0.02, 0.5)
    assert changes == []


# ---- never take the whole cluster away ----------------------------------------------------------------------------
def test_ejection_cap_limits_open_replicas_to_half():
    board, clock, _ = make_board(("a", "b", "c", "d"))
    for rid in ("a", "b", "c"):
        trip_by_failures(board, rid)
    assert board.open_replicas() == ["a", "b"]
    assert board.state("c") == CLOSED
    assert board.snapshot()["suppressed_trips"] == 1
    assert board.max_ejected() == 2
    # Once one comes back, the next bad replica may be ejected.
    clock.advance(5)
    assert board.allow("a")
    board.record_success("a")
    board.record_failure("c")
    assert board.state("c") == OPEN


def test_single_replica_and_two_replica_clusters():
    board, _, _ = make_board(("only",))
    trip_by_failures(board, "only", 20)
    assert board.state("only") == CLOSED and board.max_ejected() == 0
    board, _, _ = make_board(("a", "b"))
    trip_by_failures(board, "a")
    trip_by_failures(board, "b")
    assert board.open_replicas() == ["a"]


def test_failed_probe_may_reopen_even_at_the_cap():
    board, clock, _ = make_board(("a", "b"))
    trip_by_failures(board, "a")
    clock.advance(5)
    assert board.allow("a")
    board.record_failure("a")
    assert board.state("a") == OPEN


# ---- membership, snapshot, robustness -----------------------------------------------------------------------------
def test_set_replicas_and_forget():
    board, _, _ = make_board(("a", "b", "c"))
    trip_by_failures(board, "a")
    board.set_replicas(["b", "c", "d"])
    assert board.state("a") == CLOSED  # forgotten: a rejoining "a" starts fresh
    assert set(board.snapshot()["replicas"]) == {"b", "c", "d"}
    board.forget("b")
    board.forget("never-known")
    assert set(board.snapshot()["replicas"]) == {"c", "d"}


def test_snapshot_shape():
    board, clock, _ = make_board()
    board.record_success("a", 0.05, 0.01)
    trip_by_failures(board, "b")
    clock.advance(2)
    snap = board.snapshot()
    b = snap["replicas"]["b"]
    assert b["state"] == OPEN and b["reason"] == REASON_CONSECUTIVE
    assert b["reopens_in_s"] == pytest.approx(3.0)
    assert b["since_s"] == pytest.approx(2.0)
    assert snap["replicas"]["a"]["ttft_ewma_s"] == pytest.approx(0.05)
    assert snap["replicas"]["a"]["ttft_samples"] == 1
    assert (snap["ejected"], snap["max_ejected"]) == (1, 1)


def test_faulty_change_callback_does_not_break_the_board(caplog):
    def boom(*_):
        raise RuntimeError("observer bug")

    board = BreakerBoard(BreakerConfig(), FakeClock(100.0), on_change=boom)
    board.set_replicas(["a", "b"])
    trip_by_failures(board, "a")
    assert board.state("a") == OPEN
    assert "change callback failed" in caplog.text


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda b: b.allow(""), ValueError),
        (lambda b: b.allow(None), ValueError),
        (lambda b: b.record_failure("a", ""), ValueError),
        (lambda b: b.record_success("a", -1.0), ValueError),
        (lambda b: b.record_success("a", 0.1, math.nan), ValueError),
        (lambda b: b.record_success("a", "fast"), TypeError),
        (lambda b: b.set_replicas(["a", ""]), ValueError),
    ],
)
def test_bad_input_is_rejected_clearly(call, error):
    board, _, _ = make_board()
    with pytest.raises(error):
        call(board)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_size": 0},
        {"min_window_outcomes": 11},
        {"consecutive_failures": 0},
        {"failure_rate_threshold": 1.5},
        {"cooldown_s": 0},
        {"cooldown_multiplier": 0.5},
        {"max_cooldown_s": 1.0},
        {"max_ejection_fraction": -0.1},
        {"probe_timeout_s": math.inf},
    ],
)
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        BreakerConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"ratio": 1.0}, {"min_samples": 0}, {"ewma_alpha": 0}, {"itl_floor_s": -1}])
def test_bad_outlier_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        OutlierConfig(**kwargs)


def test_outlier_ewma_and_peer_median():
    out = LatencyOutliers(OutlierConfig(ewma_alpha=0.5, min_samples=2))
    out.observe("a", 1.0, None)
    out.observe("a", 3.0, None)
    assert out.ewma("a", "ttft") == (2.0, 2)
    assert out.ewma("a", "itl") == (0.0, 0)
    out.observe("b", 0.2, None)
    assert out.peer_median("a", "ttft") is None  # b has too few samples to count as a peer
    out.observe("b", 0.2, None)
    out.observe("c", 0.4, None)
    out.observe("c", 0.4, None)
    assert out.peer_median("a", "ttft") == pytest.approx(0.3)
    assert out.slow_metric("a") == "ttft"


# ---- properties ----------------------------------------------------------------------------------------------------
def model_trip_index(outcomes, window, min_outcomes, consecutive, threshold):
    """Straightforward re-computation: index of the outcome that trips a closed breaker, or None."""
    run = 0
    for i, failed in enumerate(outcomes):
        run = run + 1 if failed else 0
        recent = outcomes[max(0, i + 1 - window): i + 1]
        if failed and (run >= consecutive or (len(recent) >= min_outcomes and sum(recent) > threshold * len(recent))):
            return i
    return None


@settings(max_examples=examples(200), deadline=None)
@given(
    outcomes=st.lists(st.booleans(), max_size=60),
    window=st.integers(1, 12),
    min_frac=st.floats(0, 1),
    consecutive=st.integers(1, 8),
    threshold=st.sampled_from([0.0, 0.25, 0.5, 0.6, 0.75, 1.0]),
)
def test_window_arithmetic_matches_model(outcomes, window, min_frac, consecutive, threshold):
    min_outcomes = max(1, round(min_frac * window))
    cfg = BreakerConfig(
        window_size=window,
        min_window_outcomes=min_outcomes,
        consecutive_failures=consecutive,
        failure_rate_threshold=threshold,
        slow_detection=False,
    )
    board, _, changes = make_board(("a", "b", "c"), cfg)
    expected = model_trip_index(outcomes, window, min_outcomes, consecutive, threshold)
    for i, failed in enumerate(outcomes):
        board.record_failure("a") if failed else board.record_success("a")
        should_be_open = expected is not None and i >= expected
        assert board.state("a") == (OPEN if should_be_open else CLOSED), (i, expected)
    assert len(changes) == (0 if expected is None else 1)


@settings(max_examples=examples(150), deadline=None)
@given(
    n_replicas=st.integers(1, 7),
    fraction=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    ops=st.lists(
        # (replica, op, repeats): runs of the same op make trips reachable in few steps.
        st.tuples(
            st.integers(0, 5),
            st.sampled_from(["fail", "fail", "ok", "slow", "allow", "allow", "release", "wait", "wait"]),
            st.integers(1, 7),
        ),
        max_size=40,
    ),
)
def test_never_ejects_more_than_the_cap_and_probes_are_exclusive(n_replicas, fraction, ops):
    ids = [f"r{i}" for i in range(n_replicas)]
    board, clock, _ = make_board(ids, BreakerConfig(max_ejection_fraction=fraction, probe_timeout_s=1e6))
    cap = math.floor(fraction * n_replicas + 1e-9)
    probes_out: dict[str, int] = {}
    for index, op, repeats in ops:
        for _ in range(repeats):
            apply_op(board, clock, ids[index % n_replicas], op, probes_out)
            assert len(board.open_replicas()) <= cap
            # Without release() or an outcome, a half-open replica hands out at most one probe (the probe timeout
            # is set out of reach above).
            assert all(v <= 1 for v in probes_out.values())


def apply_op(board, clock, rid, op, probes_out):
    if op == "fail":
        board.record_failure(rid)
    elif op == "ok":
        board.record_success(rid, 0.01, 0.01)
    elif op == "slow":
        board.record_success(rid, 1.0, 0.5)
    elif op == "allow":
        was_half_open = board.state(rid) == HALF_OPEN
        if board.allow(rid) and was_half_open:
            probes_out[rid] = probes_out.get(rid, 0) + 1
    elif op == "release":
        board.release(rid)
        probes_out.pop(rid, None)
    else:
        clock.advance(5.0)
    for other in list(probes_out):
        if board.state(other) != HALF_OPEN:
            probes_out.pop(other)


@settings(max_examples=examples(150), deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["fail", "ok", "slow", "allow", "release", "wait"]), st.integers(1, 6)),
        max_size=30,
    )
)
def test_one_replica_hands_out_one_probe_at_a_time(ops):
    board, clock, _ = make_board(("r0", "r1"), BreakerConfig(probe_timeout_s=1e6))
    probes_out: dict[str, int] = {}
    for op, repeats in ops:
        for _ in range(repeats):
            apply_op(board, clock, "r0", op, probes_out)
            assert probes_out.get("r0", 0) <= 1
