"""Router: the routing policy over the ring and the picker, as the gateway and library users see it."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import llmgw.routing as routing
from llmgw.routing import Decision, HashRing, LeastConnectionsPicker, MemberState, Router

NAMES = [f"r{i}" for i in range(8)]
PROMPTS = [f"prompt number {i}: explain topic {i * 7}" for i in range(40)]


def router_with(n=4, **kwargs):
    router = Router(seed=1, **kwargs)
    for i in range(n):
        router.set_member(f"r{i}")
    return router


def test_public_surface():
    for name in ("Router", "Decision", "MemberState", "HashRing", "LeastConnectionsPicker"):
        assert name in routing.__all__ and hasattr(routing, name)
    assert HashRing is routing.HashRing and LeastConnectionsPicker is routing.LeastConnectionsPicker
    assert MemberState("suspect") is MemberState.SUSPECT and MemberState.ALIVE == "alive"


def test_affinity_is_sticky_and_keyed_on_the_prefix():
    router = router_with(prefix_chars=16)
    first = router.route("0123456789abcdef and then one thing")
    assert first.reason == "affinity" and first.member in router
    for tail in ("", " and then another", "x" * 1000):
        assert router.route("0123456789abcdef" + tail) == first
    assert router.affinity_hash("0123456789abcdefXYZ") == router.affinity_hash("0123456789abcdef")


def test_decision_is_immutable():
    decision = router_with().route("hi")
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.member = "other"  # type: ignore[misc]


def test_capacity_pushes_to_least_connections_then_none():
    router = Router(seed=3, balance=None)
    for m in ("a", "b", "c"):
        router.set_member(m, capacity=1)
    prompt = "a fixed prompt"
    owner = router.route(prompt).member
    router.set_load(owner, 1)
    d = router.route(prompt)
    # The ring walks on to the next member under capacity: still affinity, just not the first choice.
    assert d.reason == "affinity" and d.member != owner
    for m in ("a", "b", "c"):
        router.set_load(m, 1)
    assert router.route(prompt) == Decision(None, "none")


def test_bound_steers_affinity_and_falls_back_to_least_connections():
    # balance 1.0: bound = ceil((total + 1) / n).
    router = Router(seed=3, balance=1.0)
    for m in ("a", "b", "c"):
        router.set_member(m, capacity=10)
    router.set_load("a", 4)
    router.set_load("b", 4)
    router.set_load("c", 2)  # total 10, bound ceil(11/3) = 4: only c is under it
    assert router.ring.bound() == 4
    assert {router.route(p) for p in PROMPTS} == {Decision("c", "affinity")}
    router.set_load("c", 4)  # total 12, bound ceil(13/3) = 5: everyone under it, keys spread by affinity
    assert router.ring.bound() == 5
    spread = {router.route(p) for p in PROMPTS}
    assert {d.reason for d in spread} == {"affinity"} and {d.member for d in spread} == {"a", "b", "c"}
    # c is the only member under the bound but is at its hard capacity: the ring finds nobody, and
    # least-connections (which ignores the bound) picks among a and b.
    router.set_member("c", capacity=2)
    router.set_load("c", 2)  # total 10, bound 4
    fallback = {router.route(p) for p in PROMPTS}
    assert fallback == {Decision("a", "least_connections"), Decision("b", "least_connections")}
    router.set_load("a", 3)
    assert {router.route(p) for p in PROMPTS} == {Decision("a", "affinity")}


def test_least_connections_reason_when_ring_bound_blocks_and_alive_exists():
    router = Router(seed=5, balance=1.0)
    router.set_member("a", capacity=10)
    router.set_member("s", state="suspect", capacity=10)
    router.set_load("a", 5)  # bound = ceil(6 / 2) = 3: "a" over it, suspect "s" under it
    d = router.route("anything")
    # The ring will not hand the request to a suspect while an ALIVE member can take it; the fallback does.
    assert d == Decision("a", "least_connections")


def test_dead_members_leave_the_ring_and_only_their_keys_move():
    router = router_with(5)
    before = {p: router.route(p).member for p in PROMPTS}
    victim = before[PROMPTS[0]]
    router.set_member(victim, state=MemberState.DEAD)
    assert victim not in router.ring and victim in router
    after = {p: router.route(p).member for p in PROMPTS}
    for p in PROMPTS:
        assert after[p] == before[p] if before[p] != victim else after[p] != victim
    router.set_member(victim, state="alive")
    assert {p: router.route(p).member for p in PROMPTS} == before


def test_load_of_dead_member_is_kept_and_restored_to_the_ring():
    router = router_with(2)
    router.set_load("r0", 3)
    router.set_member("r0", state="dead")
    assert router.load("r0") == 3
    assert router.add_load("r0", -1) == 2
    router.set_member("r0", state="alive")
    assert router.ring.load("r0") == 2 == router.info("r0").load


def test_suspect_and_draining_and_exclude():
    router = router_with(3)
    prompt = PROMPTS[1]
    owner = router.route(prompt).member
    router.set_member(owner, state="suspect")
    d = router.route(prompt)
    assert d.reason == "affinity" and d.member != owner
    router.set_member(owner, state="alive", draining=True)
    assert router.route(prompt).member != owner
    router.set_member(owner)
    assert router.route(prompt).member == owner
    tried = [owner]
    second = router.route(prompt, exclude=tried)
    assert second.member not in tried
    everyone = router.members()
    assert router.route(prompt, exclude=everyone) == Decision(None, "none")


def test_only_suspects_left_still_routes():
    router = router_with(2)
    router.set_member("r0", state="suspect")
    router.set_member("r1", state="suspect")
    assert router.route("x").member in ("r0", "r1")
    router.set_member("r0", state="left")
    router.set_member("r1", state="dead")
    assert router.route("x") == Decision(None, "none")


def test_preference_list_alive_first_distinct_and_excluding():
    router = router_with(6)
    prompt = PROMPTS[2]
    full = router.preference_list(prompt, 6)
    assert sorted(full) == router.members()
    assert full[0] == router.route(prompt).member  # unloaded: the first choice is the affinity owner
    assert router.preference_list(prompt, 2) == full[:2]
    router.set_member(full[0], state="suspect")
    assert router.preference_list(prompt, 6) == full[1:] + full[:1]
    router.set_member(full[1], state="dead")
    router.set_member(full[2], draining=True)
    got = router.preference_list(prompt, 10, exclude=[full[3]])
    assert got == full[4:] + full[:1]
    assert router.preference_list(prompt, 0) == []


def test_remove_member_and_membership_views():
    router = router_with(3)
    router.remove_member("r1")
    assert router.members() == ["r0", "r2"] and len(router) == 2 and "r1" not in router
    assert "r1" not in router.ring
    info = router.info("r0")
    assert info.state is MemberState.ALIVE and info.on_ring and info.weight == 1.0
    router.set_member("r0", weight=2.0, capacity=4)
    assert router.ring.vnode_count("r0") == 2 * router.vnodes
    assert router.info("r0").capacity == 4


def test_validation_errors_are_clear():
    router = router_with(1)
    with pytest.raises(ValueError, match="state must be one of"):
        router.set_member("r0", state="zombie")
    with pytest.raises(ValueError, match="weight"):
        router.set_member("r0", weight=-1)
    with pytest.raises(ValueError, match="weight"):
        router.set_member("r0", weight=True)
    with pytest.raises(ValueError, match="capacity"):
        router.set_member("r0", capacity=-2)
    with pytest.raises(ValueError, match="member_id"):
        router.set_member("", weight=1)
    with pytest.raises(ValueError, match="draining"):
        router.set_member("r0", draining="yes")
    with pytest.raises(ValueError, match="n must be"):
        router.preference_list("p", -1)
    with pytest.raises(ValueError, match="load"):
        router.set_load("r0", -5)
    with pytest.raises(KeyError, match="unknown member"):
        router.set_load("ghost", 1)
    with pytest.raises(KeyError, match="unknown member"):
        router.remove_member("ghost")
    with pytest.raises(KeyError, match="unknown member"):
        router.info("ghost")
    with pytest.raises(TypeError, match="prompt"):
        router.route(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key_hash"):
        router.route_hash(-1)
    with pytest.raises(ValueError, match="prefix_chars"):
        Router(prefix_chars=0)
    with pytest.raises(ValueError, match="balance"):
        Router(balance=0.9)
    with pytest.raises(ValueError, match="vnodes"):
        Router(vnodes=0)
    # Failed updates leave the member as it was.
    assert router.info("r0") == routing.MemberInfo("r0", 1.0, 0, MemberState.ALIVE, False, 0, True)


member = st.fixed_dictionaries(
    {
        "weight": st.sampled_from([0.5, 1.0, 2.0]),
        "capacity": st.integers(0, 3),
        "state": st.sampled_from(list(MemberState)),
        "draining": st.booleans(),
        "load": st.integers(0, 4),
    }
)


@settings(max_examples=examples(150), deadline=None)
@given(
    st.dictionaries(st.sampled_from(NAMES), member, max_size=6),
    st.sampled_from(PROMPTS),
    st.sets(st.sampled_from(NAMES), max_size=3),
    st.sampled_from([None, 1.0, 1.25]),
)
def test_every_decision_is_consistent_with_its_reason(cluster, prompt, exclude, balance):
    router = Router(vnodes=16, balance=balance, seed=9)
    for m, c in cluster.items():
        router.set_member(m, weight=c["weight"], capacity=c["capacity"], state=c["state"], draining=c["draining"])
        router.set_load(m, c["load"])

    def routable(m):
        c = cluster[m]
        return (
            m not in exclude
            and c["state"] in (MemberState.ALIVE, MemberState.SUSPECT)
            and not c["draining"]
            and (c["capacity"] == 0 or c["load"] < c["capacity"])
        )

    d = router.route(prompt, exclude=exclude)
    if d.reason == "none":
        assert d.member is None and not any(routable(m) for m in cluster)
        return
    assert routable(d.member)
    if cluster[d.member]["state"] is MemberState.SUSPECT:
        assert not any(routable(m) and cluster[m]["state"] is MemberState.ALIVE for m in cluster)
    if d.reason == "affinity":
        bound = router.ring.bound()
        assert bound is None or cluster[d.member]["load"] < bound
    else:
        assert d.reason == "least_connections"
        assert router.ring.lookup(router.affinity_hash(prompt), exclude) is None


@settings(max_examples=examples(30), deadline=None)
@given(st.permutations(NAMES), st.lists(st.sampled_from(PROMPTS), min_size=1, max_size=10))
def test_routing_is_deterministic_and_insertion_order_independent(order, prompts):
    a, b = Router(seed=1), Router(seed=1)
    for m in NAMES:
        a.set_member(m)
    for m in order:
        b.set_member(m)
    assert [a.route(p) for p in prompts] == [b.route(p) for p in prompts]
    assert [a.preference_list(p, 3) for p in prompts] == [b.preference_list(p, 3) for p in prompts]


# ---- the demo and the benchmark plumbing built on this API -------------------------------------------------


def test_demo_shows_every_reason_and_the_moved_keys(capsys):
    import argparse

    from llmgw.cli import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.run(parser.parse_args([])) == 0
    out = capsys.readouterr().out
    assert "(affinity)" in out and "least_connections" in out
    moved_line = next(line for line in out.splitlines() if "prompts moved" in line)
    moved = int(moved_line.split()[0])
    assert 0 < moved < len(demo.PROMPTS)
    assert out.count(" -> replica-") >= len(demo.PROMPTS)
    assert demo.run(parser.parse_args(["--members", "1"])) == 2


def test_benchmark_runner_expands_asv_params_and_formats_times():
    from benchmarks import __main__ as runner

    class Grid:
        params = ([1, 2], ["a", "b"])
        param_names = ("n", "s")

    class Flat:
        params = ("x", "y", "z")

    assert runner._param_combinations(Grid) == [(1, "a"), (1, "b"), (2, "a"), (2, "b")]
    assert runner._param_combinations(Flat) == [("x",), ("y",), ("z",)]
    assert runner._format_params(Grid, (1, "a")) == "n=1, s='a'"
    assert [runner.format_seconds(s) for s in (2.0, 0.0025, 3.1e-6, 1.5e-7)] == ["2 s", "2.5 ms", "3.1 us", "150 ns"]
    assert "bench_routing" in runner.discover_modules()


def test_benchmark_runner_runs_a_filtered_selection(capsys):
    from benchmarks import __main__ as runner

    assert runner.main(["PickerPick", "--quick", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "bench_routing.PickerPick.time_pick" in out and "RingLookup" not in out
    assert runner.main(["no-such-benchmark", "--quick"]) == 1


def test_bench_cli_rejects_unknown_and_missing_suites(capsys, monkeypatch):
    import argparse

    from llmgw.cli import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["nonsense"])) == 2
    assert "unknown suite" in capsys.readouterr().err
    # A known suite whose benchmarks/run_<suite>.py does not exist (yet): a clear message and exit status 2.
    monkeypatch.setattr(bench, "SUITES", bench.SUITES + ("not_written_yet",))
    assert bench.run(parser.parse_args(["not_written_yet"])) == 2
    assert "suite not_written_yet not available" in capsys.readouterr().out


# ---- routing policies: what the gateway asks for a pick -------------------------------------------------------
def _router_with(loads: dict[str, int], weights: dict[str, float] | None = None) -> Router:
    router = Router(seed=5)
    for member, load in loads.items():
        router.set_member(member, weight=(weights or {}).get(member, 1.0), capacity=10)
        router.set_load(member, load)
    return router


def test_affinity_policy_is_the_routers_decision_minus_blocked():
    import random

    router = _router_with({"a": 0, "b": 0, "c": 0})
    policy = routing.make_policy("affinity", router, random.Random(1))
    assert isinstance(policy, routing.AffinityPolicy)
    for i in range(20):
        prompt = f"prompt {i}"
        assert policy.pick(prompt, {"a", "b", "c"}, ()) == router.route(prompt).member
        first = router.route(prompt).member
        assert policy.pick(prompt, {"a", "b", "c"}, {first}) == router.route(prompt, exclude={first}).member != first
    assert policy.pick("x", {"a", "b", "c"}, {"a", "b", "c"}) is None


def test_least_connections_policy_weighs_load_and_breaks_ties_at_random():
    import random

    router = _router_with({"a": 3, "b": 1, "c": 2}, weights={"c": 4.0})
    policy = routing.make_policy("least_connections", router, random.Random(2))
    assert policy.pick("any", ["a", "b", "c"], ()) == "c"  # 2 / 4.0 is the least load per weight
    router.set_load("c", 8)
    assert policy.pick("any", ["a", "b", "c"], ()) == "b"
    assert policy.pick("any", ["a", "b", "c"], {"b"}) == "c"  # 8 / 4.0 = 2 < 3
    assert policy.pick("any", ["a", "b"], {"a", "b"}) is None
    router.set_load("a", 1)
    assert {policy.pick(f"p{i}", ["a", "b"], ()) for i in range(50)} == {"a", "b"}  # tied: both get picked


def test_random_policy_picks_only_unblocked_candidates():
    import random

    policy = routing.make_policy("random", _router_with({"a": 0}), random.Random(3))
    picks = [policy.pick("p", ["a", "b", "c"], {"b"}) for _ in range(100)]
    assert set(picks) == {"a", "c"}
    assert policy.pick("p", ["a"], {"a"}) is None and policy.pick("p", [], ()) is None


def test_unknown_policy_name_is_refused():
    with pytest.raises(ValueError, match="routing policy must be one of"):
        routing.make_policy("round_robin", Router())
    assert routing.POLICIES == ("affinity", "least_connections", "random")
