"""Consistent-hash ring: properties against a pure-Python bisect model, plus unit tests of edges and validation."""

from __future__ import annotations

import bisect
import math
import random

import mmh3
import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from llmgw._core.ring import DEFAULT_VNODES, HashRing, affinity_hash, hash_key

MASK64 = (1 << 64) - 1
MEMBER_IDS = [f"r{i}" for i in range(12)] + ["replica-α", "b", "ab"]


class ModelRing:
    """The specification, written the slow and obvious way: sort every point, bisect, walk."""

    def __init__(self, vnodes: int, balance: float | None, point_bits: int = 64) -> None:
        self.vnodes = vnodes
        self.balance = balance or 0.0
        self.mask = MASK64 if point_bits == 64 else (1 << point_bits) - 1
        self.members: dict[str, dict] = {}

    def set_member(self, member_id, weight=1.0, capacity=0, suspect=False, draining=False, load=0):
        self.members[member_id] = dict(
            weight=weight, capacity=capacity, suspect=suspect, draining=draining, load=load
        )

    def count(self, member_id):
        return max(1, int(self.vnodes * self.members[member_id]["weight"] + 0.5))

    def points(self):
        pts = []
        for m in self.members:
            for i in range(self.count(m)):
                pts.append((mmh3.hash64(f"{m}#{i}", signed=False)[0] & self.mask, m))
        return sorted(pts)

    def walk(self, key):
        pts = self.points()
        if not pts:
            return []
        start = bisect.bisect_left([p[0] for p in pts], key) % len(pts)
        order = []
        for j in range(len(pts)):
            m = pts[(start + j) % len(pts)][1]
            if m not in order:
                order.append(m)
        return order

    def bound(self):
        accepting = [m for m, s in self.members.items() if not s["draining"]]
        if self.balance <= 0 or not accepting:
            return math.inf
        total = sum(self.members[m]["load"] for m in accepting)
        return math.ceil(self.balance * (total + 1) / len(accepting))

    def routable(self, m, exclude):
        s = self.members[m]
        return m not in exclude and not s["draining"] and (s["capacity"] == 0 or s["load"] < s["capacity"])

    def lookup(self, key, exclude=()):
        bound = self.bound()
        fallback = None
        for m in self.walk(key):
            if self.routable(m, exclude) and self.members[m]["load"] < bound:
                if not self.members[m]["suspect"]:
                    return m
                fallback = fallback or m
        if fallback and not any(
            self.routable(m, exclude) and not s["suspect"] for m, s in self.members.items()
        ):
            return fallback
        return None

    def preference_list(self, key, n, exclude=()):
        return [m for m in self.walk(key) if m not in exclude and not self.members[m]["draining"]][:n]


member_config = st.fixed_dictionaries(
    {
        "weight": st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0]),
        "capacity": st.integers(0, 4),
        "suspect": st.booleans(),
        "draining": st.booleans(),
        "load": st.integers(0, 6),
    }
)
clusters = st.dictionaries(st.sampled_from(MEMBER_IDS), member_config, min_size=0, max_size=8)
keys = st.integers(0, MASK64)


def build(cluster, vnodes=16, balance=1.25, point_bits=64, order=None):
    ring = HashRing(vnodes, balance, point_bits=point_bits)
    model = ModelRing(vnodes, balance, point_bits)
    for m in order or list(cluster):
        c = cluster[m]
        ring.set_member(m, weight=c["weight"], capacity=c["capacity"], suspect=c["suspect"], draining=c["draining"])
        ring.set_load(m, c["load"])
        model.set_member(m, **c)
    return ring, model


def key_owned_by(ring: HashRing, member: str) -> int:
    """A key whose bare-ring owner is `member` (golden-ratio stride spreads candidates over the key space)."""
    return next(k for k in ((i * 0x9E3779B97F4A7C15) & MASK64 for i in range(10_000)) if ring.owner(k) == member)


def eligible(ring: HashRing, m: str, exclude) -> bool:
    return (
        m in ring
        and m not in exclude
        and not ring.is_draining(m)
        and (ring.capacity(m) == 0 or ring.load(m) < ring.capacity(m))
    )


@settings(max_examples=examples(150), deadline=None)
@given(
    clusters,
    st.lists(keys, min_size=1, max_size=8),
    st.sets(st.sampled_from(MEMBER_IDS), max_size=4),
    st.sampled_from([None, 1.0, 1.25, 2.0]),
    st.sampled_from([64, 5]),
)
def test_agrees_with_bisect_model(cluster, key_list, exclude, balance, point_bits):
    ring, model = build(cluster, balance=balance, point_bits=point_bits)
    assert ring.points() == model.points()
    for key in key_list:
        expected = model.lookup(key, exclude)
        got = ring.lookup(key, exclude)
        assert got == expected
        assert ring.owner(key) == (model.walk(key)[0] if cluster else None)
        for n in (1, 3, 20):
            assert ring.preference_list(key, n, exclude) == model.preference_list(key, n, exclude)


