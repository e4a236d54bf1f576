"""Adaptive stall deadlines: how long to wait for a replica's next message before suspecting a stall.

A fixed inter-token timeout has to be long enough for the slowest healthy replica, so a fast replica that freezes
keeps its clients waiting that long. Here each replica's deadlines follow its own recent behaviour:

    inter-token deadline = clamp(q-quantile of its recent message gaps x gap_factor + gap_margin_s,
                                 gap_floor_s, inter_token_ceiling_s)
    first-token deadline = clamp(q-quantile of its recent TTFTs for prompts at least this long x ttft_factor
                                 + ttft_margin_s, ttft_floor_s, first_token_ceiling_s)

The ceilings are the gateway's configured first_token_timeout_s / inter_token_timeout_s: an adaptive deadline is
never looser than today's fixed one, and until a replica has `min_gap_samples` (`min_ttft_samples`) recent samples
its deadline *is* the ceiling.

What a sample is:
- A gap is the time between two consecutive messages of one stream as the request path reads them (a message can
  carry several tokens, so gaps are per message, not per token). It is never shorter than the time the path's
  watchdog waited for that message, so a deadline learnt from gaps errs on the long side. Gaps of all the streams
  a replica serves are pooled: they measure the same engine.
- A TTFT is the time from sending a request to its first message. Prefill grows with the prompt, so TTFTs are kept
  per prompt-size class (class 0: up to `prompt_unit_chars` characters; class c: up to unit x 2^c) and a request
  is judged by the samples of its own class or, when that class has too few, of the nearest *larger* class that
  has enough: a longer prompt's TTFT bounds a shorter one's from above, so the estimate only ever extrapolates
  downwards. A request longer than anything recently seen gets the ceiling. Within a class prompts differ by at
  most 2x, which the default factor of 4 covers with room to spare; the 1 s floor covers class 0's spread.

Why a decaying histogram and not a ring of the last N samples: gaps of 30 concurrent streams at 20 ms/token
arrive at 1500/s, so a ring of a few hundred samples remembers a fraction of a second; a replica that pauses
100 ms once a second would see its pauses fall out of the ring between two pauses and its deadline swing down
to the fast value just before the next pause. The histogram weighs samples by age (half-life `half_life_s`), not
by count: a pause that happens 2 % of the time keeps 2 % of the weight however fast samples arrive. Memory is fixed
(log-spaced buckets, 8 per doubling: values are rounded *up* to their bucket's upper edge, at most 9 % high, which
only ever lengthens a deadline), recording is O(1) (one log2, one add; the decay is applied by recording each new
sample with a weight that grows 2x per half-life instead of shrinking the old ones, renormalised once in ~60
half-lives), and the quantile (a walk over ~130 buckets) is recomputed lazily: when asked for, after
`recompute_every` new samples or `recompute_interval_s`, whichever comes first. A replica that stops sending
decays back below the minimum sample count, and so back to the ceiling: stale evidence is not trusted.

What a deadline that passes means is the request path's business; `StallRace` (end of this file) is the decision
logic the issue asks for: on a suspected stall start a continuation on another replica from the next index, keep
the quiet leg racing, the first leg to deliver that index wins and the others are cancelled.

Sans-IO: the clock is injected; nothing sleeps, spawns tasks or does I/O.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# Histogram resolution: 8 buckets per doubling = bucket edges 9 % apart.
_BUCKETS_PER_DOUBLING = 8
# Smallest resolved value: anything at or below 100 us counts as 100 us (a gap that short is a batch boundary).
_LOW_S = 1e-4
# Renormalise the growing sample weight once it reaches 2^60 (floats hold it exactly enough, far from overflow).
_RESCALE_EXPONENT = 60.0
# Prompt-size classes above class 0: up to unit x 2^24 characters (16 Mi units), far beyond any prompt cap.
_MAX_SIZE_CLASS = 24


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class DeadlineConfig:
    """Knobs of the adaptive deadlines; defaults and the reasoning behind them are in docs/resilience.md."""

    enabled: bool = True
    # Hard limits: the gateway's configured first_token_timeout_s / inter_token_timeout_s.
    first_token_ceiling_s: float = 10.0
    inter_token_ceiling_s: float = 5.0
    # Inter-token: p99 of recent gaps x 3 + 50 ms, never below 200 ms (the gateway's own event-loop and scheduling
    # jitter on a busy host is tens of ms; 200 ms still leaves 800 ms of the 1 s stall budget for the continuation).
    gap_quantile: float = 0.99
    gap_factor: float = 3.0
    gap_margin_s: float = 0.05
    gap_floor_s: float = 0.2
    min_gap_samples: int = 50
    # First token: p99 of recent TTFTs of the prompt's size class x 4, never below 1 s (prefill cost varies with
    # the prompt and the prefix cache far more than decoding varies per token; a false alarm here costs a
    # duplicated prefill, so the first-token limit is deliberately generous).
    ttft_quantile: float = 0.99
    ttft_factor: float = 4.0
    ttft_margin_s: float = 0.0
    ttft_floor_s: float = 1.0
    min_ttft_samples: int = 20
    prompt_unit_chars: int = 1024
    # Age weighting: a sample counts half as much after half_life_s (a "window" of ~1.44 x half-life on average).
    half_life_s: float = 30.0
    # The cached deadline is recomputed after this many new samples or this long, whichever comes first.
    recompute_every: int = 32
    recompute_interval_s: float = 1.0

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        def count(name: str) -> None:
            value = getattr(self, name)
            check(name, isinstance(value, int) and not isinstance(value, bool) and value >= 1, "an int >= 1")

        check("enabled", isinstance(self.enabled, bool), "a bool")
        for name in ("first_token_ceiling_s", "inter_token_ceiling_s", "half_life_s", "recompute_interval_s"):
            value = getattr(self, name)
            check(name, _number(value) and value > 0, "a finite number > 0")
        for name in ("gap_quantile", "ttft_quantile"):
            value = getattr(self, name)
            check(name, _number(value) and 0 < value <= 1, "a number in (0, 1]")
        for name in ("gap_factor", "ttft_factor"):
            value = getattr(self, name)
            check(name, _number(value) and value >= 1, "a finite number >= 1 (a deadline below the observed "
                                                         "quantile would flag normal behaviour)")
        for name in ("gap_margin_s", "ttft_margin_s", "gap_floor_s", "ttft_floor_s"):
            value = getattr(self, name)
            check(name, _number(value) and value >= 0, "a finite number >= 0")
        check("gap_floor_s", self.gap_floor_s <= self.inter_token_ceiling_s,
              f"<= inter_token_ceiling_s ({self.inter_token_ceiling_s})")
        check("ttft_floor_s", self.ttft_floor_s <= self.first_token_ceiling_s,
              f"<= first_token_ceiling_s ({self.first_token_ceiling_s})")
        for name in ("min_gap_samples", "min_ttft_samples", "prompt_unit_chars", "recompute_every"):
            count(name)

    @classmethod
    def from_timeouts(cls, first_token_timeout_s: float, inter_token_timeout_s: float,
                      **overrides: Any) -> DeadlineConfig:
        """The config for a gateway with these fixed timeouts as ceilings. A floor above its ceiling (a gateway
        configured with timeouts shorter than the default floors, as tests do) is lowered to the ceiling: the
        configured timeout is the operator's hard limit and wins."""
        if "first_token_ceiling_s" in overrides or "inter_token_ceiling_s" in overrides:
            raise ValueError("pass the ceilings as first_token_timeout_s / inter_token_timeout_s, not as overrides")
        gap_floor = overrides.pop("gap_floor_s", cls.gap_floor_s)
        ttft_floor = overrides.pop("ttft_floor_s", cls.ttft_floor_s)
        if _number(inter_token_timeout_s) and _number(gap_floor):
            gap_floor = min(gap_floor, inter_token_timeout_s)
        if _number(first_token_timeout_s) and _number(ttft_floor):
            ttft_floor = min(ttft_floor, first_token_timeout_s)
        return cls(first_token_ceiling_s=first_token_timeout_s, inter_token_ceiling_s=inter_token_timeout_s,
                   gap_floor_s=gap_floor, ttft_floor_s=ttft_floor, **overrides)


