"""A clock the test moves by hand, for policies that take a `clock` callable (deadlines, hedging, breaker)."""

from __future__ import annotations


class FakeClock:
    """Returns `t` when called; `advance` moves it. Nothing else changes the time, so a test sets every gap."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt
