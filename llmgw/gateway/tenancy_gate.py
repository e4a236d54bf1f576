"""Tenancy at the gateway: who is calling (API keys), whether they may start now (limits), and what they used.

The one place both fronts go through; the decisions themselves are the sans-IO cores of llmgw.tenancy:
- the fronts call `authenticate(headers)` (HTTP headers or gRPC metadata pairs) and `authorize(caller, model)`;
  a refusal is a GatewayError (Unauthenticated -> 401 / UNAUTHENTICATED, PermissionDenied -> 403 /
  PERMISSION_DENIED) that each front reports in its own terms, like every other gateway outcome;
- the request path calls `admit(tenant, now)` once a request is valid (ResourceExhausted with the retry delay ->
  429 + Retry-After / RESOURCE_EXHAUSTED + retry-after-s) and `finished(...)` once when the stream ends, however
  it ends; `weight(tenant)` is the tenant's share in the fair admission queue;
- reload (SIGHUP, POST /admin/keys/reload) parses the key file into a new ring and swaps it in; a bad file leaves
  the old ring in place and the error is reported. Limits and queue positions are kept by tenant name, so
  running streams and waiting requests are untouched.

Without a key file the gate is open: `authenticate` returns None, nothing is limited, every request has the
tenant "" and the fair queue is today's FIFO. Keys are never logged: the log names `key_id` (12 hex digits of
the key's sha256) and the tenant.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from llmgw.gateway.api import PermissionDenied, ResourceExhausted, Unauthenticated
from llmgw.tenancy import keys as keyring
from llmgw.tenancy.keys import KeyFileError, KeyRing, authorization_value, load_key_file
from llmgw.tenancy.limits import LimiterConfig, Refused, UsageLimiter

__all__ = ["Caller", "ReloadResult", "TenancyGate"]

log = logging.getLogger("llmgw.gateway.tenancy")

HeaderPairs = Iterable[tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Caller:
    """An authenticated caller: the key file's entry of the key it presented."""

    entry: keyring.KeyEntry

    @property
    def tenant(self) -> str:
        return self.entry.tenant.name

    @property
    def key_id(self) -> str:
        """For logs: 12 hex digits of the key's sha256 (the key itself is never logged)."""
        return self.entry.key_id


@dataclasses.dataclass(frozen=True)
class ReloadResult:
    reloaded: bool
    keys: int  # keys in use after the attempt
    tenants: int
    error: str = ""  # why the file was not taken (the old keys stay in use)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"reloaded": self.reloaded, "keys": self.keys, "tenants": self.tenants}
        if self.error:
            out["error"] = self.error
        return out