@settings(max_examples=examples(150), deadline=None)
@given(clusters, keys, st.sets(st.sampled_from(MEMBER_IDS), max_size=4))
def test_lookup_returns_an_eligible_member(cluster, key, exclude):
    ring, _ = build(cluster)
    got = ring.lookup(key, exclude)
    if got is None:
        return
    assert eligible(ring, got, exclude)
    bound = ring.bound()
    assert bound is None or ring.load(got) < bound
    if ring.is_suspect(got):
        # A suspect is only chosen when no ALIVE member could take the request at all.
        assert not any(eligible(ring, m, exclude) and not ring.is_suspect(m) for m in ring.members())


@settings(max_examples=examples(100), deadline=None)
@given(clusters, keys, st.integers(0, 20), st.sets(st.sampled_from(MEMBER_IDS), max_size=4))
def test_preference_list_distinct_in_ring_order(cluster, key, n, exclude):
    ring, _ = build(cluster)
    got = ring.preference_list(key, n, exclude)
    assert len(got) == len(set(got))
    candidates = [m for m in ring.members() if m not in exclude and not ring.is_draining(m)]
    assert len(got) == min(n, len(candidates))
    assert not set(got) & set(exclude)
    # Ring order: each member's first point clockwise from the key is further than the previous member's.
    distances = [min((h - key) & MASK64 for h, owner in ring.points() if owner == m) for m in got]
    assert distances == sorted(distances)


@settings(max_examples=examples(60), deadline=None)
@given(clusters.filter(lambda c: len(c) >= 2), st.data(), st.lists(keys, min_size=20, max_size=60))
def test_removing_a_member_moves_only_its_keys(cluster, data, key_list):
    ring, _ = build(cluster)
    victim = data.draw(st.sampled_from(sorted(cluster)))
    before = {k: ring.owner(k) for k in key_list}
    ring.remove_member(victim)
    for k, owner in before.items():
        if owner != victim:
            assert ring.owner(k) == owner
        else:
            assert ring.owner(k) != victim


@settings(max_examples=examples(60), deadline=None)
@given(clusters, st.sampled_from(["new-1", "new-2"]), st.sampled_from([0.5, 1.0, 2.0]), st.lists(keys, max_size=60))
def test_adding_a_member_moves_keys_only_to_it(cluster, newcomer, weight, key_list):
    ring, _ = build(cluster)
    before = {k: ring.owner(k) for k in key_list}
    ring.set_member(newcomer, weight=weight)
    for k, owner in before.items():
        assert ring.owner(k) in (owner, newcomer)


@settings(max_examples=examples(60), deadline=None)
@given(clusters.filter(bool), st.data(), st.sampled_from([0.25, 0.5, 2.0, 3.0]), st.lists(keys, max_size=60))
def test_reweighting_moves_only_that_members_keys(cluster, data, weight, key_list):
    ring, _ = build(cluster)
    target = data.draw(st.sampled_from(sorted(cluster)))
    before = {k: ring.owner(k) for k in key_list}
    ring.set_member(target, weight=weight)
    assert ring.vnode_count(target) == max(1, int(16 * weight + 0.5))
    for k, owner in before.items():
        after = ring.owner(k)
        assert after == owner or target in (owner, after)


@settings(max_examples=examples(40), deadline=None)
@given(
    st.integers(2, 10),
    st.sampled_from([1.0, 1.1, 1.25, 2.0]),
    st.lists(st.tuples(keys, st.booleans()), min_size=1, max_size=150),
)
def test_bounded_loads_never_exceeded_while_someone_is_under(n, balance, events):
    """Assign keys (and release some): every assignment goes to a member under the bound, and one always exists."""
    ring = HashRing(20, balance)
    names = [f"m{i}" for i in range(n)]
    for m in names:
        ring.set_member(m)
    assigned: list[str] = []
    for key, release in events:
        if release and assigned:
            ring.add_load(assigned.pop(0), -1)
            continue
        bound = math.ceil(balance * (ring.total_load() + 1) / n)
        assert ring.bound() == bound
        chosen = ring.lookup(key)
        assert chosen is not None, "with c >= 1 some member is always under the bound"
        assert ring.load(chosen) < bound
        # Nobody clockwise before the chosen member was under the bound.
        for m in ring.preference_list(key, n):
            if m == chosen:
                break
            assert ring.load(m) >= bound
        ring.add_load(chosen, 1)
        assigned.append(chosen)
        assert sum(ring.load(m) for m in names) == ring.total_load() == len(assigned)


