"""Per-replica circuit breakers with outlier ejection, as one board the router consults.

States per replica: CLOSED (routable) -> OPEN (ejected) -> HALF_OPEN (one probe at a time) -> CLOSED or OPEN.

CLOSED trips to OPEN when any of these holds (docs/resilience.md has the reasoning and defaults):
- failure rate: the sliding window of the last `window_size` outcomes holds at least `min_window_outcomes` outcomes
  and more than `failure_rate_threshold` of them failed;
- consecutive failures: `consecutive_failures` in a row (catches a hard-down replica before the window fills);
- slow but alive: its TTFT or inter-token latency EWMA is far above the other replicas' median (outliers.py).
A trip is refused when it would eject more than `max_ejection_fraction` of the known replicas, so the breaker never
takes the whole cluster away; the replica then stays CLOSED and the next bad outcome asks again.

OPEN becomes HALF_OPEN once its cooldown has passed (checked lazily on every call: there is no timer to run).
The cooldown starts at `cooldown_s` and is multiplied by `cooldown_multiplier` on each re-trip (a failed probe) up to
`max_cooldown_s`; closing resets it. HALF_OPEN admits exactly one probe via allow(); its success closes the breaker
(for a slow-ejected replica only if the probe's own latency is no longer an outlier), its failure re-opens it.

Sans-IO: time comes from the injected clock, nothing here sleeps, spawns or does I/O.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llmgw.policy.outliers import LatencyOutliers, OutlierConfig, check_latency

log = logging.getLogger("llmgw.policy.breaker")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

# Failure kinds the gateway reports. Any non-empty string is accepted (it is only recorded for diagnostics);
# these are the ones the gateway is expected to use. A replica answering RESOURCE_EXHAUSTED because it is full is
# healthy and should not be reported as a failure at all.
FAILURE_ERROR = "error"  # the replica answered with an error status
FAILURE_UNAVAILABLE = "unavailable"  # connection refused / reset, replica gone mid-stream
FAILURE_TIMEOUT = "timeout"  # first-token or inter-token timeout (stalled)

# Reasons passed to the change callback and shown in snapshot().
REASON_FAILURE_RATE = "failure_rate"
REASON_CONSECUTIVE = "consecutive_failures"
REASON_SLOW_TTFT = "slow_ttft"
REASON_SLOW_ITL = "slow_itl"
REASON_COOLDOWN = "cooldown_elapsed"
REASON_PROBE_OK = "probe_succeeded"
REASON_PROBE_FAILED = "probe_failed"
REASON_PROBE_SLOW_TTFT = "probe_slow_ttft"
REASON_PROBE_SLOW_ITL = "probe_slow_itl"

ChangeCallback = Callable[[str, str, str, str], None]


@dataclass(frozen=True)
class BreakerConfig:
    """Breaker knobs; defaults follow the reference where it had one (window 10, > 50 %, cooldown 5 s, 1 probe)."""

    window_size: int = 10
    failure_rate_threshold: float = 0.5
    # The rate rule waits for a full window by default: 3 unlucky requests out of 5 on a fresh replica are noise,
    # and a replica that fails everything is caught sooner by the consecutive-failure rule anyway.
    min_window_outcomes: int = 10
    consecutive_failures: int = 5
    cooldown_s: float = 5.0
    cooldown_multiplier: float = 2.0
    # 10 s keeps "healed replica is back within 15 s" true however long it was broken (one cooldown + one probe).
    max_cooldown_s: float = 10.0
    # A probe that never reports (the caller lost it without release()) frees its slot after this long.
    probe_timeout_s: float = 30.0
    # Never eject more than floor(fraction x known replicas); 0.5 = outlier ejection's max-ejection-percent 50 %.
    max_ejection_fraction: float = 0.5
    slow_detection: bool = True
    outliers: OutlierConfig = field(default_factory=OutlierConfig)

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

        def finite(name: str, low: float, high: float = math.inf, *, low_open: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and math.isfinite(value) and value <= high
            ok = ok and (value > low if low_open else value >= low)
            if not ok:
                bound = f"> {low}" if low_open else f">= {low}"
                upper = f" and <= {high}" if high != math.inf else ""
                raise ValueError(f"{name} must be a finite number {bound}{upper}, got {value!r}")

        positive_int("window_size")
        positive_int("min_window_outcomes")
        positive_int("consecutive_failures")
        if self.min_window_outcomes > self.window_size:
            raise ValueError(
                f"min_window_outcomes ({self.min_window_outcomes}) cannot exceed window_size ({self.window_size})"
            )
        finite("failure_rate_threshold", 0.0, 1.0)
        finite("cooldown_s", 0.0, low_open=True)
        finite("cooldown_multiplier", 1.0)
        finite("max_cooldown_s", 0.0, low_open=True)
        if self.max_cooldown_s < self.cooldown_s:
            raise ValueError(f"max_cooldown_s ({self.max_cooldown_s}) cannot be below cooldown_s ({self.cooldown_s})")
        finite("probe_timeout_s", 0.0, low_open=True)
        finite("max_ejection_fraction", 0.0, 1.0)
        if not isinstance(self.outliers, OutlierConfig):
            raise TypeError("outliers must be an OutlierConfig")


class _Replica:
    """One replica's breaker state. Outcomes in the window: True = failure."""

    __slots__ = (
        "changed_at", "consecutive", "cooldown", "ejections", "failures", "last_failure_kind", "open_until",
        "opened_at", "probe_in_flight", "probe_started_at", "reason", "state", "successes", "trips", "window",
        "window_failures",
    )

    def __init__(self, now: float, window_size: int) -> None:
        self.state = CLOSED
        self.reason = ""
        self.changed_at = now
        self.opened_at = now
        self.open_until = 0.0
        self.cooldown = 0.0
        self.trips = 0  # trips since the last close: drives the cooldown backoff
        self.window: deque[bool] = deque(maxlen=window_size)
        self.window_failures = 0
        self.consecutive = 0
        self.probe_in_flight = False
        self.probe_started_at = 0.0
        self.last_failure_kind = ""
        self.successes = 0
        self.failures = 0
        self.ejections = 0

    def push(self, failed: bool) -> None:
        if len(self.window) == self.window.maxlen and self.window[0]:
            self.window_failures -= 1
        self.window.append(failed)
        if failed:
            self.window_failures += 1

    def clear_outcomes(self) -> None:
        self.window.clear()
        self.window_failures = 0
        self.consecutive = 0


