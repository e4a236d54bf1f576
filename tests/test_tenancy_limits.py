"""Per-tenant limits: sliding windows, retry_after, pacing, cluster sum over digests, partition fallback."""

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from llmgw.tenancy.bench import digest_bandwidth
from llmgw.tenancy.digest import DigestError, TenantUsage, UsageDigest, decode_digest, encode_digest
from llmgw.tenancy.keys import TenantLimits
from llmgw.tenancy.limits import ALLOWED, Limit, LimiterConfig, Refused, UsageLimiter
from llmgw.tenancy.window import WindowCounter

NO_PACING = LimiterConfig(recent_window_s=60.0)


def limiter(limits: TenantLimits, config: LimiterConfig | None = None, name: str = "g0") -> UsageLimiter:
    lim = UsageLimiter(name, config)
    lim.configure({"t": limits})
    return lim


# --------------------------------------------------------------------------------------------------------------
# Window


def test_window_slides_bucket_by_bucket():
    w = WindowCounter(60, 1.0)
    w.add(0.5)
    w.add(10.2, 3)
    assert w.total(59.99) == 4
    assert w.total(60.0) == 3  # bucket 0 left at (0 + 60) * 1 s
    assert w.total(69.99) == 3
    assert w.total(70.0) == 0
    w.add(100.0, 2)
    w.add(99.0, 5)  # earlier than the newest bucket: counted in the newest
    assert w.total(100.5, span=1) == 7
    assert w.total(1000.0) == 0


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5.0), st.integers(0, 5)), max_size=60),
       st.integers(1, 12), st.sampled_from([0.5, 1.0, 5.0]))
