"""Slow-but-alive detection: a replica whose latency is far above the rest of the cluster's.

Each replica keeps an exponentially weighted moving average (EWMA) of its time to first token (TTFT) and of its mean
inter-token latency (ITL). A replica is an outlier on a metric when, with enough samples on both sides, its EWMA is
more than `ratio` times the median of the *other* replicas' EWMAs and above an absolute floor. Comparing against the
others (not against a fixed threshold) means a uniformly slow cluster ejects nobody; the floor keeps a 0.3 ms vs
0.1 ms difference (3x, but irrelevant) from counting.

Pure bookkeeping: no clock, no I/O. The circuit breaker (breaker.py) decides what to do with a verdict.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

TTFT = "ttft"
ITL = "itl"
METRICS = (TTFT, ITL)


@dataclass(frozen=True)
class OutlierConfig:
    """Knobs of slow-replica detection (defaults documented in docs/resilience.md)."""

    # A replica is slow when its EWMA exceeds ratio x the median of the other replicas' EWMAs...
    ratio: float = 3.0
    # ...and exceeds these absolute floors (seconds), so tiny absolute differences never eject anyone.
    ttft_floor_s: float = 0.05
    itl_floor_s: float = 0.02
    # Samples a replica needs before it is judged, or before it counts as a peer in the median.
    min_samples: int = 5
    # Weight of the newest sample in the EWMA: 0.3 follows a change within ~5 samples yet smooths single spikes.
    ewma_alpha: float = 0.3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ratio) and self.ratio > 1.0):
            raise ValueError(f"ratio must be a finite number > 1, got {self.ratio!r}")
        for name in ("ttft_floor_s", "itl_floor_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.min_samples, int) and self.min_samples >= 1):
            raise ValueError(f"min_samples must be an int >= 1, got {self.min_samples!r}")
        if not (0.0 < self.ewma_alpha <= 1.0):
            raise ValueError(f"ewma_alpha must be in (0, 1], got {self.ewma_alpha!r}")

    def floor(self, metric: str) -> float:
        return self.ttft_floor_s if metric == TTFT else self.itl_floor_s


class _Ewma:
    __slots__ = ("samples", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.samples = 0

    def add(self, sample: float, alpha: float) -> None:
        # The first sample seeds the average; otherwise a fresh replica would look 0 s fast for several samples.
        self.value = sample if self.samples == 0 else alpha * sample + (1.0 - alpha) * self.value
        self.samples += 1


def check_latency(name: str, value: float | None) -> float | None:
    """Validate one latency sample: None (not measured) or a finite number >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return value


class LatencyOutliers:
    """Per-replica latency EWMAs and the "far slower than its peers" verdict."""

    def __init__(self, config: OutlierConfig | None = None) -> None:
        self.config = config or OutlierConfig()
        self._stats: dict[str, dict[str, _Ewma]] = {}

    def observe(self, replica_id: str, ttft_s: float | None, mean_itl_s: float | None) -> None:
        """Fold one successful request's latencies in (None = not measured, e.g. ITL of a 1-token answer)."""
        self.observe_checked(replica_id, check_latency("ttft_s", ttft_s), check_latency("mean_itl_s", mean_itl_s))

    def observe_checked(self, replica_id: str, ttft_s: float | None, mean_itl_s: float | None) -> None:
        """observe() for values the caller already validated with check_latency()."""
        stats = self._stats.setdefault(replica_id, {TTFT: _Ewma(), ITL: _Ewma()})
        alpha = self.config.ewma_alpha
        if ttft_s is not None:
            stats[TTFT].add(ttft_s, alpha)
        if mean_itl_s is not None:
            stats[ITL].add(mean_itl_s, alpha)

    def reset(self, replica_id: str, ttft_s: float | None = None, mean_itl_s: float | None = None) -> None:
        """Drop a replica's history (optionally re-seeding it), e.g. after it recovered from a slow ejection."""
        self._stats.pop(replica_id, None)
        if ttft_s is not None or mean_itl_s is not None:
            self.observe(replica_id, ttft_s, mean_itl_s)

    def forget(self, replica_id: str) -> None:
        self._stats.pop(replica_id, None)

    def ewma(self, replica_id: str, metric: str) -> tuple[float, int]:
        """(EWMA seconds, sample count) of one metric; (0.0, 0) for an unknown replica."""
        stats = self._stats.get(replica_id)
        if stats is None:
            return 0.0, 0
        e = stats[metric]
        return e.value, e.samples

    def peer_median(self, replica_id: str, metric: str) -> float | None:
        """Median EWMA of the other replicas that have enough samples; None when there are none."""
        need = self.config.min_samples
        peers = [
            stats[metric].value
            for rid, stats in self._stats.items()
            if rid != replica_id and stats[metric].samples >= need
        ]
        return statistics.median(peers) if peers else None

    def is_slow_value(self, replica_id: str, metric: str, value: float) -> bool:
        """Would `value` be an outlier for this replica against its peers' current median?"""
        if value <= self.config.floor(metric):
            return False  # checked first: it spares the median in the common, healthy case
        median = self.peer_median(replica_id, metric)
        return median is not None and value > self.config.ratio * median

    def slow_metric(self, replica_id: str) -> str | None:
        """The first metric (TTFT, then ITL) on which this replica's EWMA is an outlier, or None."""
        stats = self._stats.get(replica_id)
        if stats is None:
            return None
        for metric in METRICS:
            e = stats[metric]
            if e.samples >= self.config.min_samples and self.is_slow_value(replica_id, metric, e.value):
                return metric
        return None

    def slow_sample(self, replica_id: str, ttft_s: float | None, mean_itl_s: float | None) -> str | None:
        """The metric on which one request's latencies (not the EWMA) are an outlier, or None.

        Used for a half-open probe: the replica's EWMA still remembers why it was ejected, so only the probe's own
        numbers say whether it has recovered.
        """
        for metric, value in ((TTFT, ttft_s), (ITL, mean_itl_s)):
            if value is not None and self.is_slow_value(replica_id, metric, value):
                return metric
        return None
