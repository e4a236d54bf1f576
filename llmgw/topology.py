"""The application's conventions over gossip membership: the one home of each rule.

The SWIM core knows members as ids, gossip addresses, states and opaque metadata. What those mean to llmgw --
which member is a gateway, which can take requests, where its gRPC port is, which ports a node listens on by
default, which gossiped ids are only placeholders -- is decided here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Protocol

# The reference convention: a node's gossip UDP port is its gRPC port + 10000.
GOSSIP_PORT_OFFSET = 10000

# Defaults shared by the CLIs, the docs and deploy/kubernetes (tests/test_deploy_manifests.py checks the manifests
# against these, so changing a default here without updating the manifests fails the suite).
DEFAULT_PORTS: Mapping[str, Mapping[str, int]] = MappingProxyType({
    "gateway": MappingProxyType({"grpc": 50051, "gossip": 50051 + GOSSIP_PORT_OFFSET, "http": 8080}),
    "replica": MappingProxyType({"grpc": 50061, "gossip": 50061 + GOSSIP_PORT_OFFSET}),
})

# A member in one of these states can be given new requests (a SUSPECT one may only be slow, and SWIM refutes
# false suspicions within a few protocol periods; the picker prefers ALIVE ones).
ROUTABLE_STATES = frozenset({"alive", "suspect"})

ROLE_REPLICA = "replica"
ROLE_GATEWAY = "gateway"
# An agent sidecar advertising an OpenAI-compatible model server (its advertisement is the member's app_meta);
# gateways stream to the server directly, never to the agent, so it is not a replica.
ROLE_UPSTREAM = "upstream"
ROLES = (ROLE_REPLICA, ROLE_GATEWAY, ROLE_UPSTREAM)
# The role numbers of proto/gossip.proto (Role enum); 0 = unspecified, what reference nodes send.
ROLE_NUMBERS: Mapping[str, int] = MappingProxyType({ROLE_REPLICA: 1, ROLE_GATEWAY: 2, ROLE_UPSTREAM: 3})
_ROLE_BY_NUMBER = {number: name for name, number in ROLE_NUMBERS.items()}

# Reference peers do not gossip a role; their convention is that ids starting with "gateway" are gateways.
_GATEWAY_ID_PREFIX = "gateway"
# Reference nodes put each seed in their table as "seed-<host:port>" until they learn its real id, and gossip
# that placeholder on: it is an address, never a member of its own. The gossip shell hands this prefix to the
# SWIM core, which drops such updates (llmgw._core.swim: Swim(placeholder_prefix=...)).
SEED_PLACEHOLDER_PREFIX = "seed-"


class MemberLike(Protocol):
    @property
    def member_id(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def state(self) -> str: ...


def is_routable(state: str) -> bool:
    return str(state).lower() in ROUTABLE_STATES


def role_of(member_id: str, advertised_role: str = "") -> str:
    """The member's role: what it advertised, else the reference's naming convention."""
    if advertised_role in ROLES:
        return advertised_role
    return ROLE_GATEWAY if member_id.startswith(_GATEWAY_ID_PREFIX) else ROLE_REPLICA


def role_from_wire(member_id: str, role_number: int) -> str:
    """The member's role from the role number it gossiped (0 = none: the naming convention decides)."""
    return role_of(member_id, _ROLE_BY_NUMBER.get(role_number, ""))


def role_number(role: str) -> int:
    """The gossip role number of `role` ("replica", "gateway" or "upstream"); ValueError for anything else."""
    try:
        return ROLE_NUMBERS[role]
    except KeyError:
        raise ValueError(f"role must be one of {sorted(ROLE_NUMBERS)}, got {role!r}") from None


def understands_user_messages(role_number: int) -> bool:
    """Whether a member that gossiped `role_number` can be sent gossip USER datagrams: llmgw nodes always gossip
    a role; reference peers gossip none (0) and do not know the message type."""
    return role_number != 0


def is_replica(member: MemberLike) -> bool:
    """Whether a gossip Member can serve requests: a replica by role and id. (Seed placeholders never become
    Members: the core drops them, see SEED_PLACEHOLDER_PREFIX.)"""
    return member.role == ROLE_REPLICA and not member.member_id.startswith(_GATEWAY_ID_PREFIX)


def is_routable_replica(member: MemberLike) -> bool:
    return is_replica(member) and is_routable(member.state)


def is_upstream_agent(member: MemberLike) -> bool:
    """Whether a gossip Member is an agent advertising a model server (read its app_meta for the server)."""
    return member.role == ROLE_UPSTREAM


def gossip_port_for(grpc_port: int) -> int:
    """The default gossip port of a node serving gRPC on `grpc_port`; ValueError when that is not a port (a gRPC
    port above 55535 has no default gossip port: it must be given)."""
    port = grpc_port + GOSSIP_PORT_OFFSET
    if not 0 < port <= 65535:
        raise ValueError(f"no default gossip port for gRPC port {grpc_port} (it would be {port}): "
                         "give the gossip port explicitly (--gossip-port)")
    return port


def grpc_address_for(gossip_address: str, advertised: str = "") -> str:
    """The member's gRPC address: the one it advertised, else the reference convention (gossip port - 10000 on
    the same host); "" when neither gives one."""
    if advertised:
        return advertised
    host, sep, port = gossip_address.rpartition(":")
    if not sep or not port.isdigit() or int(port) < GOSSIP_PORT_OFFSET:
        return ""
    return f"{host}:{int(port) - GOSSIP_PORT_OFFSET}"