def test_window_matches_a_list_of_events(steps, buckets, bucket_s):
    w = WindowCounter(buckets, bucket_s)
    events = []
    now = 0.0
    for gap, amount in steps:
        now += gap
        w.add(now, amount)
        events.append((w.bucket_of(now), amount))
        head = w.bucket_of(now)
        for span in (1, buckets // 2 + 1, buckets):
            expected = sum(a for b, a in events if b > head - min(span, buckets))
            assert w.total(now, span) == expected


# --------------------------------------------------------------------------------------------------------------
# One gateway


def test_requests_per_minute_refuses_with_exact_retry_after():
    lim = limiter(TenantLimits(requests_per_minute=3), NO_PACING)
    for t in (0.5, 10.2, 20.7):
        assert lim.try_admit("t", t) is ALLOWED
        lim.stream_ended("t")
    refused = lim.check("t", 30.0)
    assert refused == Refused(Limit.REQUESTS, pytest.approx(30.0), 3, 3)
    assert lim.check("t", 59.75).retry_after_s == pytest.approx(0.25)
    assert lim.check("t", 60.0) is ALLOWED  # the request of 0.5 s has left the window


def test_unknown_and_unlimited_tenants_are_allowed_and_cost_nothing():
    lim = limiter(TenantLimits())
    for _ in range(1000):
        assert lim.try_admit("t", 1.0) is ALLOWED
        assert lim.try_admit("stranger", 1.0) is ALLOWED
    lim.record_tokens("stranger", 10**9, 1.0)
    assert lim.report(1.0)["tenants"].keys() == {"t"}  # counted for accounting, the stranger not at all


def test_tokens_counted_after_the_fact_refuse_the_next_request():
    lim = limiter(TenantLimits(tokens_per_minute=1000), NO_PACING)
    assert lim.try_admit("t", 0.0) is ALLOWED
    lim.record_tokens("t", 999, 0.4)
    assert lim.check("t", 1.0) is ALLOWED  # still under: the next request's cost is unknown
    lim.record_tokens("t", 700, 2.0)  # a long stream went over; it was never cut
    refused = lim.check("t", 3.0)
    assert refused.limit is Limit.TOKENS and refused.used == 1699 and refused.allowed == 1000
    assert refused.retry_after_s == pytest.approx(57.0)  # until the 999 tokens of bucket 0 leave at 60 s
    assert lim.check("t", 60.0) is ALLOWED
    with pytest.raises(ValueError):
        lim.record_tokens("t", -1, 61.0)


def test_concurrent_streams():
    lim = limiter(TenantLimits(max_concurrent=2))
    assert lim.try_admit("t", 0.0) is ALLOWED
    assert lim.try_admit("t", 0.0) is ALLOWED
    refused = lim.try_admit("t", 0.0)
    assert refused == Refused(Limit.CONCURRENT, 1.0, 2, 2)
    lim.stream_ended("t")
    assert lim.try_admit("t", 0.1) is ALLOWED
    for _ in range(5):
        lim.stream_ended("t")  # extra ends never go negative
    assert lim.report(0.2)["tenants"]["t"]["local"]["in_flight"] == 0


def test_pacing_spreads_the_minute_and_retry_after_points_at_the_next_room():
    lim = limiter(TenantLimits(requests_per_minute=60))  # 5 per 5 s
    for _ in range(5):
        assert lim.try_admit("t", 0.1) is ALLOWED
    refused = lim.check("t", 0.2)
    assert refused.limit is Limit.REQUESTS and refused.allowed == 5
    assert refused.retry_after_s == pytest.approx(4.8)  # bucket 0 leaves the 5 s window at 5.0
    assert lim.check("t", 5.0) is ALLOWED


def test_steady_overload_is_admitted_at_the_limit_rate_from_the_start():
    lim = limiter(TenantLimits(requests_per_minute=600))
    admitted = []
    for i in range(180 * 30):  # 30 requests/s for 3 minutes against 10/s
        now = i / 30
        if lim.try_admit("t", now) is ALLOWED:
            admitted.append(now)
            lim.stream_ended("t")
    for start in range(0, 180, 10):
        assert sum(1 for t in admitted if start <= t < start + 10) == 100


@settings(max_examples=examples(150), deadline=None)
@given(st.lists(st.floats(0.0, 3.0), min_size=1, max_size=80), st.integers(1, 8),
       st.sampled_from([NO_PACING, LimiterConfig(), LimiterConfig(bucket_s=5.0, recent_window_s=10.0)]))
def test_decisions_match_a_model_and_retry_after_is_exact(gaps, per_minute, config):
    """Alone, a gateway allows a request iff both windows (by bucket) have room, and when it refuses, the request
    passes exactly `retry_after_s` later and not a moment before."""
    lim = limiter(TenantLimits(requests_per_minute=per_minute), config)
    bucket = config.bucket_s
    window_cap = per_minute
    recent_cap = max(1, per_minute * config.recent_buckets * bucket // 60) if config.pacing else None
    admitted: list[int] = []
    now = 0.0
    for gap in gaps:
        now += gap
        head = int(now // bucket)
        in_window = sum(1 for b in admitted if b > head - config.buckets)
        in_recent = sum(1 for b in admitted if b > head - config.recent_buckets)
        expect_allowed = in_window + 1 <= window_cap and (recent_cap is None or in_recent + 1 <= recent_cap)
        decision = lim.check("t", now)
        assert (decision is ALLOWED) == expect_allowed
        if decision is ALLOWED:
            lim.record_request("t", now)
            admitted.append(head)
        else:
            retry = decision.retry_after_s
            assert retry > 0
            probe = limiter(TenantLimits(requests_per_minute=per_minute), config)
            for b in admitted:
                probe.record_request("t", b * bucket)
            assert probe.check("t", now + retry - 1e-6) is not ALLOWED
            assert probe.check("t", now + retry + 1e-9) is ALLOWED


def test_reconfigure_keeps_state_by_name_and_drops_removed_tenants():
    lim = UsageLimiter("g0", NO_PACING)
    lim.configure({"a": TenantLimits(requests_per_minute=2), "b": TenantLimits(requests_per_minute=2)})
    for _ in range(2):
        lim.try_admit("a", 1.0)
        lim.try_admit("b", 1.0)
    lim.configure({"a": TenantLimits(requests_per_minute=3)})  # reload: a keeps its count, b is gone
    assert lim.check("a", 2.0) is ALLOWED
    lim.record_request("a", 2.0)
    assert lim.check("a", 2.0).limit is Limit.REQUESTS
    assert set(lim.report(2.0)["tenants"]) == {"a"}


def test_config_is_validated():
    with pytest.raises(ValueError, match="whole number"):
        LimiterConfig(recent_window_s=2.5)
    with pytest.raises(ValueError, match="must not exceed"):
        LimiterConfig(recent_window_s=120.0, window_s=60.0)
    with pytest.raises(ValueError, match="peer_timeout_s"):
        LimiterConfig(peer_timeout_s=10.0, forget_after_s=5.0)


# --------------------------------------------------------------------------------------------------------------
# Several gateways


def exchange(nodes, now, *, cut=frozenset(), budget=1024):
    """Every node sends its digest to every other one, except across `cut` (a set of node indexes cut off)."""
    for i, sender in enumerate(nodes):
        data = sender.build_digest(now, budget)
        for j, receiver in enumerate(nodes):
            if i != j and (i in cut) == (j in cut):
                receiver.receive_digest(sender.gateway_id, data, now)


def cluster(n, limits, config=None):
    nodes = [UsageLimiter(f"g{i}", config) for i in range(n)]
    for node in nodes:
        node.configure({"t": limits})
    return nodes


def test_cluster_usage_is_the_sum_of_each_gateways_own_counts():
    a, b = cluster(2, TenantLimits(requests_per_minute=10), NO_PACING)
    for _ in range(6):
        assert a.try_admit("t", 1.0) is ALLOWED
    for _ in range(3):
        assert b.try_admit("t", 1.0) is ALLOWED
    exchange([a, b], 1.5)
    assert a.check("t", 2.0) is ALLOWED  # 9 used
    a.record_request("t", 2.0)
    refused = b.check("t", 2.0)  # b has not heard of a's 10th yet: 9 + 1 fits
    assert refused is ALLOWED
    b.record_request("t", 2.0)
    exchange([a, b], 2.5)
    for node in (a, b):
        decision = node.check("t", 3.0)
        assert decision.limit is Limit.REQUESTS and decision.used == 11 and decision.allowed == 10
    report = a.report(3.0)["tenants"]["t"]
    assert report["local"]["requests"] == 7 and report["peers"]["g1"]["requests"] == 4
    assert report["cluster"]["requests"] == 11 and report["cluster"]["in_flight"] == 9  # 2 without a stream


def test_three_gateways_hold_the_limit_together_under_3x_load():
    nodes = cluster(3, TenantLimits(requests_per_minute=600))
    admitted = simulate(nodes, seconds=180)
    for start in range(0, 180, 10):  # 10 s slices, from the first: 100 ± 10 %
        count = sum(1 for t, _ in admitted if start <= t < start + 10)
        assert 90 <= count <= 110, (start, count)
    for start in range(0, 120, 5):  # no 60 s window ever holds more than the limit + 5 %
        assert sum(1 for t, _ in admitted if start <= t < start + 60) <= 630


def simulate(nodes, *, seconds, rate=30.0, interval=0.5, cut_from=None, cut=frozenset()):
    """`rate` requests/s spread round-robin over the nodes; digests every `interval` s; optionally cut."""
    admitted = []
    next_digest = 0.0
    for k in range(int(seconds * rate)):
        now = k / rate
        while next_digest <= now:
            partitioned = cut_from is not None and next_digest >= cut_from
            exchange(nodes, next_digest, cut=cut if partitioned else frozenset())
            next_digest += interval
        index = k % len(nodes)
        if nodes[index].try_admit("t", now) is ALLOWED:
            admitted.append((now, index))
            nodes[index].stream_ended("t")
    return admitted


def test_partition_majority_keeps_the_limit_and_the_isolated_gateway_its_share():
    nodes = cluster(3, TenantLimits(requests_per_minute=600), LimiterConfig(peer_timeout_s=3.0))
    admitted = simulate(nodes, seconds=240, cut_from=60.0, cut=frozenset({2}))
    late = [(t, i) for t, i in admitted if t >= 120]  # one full window after the cut
    pair = sum(1 for _, i in late if i < 2) / 2  # per minute
    alone = sum(1 for _, i in late if i == 2) / 2
    assert 540 <= pair <= 620  # the two that still talk keep the whole limit between them
    assert alone <= 200  # the isolated one: 600 / 3 gateways it last knew
    assert alone >= 170
    assert nodes[2].share(240.0) == pytest.approx(1 / 3)
    assert nodes[0].share(240.0) == 1.0


def test_alone_gateway_uses_its_share_then_the_whole_limit_after_peers_leave():
    a, b, c = cluster(3, TenantLimits(requests_per_minute=90), NO_PACING)
    exchange([a, b, c], 0.0)
    assert a.share(4.0) == 1.0
    assert a.share(5.5) == pytest.approx(1 / 3)  # nobody heard for peer_timeout_s = 5
    for _ in range(30):
        assert a.try_admit("t", 6.0) is ALLOWED
    assert a.check("t", 6.0) == Refused(Limit.REQUESTS, pytest.approx(60.0), 30, 30)
    a.peer_left("g1")  # b left gracefully: a now knows 2 gateways
    for _ in range(15):
        assert a.try_admit("t", 6.0) is ALLOWED
    assert a.check("t", 6.0).allowed == 45
    assert a.share(700.0) == 1.0  # c silent past forget_after_s (600 s): counted as gone


def test_stale_peer_entries_expire_and_zeroes_are_sent_once():
    a, b = cluster(2, TenantLimits(requests_per_minute=10), NO_PACING)
    for _ in range(5):
        a.record_request("t", 0.0)
    exchange([a, b], 0.5)
    assert b.report(1.0)["tenants"]["t"]["peers"]["g0"]["requests"] == 5
    for t in range(1, 80):
        exchange([a, b], float(t))
    assert decode_digest(a.build_digest(80.0)).tenants == ()  # a's window emptied at 60 s; zero sent once
    assert b.report(80.0)["tenants"] == {}


def test_a_peer_that_stops_mentioning_a_tenant_stops_counting():
    b = cluster(1, TenantLimits(requests_per_minute=10), NO_PACING)[0]
    heartbeat = encode_digest(UsageDigest(60000, 60000, 1000))
    b.receive_digest("g1", encode_digest(UsageDigest(60000, 60000, 1000, (TenantUsage("t", 10),))), 0.0)
    assert b.check("t", 1.0).used == 10
    for t in range(1, 7):
        b.receive_digest("g1", heartbeat, float(t))
    assert b.check("t", 6.0) is ALLOWED  # entry older than max(peer_timeout, 2 cycles): dropped


def test_digests_refuse_garbage_and_other_windows_and_ignore_self_and_strangers():
    a, b = cluster(2, TenantLimits(requests_per_minute=10))
    with pytest.raises(DigestError):
        a.receive_digest("g1", b"\x22\xff", 0.0)
    with pytest.raises(DigestError, match="windows"):
        a.receive_digest("g1", encode_digest(UsageDigest(30000, 5000, 0)), 0.0)
    assert a.receive_digest("g0", b.build_digest(0.0), 0.0) is False
    foreign = encode_digest(UsageDigest(60000, 5000, 0, (TenantUsage("not-ours", 10**6),)))
    assert a.receive_digest("g1", foreign, 0.0) is True
    assert a.check("t", 0.0) is ALLOWED and a.report(0.0)["tenants"] == {}


def test_peer_table_is_bounded():
    lim = limiter(TenantLimits(requests_per_minute=10), LimiterConfig(max_peers=4))
    empty = encode_digest(UsageDigest(60000, 5000, 0))
    accepted = [lim.receive_digest(f"p{i}", empty, 0.0) for i in range(10)]
    assert accepted == [True] * 4 + [False] * 6
    assert lim.gateways_known(0.0) == 5


def test_digest_respects_the_byte_budget_and_rotates_through_every_tenant():
    lim = UsageLimiter("g0")
    names = [f"tenant-{i:04d}" for i in range(300)]
    lim.configure({n: TenantLimits(requests_per_minute=10**6) for n in names})
    for n in names:
        lim.record_request(n, 0.0)
    seen: set[str] = set()
    for step in range(40):
        data = lim.build_digest(step * 0.5, budget_bytes=512)
        assert len(data) <= 512
        digest = decode_digest(data)
        seen.update(t.tenant for t in digest.tenants)
        if step >= 1:
            assert digest.cycle_ms > 0
    assert seen == set(names)


def test_tenants_near_a_limit_go_first_in_digests():
    lim = UsageLimiter("g0")
    names = [f"tenant-{i:04d}" for i in range(200)]
    lim.configure({n: TenantLimits(requests_per_minute=100) for n in names})
    for n in names:
        lim.record_request(n, 0.0)
    for _ in range(60):
        lim.record_request("tenant-0199", 0.0)  # 61 of 100: hot
    for step in range(10):
        assert "tenant-0199" in {t.tenant for t in decode_digest(lim.build_digest(step * 0.5, 256)).tenants}


@pytest.mark.slow  # ~5 s of CPU (a 30 s simulation of 1000 tenants): left out of `make test-fast`
def test_gossip_bandwidth_with_1000_tenants_is_bounded():
    report = digest_bandwidth(1000, 3, interval_s=0.5, budget_bytes=1024, duration_s=30.0)
    # One 1024-byte digest per 0.5 s to each of 2 peers: at most 4096 bytes/s, whatever the tenant count.
    assert report.largest_digest_bytes <= 1024
    assert 3000 <= report.bytes_per_s_per_node <= 4096
    assert report.longest_gap_s <= report.advertised_cycle_s
    small = digest_bandwidth(10, 3, interval_s=0.5, budget_bytes=1024, duration_s=10.0)
    assert small.bytes_per_s_per_node < report.bytes_per_s_per_node / 2
    assert small.longest_gap_s <= 0.5


# --------------------------------------------------------------------------------------------------------------
# Pace: smooth at one-second resolution


def per_second(admitted, seconds):
    counts = [0] * seconds
    for t, _ in admitted:
        counts[int(t)] += 1
    return counts


def test_after_a_quiet_spell_a_tenant_starts_at_its_pace_or_its_burst_allowance_and_nothing_echoes():
    fast = limiter(TenantLimits(requests_per_minute=600))  # 10/s: above the burst allowance (5)
    for _ in range(10):
        assert fast.try_admit("t", 0.5) is ALLOWED
    refused = fast.check("t", 0.6)
    assert refused.limit is Limit.REQUESTS and refused.retry_after_s == pytest.approx(0.4)
    for _ in range(10):
        assert fast.try_admit("t", 1.0) is ALLOWED
    assert fast.check("t", 1.0) is not ALLOWED

    slow = limiter(TenantLimits(requests_per_minute=120))  # 2/s: 5 may start at once, then it is paid back
    for _ in range(5):
        assert slow.try_admit("t", 0.0) is ALLOWED
    assert slow.check("t", 0.1).retry_after_s == pytest.approx(1.9)  # second 1 is used up, second 2 has 1
    counts = [5]
    for second in range(1, 30):
        admitted = 0
        for k in range(6):  # 3x the limit
            if slow.try_admit("t", second + k / 6) is ALLOWED:
                admitted += 1
        counts.append(admitted)
    assert counts[:3] == [5, 0, 1] and set(counts[3:]) == {2}, counts


@settings(max_examples=examples(40), deadline=None)
@given(st.integers(1, 4), st.sampled_from([300, 600, 1200, 3000]), st.sampled_from([1.5, 2.0, 3.0, 4.0]),
       st.sampled_from([0.1, 0.25, 0.5]))
def test_the_cluster_admits_the_limit_rate_in_every_second_after_the_first_two(gateways, per_minute, overload,
                                                                                interval):
    """Offered `overload` x the limit, spread round-robin over the gateways, digests every `interval`. While the
    first digests tell each gateway its slice of the demand (each takes an even one meanwhile), the first two
    seconds together stay within their pace; after them every single second admits the limit / 60 within 10 % (or
    one request, whichever is more), and no 5 s window holds more than the limit's share."""
    nodes = cluster(gateways, TenantLimits(requests_per_minute=per_minute))
    seconds = 30
    counts = per_second(simulate(nodes, seconds=seconds, rate=per_minute / 60 * overload, interval=interval),
                        seconds)
    pace = per_minute / 60
    tolerance = max(0.1 * pace, 1.0)
    assert all(abs(count - pace) <= tolerance for count in counts[2:]), counts
    assert sum(counts[:2]) <= 2 * (pace + tolerance), counts
    assert all(sum(counts[s:s + 5]) <= 5 * pace + gateways for s in range(seconds - 4)), counts


def test_random_arrivals_stay_near_the_limit_rate_every_second():
    import random

    rng = random.Random(7)
    nodes = cluster(3, TenantLimits(requests_per_minute=600))
    admitted = []
    next_digest = 0.0
    for k in range(60 * 30):
        now = k / 30
        while next_digest <= now:
            exchange(nodes, next_digest)
            next_digest += 0.5
        index = rng.choices(range(3), [1, 2, 3])[0]  # uneven, random
        if nodes[index].try_admit("t", now) is ALLOWED:
            admitted.append((now, index))
            nodes[index].stream_ended("t")
    counts = per_second(admitted, 60)
    spread = (sum((c - 10) ** 2 for c in counts[2:]) / len(counts[2:])) ** 0.5
    # Without the pace the pacing window alone gave 30, 21, 0, 0, 0, ... (a standard deviation over 10).
    assert spread < 3.0, counts
    # Each gateway's slice moves with its random share of the arrivals, and a slice that shrank holds its gateway
    # back for a moment: the cluster stays under the limit, a few percent below it.
    assert max(counts[2:]) <= 16 and 0.9 * 580 <= sum(counts[2:]) <= 580, counts


@settings(max_examples=examples(150), deadline=None)
@given(st.lists(st.floats(0.0, 0.05), min_size=30, max_size=150), st.integers(60, 600))
def test_retry_after_stays_exact_with_the_pace(gaps, per_minute):
    """Alone, at rates where the pace binds: a refused request passes exactly `retry_after_s` later and not a
    moment before, and no second (bucket) holds more than its pace or the burst allowance."""
    config = LimiterConfig()
    lim = limiter(TenantLimits(requests_per_minute=per_minute), config)
    admitted: list[int] = []
    now = 0.0
    for gap in gaps:
        now += gap
        decision = lim.check("t", now)
        if decision is ALLOWED:
            lim.record_request("t", now)
            admitted.append(int(now))
            continue
        retry = decision.retry_after_s
        assert retry > 0
        probe = limiter(TenantLimits(requests_per_minute=per_minute), config)
        for b in admitted:
            probe.record_request("t", float(b))
        assert probe.check("t", now + retry - 1e-6) is not ALLOWED
        assert probe.check("t", now + retry + 1e-9) is ALLOWED
    pace = per_minute / 60
    for bucket in set(admitted):
        assert admitted.count(bucket) <= max(pace, config.burst) + 1
    # 30+ requests within 1.5 s are more than the pace (or the burst) allows: the retries were checked.
    assert len(admitted) < len(gaps)


def test_a_gateway_that_alone_gets_requests_takes_the_whole_pace_once_its_peers_have_spoken():
    nodes = cluster(3, TenantLimits(requests_per_minute=600))
    admitted = []
    next_digest = 0.0
    for k in range(10 * 30):  # 30/s, all to g0; the others only send heartbeats
        now = k / 30
        while next_digest <= now:
            exchange(nodes, next_digest)
            next_digest += 0.5
        if nodes[0].try_admit("t", now) is ALLOWED:
            admitted.append((now, 0))
            nodes[0].stream_ended("t")
    counts = per_second(admitted, 10)
    # Until the others have spoken (an interval after its requests began) g0 takes an even slice: they might have
    # been getting requests too. Then, hearing no demand from them, the whole pace.
    assert counts[0] < 10 and counts[2:] == [10] * 8, counts