def _check_replica_id(replica_id: object) -> str:
    if not isinstance(replica_id, str) or not replica_id:
        raise ValueError(f"replica_id must be a non-empty string, got {replica_id!r}")
    return replica_id


class BreakerBoard:
    """The circuit breakers of every replica a gateway routes to.

    Routing flow: filter candidates with available() (no side effect), then call allow() on the chosen replica
    (this reserves the half-open probe slot); report the request's end with record_success()/record_failure(), or
    release() if it never ran. Pass started_at (a clock reading taken when the request was sent) so an outcome of a
    request that started before the breaker last changed state is not mistaken for the probe's.
    """

    def __init__(
        self,
        config: BreakerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_change: ChangeCallback | None = None,
    ) -> None:
        self.config = config or BreakerConfig()
        self._clock = clock
        self._on_change = on_change
        self._replicas: dict[str, _Replica] = {}
        self._outliers = LatencyOutliers(self.config.outliers)
        self.suppressed_trips = 0  # trips refused by the max-ejection cap

    # ---- membership -------------------------------------------------------------------------------------------
    def set_replicas(self, replica_ids: Iterable[str]) -> None:
        """Sync with membership: unknown ids start CLOSED, ids no longer listed are forgotten."""
        wanted = {_check_replica_id(r) for r in replica_ids}
        for rid in list(self._replicas):
            if rid not in wanted:
                self.forget(rid)
        now = self._clock()
        for rid in wanted:
            self._entry(rid, now)

    def forget(self, replica_id: str) -> None:
        """Drop all state of a replica (it left the cluster or died); unknown ids are ignored."""
        self._replicas.pop(replica_id, None)
        self._outliers.forget(replica_id)

    # ---- routing ----------------------------------------------------------------------------------------------
    def available(self, replica_id: str) -> bool:
        """Could a request go to this replica now? Reserves nothing (use allow() on the one you pick)."""
        entry = self._replicas.get(replica_id)
        if entry is None:
            return True
        self._refresh(replica_id, entry, self._clock())
        return entry.state == CLOSED or (entry.state == HALF_OPEN and not entry.probe_in_flight)

    def allow(self, replica_id: str) -> bool:
        """May a request go to this replica? In HALF_OPEN a True answer reserves the single probe slot."""
        now = self._clock()
        entry = self._entry(_check_replica_id(replica_id), now)
        self._refresh(replica_id, entry, now)
        if entry.state == CLOSED:
            return True
        if entry.state == HALF_OPEN and not entry.probe_in_flight:
            entry.probe_in_flight = True
            entry.probe_started_at = now
            return True
        return False

    def release(self, replica_id: str) -> None:
        """The request allow() admitted was never sent (or cancelled before any outcome): free the probe slot."""
        entry = self._replicas.get(replica_id)
        if entry is not None and entry.state == HALF_OPEN:
            entry.probe_in_flight = False

    # ---- outcomes ---------------------------------------------------------------------------------------------
    def record_success(
        self,
        replica_id: str,
        ttft_s: float | None = None,
        mean_itl_s: float | None = None,
        *,
        started_at: float | None = None,
    ) -> None:
        """A request on this replica completed; its TTFT and mean inter-token latency feed slow detection."""
        ttft_s = check_latency("ttft_s", ttft_s)
        mean_itl_s = check_latency("mean_itl_s", mean_itl_s)
        now = self._clock()
        entry = self._entry(_check_replica_id(replica_id), now)
        self._refresh(replica_id, entry, now)
        entry.successes += 1
        self._outliers.observe_checked(replica_id, ttft_s, mean_itl_s)
        if entry.state == CLOSED:
            entry.push(False)
            entry.consecutive = 0
            if self.config.slow_detection:
                metric = self._outliers.slow_metric(replica_id)
                if metric is not None:
                    self._trip(replica_id, entry, now, REASON_SLOW_TTFT if metric == "ttft" else REASON_SLOW_ITL)
        elif entry.state == HALF_OPEN and not self._stale(entry, started_at):
            metric = self._outliers.slow_sample(replica_id, ttft_s, mean_itl_s) if self.config.slow_detection else None
            if metric is None:
                self._close(replica_id, entry, now, ttft_s, mean_itl_s)
            else:
                reason = REASON_PROBE_SLOW_TTFT if metric == "ttft" else REASON_PROBE_SLOW_ITL
                self._reopen(replica_id, entry, now, reason)
        # OPEN: a late outcome of a request admitted before the trip; it says nothing about recovery.

    def record_failure(
        self, replica_id: str, kind: str = FAILURE_ERROR, *, started_at: float | None = None
    ) -> None:
        """A request on this replica failed (error status, broken stream, timeout). `kind` is kept for diagnostics."""
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"failure kind must be a non-empty string, got {kind!r}")
        now = self._clock()
        entry = self._entry(_check_replica_id(replica_id), now)
        self._refresh(replica_id, entry, now)
        entry.failures += 1
        entry.last_failure_kind = kind
        if entry.state == CLOSED:
            entry.push(True)
            entry.consecutive += 1
            cfg = self.config
            if entry.consecutive >= cfg.consecutive_failures:
                self._trip(replica_id, entry, now, REASON_CONSECUTIVE)
            elif (
                len(entry.window) >= cfg.min_window_outcomes
                and entry.window_failures > cfg.failure_rate_threshold * len(entry.window)
            ):
                self._trip(replica_id, entry, now, REASON_FAILURE_RATE)
        elif entry.state == HALF_OPEN and not self._stale(entry, started_at):
            self._reopen(replica_id, entry, now, REASON_PROBE_FAILED)

    def record_slow_start(self, replica_id: str, waited_s: float, *, started_at: float | None = None) -> None:
        """A request on this replica was abandoned with no first token after `waited_s` because another replica
        (a hedge) answered first.

        Not a failure (the replica is alive and might have answered later), but a lower bound on its TTFT: it
        feeds slow detection, so a replica that keeps losing hedge races by a wide margin is ejected as slow but
        alive. As a half-open probe it decides like a successful probe with that TTFT: still slow -> OPEN, else the
        probe slot is freed for a real probe (a lower bound cannot prove recovery).
        """
        waited = check_latency("waited_s", waited_s)
        if waited is None:
            raise ValueError("waited_s must be a number, not None")
        now = self._clock()
        entry = self._entry(_check_replica_id(replica_id), now)
        self._refresh(replica_id, entry, now)
        if entry.state == CLOSED:
            self._outliers.observe_checked(replica_id, waited, None)
            metric = self._outliers.slow_metric(replica_id) if self.config.slow_detection else None
            if metric is not None:
                self._trip(replica_id, entry, now, REASON_SLOW_TTFT if metric == "ttft" else REASON_SLOW_ITL)
        elif entry.state == HALF_OPEN and not self._stale(entry, started_at):
            if self.config.slow_detection and self._outliers.slow_sample(replica_id, waited, None) == "ttft":
                self._reopen(replica_id, entry, now, REASON_PROBE_SLOW_TTFT)
            else:
                entry.probe_in_flight = False

    # ---- queries ----------------------------------------------------------------------------------------------
    def state(self, replica_id: str) -> str:
        """"closed" | "open" | "half_open"; an unknown replica is closed."""
        entry = self._replicas.get(replica_id)
        if entry is None:
            return CLOSED
        self._refresh(replica_id, entry, self._clock())
        return entry.state

    def open_replicas(self) -> list[str]:
        """Replicas currently ejected (OPEN or HALF_OPEN), sorted."""
        now = self._clock()
        out = []
        for rid, entry in self._replicas.items():
            self._refresh(rid, entry, now)
            if entry.state != CLOSED:
                out.append(rid)
        return sorted(out)

    def max_ejected(self) -> int:
        """How many replicas may be ejected at once with the current membership."""
        # The epsilon absorbs float error in e.g. 0.3 x 10 = 2.9999999999999996.
        return math.floor(self.config.max_ejection_fraction * len(self._replicas) + 1e-9)

    def snapshot(self) -> dict:
        """Plain-data view for metrics and the admin API."""
        now = self._clock()
        replicas = {}
        for rid in sorted(self._replicas):
            entry = self._replicas[rid]
            self._refresh(rid, entry, now)
            ttft, ttft_n = self._outliers.ewma(rid, "ttft")
            itl, itl_n = self._outliers.ewma(rid, "itl")
            replicas[rid] = {
                "state": entry.state,
                "reason": entry.reason,
                "since_s": max(0.0, now - entry.changed_at),
                "reopens_in_s": max(0.0, entry.open_until - now) if entry.state == OPEN else 0.0,
                "cooldown_s": entry.cooldown,
                "probe_in_flight": entry.probe_in_flight,
                "window_outcomes": len(entry.window),
                "window_failures": entry.window_failures,
                "consecutive_failures": entry.consecutive,
                "last_failure_kind": entry.last_failure_kind,
                "successes": entry.successes,
                "failures": entry.failures,
                "ejections": entry.ejections,
                "ttft_ewma_s": ttft,
                "ttft_samples": ttft_n,
                "itl_ewma_s": itl,
                "itl_samples": itl_n,
            }
        return {
            "replicas": replicas,
            "ejected": sum(1 for r in replicas.values() if r["state"] != CLOSED),
            "max_ejected": self.max_ejected(),
            "suppressed_trips": self.suppressed_trips,
        }

    # ---- transitions ------------------------------------------------------------------------------------------
    def _entry(self, replica_id: str, now: float) -> _Replica:
        entry = self._replicas.get(replica_id)
        if entry is None:
            entry = self._replicas[replica_id] = _Replica(now, self.config.window_size)
        return entry

    @staticmethod
    def _stale(entry: _Replica, started_at: float | None) -> bool:
        # Nothing is admitted while OPEN, so a request sent before the trip is not the probe and must not decide.
        # (The trip time, not the half-open time: half-open is entered lazily, possibly after the probe's clock
        # reading was taken.)
        return started_at is not None and started_at < entry.opened_at

    def _refresh(self, replica_id: str, entry: _Replica, now: float) -> None:
        if entry.state == OPEN and now >= entry.open_until:
            self._set(replica_id, entry, HALF_OPEN, REASON_COOLDOWN, now)
            entry.probe_in_flight = False
        elif (
            entry.state == HALF_OPEN
            and entry.probe_in_flight
            and now - entry.probe_started_at >= self.config.probe_timeout_s
        ):
            log.warning("breaker %s: half-open probe gave no outcome in %.1f s; admitting a new probe",
                        replica_id, self.config.probe_timeout_s)
            entry.probe_in_flight = False

    def _trip(self, replica_id: str, entry: _Replica, now: float, reason: str) -> None:
        ejected = sum(1 for e in self._replicas.values() if e.state != CLOSED)
        if ejected + 1 > self.max_ejected():
            self.suppressed_trips += 1
            log.info("breaker %s: would open (%s) but %d of %d replicas are already ejected (cap %d)",
                     replica_id, reason, ejected, len(self._replicas), self.max_ejected())
            return
        entry.ejections += 1
        self._open(replica_id, entry, now, reason)

    def _reopen(self, replica_id: str, entry: _Replica, now: float, reason: str) -> None:
        # Already counted as ejected while half-open, so the ejection cap does not apply.
        self._open(replica_id, entry, now, reason)

    def _open(self, replica_id: str, entry: _Replica, now: float, reason: str) -> None:
        cfg = self.config
        entry.cooldown = min(cfg.max_cooldown_s, cfg.cooldown_s * cfg.cooldown_multiplier ** entry.trips)
        entry.trips += 1
        entry.open_until = now + entry.cooldown
        entry.opened_at = now
        entry.probe_in_flight = False
        entry.clear_outcomes()
        self._set(replica_id, entry, OPEN, reason, now)

    def _close(self, replica_id: str, entry: _Replica, now: float, ttft_s: float | None, itl_s: float | None) -> None:
        entry.trips = 0
        entry.cooldown = 0.0
        entry.probe_in_flight = False
        entry.clear_outcomes()
        # Restart latency history from the probe: the old EWMA still remembers why the replica was ejected and
        # would re-eject it on its next success.
        self._outliers.reset(replica_id, ttft_s, itl_s)
        self._set(replica_id, entry, CLOSED, REASON_PROBE_OK, now)

    def _set(self, replica_id: str, entry: _Replica, new_state: str, reason: str, now: float) -> None:
        old = entry.state
        entry.state = new_state
        entry.reason = reason
        entry.changed_at = now
        log.info("breaker %s: %s -> %s (%s)", replica_id, old, new_state, reason)
        if self._on_change is not None:
            try:
                self._on_change(replica_id, old, new_state, reason)
            except Exception:  # a faulty observer must not break routing
                log.exception("breaker change callback failed for %s", replica_id)