class DecayingHistogram:
    """Age-weighted samples in fixed log-spaced buckets between 100 us and `high_s` (values above go to the top
    bucket and read back as `high_s`). A quantile reads back as its bucket's upper edge: never below the sample."""

    __slots__ = ("_counts", "_edges", "_epoch", "_half_life", "_last", "_top", "_total")

    def __init__(self, high_s: float, half_life_s: float, now: float) -> None:
        doublings = max(0.0, math.log2(high_s / _LOW_S))
        buckets = math.ceil(doublings * _BUCKETS_PER_DOUBLING) + 1
        edges = [_LOW_S * 2.0 ** (i / _BUCKETS_PER_DOUBLING) for i in range(buckets)]
        edges[-1] = max(high_s, _LOW_S)
        self._edges = edges
        self._top = buckets - 1
        self._counts = [0.0] * buckets
        self._total = 0.0
        self._epoch = now
        self._half_life = half_life_s
        self._last = now

    @property
    def buckets(self) -> int:
        return len(self._counts)

    def add(self, value: float, now: float) -> None:
        if now < self._last:  # a clock that stepped back: age nothing rather than weigh the past more
            now = self._last
        self._last = now
        exponent = (now - self._epoch) / self._half_life
        if exponent > _RESCALE_EXPONENT:
            self._rescale(now)
            exponent = 0.0
        weight = 2.0 ** exponent
        self._counts[self._index(value)] += weight
        self._total += weight

    def weight(self, now: float) -> float:
        """Effective number of samples at `now`: each sample counts 2^-(age / half-life)."""
        now = max(now, self._last)
        return self._total * 2.0 ** (-(now - self._epoch) / self._half_life)

    def quantile(self, q: float) -> float | None:
        """Upper edge of the bucket holding the weighted q-quantile; None when empty."""
        if self._total <= 0.0:
            return None
        target = q * self._total
        cumulative = 0.0
        last_nonzero = 0
        edges = self._edges
        for i, count in enumerate(self._counts):
            if count:
                cumulative += count
                last_nonzero = i
                if cumulative >= target:
                    return edges[i]
        return edges[last_nonzero]  # float rounding left the sum a hair short of q x total

    def _index(self, value: float) -> int:
        if value <= _LOW_S:
            return 0
        i = math.ceil(math.log2(value / _LOW_S) * _BUCKETS_PER_DOUBLING)
        if i >= self._top:
            return self._top
        if self._edges[i] < value:  # log2 rounding put it one bucket low: the edge must not be below the value
            i += 1
        return i

    def _rescale(self, now: float) -> None:
        factor = 2.0 ** (-(now - self._epoch) / self._half_life)
        self._counts = [c * factor for c in self._counts]
        self._total *= factor
        self._epoch = now


