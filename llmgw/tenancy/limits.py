"""Per-tenant limits, enforced across gateways by summing gossiped usage (sans-IO: `now` is always an argument).

Each gateway counts its own usage per tenant: requests and tokens in a sliding window of 60 one-second buckets
(`window.WindowCounter`), and running streams. It sends those counts to the other gateways (`build_digest`) and
keeps the latest counts each of them sent (`receive_digest`). A tenant's cluster usage is the sum of its own counts
and the fresh peers' counts: each gateway only ever writes its own numbers, so merging needs no coordination.

Decisions (`check`, or `try_admit` which also records the admission):
- max_concurrent: refused while cluster running streams >= the limit (retry hint: `concurrent_retry_after_s`);
- requests_per_minute: refused when one more request would exceed the limit in the window, or would exceed the
  pro-rata budget of the recent (pacing) window: limit * recent_window_s / 60. Without pacing a 60 s window lets a
  tenant spend the whole minute in its first seconds and then echoes that burst every minute; with it the
  admitted rate stays near limit / 60 per second after the first seconds; and refused when this gateway's own
  requests of the last s buckets (1 <= s <= the pacing window) would exceed its pace over them (below);
- tokens_per_minute: refused while the window's (or the recent window's) tokens are at or over the budget. Tokens
  are counted after the fact (`record_tokens`): a running stream is never cut, the next request is refused.
Pace (requests per minute, with pacing on): the pacing window alone still admits in lumps -- whatever a bucket
took frees up at once when that bucket leaves the window, so a burst comes back every window (per second 24, 21,
0, 0, 6, ... against 600/min). So each gateway also spreads its requests over the buckets: its pace is its part
of limit / 60 per second (its share when alone, times its slice of the cluster's recent demand; an even slice
while requests have just begun to arrive and some peer has not spoken since), and any s consecutive buckets may
hold at most the pace of s buckets (1 <= s <= the pacing window). Fractions of a request are spread
Bresenham-style, each gateway offset by its rank among the gateways it hears from, so with equal slices the
gateways' whole requests add up to the cluster's pace in every bucket. The burst allowance: after a quiet spell
(nothing in the pacing window) a bucket may take `burst` requests (cluster-wide, each gateway its slice) when its
pace is lower; the buckets after it take only what is left of their pace, so nothing echoes.
`retry_after_s` is the time until the first bucket boundary at which the request would pass, given the local
buckets (exact) and the peers' counts assumed spread evenly over their window (they only send sums).

Partitions: a peer not heard from for `peer_timeout_s` stops counting. While at least one peer is fresh, the
gateway enforces the whole limit on the sum it can see. When none is fresh, it is alone: it enforces its share,
limit / (1 + peers heard from within `forget_after_s`), at least 1. A peer that leaves gracefully (`peer_left`)
is forgotten at once; one that crashed stops counting in the divisor after `forget_after_s`.

Memory is bounded: state exists only for configured tenants (`configure`), for at most `max_peers` peers, and a
tenant with no usage holds no counters.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from llmgw.tenancy.digest import (
    DigestError,
    TenantUsage,
    decode_digest,
    encode_header,
    encode_tenant,
)
from llmgw.tenancy.keys import TenantLimits
from llmgw.tenancy.window import WindowCounter

__all__ = ["ALLOWED", "Allowed", "Decision", "Limit", "LimiterConfig", "Refused", "UsageLimiter"]


class Limit(enum.Enum):
    REQUESTS = "requests_per_minute"
    TOKENS = "tokens_per_minute"
    CONCURRENT = "max_concurrent"


@dataclass(frozen=True)
class Allowed:
    pass


ALLOWED = Allowed()


@dataclass(frozen=True)
class Refused:
    """HTTP 429 with Retry-After / gRPC RESOURCE_EXHAUSTED."""

    limit: Limit
    retry_after_s: float
    used: int  # the usage that was counted against the limit
    allowed: int  # the limit that applied (a share of the configured one when the gateway is alone)


Decision = Allowed | Refused


@dataclass(frozen=True)
class LimiterConfig:
    bucket_s: float = 1.0
    window_s: float = 60.0  # the limits are per minute; a different window scales them
    recent_window_s: float = 5.0  # pacing window; equal to window_s turns pacing off
    peer_timeout_s: float = 5.0  # a peer not heard from for this long stops counting
    forget_after_s: float = 600.0  # ... and after this long stops counting in "the gateways I last knew"
    concurrent_retry_after_s: float = 1.0  # when a stream will end is unknown: a hint
    burst: float = 5.0  # requests (cluster-wide) a tenant may start in one bucket after a quiet spell, at least
    hot_fraction: float = 0.5  # tenants using this much of a limit go first in digests
    max_peers: int = 64

    def __post_init__(self) -> None:
        if not self.bucket_s > 0:
            raise ValueError("bucket_s must be > 0")
        for name in ("window_s", "recent_window_s"):
            buckets = getattr(self, name) / self.bucket_s
            if buckets < 1 or abs(buckets - round(buckets)) > 1e-9:
                raise ValueError(f"{name} must be a whole number (>= 1) of buckets of {self.bucket_s:g} s")
        if self.recent_window_s > self.window_s:
            raise ValueError("recent_window_s must not exceed window_s")
        if not (self.peer_timeout_s > 0 and self.forget_after_s >= self.peer_timeout_s):
            raise ValueError("need peer_timeout_s > 0 and forget_after_s >= peer_timeout_s")
        if self.concurrent_retry_after_s <= 0 or not 0 < self.hot_fraction <= 1 or self.max_peers < 1:
            raise ValueError("concurrent_retry_after_s > 0, 0 < hot_fraction <= 1 and max_peers >= 1 required")
        if not self.burst >= 1:
            raise ValueError("burst must be >= 1 request")

    @property
    def buckets(self) -> int:
        return round(self.window_s / self.bucket_s)

    @property
    def recent_buckets(self) -> int:
        return round(self.recent_window_s / self.bucket_s)

    @property
    def pacing(self) -> bool:
        return self.recent_buckets < self.buckets


@dataclass(frozen=True)
class _Pace:
    """This gateway's pace for one tenant: how many requests the buckets ending with a given one may hold."""

    rate: float  # requests per bucket (this gateway's part)
    phase: float  # in [0, 1): rank / gateways, so the gateways' rounded allocations interleave
    burst: float  # this gateway's part of LimiterConfig.burst

    def _allocated(self, bucket: int) -> int:
        """Whole requests allocated to the buckets before `bucket` (Bresenham: floor(rate * bucket + phase))."""
        return math.floor(self.rate * bucket + self.phase)

    def allowance(self, head: int, span: int, quiet: bool) -> float:
        """What the `span` buckets ending with bucket `head` may hold together: their allocation; after a quiet
        spell (`quiet`: nothing in the pacing window before `head`) also what lifts bucket `head`'s allocation to
        the burst allowance when it is below it."""
        end = self._allocated(head + 1)
        lift = max(0.0, self.burst - (end - self._allocated(head))) if quiet else 0.0
        return end - self._allocated(head + 1 - span) + lift

    def fits(self, newest: list[int], head: int, spans: int, ahead: int = 0) -> bool:
        """Whether one more request fits in bucket `head + ahead`, for every span 1..`spans` ending with it, given
        this gateway's counts newest first (newest[k] = bucket `head - k`; later buckets are empty)."""
        older = newest[1:spans] if ahead == 0 else newest[:max(0, spans - ahead)]
        quiet = not any(older)
        for span in range(1, spans + 1):
            if sum(newest[:max(0, span - ahead)]) + 1 > self.allowance(head + ahead, span, quiet):
                return False
        return True


