"""Routing policy: prompt-prefix affinity on a bounded-load consistent-hash ring, then weighted least connections.

This is the library face of llmgw's routing (usable by programs that do not run our servers)::

    from llmgw.routing import Router
    router = Router(seed=7)
    router.set_member("replica-a", capacity=4)
    router.set_member("replica-b", capacity=4)
    decision = router.route("Summarise this contract: ...")
    decision.member, decision.reason     # e.g. ("replica-b", "affinity")

Policy, in order:

1. **affinity** — walk the ring clockwise from the hash of the prompt's first `prefix_chars` characters and take
   the first member that is not excluded, not draining, under its hard capacity and under the bounded-loads bound
   ceil(balance * (total_load + 1) / n). SUSPECT members are taken only when no ALIVE member is routable.
2. **least_connections** — when the ring finds nobody, the eligible member with the least active / weight
   (random among ties; SUSPECT only if no ALIVE member is eligible).
3. **none** — nothing can take the request.

DEAD and LEFT members are removed from the ring (so keys move only when membership changes) but their load is
still tracked, so requests that were in flight when they died can still be accounted for.

Not thread-safe: use from one thread (an asyncio loop), as the gateway does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from llmgw._core.picker import LeastConnectionsPicker
from llmgw._core.ring import (
    DEFAULT_BALANCE,
    DEFAULT_PREFIX_CHARS,
    DEFAULT_VNODES,
    HashRing,
    affinity_hash,
    hash_key,
)

__all__ = [
    "DEFAULT_BALANCE",
    "DEFAULT_PREFIX_CHARS",
    "DEFAULT_VNODES",
    "POLICIES",
    "AffinityPolicy",
    "Decision",
    "HashRing",
    "LeastConnectionsPicker",
    "LeastConnectionsPolicy",
    "MemberInfo",
    "MemberState",
    "RandomPolicy",
    "Router",
    "RoutingPolicy",
    "affinity_hash",
    "hash_key",
    "make_policy",
]


class MemberState(StrEnum):
    """Membership state as SWIM reports it."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"

    def __str__(self) -> str:
        return self.value