class TenancyGate:
    """API keys and per-tenant limits of one gateway; `ring` None = open (no key file)."""

    def __init__(self, gateway_id: str, ring: KeyRing | None = None, *, key_file: str = "",
                 limiter_config: LimiterConfig | None = None) -> None:
        self.key_file = key_file
        self.limiter = UsageLimiter(gateway_id, limiter_config)
        self.ring: KeyRing | None = None
        # Plain counts, copied into metrics at scrape time (bounded label sets: fixed reasons, configured tenants).
        self.auth_failures: dict[str, int] = {reason.value: 0 for reason in keyring.AuthFailure}
        self.forbidden = 0
        self.refusals: dict[tuple[str, str], int] = {}
        self._on_change: list[Callable[[KeyRing], None]] = []
        if ring is not None:
            self.use_ring(ring)

    @classmethod
    def from_key_file(cls, gateway_id: str, path: str, **kwargs: Any) -> TenancyGate:
        """A gate over the keys of `path`; KeyFileError (naming the file and line) when the file is bad."""
        return cls(gateway_id, load_key_file(path), key_file=path, **kwargs)

    @property
    def enabled(self) -> bool:
        return self.ring is not None

    def tenants(self) -> list[str]:
        """The configured tenants' names (the bounded label set of the per-tenant metrics)."""
        return sorted(self.ring.tenants) if self.ring is not None else []

    def on_change(self, callback: Callable[[KeyRing], None]) -> None:
        """Call `callback(ring)` after every ring swap (e.g. to update the metrics' tenant labels)."""
        self._on_change.append(callback)

    def use_ring(self, ring: KeyRing) -> None:
        self.ring = ring
        self.limiter.configure({name: tenant.limits for name, tenant in ring.tenants.items()})
        for name in [key for key in self.refusals if key[0] not in ring.tenants]:
            del self.refusals[name]
        for callback in self._on_change:
            try:
                callback(ring)
            except Exception:  # a faulty observer must not leave the gate half-configured
                log.exception("tenancy change callback failed")

    def reload(self) -> ReloadResult:
        """Read the key file again and swap it in; on any error keep the keys in use and say why."""
        ring = self.ring
        if not self.key_file or ring is None:
            return ReloadResult(False, 0, 0, "no key file configured (start the gateway with --keys PATH)")
        try:
            fresh = load_key_file(self.key_file)
        except KeyFileError as exc:
            log.warning("key file not reloaded, still using the %d keys loaded before: %s", len(ring), exc)
            return ReloadResult(False, len(ring), len(ring.tenants), str(exc))
        self.use_ring(fresh)
        log.warning("key file %s reloaded: %d keys, %d tenants", self.key_file, len(fresh), len(fresh.tenants))
        return ReloadResult(True, len(fresh), len(fresh.tenants))

    # ---- the fronts ------------------------------------------------------------------------------------------
    def authenticate(self, headers: HeaderPairs) -> Caller | None:
        """The caller named by the Authorization among `headers` (HTTP headers or gRPC metadata pairs); None when
        the gate is open. Unauthenticated (a GatewayError) for a missing, malformed, oversized or unknown key."""
        ring = self.ring
        if ring is None:
            return None
        try:
            entry = ring.authenticate_header(authorization_value(headers))
        except keyring.Unauthenticated as exc:
            reason = exc.reason.value
            self.auth_failures[reason] += 1
            # The message is one of four fixed texts: the presented value never reaches a log or a client.
            raise Unauthenticated(str(exc), reason) from None
        return Caller(entry)

    def authorize(self, caller: Caller | None, model: str) -> None:
        """PermissionDenied unless the caller's key may use `model` ("" = the request named none)."""
        ring = self.ring
        if caller is None or ring is None:
            return
        try:
            ring.authorize(caller.entry, model)
        except keyring.Forbidden as exc:
            self.forbidden += 1
            hint = "" if model else " (name the model: InferRequest.model, or gRPC metadata 'llmgw-model')"
            raise PermissionDenied(f"{exc}{hint}") from None

    def caller(self, headers: HeaderPairs, model: str) -> Caller | None:
        """`authenticate` then `authorize`, for a front that knows the model before reading a body."""
        caller = self.authenticate(headers)
        self.authorize(caller, model)
        return caller

    # ---- the request path ------------------------------------------------------------------------------------
    def weight(self, tenant: str) -> float:
        ring = self.ring
        found = ring.tenants.get(tenant) if ring is not None and tenant else None
        return found.weight if found is not None else 1.0

    def admit(self, tenant: str, now: float) -> bool:
        """Count a request of `tenant` that may start now (True), or raise ResourceExhausted with the delay after
        which it would pass. False: nothing to count (open gate or no tenant), so `finished` must not be
        called."""
        if not tenant or self.ring is None:
            return False
        decision = self.limiter.try_admit(tenant, now)
        if isinstance(decision, Refused):
            key = (tenant, decision.limit.value)
            self.refusals[key] = self.refusals.get(key, 0) + 1
            retry = decision.retry_after_s
            raise ResourceExhausted(f"tenant {tenant!r} is over its {decision.limit.value} limit "
                                    f"({decision.used} of {decision.allowed}); retry in {math.ceil(retry)} s",
                                    retry_after_s=retry)
        return True

    def finished(self, tenant: str, tokens: int, now: float) -> None:
        """An admitted request's stream ended (any way): its stream slot is free and its tokens are counted."""
        self.limiter.stream_ended(tenant)
        self.limiter.record_tokens(tenant, max(0, tokens), now)

    # ---- accounting ------------------------------------------------------------------------------------------
    def usage(self, now: float) -> dict:
        """GET /admin/usage: per tenant, this gateway's, each peer's and the cluster's usage, and the key file."""
        report = self.limiter.report(now)
        ring = self.ring
        report["keys"] = {"enabled": ring is not None, "file": self.key_file, "count": len(ring) if ring else 0,
                          "tenants": len(ring.tenants) if ring else 0}
        return report



def bind_metrics(gate: TenancyGate, metrics: Any) -> Callable[[], None]:
    """Keep `metrics` (a llmgw.metrics.GatewayMetrics) in step with `gate`: its tenant labels follow the key file,
    and the gate's refusal counts are copied in at scrape time (the request path pays nothing for them). Returns
    the function that stops the copying."""
    metrics.set_tenants(gate.tenants())
    gate.on_change(lambda ring: metrics.set_tenants(ring.tenants))
    seen: dict[Any, int] = {}

    def add(key: Any, value: int, counter: Any) -> None:
        previous = seen.get(key, 0)
        if value > previous:
            counter.inc(value - previous)
        seen[key] = value

    def refresh() -> None:
        for reason, count in gate.auth_failures.items():
            add(("auth", reason), count, metrics.auth_failures.labels(reason))
        add(("auth", "forbidden"), gate.forbidden, metrics.auth_failures.labels("forbidden"))
        configured = set(gate.tenants())
        for (tenant, limit), count in list(gate.refusals.items()):
            if tenant in configured:
                add(("refused", tenant, limit), count, metrics.tenant_refusals.labels(tenant, limit))

    return metrics.on_scrape(refresh)
