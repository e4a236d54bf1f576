"""Usage digest wire format: byte-identical to protobuf for the proposed message, hostile bytes refused cleanly."""

import pytest
from conftest import examples
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import given, settings
from hypothesis import strategies as st

from llmgw.tenancy.digest import (
    MAX_DIGEST_BYTES,
    DigestError,
    TenantUsage,
    UsageDigest,
    decode_digest,
    encode_digest,
    encode_tenant,
)

F = descriptor_pb2.FieldDescriptorProto


def _proposed_messages():
    """The messages proposed in llmgw/tenancy/digest.py, built with protobuf itself."""
    fdp = descriptor_pb2.FileDescriptorProto(name="llmgw_usage_test.proto", package="llmgwtest", syntax="proto3")
    tenant = fdp.message_type.add(name="TenantUsage")
    tenant.field.add(name="tenant", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    for number, name, kind in ((2, "requests", F.TYPE_UINT64), (3, "tokens", F.TYPE_UINT64),
                               (4, "in_flight", F.TYPE_UINT32), (5, "recent_requests", F.TYPE_UINT64),
                               (6, "recent_tokens", F.TYPE_UINT64), (7, "recent_demand", F.TYPE_UINT64)):
        tenant.field.add(name=name, number=number, type=kind, label=F.LABEL_OPTIONAL)
    digest = fdp.message_type.add(name="UsageDigest")
    for number, name in ((1, "window_ms"), (2, "recent_ms"), (3, "cycle_ms")):
        digest.field.add(name=name, number=number, type=F.TYPE_UINT32, label=F.LABEL_OPTIONAL)
    digest.field.add(name="tenants", number=4, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                     type_name=".llmgwtest.TenantUsage")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("llmgwtest.UsageDigest"))


ProtoDigest = _proposed_messages()

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=16).filter(
    lambda s: 0 < len(s.encode()) <= 64)
usages = st.builds(TenantUsage, names, u64, u64, u32, u64, u64, u64)
digests = st.builds(UsageDigest, u32, u32, u32, st.lists(usages, max_size=8).map(tuple))


def to_proto(digest: UsageDigest):
    msg = ProtoDigest(window_ms=digest.window_ms, recent_ms=digest.recent_ms, cycle_ms=digest.cycle_ms)
    for t in digest.tenants:
        msg.tenants.add(tenant=t.tenant, requests=t.requests, tokens=t.tokens, in_flight=t.in_flight,
                        recent_requests=t.recent_requests, recent_tokens=t.recent_tokens,
                        recent_demand=t.recent_demand)
    return msg


@settings(max_examples=examples(300), deadline=None)
@given(digests)
def test_encoding_is_byte_identical_to_protobuf_and_round_trips(digest):
    data = encode_digest(digest)
    assert data == to_proto(digest).SerializeToString()
    assert decode_digest(data) == digest
    parsed = ProtoDigest.FromString(data)
    assert [t.tenant for t in parsed.tenants] == [t.tenant for t in digest.tenants]


def test_idle_tenant_costs_its_name_and_a_few_bytes():
    assert len(encode_tenant(TenantUsage("team-a"))) == 2 + 2 + 6
    # tag+length, name, then tag + varint for 600 (2), 200000 (3), 16 (1), 50 (1), 20000 (3)
    assert len(encode_tenant(TenantUsage("team-a", 600, 200_000, 16, 50, 20_000))) == 2 + 8 + 3 + 4 + 2 + 2 + 4


def test_unknown_fields_are_skipped():
    extra = (bytes([9 << 3 | 0]) + b"\x05" + bytes([10 << 3 | 2]) + b"\x02ab" + bytes([11 << 3 | 1]) + bytes(8)
             + bytes([12 << 3 | 5]) + bytes(4))
    digest = UsageDigest(60000, 5000, 1000, (TenantUsage("a", 3),))
    assert decode_digest(extra + encode_digest(digest) + extra) == digest


@pytest.mark.parametrize(("data", "words"), [
    (b"\x08", "truncated varint"),
    (b"\x08" + b"\xff" * 10 + b"\x01", "varint longer"),
    (b"\x22\x05\x0a\x01", "runs past the end"),
    (b"\x22\x02\x10\x01", "without a name"),
    (b"\x22\x03\x0a\x01\xff", "not UTF-8"),
    (b"\x22\x43\x0a\x41" + b"a" * 65, "longer than 64"),
    (b"\x0b", "wire type 3"),
    (b"\x00\x01", "field number 0"),
    (b"\x08\x80\x80\x80\x80\x10", "out of range"),
    (b"\x22\x09\x0a\x01a\x20\x80\x80\x80\x80\x10", "out of range"),
    (b"\x0d\x01", "truncated fixed-size"),
    (b"\x00" * (MAX_DIGEST_BYTES + 1), "larger than any datagram"),
])
def test_malformed_bytes_raise_digest_error(data, words):
    with pytest.raises(DigestError, match=words):
        decode_digest(data)


@settings(max_examples=examples(500), deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_digest_error(data):
    try:
        decode_digest(data)
    except DigestError:
        pass


def test_encoder_refuses_values_outside_the_message():
    with pytest.raises(ValueError):
        encode_tenant(TenantUsage(""))
    with pytest.raises(ValueError):
        encode_tenant(TenantUsage("a" * 65))
    with pytest.raises(ValueError):
        encode_tenant(TenantUsage("a", in_flight=2**32))
    with pytest.raises(ValueError):
        encode_tenant(TenantUsage("a", requests=-1))