_ROUTABLE = (MemberState.ALIVE, MemberState.SUSPECT)
REASONS = ("affinity", "least_connections", "none")


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes and why: reason is "affinity", "least_connections" or "none" (member is None)."""

    member: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """A snapshot of one member as the router sees it."""

    member_id: str
    weight: float
    capacity: int
    state: MemberState
    draining: bool
    load: int
    on_ring: bool


@dataclass(slots=True)
class _Config:
    weight: float
    capacity: int
    state: MemberState
    draining: bool


_NO_MEMBER = Decision(None, "none")


class Router:
    """Affinity-first router over a bounded-load consistent-hash ring with a least-connections fallback.

    vnodes: ring points per member at weight 1.0 (a member gets round(vnodes * weight), at least 1).
    balance: bounded-loads factor c >= 1.0 (None or 0: unbounded ring, affinity only limited by capacity).
    prefix_chars: how many leading characters of a prompt form its affinity key.
    seed: seed of the least-connections tie-breaker (None: random).
    """

    def __init__(
        self,
        *,
        vnodes: int = DEFAULT_VNODES,
        balance: float | None = DEFAULT_BALANCE,
        prefix_chars: int = DEFAULT_PREFIX_CHARS,
        seed: int | None = None,
    ) -> None:
        if not isinstance(prefix_chars, int) or isinstance(prefix_chars, bool) or prefix_chars < 1:
            raise ValueError(f"prefix_chars must be an int >= 1, got {prefix_chars!r}")
        if not isinstance(vnodes, int) or isinstance(vnodes, bool):
            raise ValueError(f"vnodes must be an int >= 1, got {vnodes!r}")
        self._ring = HashRing(vnodes, balance)
        self._picker = LeastConnectionsPicker(seed)
        self._prefix_chars = prefix_chars
        self._config: dict[str, _Config] = {}
        # Decisions are immutable, so one instance per (member, reason) is reused instead of built per request.
        self._affinity: dict[str, Decision] = {}
        self._fallback: dict[str, Decision] = {}

    # ------------------------------------------------------------------ knobs

    @property
    def prefix_chars(self) -> int:
        return self._prefix_chars

    @property
    def balance(self) -> float | None:
        return self._ring.balance

    @property
    def vnodes(self) -> int:
        return self._ring.vnodes

    @property
    def ring(self) -> HashRing:
        """The underlying ring (read it; change members through the router so both cores stay in step)."""
        return self._ring

    # ------------------------------------------------------------------ membership

    def set_member(
        self,
        member_id: str,
        *,
        weight: float = 1.0,
        capacity: int = 0,
        state: MemberState | str = "alive",
        draining: bool = False,
    ) -> None:
        """Add a member or update it. Its load is kept. Only a weight change or a move between routable
        (alive/suspect) and unroutable (dead/left) moves keys, and only this member's."""
        _check_member_id(member_id)
        state = _check_state(state)
        weight = _check_weight(weight)
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0 (0 = unlimited), got {capacity!r}")
        if not isinstance(draining, bool):
            raise ValueError(f"draining must be a bool, got {draining!r}")
        # The picker validates the same things but the ring may still reject the weight (points cap): ring first,
        # so a rejection leaves both cores unchanged.
        if state in _ROUTABLE:
            newly_on_ring = member_id not in self._ring
            self._ring.set_member(
                member_id, weight=weight, capacity=capacity, suspect=state is MemberState.SUSPECT, draining=draining
            )
            if newly_on_ring and member_id in self._picker:
                self._ring.set_load(member_id, self._picker.load(member_id))
        elif member_id in self._ring:
            self._ring.remove_member(member_id)
        self._picker.set_member(member_id, weight=weight, capacity=capacity, state=state.value, draining=draining)
        self._config[member_id] = _Config(weight, capacity, state, draining)

    def remove_member(self, member_id: str) -> None:
        """Forget a member entirely (KeyError if unknown)."""
        if member_id not in self._config:
            raise KeyError(f"unknown member {member_id!r}")
        if member_id in self._ring:
            self._ring.remove_member(member_id)
        self._picker.remove_member(member_id)
        del self._config[member_id]
        self._affinity.pop(member_id, None)
        self._fallback.pop(member_id, None)

    def set_load(self, member_id: str, active: int) -> None:
        """Set a member's current in-flight request count (KeyError if unknown, ValueError if negative)."""
        self._picker.set_load(member_id, active)
        if member_id in self._ring:
            self._ring.set_load(member_id, active)

    def add_load(self, member_id: str, delta: int) -> int:
        """Add delta (e.g. +1 when a request starts, -1 when it ends) and return the new load."""
        new = self._picker.add_load(member_id, delta)
        if member_id in self._ring:
            self._ring.set_load(member_id, new)
        return new

    def load(self, member_id: str) -> int:
        """A member's in-flight request count (KeyError if unknown)."""
        return self._picker.load(member_id)

    def members(self) -> list[str]:
        """All known member ids (any state), sorted."""
        return sorted(self._config)

    def info(self, member_id: str) -> MemberInfo:
        """A snapshot of one member (KeyError if unknown)."""
        try:
            cfg = self._config[member_id]
        except KeyError:
            raise KeyError(f"unknown member {member_id!r}") from None
        return MemberInfo(
            member_id,
            cfg.weight,
            cfg.capacity,
            cfg.state,
            cfg.draining,
            self._picker.load(member_id),
            member_id in self._ring,
        )

    def __contains__(self, member_id: object) -> bool:
        return member_id in self._config

    def __len__(self) -> int:
        return len(self._config)

    # ------------------------------------------------------------------ routing

    def affinity_hash(self, prompt: str) -> int:
        """The 64-bit affinity key of a prompt: MurmurHash3 of its first prefix_chars characters as UTF-8."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return affinity_hash(prompt, self._prefix_chars)

    def route(self, prompt: str, *, exclude: Collection[str] = ()) -> Decision:
        """Decide where a prompt goes; `exclude` lists members already tried (failover)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return self.route_hash(affinity_hash(prompt, self._prefix_chars), exclude=exclude)

    def route_hash(self, key_hash: int, *, exclude: Collection[str] = ()) -> Decision:
        """Like route() for an already computed affinity key (an int in [0, 2**64))."""
        member = self._ring.lookup(key_hash, exclude)
        if member is not None:
            decision = self._affinity.get(member)
            if decision is None:
                decision = self._affinity[member] = Decision(member, "affinity")
            return decision
        member = self._picker.pick(exclude)
        if member is None:
            return _NO_MEMBER
        decision = self._fallback.get(member)
        if decision is None:
            decision = self._fallback[member] = Decision(member, "least_connections")
        return decision

    def preference_list(self, prompt: str, n: int, *, exclude: Collection[str] = ()) -> list[str]:
        """Up to n distinct routable members (alive or suspect, not draining, not excluded) for failover or
        hedging: ring order from the prompt's affinity point, ALIVE members before SUSPECT ones.
        Loads and capacity are ignored; route() is the decision for the first attempt."""
        return self.preference_list_hash(self.affinity_hash(prompt), n, exclude=exclude)

    def preference_list_hash(self, key_hash: int, n: int, *, exclude: Collection[str] = ()) -> list[str]:
        """preference_list() for an already computed affinity key."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if n == 0:
            return []
        ordered = self._ring.preference_list(key_hash, len(self._ring), exclude)
        alive = [m for m in ordered if self._config[m].state is MemberState.ALIVE]
        if len(alive) < len(ordered):
            alive.extend(m for m in ordered if self._config[m].state is not MemberState.ALIVE)
        return alive[:n]


def _check_member_id(member_id: object) -> None:
    if not isinstance(member_id, str) or not member_id:
        raise ValueError(f"member_id must be a non-empty str, got {member_id!r}")


def _check_state(state: object) -> MemberState:
    try:
        return MemberState(state)  # type: ignore[arg-type]  # checking any value is the point
    except ValueError:
        allowed = ", ".join(s.value for s in MemberState)
        raise ValueError(f"state must be one of {allowed}; got {state!r}") from None


def _check_weight(weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"weight must be a number > 0, got {weight!r}")
    value = float(weight)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Routing policies: what the gateway asks for a pick. Each picks one of `routable` (the replicas the gateway could
# send to, full or not) that is not in `blocked` (full, busy, excluded, already tried), or None.


class RoutingPolicy(Protocol):
    def pick(self, prompt: str, routable: Collection[str], blocked: Collection[str]) -> str | None: ...


class AffinityPolicy:
    """The Router's decision: prompt-prefix affinity with bounded loads, then weighted least connections. The
    router knows every member's state itself, so `routable` is not consulted."""

    name = "affinity"

    def __init__(self, router: Router) -> None:
        self.router = router

    def pick(self, prompt: str, routable: Collection[str], blocked: Collection[str]) -> str | None:
        return self.router.route(prompt, exclude=blocked).member


