"""When to hedge a request (send it to a second replica as well) and how many hedges the gateway can afford.

- A client asking for hedge=true gets its second replica at once (delay 0). That is the client's explicit choice:
  it is not a policy hedge, it does not spend the budget and is never denied.
- Otherwise a policy hedge fires if the first token has not come within the hedge delay: a fixed delay (default off),
  or, when adaptive, the p95 of recently observed TTFTs (bounded ring buffer, samples older than a maximum age
  dropped, a floor, a minimum sample count before it is trusted; until then the fixed delay applies).
- Budget: a token bucket. Every request (explicit ones included: they are requests too) deposits `budget_ratio`
  tokens, a policy hedge spends one, the bucket holds at most `budget_burst`. So over any sequence,
  policy hedges <= budget_initial + budget_ratio x requests: with the default ratio 0.1, at most ~10 % of requests
  get a policy hedge, however slow the cluster gets (hedging a slow cluster would only make it slower).

The budget is kept in integer micro-tokens so 10 deposits of 0.1 make exactly one hedge (floats would give
0.9999999999999999 and deny it).

Sans-IO: the clock is injected and only used to age TTFT samples; nothing sleeps or starts tasks.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sortedcontainers import SortedList

from llmgw.policy.outliers import check_latency

HEDGE_WON = "won"  # the hedge replica produced the first token first; the primary was cancelled
HEDGE_LOST = "lost"  # the primary produced the first token first; the hedge was cancelled
HEDGE_CANCELLED = "cancelled"  # the race ended without a winner (client went away, both failed, deadline)
_OUTCOMES = (HEDGE_WON, HEDGE_LOST, HEDGE_CANCELLED)

_MICRO = 1_000_000  # budget tokens are counted in millionths


@dataclass(frozen=True)
class HedgeConfig:
    """Hedging knobs; defaults documented in docs/resilience.md."""

    # Fixed policy hedge delay in seconds; None = no policy hedging (only explicit hedge=true requests hedge).
    delay_s: float | None = None
    # Use the observed TTFT quantile as the delay once enough samples exist.
    adaptive: bool = False
    adaptive_quantile: float = 0.95
    adaptive_window: int = 256
    adaptive_min_samples: int = 20
    # Never hedge sooner than this, however fast recent TTFTs were: a hedge at 1 ms doubles load for nothing.
    adaptive_floor_s: float = 0.01
    # Samples older than this are forgotten, so the delay follows today's latency, not this morning's.
    adaptive_max_age_s: float = 60.0
    budget_ratio: float = 0.1
    budget_burst: float = 10.0
    budget_initial: float = 1.0

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        def finite(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        check("delay_s", self.delay_s is None or (finite(self.delay_s) and self.delay_s >= 0), "None or >= 0 s")
        check("adaptive_quantile", finite(self.adaptive_quantile) and 0 < self.adaptive_quantile <= 1, "in (0, 1]")
        check("adaptive_window", isinstance(self.adaptive_window, int) and self.adaptive_window >= 1, "an int >= 1")
        check(
            "adaptive_min_samples",
            isinstance(self.adaptive_min_samples, int) and 1 <= self.adaptive_min_samples <= self.adaptive_window,
            "an int in [1, adaptive_window]",
        )
        check("adaptive_floor_s", finite(self.adaptive_floor_s) and self.adaptive_floor_s >= 0, ">= 0 s")
        check("adaptive_max_age_s", finite(self.adaptive_max_age_s) and self.adaptive_max_age_s > 0, "> 0 s")
        check("budget_ratio", finite(self.budget_ratio) and 0 <= self.budget_ratio <= 1, "in [0, 1]")
        check("budget_burst", finite(self.budget_burst) and self.budget_burst >= 1, ">= 1 (one hedge)")
        check(
            "budget_initial",
            finite(self.budget_initial) and 0 <= self.budget_initial <= self.budget_burst,
            "in [0, budget_burst]",
        )


class HedgePolicy:
    """Hedge decisions for one gateway. Call delay_for() exactly once per request: it also credits the budget."""

    def __init__(self, config: HedgeConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or HedgeConfig()
        self._clock = clock
        cfg = self.config
        self._deposit = round(cfg.budget_ratio * _MICRO)
        self._burst = round(cfg.budget_burst * _MICRO)
        self._tokens = round(cfg.budget_initial * _MICRO)
        self._ttft_arrivals: deque[tuple[float, float]] = deque()  # (observed at, ttft) oldest first
        self._ttft_sorted = SortedList()
        self._requests = 0
        self._explicit = 0
        self._issued = 0
        self._denied = 0
        self._outcomes = dict.fromkeys(_OUTCOMES, 0)

    def delay_for(self, request_hedge_flag: bool) -> float | None:
        """Seconds to wait for the first token before hedging this request: 0 = hedge now, None = never.

        A policy delay (not None, not an explicit hedge) still needs try_acquire() when it expires.
        """
        if not isinstance(request_hedge_flag, bool):
            raise TypeError(f"request_hedge_flag must be a bool, got {type(request_hedge_flag).__name__}")
        self._requests += 1
        self._tokens = min(self._burst, self._tokens + self._deposit)
        if request_hedge_flag:
            self._explicit += 1
            return 0.0
        return self.current_delay()

    def current_delay(self) -> float | None:
        """The policy hedge delay right now (no side effect on the budget)."""
        cfg = self.config
        if cfg.adaptive:
            p = self.ttft_quantile()
            if p is not None:
                return max(cfg.adaptive_floor_s, p)
        return cfg.delay_s

    def try_acquire(self) -> bool:
        """The hedge delay expired without a first token: may a policy hedge be sent? Spends budget if so."""
        if self._tokens >= _MICRO:
            self._tokens -= _MICRO
            self._issued += 1
            return True
        self._denied += 1
        return False

    def observe_ttft(self, seconds: float) -> None:
        """A request's time to first token (whichever replica won), for the adaptive delay."""
        value = check_latency("seconds", seconds)
        if value is None:
            raise ValueError("seconds must be a number, not None")
        now = self._clock()
        self._expire(now)
        if len(self._ttft_arrivals) >= self.config.adaptive_window:
            _, oldest = self._ttft_arrivals.popleft()
            self._ttft_sorted.remove(oldest)
        self._ttft_arrivals.append((now, value))
        self._ttft_sorted.add(value)

    def ttft_quantile(self, q: float | None = None) -> float | None:
        """Nearest-rank quantile of recent TTFTs (default: the configured one); None below the minimum sample count."""
        q = self.config.adaptive_quantile if q is None else q
        if not (0 < q <= 1):
            raise ValueError(f"quantile must be in (0, 1], got {q!r}")
        self._expire(self._clock())
        n = len(self._ttft_sorted)
        if n < self.config.adaptive_min_samples:
            return None
        quantile: float = self._ttft_sorted[max(0, math.ceil(q * n) - 1)]
        return quantile

    def record_outcome(self, outcome: str) -> None:
        """How a hedge race ended: HEDGE_WON, HEDGE_LOST or HEDGE_CANCELLED (explicit and policy hedges alike)."""
        if outcome not in self._outcomes:
            raise ValueError(f"hedge outcome must be one of {_OUTCOMES}, got {outcome!r}")
        self._outcomes[outcome] += 1

    def budget_tokens(self) -> float:
        """Policy hedges affordable right now (fractional)."""
        return self._tokens / _MICRO

    def stats(self) -> dict:
        return {
            "requests": self._requests,
            "explicit_hedges": self._explicit,
            "policy_hedges_issued": self._issued,
            "policy_hedges_denied": self._denied,
            "won": self._outcomes[HEDGE_WON],
            "lost": self._outcomes[HEDGE_LOST],
            "cancelled": self._outcomes[HEDGE_CANCELLED],
            "budget_tokens": self.budget_tokens(),
            "current_delay_s": self.current_delay(),
            "ttft_samples": len(self._ttft_sorted),
        }

    def _expire(self, now: float) -> None:
        horizon = now - self.config.adaptive_max_age_s
        arrivals = self._ttft_arrivals
        while arrivals and arrivals[0][0] < horizon:
            _, value = arrivals.popleft()
            self._ttft_sorted.remove(value)
