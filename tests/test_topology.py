"""llmgw.topology is the one home of the application's conventions (ports, roles, routable states, placeholders);
the SWIM core knows none of them and the gossip shell applies them when it builds a Member."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from llmgw._core.swim import MEMBER_FIELDS
from llmgw.gossip import EVENT_KINDS, Member, MemberEvent, MemberEventKind, MemberState
from llmgw.gossip.testing import gossip, make, upd
from llmgw.topology import (
    DEFAULT_PORTS,
    GOSSIP_PORT_OFFSET,
    ROLE_GATEWAY,
    ROLE_REPLICA,
    ROLE_UPSTREAM,
    ROLES,
    gossip_port_for,
    grpc_address_for,
    is_replica,
    is_routable,
    is_routable_replica,
    is_upstream_agent,
    role_from_wire,
    role_number,
    understands_user_messages,
)

CORE = Path(__file__).resolve().parent.parent / "llmgw" / "_core"
# The codec is the wire format of proto/gossip.proto: it must name every field and enum value there, the role
# enum and grpc_address included. The rule below is for the protocol cores.
CODEC_FILES = {"codec.pyx", "codec.pxd", "codec.pyi"}


def test_member_fields_match_the_cores_tuple_fields():
    assert [f.name for f in dataclasses.fields(Member)] == list(MEMBER_FIELDS)


def test_member_is_built_by_field_name_with_the_applications_readings():
    a = make("a")
    gossip(a, "gateway-2", [upd("gateway-2", address="10.1.2.3:17946", model_version="v5", active_requests=2,
                                max_capacity=3)])
    gossip(a, "b", [upd("b", grpc_address="h:1", role=2)])
    m = Member.from_core(a.member("gateway-2"))
    assert (m.member_id, m.address, m.grpc_address, m.role, m.state) == (
        "gateway-2", "10.1.2.3:17946", "10.1.2.3:7946", ROLE_GATEWAY, MemberState.ALIVE)
    assert (m.model_version, m.active_requests, m.max_capacity, m.weight, m.draining) == ("v5", 2, 3, 1.0, False)
    b = Member.from_core(a.member("b"))
    assert (b.grpc_address, b.role) == ("h:1", ROLE_GATEWAY)
    with pytest.raises(ValueError):
        Member.from_core(a.member("b")[:-1])  # a row of another shape is an error, never a shifted Member


def test_event_kinds_and_states_are_typed_strings():
    assert tuple(MemberEventKind) == EVENT_KINDS
    assert [str(k) for k in MemberEventKind] == ["joined", "updated", "suspect", "alive", "dead", "left", "removed"]
    event = MemberEvent(MemberEventKind.JOINED, Member("x", "h:10001", "h:1", ROLE_REPLICA, MemberState.SUSPECT, 1,
                                                       "", 0, 0, 1.0, False))
    assert event.kind == "joined" and event.member.state == "suspect" and f"{event.member.state}" == "suspect"
    assert event.member.is_live


def test_roles_ports_and_routable_states():
    assert grpc_address_for("10.1.2.3:17946") == "10.1.2.3:7946"
    assert grpc_address_for("10.1.2.3:17946", "h:1") == "h:1"
    assert grpc_address_for("10.1.2.3:900") == "" and grpc_address_for("nonsense") == ""
    assert role_from_wire("gateway-1", 0) == ROLE_GATEWAY and role_from_wire("replica-1", 0) == ROLE_REPLICA
    assert role_from_wire("gateway-1", 1) == ROLE_REPLICA and role_from_wire("x", 2) == ROLE_GATEWAY
    assert role_from_wire("x", 77) == ROLE_REPLICA  # an unknown role number: the naming convention decides
    assert role_number(ROLE_REPLICA) == 1 and role_number(ROLE_GATEWAY) == 2 and role_number(ROLE_UPSTREAM) == 3
    assert role_from_wire("gateway-x", 3) == ROLE_UPSTREAM and ROLE_UPSTREAM in ROLES
    assert understands_user_messages(3) and understands_user_messages(1) and not understands_user_messages(0)
    with pytest.raises(ValueError, match="role must be one of"):
        role_number("router")
    assert gossip_port_for(50051) == 50051 + GOSSIP_PORT_OFFSET == DEFAULT_PORTS["gateway"]["gossip"]
    assert gossip_port_for(55535) == 65535
    with pytest.raises(ValueError, match="no default gossip port for gRPC port 56731"):
        gossip_port_for(56731)  # an ephemeral gRPC port: 66731 is no port (found by a flaky process test)
    assert [s for s in ("alive", "suspect", "dead", "left", "ALIVE") if is_routable(s)] == ["alive", "suspect", "ALIVE"]
    replica = Member("r", "h:10001", "h:1", ROLE_REPLICA, MemberState.SUSPECT, 1, "", 0, 0, 1.0, False)
    assert is_replica(replica) and is_routable_replica(replica)
    assert not is_routable_replica(dataclasses.replace(replica, state=MemberState.DEAD))
    assert not is_replica(dataclasses.replace(replica, role=ROLE_GATEWAY))
    assert not is_replica(dataclasses.replace(replica, member_id="gateway-x"))
    agent = dataclasses.replace(replica, member_id="agent-1", role=ROLE_UPSTREAM, app_meta=b"{}")
    assert is_upstream_agent(agent) and not is_replica(agent) and not is_routable_replica(agent)
    assert not is_upstream_agent(replica)


def core_sources() -> list[Path]:
    files = [p for p in sorted(CORE.iterdir()) if p.suffix in (".pyx", ".pxd", ".pyi", ".py")]
    assert any(p.name == "swim.pyx" for p in files)
    return files


# What the protocol cores must not contain (comments and docstrings included: a core that explains a port rule
# is one step from applying it):
FORBIDDEN = [
    (re.compile(r"\b10000\b"), "the gossip/gRPC port offset"),
    (re.compile(r"\b(gateway|replica)s?\b", re.IGNORECASE), "a role name"),
    (re.compile(r"\bROLE_\w+"), "a role constant"),
    (re.compile(r"grpc(?!_address\b)", re.IGNORECASE), "anything gRPC beyond the opaque grpc_address field"),
    (re.compile(r"\brole\s*[!=<>]=|[!=<>]=\s*(self\.|m\.|u\.)?role\b"), "a comparison of the role field"),
    (re.compile(r"grpc_address\s*\.\s*(rpartition|partition|split|rsplit)|grpc_address\s*\["),
     "parsing the grpc_address field"),
]


def test_the_protocol_cores_know_no_ports_or_roles():
    """The SWIM core carries a member's advertised gRPC address and role number as opaque metadata (what was
    gossiped) and never reads them; deriving addresses and roles is llmgw.topology's job."""
    problems = []
    for path in core_sources():
        if path.name in CODEC_FILES:
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for pattern, what in FORBIDDEN:
                if pattern.search(line):
                    problems.append(f"{path.name}:{lineno}: {what}: {line.strip()}")
    assert problems == []


def test_the_codec_names_roles_only_as_the_wire_enum_and_holds_no_port_rule():
    for name in ("codec.pyx", "codec.pxd"):
        text = (CORE / name).read_text(encoding="utf-8")
        assert not re.search(r"\b10000\b", text), name
        assert not re.search(r"startswith\(\s*[\"']gateway", text), name
        assert not re.search(r"rpartition\(\s*[\"']:", text), name


def test_the_rule_catches_what_it_is_for():
    offending = ['    if not sep or int(port) < 10000:', '    return "gateway" if x else "replica"',
                 'from llmgw._core.codec cimport ROLE_GATEWAY', '    if self.role == 2:',
                 '    host, _, port = m.grpc_address.rpartition(":")', '# the gRPC port']
    for line in offending:
        assert any(p.search(line) for p, _ in FORBIDDEN), line
    allowed = ['    cdef public str member_id, address, model_version, grpc_address, reporter_id',
               '        self.grpc_address = u.grpc_address', '        self.role = u.role',
               '        return (self.member_id, self.address, self.grpc_address, self.role,']
    for line in allowed:
        assert not any(p.search(line) for p, _ in FORBIDDEN), line