def keyspace_shares(ring: HashRing) -> dict[str, float]:
    """Fraction of the 64-bit key space each member owns (a point owns the arc ending at it)."""
    pts = ring.points()
    shares = dict.fromkeys(ring.members(), 0)
    for i, (h, m) in enumerate(pts):
        shares[m] += (h - pts[i - 1][0]) & MASK64 if len(pts) > 1 else 1 << 64
    return {m: s / float(1 << 64) for m, s in shares.items()}


@settings(max_examples=examples(10), deadline=None)
@given(st.lists(st.sampled_from([1.0, 2.0, 3.0]), min_size=2, max_size=4), st.integers(0, 1000))
def test_weights_shift_key_share_in_proportion(weights, salt):
    ring = HashRing(1000, None)
    for i, w in enumerate(weights):
        ring.set_member(f"w{salt}-{i}", weight=w)
    shares = keyspace_shares(ring)
    total_weight = sum(weights)
    for i, w in enumerate(weights):
        expected = w / total_weight
        # 1000 points per unit of weight: the share's relative spread is ~3%, so 15% is a comfortable margin.
        assert abs(shares[f"w{salt}-{i}"] - expected) <= 0.15 * expected


@settings(max_examples=examples(40), deadline=None)
@given(clusters, st.randoms(use_true_random=False), st.lists(keys, max_size=20), st.sampled_from([64, 3]))
def test_same_input_same_output_regardless_of_insertion_order(cluster, rnd, key_list, point_bits):
    order = list(cluster)
    shuffled = order[:]
    rnd.shuffle(shuffled)
    a, _ = build(cluster, point_bits=point_bits, order=order)
    b, _ = build(cluster, point_bits=point_bits, order=shuffled)
    assert a.points() == b.points()
    for k in key_list:
        assert a.lookup(k) == b.lookup(k)
        assert a.preference_list(k, 5) == b.preference_list(k, 5)


def test_point_collisions_are_kept_and_ordered_by_member_id():
    # 2-bit points: 4 distinct positions for 3 * 8 points, so most points collide.
    ring = HashRing(8, None, point_bits=2)
    for m in ("c", "a", "b"):
        ring.set_member(m)
    pts = ring.points()
    assert len(pts) == 24  # no point overwritten
    assert pts == sorted(pts)
    assert {h for h, _ in pts} <= {0, 1, 2, 3}


def test_hash_key_is_murmur3_x64_low_half_of_utf8():
    assert hash_key("") == 0
    assert hash_key("é") == mmh3.hash128("é".encode(), 0, True, signed=False) & MASK64
    assert hash_key("hello") == 0xCBD8A7B341BD9B02
    assert 0 <= hash_key("x" * 1000) <= MASK64


def test_affinity_hash_uses_first_prefix_chars_characters():
    base = "ü" * 64
    assert affinity_hash(base + "tail one") == affinity_hash(base + "something else") == hash_key(base)
    assert affinity_hash("abcdef", 3) == hash_key("abc")
    assert affinity_hash("ab", 64) == hash_key("ab")
    with pytest.raises(ValueError, match="prefix_chars"):
        affinity_hash("abc", 0)


def test_empty_ring():
    ring = HashRing()
    assert len(ring) == 0 and ring.point_count == 0
    assert ring.lookup(123) is None
    assert ring.owner(123) is None
    assert ring.preference_list(123, 3) == []
    assert ring.bound() is None


def test_defaults_and_single_member():
    ring = HashRing()
    assert ring.vnodes == DEFAULT_VNODES == 160 and ring.balance == 1.25
    ring.set_member("only")
    assert ring.point_count == 160
    assert ring.lookup(0) == ring.lookup(MASK64) == "only"
    ring.set_load("only", 10)
    # bound = ceil(1.25 * 11 / 1) = 14 > 10: a lone member always stays under its own bound.
    assert ring.bound() == 14 and ring.lookup(5) == "only"


def test_capacity_and_draining_and_exclude():
    ring = HashRing(32, None)
    for m in ("a", "b", "c"):
        ring.set_member(m, capacity=2)
    key = 42
    first = ring.lookup(key)
    ring.set_load(first, 2)
    second = ring.lookup(key)
    assert second not in (first, None)
    ring.set_draining(second, True)
    third = ring.lookup(key)
    assert third not in (first, second, None)
    assert ring.lookup(key, exclude=[third]) is None
    assert ring.lookup(key, exclude={"nobody"}) == third
    ring.set_draining(second, False)
    assert ring.lookup(key) == second


