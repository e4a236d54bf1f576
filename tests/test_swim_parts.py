"""The core's single-idea parts: Lifeguard suspicion timer, local health awareness, dissemination queue."""

from __future__ import annotations

import math

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from llmgw._core.awareness import Awareness
from llmgw._core.broadcast import BroadcastQueue
from llmgw._core.codec import Update
from llmgw._core.suspicion import Suspicion


def test_suspicion_shrinks_logarithmically_to_min():
    s = Suspicion(7, 100.0, 2.0, 12.0, 3, "r0")
    assert s.timeout() == 12.0 and s.deadline == 112.0 and s.confirmations() == 0
    assert not s.confirm("r0") and not s.confirm("")
    timeouts = [s.timeout()]
    for r in ("r1", "r2", "r3", "r4"):
        s.confirm(r)
        timeouts.append(s.timeout())
    assert timeouts[1] == pytest.approx(12.0 - 10.0 * math.log(2) / math.log(4))
    assert timeouts == sorted(timeouts, reverse=True)
    assert timeouts[3] == timeouts[4] == 2.0 and s.deadline == 102.0


def test_suspicion_without_expected_confirmations_is_min_at_once():
    assert Suspicion(1, 0.0, 3.0, 18.0, 0, "r").timeout() == 3.0
    assert Suspicion(1, 0.0, 3.0, 1.0, 2, "r").timeout() == 3.0  # max below min is raised to min
    with pytest.raises(ValueError):
        Suspicion(1, 0.0, -1.0, 1.0, 2, "r")


@given(st.integers(1, 12), st.lists(st.integers(-3, 3), max_size=60))
def test_awareness_is_a_clamped_counter(max_mult, deltas):
    a = Awareness(max_mult)
    model = 0
    for d in deltas:
        a.apply(d)
        model = min(max(model + d, 0), max_mult - 1)
        assert a.score == model and a.scale() == 1.0 + model
    with pytest.raises(ValueError):
        Awareness(0)


ops = st.lists(st.one_of(st.tuples(st.just("push"), st.integers(0, 5), st.integers(1, 3)),
                         st.tuples(st.just("send"), st.integers(0, 8), st.integers(1, 4))), max_size=60)


@settings(max_examples=examples(200), deadline=None)
@given(ops)
def test_broadcast_queue_matches_model(operations):
    q = BroadcastQueue()
    model: dict[str, list] = {}  # member -> [transmits, order, mult]
    order = 0
    for op in operations:
        if op[0] == "push":
            _, member, mult = op
            order += 1
            q.push(Update(f"m{member}", "h:1"), mult)
            model[f"m{member}"] = [0, order, mult]
        else:
            _, fit, limit = op
            ranked = sorted(model, key=lambda m: (model[m][0], -model[m][1]))  # least-sent, then newest
            got = q.ordered()
            assert [b.update.member_id for b in got] == ranked
            n = min(fit, len(got))
            q.mark_sent(got, n, limit)
            for m in ranked[:n]:
                model[m][0] += 1
                if model[m][0] >= limit * model[m][2]:
                    del model[m]
        assert len(q) == len(model)