class _CachedDeadline:
    """A deadline derived from one histogram, recomputed after enough new samples or time."""

    __slots__ = ("computed_at", "histogram", "pending", "quantile_s", "value")

    def __init__(self, histogram: DecayingHistogram, ceiling: float) -> None:
        self.histogram = histogram
        self.value = ceiling
        self.quantile_s: float | None = None
        self.pending = 0
        self.computed_at = -math.inf


class _Replica:
    __slots__ = ("gaps", "largest_class", "stalled_since", "ttft")

    def __init__(self, gaps: _CachedDeadline) -> None:
        self.gaps = gaps
        self.stalled_since: float | None = None
        self.ttft: dict[int, _CachedDeadline] = {}  # by prompt-size class, created on first sample
        self.largest_class = -1


def _check_replica_id(replica_id: object) -> str:
    if not isinstance(replica_id, str) or not replica_id:
        raise ValueError(f"replica_id must be a non-empty string, got {replica_id!r}")
    return replica_id


def _check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not (value >= 0.0 and value < math.inf):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _check_chars(prompt_chars: object) -> int:
    if isinstance(prompt_chars, bool) or not isinstance(prompt_chars, int) or prompt_chars < 0:
        raise ValueError(f"prompt_chars must be an int >= 0, got {prompt_chars!r}")
    return prompt_chars