def test_suspect_taken_only_without_routable_alive_member():
    ring = HashRing(32, None)
    ring.set_member("s", suspect=True)
    ring.set_member("a")
    key = key_owned_by(ring, "s")
    assert ring.lookup(key) == "a"
    ring.set_member("a", capacity=1)
    ring.set_load("a", 1)
    assert ring.lookup(key) == "s"
    assert ring.lookup(key, exclude=("s",)) is None


def test_suspect_over_alive_at_bound_defers_to_fallback():
    # "a" is routable but over the bound: the ring returns None so least-connections can pick an ALIVE member.
    ring = HashRing(32, 1.0)
    ring.set_member("a")
    ring.set_member("s", suspect=True)
    ring.set_load("a", 5)
    assert ring.bound() == 3
    assert ring.lookup(7) is None


def test_draining_members_do_not_count_toward_the_bound():
    ring = HashRing(16, 1.25)
    ring.set_member("a")
    ring.set_member("b")
    ring.set_load("b", 8)
    assert ring.total_load() == 8 and ring.bound() == math.ceil(1.25 * 9 / 2)
    ring.set_draining("b", True)
    assert ring.total_load() == 0 and ring.bound() == 2
    ring.set_draining("b", False)
    assert ring.total_load() == 8
    ring.remove_member("b")
    assert ring.total_load() == 0 and ring.bound() == 2


def test_slot_reuse_after_remove_starts_clean():
    ring = HashRing(8, 1.25)
    ring.set_member("a", capacity=3, suspect=True, draining=True)
    ring.set_load("a", 2)
    ring.remove_member("a")
    ring.set_member("b")
    assert ring.load("b") == 0 and ring.capacity("b") == 0
    assert not ring.is_suspect("b") and not ring.is_draining("b")
    assert ring.members() == ["b"] and "a" not in ring


def test_many_members_grow_and_shrink():
    ring = HashRing(4, 1.25)
    names = [f"n{i}" for i in range(300)]
    for m in names:
        ring.set_member(m)
    assert len(ring) == 300 and ring.point_count == 1200
    rng = random.Random(1)
    for m in rng.sample(names, 150):
        ring.remove_member(m)
    assert len(ring) == 150 and ring.point_count == 600
    assert ring.points() == sorted(ring.points())


def test_exclusions_do_not_leak_into_the_next_call():
    ring = HashRing(8, None)
    ring.set_member("a")
    ring.set_member("b")
    key = key_owned_by(ring, "a")
    assert ring.lookup(key, exclude=["a"]) == "b"
    assert ring.lookup(key) == "a"


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(vnodes=0), ValueError),
        (dict(vnodes=-3), ValueError),
        (dict(vnodes=10**12), ValueError),
        (dict(vnodes=2.5), ValueError),
        (dict(balance=0.5), ValueError),
        (dict(balance=float("nan")), ValueError),
        (dict(balance=float("inf")), ValueError),
        (dict(balance="high"), TypeError),
        (dict(point_bits=0), ValueError),
        (dict(point_bits=65), ValueError),
    ],
)
def test_constructor_validation(kwargs, error):
    with pytest.raises(error):
        HashRing(**kwargs)


def test_balance_off_values():
    assert HashRing(balance=None).balance is None
    assert HashRing(balance=0).balance is None
    assert HashRing(balance=1).balance == 1.0


def test_member_and_lookup_validation():
    ring = HashRing(8)
    ring.set_member("a")
    for bad_weight in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight"):
            ring.set_member("a", weight=bad_weight)
    with pytest.raises(ValueError, match="points per member"):
        ring.set_member("a", weight=1e9)
    assert ring.vnode_count("a") == 8  # failed updates change nothing
    with pytest.raises(ValueError, match="capacity"):
        ring.set_member("a", capacity=-1)
    with pytest.raises(TypeError, match="capacity"):
        ring.set_member("a", capacity=1.5)
    with pytest.raises(ValueError, match="load"):
        ring.set_load("a", -1)
    with pytest.raises(TypeError, match="load"):
        ring.set_load("a", "3")
    with pytest.raises(ValueError, match="< 0"):
        ring.add_load("a", -1)
    with pytest.raises(KeyError, match="unknown member 'zz'"):
        ring.set_load("zz", 1)
    with pytest.raises(KeyError):
        ring.remove_member("zz")
    with pytest.raises(ValueError, match="key_hash"):
        ring.lookup(-1)
    with pytest.raises(ValueError, match="key_hash"):
        ring.lookup(1 << 64)
    with pytest.raises(TypeError):
        ring.lookup("abc")
    with pytest.raises(TypeError, match="single string"):
        ring.lookup(5, exclude="a")
    with pytest.raises(ValueError, match="n must be"):
        ring.preference_list(5, -1)
    assert ring.preference_list(5, 0) == []
