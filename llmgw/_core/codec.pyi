"""Types of the compiled gossip wire codec (codec.pyx; the schema is proto/gossip.proto)."""

from collections.abc import Iterable
from typing import ClassVar, Final

from _typeshed import ReadableBuffer
from typing_extensions import disjoint_base

# MessageType
PING: Final[int]
PING_REQ: Final[int]
ACK: Final[int]
NACK: Final[int]
SYNC: Final[int]
SYNC_ACK: Final[int]
USER: Final[int]
# MemberState
ALIVE: Final[int]
SUSPECT: Final[int]
DEAD: Final[int]
LEFT: Final[int]
# Role
ROLE_UNSPECIFIED: Final[int]
ROLE_REPLICA: Final[int]
ROLE_GATEWAY: Final[int]
ROLE_UPSTREAM: Final[int]

MAX_DATAGRAM: Final[int]
MAX_UPDATES: Final[int]

class CodecError(ValueError): ...

@disjoint_base
class Update:
    member_id: str
    address: str
    state: int
    incarnation: int
    model_version: str
    active_requests: int
    max_capacity: int
    grpc_address: str
    role: int
    weight: float
    draining: bool
    reporter_id: str
    app_meta: bytes
    def __init__(
        self,
        member_id: str = "",
        address: str = "",
        state: int = 0,
        incarnation: int = 0,
        model_version: str = "",
        active_requests: int = 0,
        max_capacity: int = 0,
        grpc_address: str = "",
        role: int = 0,
        weight: float = 0.0,
        draining: bool = False,
        reporter_id: str = "",
        app_meta: bytes = b"",
    ) -> None: ...
    def encoded_size(self) -> int: ...
    def copy(self) -> Update: ...
    def __eq__(self, other: object, /) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]  # mutable: not a dict key

@disjoint_base
class Message:
    type: int
    sequence_num: int
    timestamp_ms: int
    payload: bytes
    def __init__(
        self,
        type: int = 0,
        sender_id: str = "",
        target_id: str = "",
        sequence_num: int = 0,
        updates: Iterable[Update] | None = None,
        sender_address: str = "",
        target_address: str = "",
        timestamp_ms: int = 0,
        payload: bytes = b"",
    ) -> None: ...
    @property
    def sender_id(self) -> str: ...
    @sender_id.setter
    def sender_id(self, value: str) -> None: ...
    @property
    def target_id(self) -> str: ...
    @target_id.setter
    def target_id(self, value: str) -> None: ...
    @property
    def sender_address(self) -> str: ...
    @sender_address.setter
    def sender_address(self, value: str) -> None: ...
    @property
    def target_address(self) -> str: ...
    @target_address.setter
    def target_address(self, value: str) -> None: ...
    @property
    def updates(self) -> list[Update]: ...
    @updates.setter
    def updates(self, value: list[Update]) -> None: ...
    def copy(self) -> Message: ...
    def __eq__(self, other: object, /) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]  # mutable: not a dict key

def encode(msg: Message) -> bytes: ...
def encode_limited(msg: Message, updates: list[Update], max_size: int = 1400) -> tuple[bytes, int]: ...
def decode(data: ReadableBuffer, max_updates: int = 4096) -> Message: ...
