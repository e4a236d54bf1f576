"""A sliding-window counter made of fixed time buckets (sans-IO: every call takes `now`).

Bucket ``b`` holds what was added during ``[b * bucket_s, (b + 1) * bucket_s)``. At time ``now`` the window is the
``buckets`` most recent buckets, the current one included, so it covers between ``(buckets - 1) * bucket_s`` and
``buckets * bucket_s`` seconds of history, and bucket ``b`` leaves it at ``(b + buckets) * bucket_s``. A `now` earlier
than the newest bucket (a caller's clock read out of order) counts into the newest bucket.
"""

from __future__ import annotations

import math

__all__ = ["WindowCounter"]


class WindowCounter:
    def __init__(self, buckets: int, bucket_s: float) -> None:
        if buckets < 1 or not bucket_s > 0:
            raise ValueError("buckets must be >= 1 and bucket_s > 0")
        self.buckets = buckets
        self.bucket_s = bucket_s
        self._counts = [0] * buckets
        self._head = -(1 << 62)  # absolute index of the newest bucket; far in the past until the first add
        self._total = 0

    def bucket_of(self, now: float) -> int:
        return math.floor(now / self.bucket_s)

    def _advance(self, now: float) -> None:
        bucket = self.bucket_of(now)
        if bucket <= self._head:
            return
        if bucket - self._head >= self.buckets:
            self._counts = [0] * self.buckets
            self._total = 0
        else:
            for index in range(self._head + 1, bucket + 1):
                slot = index % self.buckets
                self._total -= self._counts[slot]
                self._counts[slot] = 0
        self._head = bucket

    def add(self, now: float, amount: int = 1) -> None:
        self._advance(now)
        self._counts[self._head % self.buckets] += amount
        self._total += amount

    def total(self, now: float, span: int | None = None) -> int:
        """The sum over the window, or over its `span` most recent buckets."""
        self._advance(now)
        if span is None or span >= self.buckets:
            return self._total
        return sum(self._counts[(self._head - k) % self.buckets] for k in range(max(span, 0)))

    def newest_first(self, now: float) -> list[int]:
        """The window's buckets, newest first: element k was added during bucket ``head - k``."""
        self._advance(now)
        return [self._counts[(self._head - k) % self.buckets] for k in range(self.buckets)]

    def head(self, now: float) -> int:
        """The absolute index of the newest bucket (the current one, once `now` has been seen)."""
        self._advance(now)
        return self._head
