"""Gossip tuning knobs, with named presets in the style of memberlist (LAN, local, WAN).

Every duration is in seconds. The sans-IO core (llmgw._core.swim) reads these attributes once at construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GossipConfig:
    # --- failure detection (SWIM probe round) ---
    protocol_period: float = 0.5  # one probe per period (stretched by local health awareness)
    probe_timeout: float = 0.2  # direct PING -> ACK; after it, k relays are asked (PING_REQ)
    indirect_probes: int = 3  # k
    # "ring": at step s each node probes the member 1 + s mod (N - 1) places after itself on a ring every node
    # orders the same way (crc32 of ids), so each member is probed by exactly one node per period and a crash is
    # noticed within one period; "shuffle": classic SWIM per-node shuffled round-robin. Either way every live
    # member is probed within N - 1 periods; nodes with awareness > 0 use "shuffle".
    probe_schedule: str = "ring"
    # --- Lifeguard dynamic suspicion ---
    # min timeout = suspicion_mult * max(1, log10(N)) * protocol_period; it starts at
    # suspicion_max_mult * min and shrinks towards min as independent confirmations (distinct reporters) arrive.
    suspicion_mult: float = 4.0
    suspicion_max_mult: float = 6.0
    # local health awareness: probe interval and probe timeout are multiplied by (1 + score), score < max
    awareness_max: int = 8
    # --- dissemination ---
    retransmit_mult: int = 4  # lambda: each update is piggybacked lambda * ceil(log10(N + 1)) times
    gossip_interval: float = 0.2  # dedicated gossip datagrams to gossip_fanout members while updates are queued
    gossip_fanout: int = 3
    # A fresh update pulls the next gossip round forward, but never closer than this to the previous round:
    # rumours travel at network speed instead of waiting up to a whole gossip_interval at every hop.
    gossip_min_interval: float = 0.05
    # --- anti-entropy and join ---
    # Full-state exchange with one random member every push_pull_interval * max(1, N / 32): a full state grows
    # with N, so stretching the interval with N keeps anti-entropy bytes per node per second flat in N.
    push_pull_interval: float = 10.0
    join_retry_interval: float = 1.0  # seeds are re-contacted while no other live member is known
    # Every reconnect_interval, one random DEAD (not LEFT) member still in the table, or else one seed that is
    # not a known live member, gets a full-state SYNC: a healed partition merges back instead of staying split.
    reconnect_interval: float = 10.0
    # --- garbage collection ---
    dead_gc_after: float = 30.0  # DEAD/LEFT members leave the table (event "removed") after this
    tombstone_ttl: float = 600.0  # removed members' last incarnation is remembered this long (no resurrection)
    # --- safety ---
    max_datagram: int = 1400
    # Updates whose incarnation exceeds max(known incarnation of that member, our own time-based start
    # incarnation) by more than this are dropped as implausible: a forged 2**64 - 1 cannot lock a member out.
    # 2**40 ms is ~35 years of the time-based (wall-clock ms) incarnation scheme.
    max_incarnation_jump: int = 2**40
    # A rumour about *ourselves* above our own incarnation can only come from a previous life of ours (only a node
    # raises its own incarnation); one more than this above max(our start incarnation, wall-clock ms now) is
    # forged and dropped (counted as implausible) instead of being refuted at rumoured + 1. 600,000 ms = 10 min of
    # the time-based scheme: room for clock steps between two lives and for the bumps of the previous one.
    max_self_incarnation_lead: int = 600_000
    # Member table cap: past it, unknown members are ignored (stat members_refused) until GC frees room; known
    # members are never evicted for a newcomer. DEAD rumours about never-seen ids share the same cap.
    max_members: int = 10_000
    replay_window: float = 30.0  # with a key: signed timestamps further than this from our clock are dropped

    def __post_init__(self) -> None:
        positive = ("protocol_period", "probe_timeout", "gossip_interval", "gossip_min_interval",
                    "push_pull_interval", "join_retry_interval", "reconnect_interval", "replay_window")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"GossipConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.probe_timeout >= self.protocol_period:
            raise ValueError("GossipConfig.probe_timeout must be shorter than protocol_period "
                             "(the indirect probe needs the rest of the period)")
        if self.probe_schedule not in ("ring", "shuffle"):
            raise ValueError(f"GossipConfig.probe_schedule must be 'ring' or 'shuffle', got {self.probe_schedule!r}")
        if self.indirect_probes < 0 or self.gossip_fanout < 1 or self.retransmit_mult < 1:
            raise ValueError("GossipConfig: indirect_probes >= 0, gossip_fanout >= 1, retransmit_mult >= 1")
        if self.suspicion_mult < 1 or self.suspicion_max_mult < 1 or self.awareness_max < 1:
            raise ValueError("GossipConfig: suspicion_mult, suspicion_max_mult and awareness_max must be >= 1")
        if not 200 <= self.max_datagram <= 65507:
            raise ValueError("GossipConfig.max_datagram must be within 200..65507")
        if self.dead_gc_after < 0 or self.tombstone_ttl < self.dead_gc_after:
            raise ValueError("GossipConfig: 0 <= dead_gc_after <= tombstone_ttl")
        if self.max_incarnation_jump < 1:
            raise ValueError("GossipConfig.max_incarnation_jump must be >= 1")
        if not 1 <= self.max_self_incarnation_lead <= self.max_incarnation_jump:
            raise ValueError("GossipConfig.max_self_incarnation_lead must be within 1..max_incarnation_jump")
        if self.max_members < 1:
            raise ValueError("GossipConfig.max_members must be >= 1")

    @classmethod
    def lan(cls, **overrides) -> GossipConfig:
        """Defaults for a LAN (memberlist DefaultLANConfig, with k = 3 as llmgw's issue asks)."""
        return cls(**overrides)

    @classmethod
    def local(cls, **overrides: Any) -> GossipConfig:
        """Faster timers for loopback tests and single-host demos."""
        base: dict[str, Any] = dict(protocol_period=0.25, probe_timeout=0.1, suspicion_mult=3.0, gossip_interval=0.1,
                    gossip_min_interval=0.02, push_pull_interval=5.0, join_retry_interval=0.5, reconnect_interval=3.0,
                    dead_gc_after=10.0, tombstone_ttl=300.0)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def wan(cls, **overrides: Any) -> GossipConfig:
        """Slower timers for links with high latency (memberlist DefaultWANConfig)."""
        base: dict[str, Any] = dict(protocol_period=5.0, probe_timeout=3.0, suspicion_mult=6.0, gossip_interval=0.5,
                    gossip_fanout=4, gossip_min_interval=0.1, push_pull_interval=60.0, join_retry_interval=5.0,
                    reconnect_interval=30.0,
                    dead_gc_after=300.0, tombstone_ttl=3600.0)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def preset(cls, name: str, **overrides) -> GossipConfig:
        presets = {"lan": cls.lan, "local": cls.local, "wan": cls.wan}
        try:
            return presets[name](**overrides)
        except KeyError:
            raise ValueError(f"unknown gossip preset {name!r}; choose one of {sorted(presets)}") from None

    def replace(self, **changes) -> GossipConfig:
        return dataclasses.replace(self, **changes)
