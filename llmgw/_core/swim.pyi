"""Types of the compiled SWIM + Lifeguard membership state machine (swim.pyx)."""

from collections.abc import Iterable
from typing import Final, Protocol, type_check_only

from _typeshed import ReadableBuffer
from typing_extensions import disjoint_base

from llmgw._core.codec import CodecError as CodecError

STATE_NAMES: Final[tuple[str, str, str, str]]
MEMBER_FIELDS: Final[tuple[str, ...]]
MAX_APP_META: Final[int]
MAX_PENDING_USER_MESSAGES: Final[int]

# One member as members(), member(), local_member() and drain_events() return it; fields in MEMBER_FIELDS order:
# member_id, address, grpc_address, role, state (a STATE_NAMES entry), incarnation, model_version, active_requests,
# max_capacity, weight, draining, app_meta.
_MemberTuple = tuple[str, str, str, int, str, int, str, int, int, float, bool, bytes]

@type_check_only
class _SwimConfig(Protocol):
    """What the core reads from its config (llmgw.gossip.config.GossipConfig satisfies it)."""

    @property
    def protocol_period(self) -> float: ...
    @property
    def probe_timeout(self) -> float: ...
    @property
    def indirect_probes(self) -> int: ...
    @property
    def suspicion_mult(self) -> float: ...
    @property
    def suspicion_max_mult(self) -> float: ...
    @property
    def awareness_max(self) -> int: ...
    @property
    def retransmit_mult(self) -> int: ...
    @property
    def gossip_interval(self) -> float: ...
    @property
    def gossip_min_interval(self) -> float: ...
    @property
    def gossip_fanout(self) -> int: ...
    @property
    def push_pull_interval(self) -> float: ...
    @property
    def join_retry_interval(self) -> float: ...
    @property
    def reconnect_interval(self) -> float: ...
    @property
    def dead_gc_after(self) -> float: ...
    @property
    def tombstone_ttl(self) -> float: ...
    @property
    def max_incarnation_jump(self) -> int: ...
    @property
    def max_datagram(self) -> int: ...
    # also read when present: max_self_incarnation_lead, max_members, probe_schedule ("ring" | "random")

@type_check_only
class _SwimAuth(Protocol):
    """Datagram authentication (llmgw.gossip.auth.GossipAuth satisfies it)."""

    @property
    def overhead(self) -> int: ...
    def seal(self, payload: bytes) -> bytes: ...
    def open(self, data: bytes) -> tuple[bytes, bytes] | None: ...
    def accept_fresh(self, tag: bytes, timestamp_ms: int, now_ms: int) -> bool: ...

def state_rank(state: int) -> int: ...
def outranks(new_inc: int, new_state: int, cur_inc: int, cur_state: int) -> bool: ...

@disjoint_base
class Swim:
    @property
    def member_id(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def leaving(self) -> bool: ...
    @property
    def placeholder_prefix(self) -> str: ...
    # counters (also in .stats)
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int
    malformed: int
    auth_rejected: int
    replays_rejected: int
    misdirected: int
    implausible: int
    pings_sent: int
    ping_reqs_sent: int
    acks_received: int
    indirect_acks: int
    nacks_sent: int
    nacks_received: int
    probes_failed: int
    suspicions_raised: int
    refutations: int
    deaths_declared: int
    updates_sent: int
    syncs_sent: int
    gossip_sent: int
    relays_served: int
    corrections_sent: int
    sync_bytes_out: int
    oversized: int
    members_refused: int
    metadata_clamped: int
    placeholders_ignored: int
    owner_meta_applied: int
    user_sent: int
    user_received: int
    user_dropped: int
    user_refused: int
    def __init__(
        self,
        member_id: str,
        address: str,
        config: _SwimConfig,
        seed: int | str | bytes | None = 0,
        now: float = 0.0,
        incarnation: int = 0,
        *,
        role: int = 0,
        grpc_address: str = "",
        model_version: str = "",
        max_capacity: int = 0,
        active_requests: int = 0,
        weight: float = 1.0,
        draining: bool = False,
        wall_offset: float = 0.0,
        auth: _SwimAuth | None = None,
        placeholder_prefix: str = "",
        app_meta: ReadableBuffer = b"",
    ) -> None: ...
    # queries
    @property
    def incarnation(self) -> int: ...
    def local_member(self) -> _MemberTuple: ...
    def members(self, include_self: bool = False) -> list[_MemberTuple]: ...
    def member(self, member_id: str) -> _MemberTuple | None: ...
    def num_live(self) -> int: ...
    @property
    def awareness(self) -> int: ...
    def pending_broadcasts(self) -> int: ...
    def retransmit_limit(self) -> int: ...
    def suspicion_of(self, member_id: str) -> tuple[int, float, float] | None: ...
    @property
    def stats(self) -> dict[str, int]: ...
    # output queues
    def drain_outgoing(self) -> list[tuple[str, bytes]]: ...
    def drain_events(self) -> list[tuple[str, _MemberTuple]]: ...
    def drain_user_messages(self) -> list[tuple[str, bytes]]: ...
    def next_deadline(self) -> float: ...
    # inputs
    def join(self, seeds: Iterable[str], now: float) -> None: ...
    def leave(self, now: float) -> None: ...
    def set_meta(
        self,
        now: float,
        active_requests: int | None = None,
        max_capacity: int | None = None,
        model_version: str | None = None,
        weight: float | None = None,
        draining: bool | None = None,
        grpc_address: str | None = None,
        app_meta: ReadableBuffer | None = None,
    ) -> None: ...
    def max_user_payload(self, target_id: str) -> int: ...
    def user_message(self, target_id: str, payload: ReadableBuffer, now: float) -> bool: ...
    def handle_datagram(self, data: bytes, source_address: str, now: float) -> None: ...
    def tick(self, now: float) -> None: ...