class LeastConnectionsPolicy:
    """Prompt-blind baseline: the candidate with the least load per unit of weight (the router's load book),
    random among ties."""

    name = "least_connections"

    def __init__(self, router: Router, rng: random.Random | None = None) -> None:
        self.router = router
        self._rng = rng or random.Random()

    def pick(self, prompt: str, routable: Collection[str], blocked: Collection[str]) -> str | None:
        candidates = [m for m in routable if m not in blocked]
        if not candidates:
            return None
        router, rng = self.router, self._rng
        return min(candidates, key=lambda m: (router.load(m) / router.info(m).weight, rng.random()))


class RandomPolicy:
    """Prompt-blind baseline: a uniformly random candidate."""

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, prompt: str, routable: Collection[str], blocked: Collection[str]) -> str | None:
        candidates = [m for m in routable if m not in blocked]
        if not candidates:
            return None
        return self._rng.choice(candidates)


POLICIES = ("affinity", "least_connections", "random")


def make_policy(name: str, router: Router, rng: random.Random | None = None) -> RoutingPolicy:
    """The policy called `name` (one of POLICIES) over `router`."""
    if name == "affinity":
        return AffinityPolicy(router)
    if name == "least_connections":
        return LeastConnectionsPolicy(router, rng)
    if name == "random":
        return RandomPolicy(rng)
    raise ValueError(f"routing policy must be one of {POLICIES}, got {name!r}")
