"""Property tests of the core's merge rule against a tiny pure-Python model, and of its input robustness."""

from __future__ import annotations

from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from llmgw._core.codec import ALIVE, DEAD, LEFT, SUSPECT
from llmgw._core.swim import MEMBER_FIELDS, outranks
from llmgw.gossip.testing import BASE_INC, gossip, make, upd

STATES = [ALIVE, SUSPECT, DEAD, LEFT]
NAMES = {"alive": ALIVE, "suspect": SUSPECT, "dead": DEAD, "left": LEFT}
RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 2}


def model_wins(new: tuple[int, int], cur: tuple[int, int]) -> bool:
    """The rule, stated plainly: higher incarnation wins; at equal incarnation DEAD == LEFT > SUSPECT > ALIVE."""
    if new[0] != cur[0]:
        return new[0] > cur[0]
    return RANK[new[1]] > RANK[cur[1]]


rumours = st.lists(st.tuples(st.integers(0, 6), st.sampled_from(STATES)), max_size=40)


@given(st.integers(0, 2**64 - 1), st.sampled_from(STATES), st.integers(0, 2**64 - 1), st.sampled_from(STATES))
def test_outranks_is_the_model(a_inc, a_state, b_inc, b_state):
    assert outranks(a_inc, a_state, b_inc, b_state) == model_wins((a_inc, a_state), (b_inc, b_state))


@settings(max_examples=examples(150), deadline=None)
@given(rumours)
def test_member_table_follows_the_merge_model(seq):
    node = make("observer")
    gossip(node, "m", [upd("m", ALIVE, BASE_INC)])
    model = (BASE_INC, ALIVE)
    for delta, state in seq:
        u = (BASE_INC + delta, state)
        gossip(node, "rumourer", [upd("m", state, u[0], reporter="rumourer")])
        if model_wins(u, model):
            model = u
        row = node.member("m")
        assert (row[5], RANK[NAMES[row[4]]]) == (model[0], RANK[model[1]])
        if model[1] in (DEAD, LEFT):
            assert NAMES[row[4]] in (DEAD, LEFT)
        else:
            assert NAMES[row[4]] == model[1]


@settings(max_examples=examples(150), deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.sampled_from(STATES), st.binary(max_size=3), st.booleans()),
                max_size=40))
def test_app_meta_follows_the_same_merge_model_as_the_other_metadata(seq):
    """The app_meta held is the winning rumour's, or the member's own ALIVE word at the incarnation held while
    it is live; the same holds for every other metadata field (max_capacity stands for them)."""
    node = make("observer")
    gossip(node, "m", [upd("m", ALIVE, BASE_INC, app_meta=b"start", max_capacity=1)])
    model = (BASE_INC, ALIVE)
    meta = (b"start", 1)
    for i, (delta, state, blob, from_owner) in enumerate(seq):
        u = (BASE_INC + delta, state)
        gossip(node, "m" if from_owner else "rumourer",
               [upd("m", state, u[0], reporter="" if from_owner else "rumourer", app_meta=blob, max_capacity=i + 2)])
        if model_wins(u, model):
            model, meta = u, (blob, i + 2)
        elif from_owner and state == ALIVE and u[0] == model[0] and model[1] in (ALIVE, SUSPECT):
            meta = (blob, i + 2)
        row = node.member("m")
        assert (row[MEMBER_FIELDS.index("app_meta")], row[MEMBER_FIELDS.index("max_capacity")]) == meta


@settings(max_examples=examples(150), deadline=None)
@given(st.integers(0, 10), rumours)
def test_self_refutation_model(start, seq):
    """Hearing itself SUSPECT/DEAD/LEFT at incarnation >= its own, a node moves to rumoured + 1; else nothing."""
    node = make("me", incarnation=BASE_INC + start)
    own = BASE_INC + start
    for delta, state in seq:
        inc = BASE_INC + delta
        gossip(node, "other", [upd("me", state, inc, reporter="other")])
        if state == ALIVE:
            if inc > own:
                own = inc + 1
        elif inc >= own:
            own = inc + 1
        assert node.incarnation == own
        assert node.local_member()[4] == "alive"


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=1500))
def test_arbitrary_bytes_never_raise_and_known_members_stay_listed(data):
    node = make("x")
    gossip(node, "y", [upd("y")])
    before = node.members()
    node.handle_datagram(data, "1.2.3.4:5", 0.0)
    node.drain_outgoing()
    after = node.members()
    # Random bytes can, rarely, be a valid message; they must never make a known member non-alive at once.
    assert [r[0] for r in before] == [r[0] for r in after][: len(before)]