class StallDeadlines:
    """Per-replica adaptive first-token and inter-token deadlines for one gateway.

    Hot path, per replica message: record_gap(replica, seconds) then inter_token_deadline(replica) to arm the
    watchdog for the next one. Per request: first_token_deadline(replica, prompt_chars) when sending it,
    record_first_token(replica, seconds, prompt_chars) when its first message arrives (prompt_chars: the prompt
    plus the resumed tokens of a continuation). A leg that lost a stall race: record_abandoned_wait(). Attempts
    cancelled for other reasons (client gone, hedge lost) record nothing.
    """

    def __init__(self, config: DeadlineConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or DeadlineConfig()
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}

    # ---- membership -------------------------------------------------------------------------------------------
    def set_replicas(self, replica_ids: Iterable[str]) -> None:
        """Forget replicas no longer listed (new ones start at the ceilings when they first report)."""
        wanted = {_check_replica_id(r) for r in replica_ids}
        for rid in list(self._replicas):
            if rid not in wanted:
                del self._replicas[rid]

    def forget(self, replica_id: str) -> None:
        """Drop a replica's history (it left, or restarted and may behave differently); unknown ids are ignored."""
        self._replicas.pop(replica_id, None)

    # ---- samples ----------------------------------------------------------------------------------------------
    def record_gap(self, replica_id: str, gap_s: float) -> None:
        """Time between two consecutive messages of one stream served by this replica."""
        gap_s = _check_seconds("gap_s", gap_s)
        if not self.config.enabled:
            return
        entry = self._replicas.get(replica_id) or self._entry(replica_id)
        entry.stalled_since = None
        cached = entry.gaps
        cached.histogram.add(gap_s, self._clock())
        cached.pending += 1

    def record_abandoned_wait(self, replica_id: str, waited_s: float) -> None:
        """A stream of this replica was given up on after waiting `waited_s` for its next message (its leg lost a
        stall race): its gap was at least that long. Counted as a gap of that length, so a replica that really
        became slower raises its own deadline even when every race goes to the continuation; a one-off freeze
        adds one sample per stream (30 among tens of thousands) and moves no high percentile. It does not clear
        the stalled mark: the replica did not deliver."""
        waited_s = _check_seconds("waited_s", waited_s)
        if not self.config.enabled:
            return
        entry = self._replicas.get(replica_id) or self._entry(replica_id)
        entry.gaps.histogram.add(waited_s, self._clock())
        entry.gaps.pending += 1

    def record_first_token(self, replica_id: str, ttft_s: float, prompt_chars: int) -> None:
        """Time from sending a request of `prompt_chars` characters (prompt plus resumed tokens) to its first
        message."""
        ttft_s = _check_seconds("ttft_s", ttft_s)
        size_class = self._size_class(_check_chars(prompt_chars))
        if not self.config.enabled:
            return
        entry = self._replicas.get(replica_id) or self._entry(replica_id)
        entry.stalled_since = None
        now = self._clock()
        cached = entry.ttft.get(size_class)
        if cached is None:
            ceiling = self.config.first_token_ceiling_s
            cached = entry.ttft[size_class] = _CachedDeadline(
                DecayingHistogram(ceiling, self.config.half_life_s, now), ceiling)
            entry.largest_class = max(entry.largest_class, size_class)
        cached.histogram.add(ttft_s, now)
        cached.pending += 1

    def mark_stalled(self, replica_id: str) -> None:
        """A deadline of this replica passed: it counts as stalled until it delivers a message again (any
        record_gap / record_first_token for it). New requests can avoid it meanwhile (stalled_replicas()): a
        frozen replica would otherwise make every request routed to it wait a first-token deadline."""
        if not self.config.enabled:
            return
        entry = self._replicas.get(replica_id) or self._entry(replica_id)
        if entry.stalled_since is None:
            entry.stalled_since = self._clock()

    def stalled(self, replica_id: str) -> bool:
        entry = self._replicas.get(replica_id)
        return entry is not None and entry.stalled_since is not None

    def stalled_replicas(self) -> list[str]:
        """Replicas marked stalled that have not delivered since, sorted."""
        return sorted(rid for rid, entry in self._replicas.items() if entry.stalled_since is not None)

    # ---- deadlines --------------------------------------------------------------------------------------------
    def inter_token_deadline(self, replica_id: str) -> float:
        """Seconds to wait for this replica's next message before suspecting a stall."""
        cfg = self.config
        entry = self._replicas.get(replica_id)
        if entry is None or not cfg.enabled:
            return cfg.inter_token_ceiling_s
        cached = entry.gaps
        now = self._clock()
        if cached.pending >= cfg.recompute_every or now - cached.computed_at >= cfg.recompute_interval_s:
            self._recompute(cached, now, cfg.min_gap_samples, cfg.gap_quantile, cfg.gap_factor, cfg.gap_margin_s,
                            cfg.gap_floor_s, cfg.inter_token_ceiling_s)
        return cached.value

    def first_token_deadline(self, replica_id: str, prompt_chars: int) -> float:
        """Seconds to wait for the first message of a request of `prompt_chars` characters (prompt plus resumed
        tokens) on this replica before suspecting a stall."""
        cfg = self.config
        size_class = self._size_class(_check_chars(prompt_chars))
        entry = self._replicas.get(replica_id)
        if entry is None or not cfg.enabled:
            return cfg.first_token_ceiling_s
        now = self._clock()
        # The prompt's own class, else the nearest larger one with enough samples: a longer prompt's TTFT is an
        # upper bound for this one's. Nothing at this size or above: no evidence, the ceiling.
        for c in range(size_class, entry.largest_class + 1):
            cached = entry.ttft.get(c)
            if cached is None:
                continue
            if cached.pending >= cfg.recompute_every or now - cached.computed_at >= cfg.recompute_interval_s:
                self._recompute(cached, now, cfg.min_ttft_samples, cfg.ttft_quantile, cfg.ttft_factor,
                                cfg.ttft_margin_s, cfg.ttft_floor_s, cfg.first_token_ceiling_s)
            if cached.quantile_s is not None:
                return cached.value
        return cfg.first_token_ceiling_s

    def snapshot(self) -> dict[str, Any]:
        """Plain data for status and metrics: per replica the current deadlines and the evidence behind them.
        `first_token_deadline_s` is for a short prompt (class 0); `first_token_deadline_by_chars_s` maps the upper
        prompt size of every class with samples to its deadline."""
        cfg = self.config
        now = self._clock()
        replicas: dict[str, Any] = {}
        for rid in sorted(self._replicas):
            entry = self._replicas[rid]
            gaps = entry.gaps
            by_chars = {}
            for c in sorted(entry.ttft):
                by_chars[cfg.prompt_unit_chars << c] = self.first_token_deadline(rid, cfg.prompt_unit_chars << c)
            short = entry.ttft.get(0)
            replicas[rid] = {
                "inter_token_deadline_s": self.inter_token_deadline(rid),
                "gap_quantile_s": gaps.quantile_s,
                "gap_samples": gaps.histogram.weight(now),
                "first_token_deadline_s": self.first_token_deadline(rid, 0),
                "first_token_deadline_by_chars_s": by_chars,
                "ttft_quantile_s": None if short is None else short.quantile_s,
                "ttft_samples": sum(c.histogram.weight(now) for c in entry.ttft.values()),
                "stalled_for_s": None if entry.stalled_since is None else max(0.0, now - entry.stalled_since),
                # The memory this replica holds, in histogram buckets: bounded by 1 + 26 histograms.
                "histogram_buckets": gaps.histogram.buckets + sum(c.histogram.buckets for c in entry.ttft.values()),
            }
        return {
            "enabled": cfg.enabled,
            "first_token_ceiling_s": cfg.first_token_ceiling_s,
            "inter_token_ceiling_s": cfg.inter_token_ceiling_s,
            "replicas": replicas,
        }

    # ---- internals --------------------------------------------------------------------------------------------
    def _entry(self, replica_id: str) -> _Replica:
        _check_replica_id(replica_id)
        cfg = self.config
        gaps = _CachedDeadline(DecayingHistogram(cfg.inter_token_ceiling_s, cfg.half_life_s, self._clock()),
                               cfg.inter_token_ceiling_s)
        entry = self._replicas[replica_id] = _Replica(gaps)
        return entry

    def _size_class(self, prompt_chars: int) -> int:
        units = -(-prompt_chars // self.config.prompt_unit_chars)  # ceil: 1..unit chars is one unit
        if units <= 1:
            return 0
        return min(_MAX_SIZE_CLASS + 1, (units - 1).bit_length())

    @staticmethod
    def _recompute(cached: _CachedDeadline, now: float, min_samples: int, q: float, factor: float, margin: float,
                   floor: float, ceiling: float) -> None:
        cached.pending = 0
        cached.computed_at = now
        histogram = cached.histogram
        # The effective (age-weighted) count; the epsilon absorbs float rounding of the weights.
        quantile = histogram.quantile(q) if histogram.weight(now) + 1e-6 >= min_samples else None
        cached.quantile_s = quantile
        if quantile is None:
            cached.value = ceiling
        else:
            cached.value = min(ceiling, max(floor, quantile * factor + margin))


# ---- the stall race -------------------------------------------------------------------------------------------
# What the request path should do next (RaceDecision.action).
START_CONTINUATION = "start_continuation"  # start a leg on another replica from RaceDecision.from_index
KEEP_WAITING = "keep_waiting"  # nothing to do: the live legs keep racing
FORWARD = "forward"  # relay this message; cancel RaceDecision.cancel (the losers) first
DISCARD = "discard"  # drop this message: it comes from a leg that already lost or failed
FAIL_OVER = "fail_over"  # no leg left: ordinary failover from RaceDecision.from_index


@dataclass(frozen=True)
class RaceDecision:
    action: str
    from_index: int
    cancel: tuple[int, ...] = ()
    winner: int | None = None


class StallRace:
    """One suspected-stall episode of one request, as pure decisions (no asyncio: the caller owns the legs).

    Legs are numbered: 0 is the stream that went quiet, 1, 2 ... the continuations started for it. Every leg
    generates from `next_index` (the first token the client does not have), so whichever leg delivers that index
    first wins, and since only the winner's tokens are relayed from then on, delivery stays exactly-once and in
    order. A suspected leg is not failed: it keeps racing (a brief hiccup then costs nothing) until it delivers,
    fails, or the request path's hard limit (the configured timeout) fails it.

    A continuation is asked for when every live leg is suspected and fewer than `max_legs` legs were started; the
    caller reports continuation_started() once it is sent, or continuation_not_started() when no replica was free
    (then the legs keep racing). The episode ends with a winner (then `done`); a later suspicion of the winner is
    a new episode.
    """

    def __init__(self, next_index: int, max_legs: int = 2) -> None:
        if isinstance(next_index, bool) or not isinstance(next_index, int) or next_index < 0:
            raise ValueError(f"next_index must be an int >= 0, got {next_index!r}")
        if isinstance(max_legs, bool) or not isinstance(max_legs, int) or max_legs < 1:
            raise ValueError(f"max_legs must be an int >= 1, got {max_legs!r}")
        self.next_index = next_index
        self.max_legs = max_legs
        self.winner: int | None = None
        self.suspicions = 0
        self._suspected: dict[int, bool] = {0: False}  # live legs -> suspected?
        self._started = 1
        self._start_granted = False

    @property
    def done(self) -> bool:
        return self.winner is not None

    @property
    def live_legs(self) -> tuple[int, ...]:
        return tuple(sorted(self._suspected))

    def suspect(self, leg: int) -> RaceDecision:
        """The leg's adaptive deadline passed without a message."""
        if self.done or leg not in self._suspected:
            return RaceDecision(KEEP_WAITING, self.next_index)
        if not self._suspected[leg]:
            self._suspected[leg] = True
            self.suspicions += 1
        return self._next_step()

    def continuation_started(self) -> int:
        """A continuation asked for by START_CONTINUATION was sent; returns its leg number."""
        if not self._start_granted or self.done:
            raise RuntimeError("no continuation was asked for (START_CONTINUATION not pending)")
        self._start_granted = False
        leg = self._started
        self._started += 1
        self._suspected[leg] = False
        return leg

    def continuation_not_started(self) -> None:
        """No continuation could be sent for the pending START_CONTINUATION (no replica free): the legs keep
        racing, and the next suspicion or failure may ask again."""
        self._start_granted = False

    def message(self, leg: int, index: int) -> RaceDecision:
        """A leg delivered a message starting at `index`. Once the race is decided every message of the winner is
        forwarded: from then on the request path checks indices as it does for any stream."""
        if leg not in self._suspected:
            return RaceDecision(DISCARD, self.next_index)
        if self.done:  # only the winner is live once the race is decided
            return RaceDecision(FORWARD, self.next_index, winner=self.winner)
        if index != self.next_index:  # a leg that skips or repeats tokens cannot be trusted: it failed
            return self.failed(leg)
        self.winner = leg
        losers = tuple(sorted(other for other in self._suspected if other != leg))
        self._suspected = {leg: False}
        self._start_granted = False
        return RaceDecision(FORWARD, self.next_index, cancel=losers, winner=leg)

    def failed(self, leg: int) -> RaceDecision:
        """A leg ended without delivering (error, broken stream, hard timeout)."""
        if leg not in self._suspected:
            return RaceDecision(DISCARD, self.next_index)
        del self._suspected[leg]
        if self.done:  # the winner failed after the race: an ordinary failover
            return RaceDecision(FAIL_OVER, self.next_index)
        if not self._suspected:
            self._start_granted = False
            return RaceDecision(FAIL_OVER, self.next_index)
        return self._next_step()

    def _next_step(self) -> RaceDecision:
        # One continuation at a time: while one is pending (asked for, not yet reported) ask for no other.
        if not self._start_granted and all(self._suspected.values()) and self._started < self.max_legs:
            self._start_granted = True
            return RaceDecision(START_CONTINUATION, self.next_index)
        return RaceDecision(KEEP_WAITING, self.next_index)