@dataclass
class _Own:
    """This gateway's usage of one tenant."""

    requests: WindowCounter
    tokens: WindowCounter
    demand: WindowCounter  # requests that arrived (checked), over the recent window only
    in_flight: int = 0
    busy_since: float = -math.inf  # when requests began to arrive after a quiet pacing window
    demand_sent: int | None = None  # recent demand in the last digest sent: as stale as the peers' figures
    last_sent: float = -math.inf
    sent_nonzero: bool = False  # peers hold a non-zero value from us: send the zero once it drops to zero


@dataclass
class _Peer:
    last_heard: float
    cycle_s: float = 0.0
    tenants: dict[str, tuple[TenantUsage, float]] = field(default_factory=dict)  # name -> (usage, received at)


@dataclass(frozen=True)
class _Seen:
    """A tenant's usage summed over the fresh peers."""

    requests: int = 0
    recent_requests: int = 0
    tokens: int = 0
    recent_tokens: int = 0
    in_flight: int = 0
    recent_demand: int = 0


class UsageLimiter:
    def __init__(self, gateway_id: str, config: LimiterConfig | None = None) -> None:
        self.gateway_id = gateway_id
        self.config = config or LimiterConfig()
        self._limits: dict[str, TenantLimits] = {}
        self._own: dict[str, _Own] = {}
        self._peers: dict[str, _Peer] = {}
        self._last_build: float | None = None
        self._interval_s = 1.0  # estimate of the time between two build_digest calls

    # ----------------------------------------------------------------------------------------------------------
    # Configuration

    def configure(self, limits: Mapping[str, TenantLimits]) -> None:
        """The configured tenants (after a key file load or reload). State is kept by tenant name; tenants no
        longer configured lose theirs."""
        self._limits = dict(limits)
        for name in [n for n in self._own if n not in self._limits]:
            del self._own[name]
        for peer in self._peers.values():
            for name in [n for n in peer.tenants if n not in self._limits]:
                del peer.tenants[name]

    # ----------------------------------------------------------------------------------------------------------
    # Recording

    def _state(self, tenant: str) -> _Own | None:
        if tenant not in self._limits:
            return None
        own = self._own.get(tenant)
        if own is None:
            cfg = self.config
            own = self._own[tenant] = _Own(WindowCounter(cfg.buckets, cfg.bucket_s),
                                           WindowCounter(cfg.buckets, cfg.bucket_s),
                                           WindowCounter(cfg.recent_buckets, cfg.bucket_s))
        return own

    def record_request(self, tenant: str, now: float) -> None:
        own = self._state(tenant)
        if own is not None:
            own.requests.add(now, 1)

    def record_tokens(self, tenant: str, tokens: int, now: float) -> None:
        """Tokens a request used (prompt + completion), counted when known: at the end of a stream or as it goes."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        own = self._state(tenant)
        if own is not None and tokens:
            own.tokens.add(now, tokens)

    def stream_started(self, tenant: str) -> None:
        own = self._state(tenant)
        if own is not None:
            own.in_flight += 1

    def stream_ended(self, tenant: str) -> None:
        own = self._own.get(tenant)
        if own is not None and own.in_flight > 0:
            own.in_flight -= 1

    # ----------------------------------------------------------------------------------------------------------
    # Decisions

    def try_admit(self, tenant: str, now: float) -> Decision:
        """`check`, and when allowed, `record_request` and `stream_started` in the same step."""
        decision = self.check(tenant, now)
        if decision is ALLOWED:
            self.record_request(tenant, now)
            self.stream_started(tenant)
        return decision

    def check(self, tenant: str, now: float) -> Decision:
        """Whether a request arriving now may start. Call it once per arriving request: the arrivals it counts
        (admitted or not) decide how the recent budget is sliced between gateways. Unconfigured and unlimited
        tenants are always allowed."""
        limits = self._limits.get(tenant)
        own = self._state(tenant)
        if limits is None or own is None or limits.unlimited:
            return ALLOWED
        cfg = self.config
        if not own.demand.total(now):
            own.busy_since = now
        own.demand.add(now, 1)
        share, fresh = self._share(now)
        seen = self._seen(tenant, fresh, now)
        if limits.max_concurrent is not None:
            cap = max(1, math.floor(limits.max_concurrent * share))
            used = own.in_flight + seen.in_flight
            if used >= cap:
                return Refused(Limit.CONCURRENT, cfg.concurrent_retry_after_s, used, cap)
        checks = ((Limit.REQUESTS, limits.requests_per_minute, seen.requests, seen.recent_requests),
                  (Limit.TOKENS, limits.tokens_per_minute, seen.tokens, seen.recent_tokens))
        for kind, per_minute, peer_window, peer_recent in checks:
            if per_minute is None:
                continue
            counter = own.requests if kind is Limit.REQUESTS else own.tokens
            window_cap, recent_cap = self._caps(per_minute, share)
            slice_cap = None
            pace = None
            if kind is Limit.REQUESTS and recent_cap is not None:
                gateways = self._gateways_heard(now)
                fraction = 1.0  # of the cluster's recent demand that arrives here
                if not seen.recent_demand and any(peer.last_heard < own.busy_since + self._interval_s
                                                  for peer in fresh):
                    # Requests just began to arrive here and a peer has not spoken since (a digest heard within an
                    # interval may have been built before its own requests began): it may be getting them too.
                    # Until each has, this gateway takes an even slice rather than the whole pace.
                    fraction = 1.0 / len(gateways)
                elif seen.recent_demand:
                    # Peers' counts arrive late: after a bucket boundary every gateway would see the same freed
                    # room and fill it. Each takes at most its slice of the recent budget, in proportion to the
                    # requests arriving at it, so the gateways do not claim the same room twice.
                    own_demand = own.demand.total(now) if own.demand_sent is None else own.demand_sent
                    own_demand = max(own_demand, 1)
                    fraction = _rounded_slice(own_demand / (own_demand + seen.recent_demand), len(gateways))
                    slice_cap = math.ceil(recent_cap * fraction)
                pace = self._pace(per_minute, share * fraction, gateways)
            own_window = counter.total(now)
            own_recent = counter.total(now, cfg.recent_buckets)
            # Requests: one more must fit. Tokens: the next request's cost is unknown; allowed while under.
            over: tuple[int, int] | None = None
            if own_window + peer_window + 1 > window_cap:
                over = own_window + peer_window, window_cap
            elif recent_cap is not None and (own_recent + peer_recent + 1 > recent_cap
                                             or (slice_cap is not None and own_recent + 1 > slice_cap)
                                             or (pace is not None and not pace.fits(counter.newest_first(now),
                                                                                    counter.head(now),
                                                                                    cfg.recent_buckets))):
                over = own_recent + peer_recent, recent_cap
            if over is not None:
                retry = self._retry_after(counter, now, peer_window, peer_recent, window_cap, recent_cap, slice_cap,
                                          pace)
                return Refused(kind, retry, *over)
        return ALLOWED

    def _caps(self, per_minute: int, share: float) -> tuple[int, int | None]:
        cfg = self.config
        window_cap = max(1, math.floor(per_minute * share * cfg.window_s / 60.0))
        if not cfg.pacing:
            return window_cap, None
        return window_cap, max(1, math.floor(per_minute * share * cfg.recent_window_s / 60.0))

    def _gateways_heard(self, now: float) -> list[str]:
        """This gateway and the peers it hears from, sorted by id."""
        timeout = self.config.peer_timeout_s
        return sorted([self.gateway_id, *(peer_id for peer_id, peer in self._peers.items()
                                          if now - peer.last_heard <= timeout)])

    def _pace(self, per_minute: int, part: float, gateways: list[str]) -> _Pace:
        """This gateway's pace: `part` (its share times its slice) of per_minute / 60 per second, phased by its rank
        among `gateways`."""
        cfg = self.config
        return _Pace(per_minute * part * cfg.bucket_s / 60.0, gateways.index(self.gateway_id) / len(gateways),
                     cfg.burst * part)

    def _retry_after(self, counter: WindowCounter, now: float, peer_window: int, peer_recent: int,
                     window_cap: int, recent_cap: int | None, slice_cap: int | None,
                     pace: _Pace | None = None) -> float:
        """Seconds until the first bucket boundary where one more unit fits in both windows (and the slice and
        the pace)."""
        cfg = self.config
        n, r, bucket_s = cfg.buckets, cfg.recent_buckets, cfg.bucket_s
        newest = counter.newest_first(now)
        head = counter.head(now)
        own_window = sum(newest)
        own_recent = sum(newest[:r])
        for j in range(n):
            # At the boundary (head + 1 + j) * bucket_s, bucket head - k is still in a window of m buckets
            # while k <= m - 2 - j: the oldest of them, k = m - 1 - j, has just left.
            own_window -= newest[n - 1 - j]
            if r - 1 - j >= 0:
                own_recent -= newest[r - 1 - j]
            wait = (head + 1 + j) * bucket_s - now
            peers_window = peer_window * max(0.0, 1.0 - wait / cfg.window_s)
            peers_recent = peer_recent * max(0.0, 1.0 - wait / cfg.recent_window_s)
            fits_window = own_window + peers_window + 1 <= window_cap
            fits_recent = recent_cap is None or own_recent + peers_recent + 1 <= recent_cap
            fits_slice = slice_cap is None or own_recent + 1 <= slice_cap
            fits_pace = pace is None or pace.fits(newest, head, r, ahead=1 + j)
            if fits_window and fits_recent and fits_slice and fits_pace:
                return max(wait, 0.0)
        return cfg.window_s

    # ----------------------------------------------------------------------------------------------------------
    # Cluster view

    def _share(self, now: float) -> tuple[float, list[_Peer]]:
        """(fraction of each limit this gateway enforces, the fresh peers whose usage counts)."""
        cfg = self.config
        for peer_id in [p for p, peer in self._peers.items() if now - peer.last_heard > cfg.forget_after_s]:
            del self._peers[peer_id]
        fresh = [peer for peer in self._peers.values() if now - peer.last_heard <= cfg.peer_timeout_s]
        if fresh:
            return 1.0, fresh
        return 1.0 / (1 + len(self._peers)), []

    def _seen(self, tenant: str, fresh: list[_Peer], now: float) -> _Seen:
        requests = recent_requests = tokens = recent_tokens = in_flight = recent_demand = 0
        for peer in fresh:
            usage = self._peer_entry(peer, tenant, now)
            if usage is None:
                continue
            requests += usage.requests
            recent_requests += usage.recent_requests
            tokens += usage.tokens
            recent_tokens += usage.recent_tokens
            in_flight += usage.in_flight
            recent_demand += usage.recent_demand
        return _Seen(requests, recent_requests, tokens, recent_tokens, in_flight, recent_demand)

    def _peer_entry(self, peer: _Peer, tenant: str, now: float) -> TenantUsage | None:
        entry = peer.tenants.get(tenant)
        if entry is None:
            return None
        usage, received_at = entry
        # A peer sends each tenant at least once per cycle; an entry not refreshed for two cycles is gone (the
        # peer's usage dropped to zero and the datagram saying so was lost). Nothing counted more than a window
        # ago can still be in the window.
        if now - received_at > min(self.config.window_s, max(self.config.peer_timeout_s, 2 * peer.cycle_s)):
            return None
        return usage

    def share(self, now: float) -> float:
        """The fraction of each limit this gateway enforces now: 1, or its share when it is alone."""
        return self._share(now)[0]

    def gateways_known(self, now: float) -> int:
        self._share(now)
        return 1 + len(self._peers)

    # ----------------------------------------------------------------------------------------------------------
    # Gossip

    def _own_usage(self, tenant: str, own: _Own, now: float) -> TenantUsage:
        recent = self.config.recent_buckets
        return TenantUsage(tenant, own.requests.total(now), own.tokens.total(now), own.in_flight,
                           own.requests.total(now, recent), own.tokens.total(now, recent), own.demand.total(now))

    def _hot(self, tenant: str, usage: TenantUsage, fresh: list[_Peer], now: float) -> bool:
        limits = self._limits[tenant]
        seen = self._seen(tenant, fresh, now)
        hot = self.config.hot_fraction
        window = self.config.window_s / 60.0
        return ((limits.requests_per_minute is not None
                 and usage.requests + seen.requests >= hot * limits.requests_per_minute * window)
                or (limits.tokens_per_minute is not None
                    and usage.tokens + seen.tokens >= hot * limits.tokens_per_minute * window)
                or (limits.max_concurrent is not None
                    and usage.in_flight + seen.in_flight >= hot * limits.max_concurrent))

    def build_digest(self, now: float, budget_bytes: int = 1024) -> bytes:
        """This gateway's usage, at most `budget_bytes` long, to send to every other gateway.

        Only tenants with usage are sent (plus, once, those whose usage just dropped to zero). When they do not all
        fit, tenants near a limit go first, then the least recently sent: successive digests rotate through
        the rest. Call it on a steady interval; an empty digest is a heartbeat and still worth sending."""
        cfg = self.config
        if self._last_build is not None and now > self._last_build:
            self._interval_s = 0.8 * self._interval_s + 0.2 * (now - self._last_build)
        self._last_build = now
        _, fresh = self._share(now)
        candidates: list[tuple[bool, float, str, bytes, bool]] = []
        total = 0
        for name in list(self._own):
            own = self._own[name]
            usage = self._own_usage(name, own, now)
            nonzero = bool(usage.requests or usage.tokens or usage.in_flight or usage.recent_demand)
            if not nonzero and not own.sent_nonzero:
                del self._own[name]  # idle: nothing to remember, nothing owed to peers
                continue
            encoded = encode_tenant(usage)
            total += len(encoded)
            candidates.append((not self._hot(name, usage, fresh, now), own.last_sent, name, encoded, nonzero))
        # Half the budget goes to tenants near a limit (their peers' view matters most), least recently sent
        # first; the rest to every tenant, least recently sent first, so no tenant waits longer than the cycle.
        candidates.sort(key=lambda c: (c[1], c[2]))
        room = max(1, (budget_bytes - 20) // 2)
        cycle_s = math.ceil(total / room) * self._interval_s
        header = encode_header(round(cfg.window_s * 1000), round(cfg.recent_window_s * 1000),
                               min(round(cycle_s * 1000), (1 << 32) - 1))
        if len(header) > budget_bytes:
            raise ValueError(f"budget_bytes {budget_bytes} cannot hold even the digest header")
        parts = [header]
        used = len(header)
        chosen: set[str] = set()
        for hot_pass in (True, False):
            limit = len(header) + room if hot_pass else budget_bytes
            for cold, _, name, encoded, nonzero in candidates:
                if (hot_pass and cold) or name in chosen:
                    continue
                if used + len(encoded) > limit:
                    break
                parts.append(encoded)
                used += len(encoded)
                chosen.add(name)
                own = self._own[name]
                own.last_sent = now
                own.sent_nonzero = nonzero
                own.demand_sent = own.demand.total(now)
        return b"".join(parts)

    def receive_digest(self, peer_id: str, data: bytes, now: float) -> bool:
        """Take in a peer's digest. False when it was ignored (from ourselves, or too many peers); `DigestError`
        when the bytes are not a digest or the peer counts over different windows."""
        if peer_id == self.gateway_id:
            return False
        digest = decode_digest(data)
        cfg = self.config
        if digest.window_ms != round(cfg.window_s * 1000) or digest.recent_ms != round(cfg.recent_window_s * 1000):
            raise DigestError(f"peer {peer_id!r} counts over {digest.window_ms} ms / {digest.recent_ms} ms windows, "
                              f"this gateway over {round(cfg.window_s * 1000)} / {round(cfg.recent_window_s * 1000)}")
        peer = self._peers.get(peer_id)
        if peer is None:
            self._share(now)  # forgets long-silent peers first
            if len(self._peers) >= cfg.max_peers:
                return False
            peer = self._peers[peer_id] = _Peer(now)
        peer.last_heard = max(peer.last_heard, now)
        peer.cycle_s = digest.cycle_ms / 1000.0
        for usage in digest.tenants:
            if usage.tenant not in self._limits:
                continue
            if usage.requests or usage.tokens or usage.in_flight or usage.recent_demand:
                peer.tenants[usage.tenant] = (usage, now)
            else:  # the peer's usage dropped to zero
                peer.tenants.pop(usage.tenant, None)
        return True

    def peer_left(self, peer_id: str) -> None:
        """A gateway left gracefully (or was removed): drop its usage and stop counting it as a gateway."""
        self._peers.pop(peer_id, None)

    # ----------------------------------------------------------------------------------------------------------
    # Accounting

    def report(self, now: float) -> dict:
        """JSON-able usage per tenant: this gateway's, each fresh peer's and the cluster sum (GET /admin/usage)."""
        share, fresh = self._share(now)
        fresh_ids = {id(p) for p in fresh}
        tenants: dict[str, dict] = {}
        for name, limits in sorted(self._limits.items()):
            own = self._own.get(name)
            local = self._own_usage(name, own, now) if own else TenantUsage(name)
            per_peer = {}
            for peer_id, peer in sorted(self._peers.items()):
                usage = self._peer_entry(peer, name, now) if id(peer) in fresh_ids else None
                if usage is not None:
                    per_peer[peer_id] = _usage_json(usage)
            if not (local.requests or local.tokens or local.in_flight or per_peer):
                continue
            seen = self._seen(name, fresh, now)
            cluster = {"requests": local.requests + seen.requests, "tokens": local.tokens + seen.tokens,
                       "in_flight": local.in_flight + seen.in_flight}
            tenants[name] = {"local": _usage_json(local), "peers": per_peer, "cluster": cluster,
                             "limits": {"requests_per_minute": limits.requests_per_minute,
                                        "tokens_per_minute": limits.tokens_per_minute,
                                        "max_concurrent": limits.max_concurrent}}
        peers = {peer_id: {"last_heard_s": round(now - peer.last_heard, 3),
                           "counted": id(peer) in fresh_ids}
                 for peer_id, peer in sorted(self._peers.items())}
        return {"gateway": self.gateway_id, "window_s": self.config.window_s, "share": share, "peers": peers,
                "tenants": tenants}


def _rounded_slice(fraction: float, gateways: int) -> float:
    """A slice of the demand rounded to 1 / (4 x gateways): demand counts differ by a request or two from digest to
    digest, and each such difference would otherwise move the rounding of the pace's allocations (and the slice of
    the pacing budget), so that evenly loaded gateways no longer add up exactly."""
    steps = 4 * gateways
    return min(1.0, max(1, round(fraction * steps)) / steps)


def _usage_json(usage: TenantUsage) -> dict:
    return {"requests": usage.requests, "tokens": usage.tokens, "in_flight": usage.in_flight}
