"""Gossip wire codec (llmgw/_core/codec.pyx) against the generated protobuf classes (the reference encoding)."""

from __future__ import annotations

import math
import struct

import pytest
from conftest import examples
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llmgw._core import codec
from llmgw._core.codec import CodecError, Message, Update, decode, encode, encode_limited
from llmgw._proto import gossip_pb2

INT32 = st.integers(-(2**31), 2**31 - 1)
UINT64 = st.integers(0, 2**64 - 1)
# Known values most of the time, any int32 (open enums) the rest.
MESSAGE_TYPES = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 6]), INT32)
STATES = st.one_of(st.sampled_from([0, 1, 2, 3]), INT32)
ROLES = st.one_of(st.sampled_from([0, 1, 2, 3]), INT32)
TEXT = st.one_of(st.sampled_from(["", "replica-1", "10.0.0.7:7946"]), st.text(max_size=40))
WEIGHTS = st.floats(width=32)  # every float32, including NaN, infinities and -0.0
# Opaque bytes: empty most often, short ones, and now and then one past the 128-byte length-prefix boundary.
BLOBS = st.one_of(st.just(b""), st.binary(max_size=40), st.binary(min_size=120, max_size=300))

updates_st = st.builds(
    Update,
    member_id=TEXT,
    address=TEXT,
    state=STATES,
    incarnation=UINT64,
    model_version=TEXT,
    active_requests=INT32,
    max_capacity=INT32,
    grpc_address=TEXT,
    role=ROLES,
    weight=WEIGHTS,
    draining=st.booleans(),
    reporter_id=TEXT,
    app_meta=BLOBS,
)
messages_st = st.builds(
    Message,
    type=MESSAGE_TYPES,
    sender_id=TEXT,
    target_id=TEXT,
    sequence_num=UINT64,
    updates=st.lists(updates_st, max_size=6),
    sender_address=TEXT,
    target_address=TEXT,
    timestamp_ms=UINT64,
    payload=BLOBS,
)

# Generating rich messages dominates the run time; these counts keep the file well inside its time budget.
PROPERTY = settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------------------------
# A second, independent path through the generated protobuf classes.


def to_pb(msg: Message) -> gossip_pb2.GossipMessage:
    pb = gossip_pb2.GossipMessage(
        type=msg.type,
        sender_id=msg.sender_id,
        target_id=msg.target_id,
        sequence_num=msg.sequence_num,
        sender_address=msg.sender_address,
        target_address=msg.target_address,
        timestamp_ms=msg.timestamp_ms,
        payload=msg.payload,
    )
    for u in msg.updates:
        pb.updates.add(
            member_id=u.member_id,
            address=u.address,
            state=u.state,
            incarnation=u.incarnation,
            model_version=u.model_version,
            active_requests=u.active_requests,
            max_capacity=u.max_capacity,
            grpc_address=u.grpc_address,
            role=u.role,
            weight=u.weight,
            draining=u.draining,
            reporter_id=u.reporter_id,
            app_meta=u.app_meta,
        )
    return pb


def from_pb(pb: gossip_pb2.GossipMessage) -> Message:
    return Message(
        type=pb.type,
        sender_id=pb.sender_id,
        target_id=pb.target_id,
        sequence_num=pb.sequence_num,
        sender_address=pb.sender_address,
        target_address=pb.target_address,
        timestamp_ms=pb.timestamp_ms,
        payload=pb.payload,
        updates=[
            Update(
                member_id=u.member_id,
                address=u.address,
                state=u.state,
                incarnation=u.incarnation,
                model_version=u.model_version,
                active_requests=u.active_requests,
                max_capacity=u.max_capacity,
                grpc_address=u.grpc_address,
                role=u.role,
                weight=u.weight,
                draining=u.draining,
                reporter_id=u.reporter_id,
                app_meta=u.app_meta,
            )
            for u in pb.updates
        ],
    )


def pb_parse(data: bytes) -> gossip_pb2.GossipMessage:
    pb = gossip_pb2.GossipMessage()
    pb.ParseFromString(data)
    return pb


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_spans(data: bytes) -> list[int]:
    """Offsets of every top-level field boundary of a valid encoding (where a field may be inserted)."""
    offsets = [0]
    pos = 0
    while pos < len(data):
        tag = 0
        shift = 0
        while True:
            b = data[pos]
            pos += 1
            tag |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        wire = tag & 7
        if wire == 0:
            while data[pos] >= 0x80:
                pos += 1
            pos += 1
        elif wire == 2:
            length = 0
            shift = 0
            while True:
                b = data[pos]
                pos += 1
                length |= (b & 0x7F) << shift
                shift += 7
                if b < 0x80:
                    break
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        offsets.append(pos)
    return offsets


def sample_message(n_updates: int = 3) -> Message:
    return Message(
        type=codec.PING,
        sender_id="gateway-1",
        target_id="replica-2",
        sequence_num=42,
        sender_address="10.0.0.1:7946",
        timestamp_ms=1_700_000_000_000,
        updates=[
            Update(
                member_id=f"replica-{i}",
                address=f"10.0.0.{i}:7946",
                state=codec.ALIVE if i % 2 else codec.SUSPECT,
                incarnation=1_700_000_000 + i,
                model_version="v1",
                active_requests=i,
                max_capacity=4,
                role=codec.ROLE_REPLICA,
                weight=1.0,
                reporter_id="gateway-1" if i % 2 == 0 else "",
            )
            for i in range(n_updates)
        ],
    )


# ------------------------------------------------------------------------------------------------------------------
# Constants and the value classes


def test_constants_match_the_proto_enums():
    assert tuple(
        gossip_pb2.MessageType.Value(n) for n in ("PING", "PING_REQ", "ACK", "NACK", "SYNC", "SYNC_ACK", "USER")
    ) == (codec.PING, codec.PING_REQ, codec.ACK, codec.NACK, codec.SYNC, codec.SYNC_ACK, codec.USER)
    assert tuple(
        gossip_pb2.MemberState.Value(n) for n in ("ALIVE", "SUSPECT", "DEAD", "LEFT")
    ) == (codec.ALIVE, codec.SUSPECT, codec.DEAD, codec.LEFT)
    assert tuple(
        gossip_pb2.Role.Value(n) for n in ("ROLE_UNSPECIFIED", "REPLICA", "GATEWAY", "UPSTREAM")
    ) == (codec.ROLE_UNSPECIFIED, codec.ROLE_REPLICA, codec.ROLE_GATEWAY, codec.ROLE_UPSTREAM)
    assert type(codec.PING) is int
    assert codec.MAX_DATAGRAM == 1400
    assert issubclass(CodecError, ValueError)


def test_defaults_encode_to_nothing():
    assert encode(Message()) == b""
    assert decode(b"") == Message()
    assert Update().encoded_size() == 2  # tag + zero length
    assert encode(Message(updates=[Update()])) == b"\x2a\x00"
    m = Message.__new__(Message)  # bypasses __init__, as decoding and unpickling do
    assert m.sender_id == "" and m.updates == [] and m.payload == b""
    u = Update.__new__(Update)
    assert u.member_id == "" and u.reporter_id == "" and u.app_meta == b""


def test_equality_repr_and_copy():
    m = sample_message()
    assert m == sample_message()
    assert m != Message()
    other = sample_message()
    other.updates[1].incarnation += 1
    assert m != other
    assert (m == 3) is False
    with pytest.raises(TypeError):
        hash(m)
    with pytest.raises(TypeError):
        hash(m.updates[0])
    text = repr(m)
    assert text.startswith("Message(type=PING, sender_id='gateway-1'")
    assert "Update(member_id='replica-0'" in text and "state=SUSPECT" in text and "role=ROLE_REPLICA" in text
    assert repr(Update(state=77)) == "Update(state=77)"
    clone = m.copy()
    assert clone == m and clone.updates is not m.updates and clone.updates[0] is not m.updates[0]
    clone.updates[0].member_id = "changed"
    assert m.updates[0].member_id == "replica-0"
    u = m.updates[0]
    uc = u.copy()
    assert uc == u and uc is not u


def test_nan_weights_compare_equal_so_round_trips_hold():
    u = Update(weight=math.nan)
    assert u == Update(weight=math.nan)
    assert u != Update(weight=1.0)
    assert decode(encode(Message(updates=[u]))).updates[0] == u


def test_constructor_rejects_bad_types():
    with pytest.raises(TypeError):
        Update(member_id=None)
    with pytest.raises(TypeError):
        Message(sender_id=None)
    with pytest.raises(TypeError, match=r"updates\[1\] is int"):
        Message(updates=[Update(), 5])
    with pytest.raises(OverflowError):
        Update(incarnation=-1)
    with pytest.raises(OverflowError):
        Update(active_requests=2**31)
    with pytest.raises(OverflowError):
        Message(sequence_num=2**64)


# ------------------------------------------------------------------------------------------------------------------
# Encoding


def test_encode_is_byte_identical_to_protobuf():
    m = sample_message(8)
    assert encode(m) == to_pb(m).SerializeToString()


def test_negative_int32_is_a_ten_byte_varint():
    data = encode(Message(type=-1))
    assert data == b"\x08" + b"\xff" * 9 + b"\x01"
    assert decode(data).type == -1
    u = Update(active_requests=-(2**31))
    assert u.encoded_size() == 2 + 1 + 10


def test_weight_is_float32_and_negative_zero_is_sent():
    assert encode(Message(updates=[Update(weight=1.0)])) == b"\x2a\x05\x55" + struct.pack("<f", 1.0)
    # protobuf decides presence of an implicit float on its bits, so -0.0 is written.
    data = encode(Message(updates=[Update(weight=-0.0)]))
    assert data == to_pb(Message(updates=[Update(weight=-0.0)])).SerializeToString()
    assert math.copysign(1.0, decode(data).updates[0].weight) == -1.0
    # A double between float32 values comes back rounded to float32.
    assert decode(encode(Message(updates=[Update(weight=0.1)]))).updates[0].weight == struct.unpack(
        "<f", struct.pack("<f", 0.1)
    )[0]


def test_weight_beyond_float32_saturates_to_infinity():
    for value, expected in ((1e300, math.inf), (-1e300, -math.inf), (3.4028234663852886e38, 3.4028234663852886e38)):
        got = decode(encode(Message(updates=[Update(weight=value)]))).updates[0].weight
        assert got == expected


def test_encode_errors():
    m = sample_message()
    m.updates[0].address = None
    with pytest.raises(TypeError, match="address must be str"):
        encode(m)
    m = sample_message()
    m.target_id = None
    with pytest.raises(TypeError, match="target_id must be str"):
        encode(m)
    m = sample_message()
    m.updates.append("not an update")
    with pytest.raises(TypeError, match=r"updates\[3\] is str"):
        encode(m)
    with pytest.raises(CodecError, match="sender_id cannot be encoded"):
        encode(Message(sender_id="bad \udc80 surrogate"))
    with pytest.raises(TypeError):
        encode(None)
    # A None list is the same as no updates.
    m = sample_message()
    m.updates = None
    assert encode(m) == encode(Message(type=m.type, sender_id=m.sender_id, target_id=m.target_id,
                                       sequence_num=m.sequence_num, sender_address=m.sender_address,
                                       timestamp_ms=m.timestamp_ms))


def test_encoded_size_is_what_the_update_adds():
    for n in (0, 1, 5):
        m = sample_message(n)
        header = len(encode(Message(type=m.type, sender_id=m.sender_id, target_id=m.target_id,
                                    sequence_num=m.sequence_num, sender_address=m.sender_address,
                                    timestamp_ms=m.timestamp_ms)))
        assert len(encode(m)) == header + sum(u.encoded_size() for u in m.updates)
    big = Update(member_id="x" * 300)  # two-byte length prefixes, for the string and for the update
    assert big.encoded_size() == 1 + 2 + (1 + 2 + 300)
    assert len(encode(Message(updates=[big]))) == big.encoded_size()
    assert len(encode(Message(type=codec.ACK, updates=[big]))) == 2 + big.encoded_size()


# ------------------------------------------------------------------------------------------------------------------
# Decoding


def test_decode_accepts_every_buffer_kind():
    m = sample_message()
    data = encode(m)
    assert decode(data) == m
    assert decode(bytearray(data)) == m
    assert decode(memoryview(data)) == m
    padded = bytes(b for byte in data for b in (byte, 0))
    assert decode(memoryview(padded)[::2]) == m  # non-contiguous view
    with pytest.raises(TypeError):
        decode("not bytes")
    with pytest.raises(TypeError):
        decode(None)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x08", "truncated varint"),
        (b"\x08\x80", "truncated varint"),
        (b"\x80", "truncated varint"),
        (b"\x08" + b"\xff" * 10 + b"\x01", "varint longer than 10 bytes"),
        (b"\x12\x05abc", "runs past the end"),
        (b"\x12\xff\xff\xff\xff\x0f", "length 4294967295 at offset 6 runs past the end"),
        (b"\x2a\x03\x0a\x05abc", "runs past the end"),  # inner length past the update's end
        (b"\x00", "field number 0"),
        (b"\x80\x00", "field number 0"),
        (b"\x2a\x01\x00", "field number 0"),
        (b"\x80\x80\x80\x80\x10\x00", "out of range"),
        (b"\x88\x80\x80\x80\x80\x00\x05", "tag varint longer than 5 bytes"),
        (b"\x12\x81\x80\x80\x80\x80\x00x", "length varint longer than 5 bytes"),
        (b"\x4b\x4c", "wire type 3"),
        (b"\x4c", "wire type 4"),
        (b"\x4e", "wire type 6"),
        (b"\x4f", "wire type 7"),
        (b"\x49\x01\x02", "truncated fixed64"),
        (b"\x4d\x01\x02", "truncated fixed32"),
        (b"\x2a\x03\x55\x00\x00", "truncated MembershipUpdate.weight"),
        (b"\x12\x02\xc3\x28", "sender_id at offset 2 is not valid UTF-8"),
        (b"\x12\x03\xed\xa0\x80", "not valid UTF-8"),  # an encoded surrogate
        (b"\x12\x02\xc0\x80", "not valid UTF-8"),  # overlong NUL
        (b"\x2a\x03\x0a\x01\xff", "MembershipUpdate.member_id at offset 4 is not valid UTF-8"),
    ],
)
def test_malformed_input_raises_codec_error(data, message):
    with pytest.raises(CodecError, match=message):
        decode(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x88\x80\x80\x80\x00\x05",  # five-byte overlong tag: accepted
        b"\x88\x80\x80\x80\x80\x00\x05",  # six-byte tag: rejected
        b"\xf8\xff\xff\xff\x0f\x00",  # largest field number
        b"\xf8\xff\xff\xff\x1f\x00",  # tag above 32 bits
        b"\x12\x81\x80\x80\x80\x00x",  # five-byte overlong length: accepted
        b"\x12\x81\x80\x80\x80\x80\x00x",  # six-byte length: rejected
        b"\x08\x85\x80\x80\x80\x80\x80\x80\x80\x80\x00",  # ten-byte overlong value varint: accepted
        b"\x2a\x81\x00\x08\x02",  # update body ends inside a field
    ],
)
def test_overlong_and_boundary_varints_are_treated_like_protobuf(data):
    _differential(data)
    try:
        decode(data)
    except CodecError:
        with pytest.raises(DecodeError):
            pb_parse(data)
    else:
        pb_parse(data)


def test_bad_utf8_and_bad_framing_is_rejected_by_protobuf_too():
    for data in (b"\x12\x02\xc3\x28", b"\x08\x80", b"\x12\x05abc", b"\x00"):
        with pytest.raises(DecodeError):
            pb_parse(data)


def test_update_count_is_capped():
    data = b"\x2a\x00" * codec.MAX_UPDATES
    assert len(decode(data).updates) == codec.MAX_UPDATES
    with pytest.raises(CodecError, match="more than 4096 updates"):
        decode(data + b"\x2a\x00")
    with pytest.raises(CodecError, match="more than 2 updates"):
        decode(b"\x2a\x00" * 3, max_updates=2)


def test_unknown_fields_of_every_wire_type_are_skipped_like_protobuf():
    unknown = (
        varint((20 << 3) | 0) + varint(2**64 - 1)
        + varint((21 << 3) | 1) + b"12345678"
        + varint((22 << 3) | 2) + varint(3) + b"\xff\xfe\xfd"  # unknown bytes need not be UTF-8
        + varint((23 << 3) | 5) + b"1234"
        + varint(((2**29 - 1) << 3) | 0) + b"\x01"  # largest field number
    )
    inner = encode(Message(updates=[Update(member_id="n1", state=codec.DEAD)]))[2:]
    data = (
        unknown
        + encode(Message(type=codec.ACK, sender_id="s"))
        + b"\x2a" + varint(len(inner) + len(unknown)) + inner + unknown
        + unknown
    )
    expected = Message(type=codec.ACK, sender_id="s", updates=[Update(member_id="n1", state=codec.DEAD)])
    assert decode(data) == expected
    assert from_pb(pb_parse(data)) == expected


def test_known_field_with_wrong_wire_type_is_treated_as_unknown():
    # sender_id (2) sent as a varint, type (1) as length-delimited, weight (10) as a varint.
    data = b"\x10\x05" + b"\x0a\x01x" + b"\x2a\x02\x50\x01"
    assert decode(data) == from_pb(pb_parse(data)) == Message(updates=[Update()])


def test_last_value_wins_and_updates_accumulate():
    data = (
        encode(Message(type=codec.PING, sender_id="first", sequence_num=1))
        + encode(Message(type=codec.ACK, sender_id="second", updates=[Update(member_id="a")]))
        + encode(Message(updates=[Update(member_id="b", incarnation=3)]))
        + b"\x2a\x06" + b"\x0a\x01x" + b"\x0a\x01y"  # a repeated string inside one update: last wins
    )
    got = decode(data)
    assert got == from_pb(pb_parse(data))
    assert got.type == codec.ACK and got.sender_id == "second" and got.sequence_num == 1
    assert [u.member_id for u in got.updates] == ["a", "b", "y"]


def test_int32_and_bool_varints_are_read_like_protobuf():
    # An int32 sent as a full 64-bit varint keeps its low 32 bits; a bool is true for any non-zero varint.
    data = b"\x2a\x0e" + b"\x30" + varint(2**40 + 7) + b"\x58" + varint(2**35)
    assert len(data) == 2 + 14
    got = decode(data)
    assert got == from_pb(pb_parse(data))
    assert got.updates[0].active_requests == 7 and got.updates[0].draining is True
    # A tenth varint byte above 1 overflows 64 bits; the extra bits are dropped.
    data = b"\x20" + b"\xff" * 9 + b"\x7f"
    assert decode(data).sequence_num == pb_parse(data).sequence_num == 2**64 - 1


def test_unknown_enum_values_are_kept():
    m = Message(type=99, updates=[Update(state=-7, role=1234)])
    data = encode(m)
    assert decode(data) == m
    pb = pb_parse(data)
    assert pb.type == 99 and pb.updates[0].state == -7 and pb.updates[0].role == 1234


def test_pickle_and_deepcopy_round_trip():
    import copy
    import pickle

    m = sample_message()
    assert pickle.loads(pickle.dumps(m)) == m
    clone = copy.deepcopy(m)
    assert clone == m and clone.updates[0] is not m.updates[0]


# ------------------------------------------------------------------------------------------------------------------
# The decoder's string cache: it must never return a wrong string, whatever collides.


def _strings_message(strings: list[str]) -> bytes:
    return encode(Message(updates=[Update(member_id=s) for s in strings]))


def test_repeated_ascii_strings_come_back_as_the_same_object():
    data = encode(sample_message())
    first, second = decode(data), decode(data)
    assert first == second
    assert all(a.member_id is b.member_id for a, b in zip(first.updates, second.updates, strict=True))
    assert first.sender_id is second.sender_id


def test_string_cache_never_confuses_strings():
    # Every length around the hashing boundaries (8, 16, 64), with ASCII and non-ASCII text.
    strings = [("abcdefghijklmnopqrstuvwxyz0123456789" * 3)[:n] for n in range(1, 80)]
    strings += [s[:-1] + "é" for s in strings[1:]]
    # Same length, differing only in bytes the slot hash does not read (8..15 and 24..31 of a 40-byte string),
    # so they share a slot and must be told apart by their bytes.
    base = "k" * 40
    strings += [base[:10] + chr(ord("A") + i) + base[11:] for i in range(6)]
    strings += [base[:26] + chr(ord("A") + i) + base[27:] for i in range(6)]
    # More distinct strings than the cache has slots.
    strings += [f"member-{i:05d}" for i in range(3000)]
    for _ in range(2):  # the second pass is served from the cache where it can be
        for start in range(0, len(strings), 400):
            chunk = strings[start : start + 400]
            assert [u.member_id for u in decode(_strings_message(chunk)).updates] == chunk


@PROPERTY
@given(st.lists(st.text(alphabet="ab", min_size=30, max_size=34), min_size=2, max_size=12))
def test_colliding_strings_decode_exactly(strings):
    # Tiny alphabet, similar lengths: many strings agree on every byte the slot hash reads.
    data = _strings_message(strings)
    for _ in range(3):
        assert [u.member_id for u in decode(data).updates] == strings


# ------------------------------------------------------------------------------------------------------------------
# encode_limited


def test_encode_limited_fills_a_datagram_with_a_prefix():
    m = sample_message(0)
    updates = sample_message(200).updates
    data, n = encode_limited(m, updates)
    assert len(data) <= codec.MAX_DATAGRAM < len(data) + updates[n].encoded_size()
    got = decode(data)
    assert got.updates == updates[:n] and got.sender_id == m.sender_id
    # msg.updates is ignored.
    m.updates = updates[:3]
    assert encode_limited(m, updates[:2], 10_000) == (encode(Message(
        type=m.type, sender_id=m.sender_id, target_id=m.target_id, sequence_num=m.sequence_num,
        sender_address=m.sender_address, timestamp_ms=m.timestamp_ms, updates=updates[:2])), 2)


def test_encode_limited_edges():
    m = Message(type=codec.PING, sender_id="abc")  # 5 header bytes
    u = Update(member_id="x")  # 5 bytes
    assert encode_limited(m, [u, u], 15) == (encode(Message(type=codec.PING, sender_id="abc", updates=[u, u])), 2)
    assert encode_limited(m, [u, u], 14)[1] == 1
    assert encode_limited(m, [u, u], 5) == (b"\x12\x03abc", 0)
    assert encode_limited(m, [], 5)[1] == 0
    assert encode_limited(m, None, 5)[1] == 0
    # A prefix: a big update stops the packing even though a later small one would fit.
    assert encode_limited(m, [u, Update(member_id="y" * 50), u], 30)[1] == 1
    with pytest.raises(CodecError, match="header alone is 5 bytes"):
        encode_limited(m, [u], 4)
    with pytest.raises(TypeError, match=r"updates\[1\] is int"):
        encode_limited(m, [u, 3], 100)


# ------------------------------------------------------------------------------------------------------------------
# Properties


@settings(PROPERTY, max_examples=examples(250))
@given(messages_st)
def test_round_trips_through_protobuf_both_ways(m):
    data = encode(m)
    assert from_pb(pb_parse(data)) == m
    reference = to_pb(m).SerializeToString()
    assert data == reference
    assert decode(reference) == m
    assert decode(data) == m


@st.composite
def unknown_field(draw):
    known = set(range(1, 14))
    number = draw(st.integers(1, 2**29 - 1).filter(lambda n: n not in known))
    wire = draw(st.sampled_from([0, 1, 2, 5]))
    tag = varint((number << 3) | wire)
    if wire == 0:
        return tag + varint(draw(UINT64))
    if wire == 1:
        return tag + draw(st.binary(min_size=8, max_size=8))
    if wire == 2:
        payload = draw(st.binary(max_size=20))
        return tag + varint(len(payload)) + payload
    return tag + draw(st.binary(min_size=4, max_size=4))


@PROPERTY
@given(messages_st, st.data())
def test_injected_unknown_fields_are_skipped(m, data):
    encoded = encode(m)
    # Unknown fields inside updates: rebuild each update's body with unknown fields spliced in.
    pieces = [encode(Message(type=m.type, sender_id=m.sender_id, target_id=m.target_id,
                             sequence_num=m.sequence_num, sender_address=m.sender_address,
                             target_address=m.target_address, timestamp_ms=m.timestamp_ms, payload=m.payload))]
    for u in m.updates:
        body = _update_body(encode(Message(updates=[u])))
        at = data.draw(st.sampled_from(field_spans(body)))
        spliced = body[:at] + data.draw(unknown_field()) + body[at:]
        pieces.append(b"\x2a" + varint(len(spliced)) + spliced)
    joined = b"".join(pieces)
    cuts = field_spans(joined)
    at = data.draw(st.sampled_from(cuts))
    joined = joined[:at] + data.draw(unknown_field()) + joined[at:]
    assert decode(joined) == m
    assert from_pb(pb_parse(joined)) == m
    assert decode(encoded) == m


def _update_body(raw: bytes) -> bytes:
    """The body of the single update in encode(Message(updates=[u]))."""
    assert raw[0] == 0x2A
    pos = 1
    length = 0
    shift = 0
    while True:
        b = raw[pos]
        pos += 1
        length |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            break
    assert pos + length == len(raw)
    return raw[pos:]


@settings(PROPERTY, max_examples=examples(60))
@given(messages_st)
def test_truncated_messages_fail_cleanly_or_decode_to_what_protobuf_sees(m):
    encoded = encode(m)
    for cut in range(len(encoded)):
        truncated = encoded[:cut]
        try:
            got = decode(truncated)
        except CodecError:
            with pytest.raises(DecodeError):
                pb_parse(truncated)
        else:
            # Cut at a field boundary: a valid, shorter message.
            assert got == from_pb(pb_parse(truncated))


def _differential(data: bytes) -> None:
    """Our decoder accepts exactly what protobuf accepts (bar groups and the update cap), with the same result."""
    try:
        got = decode(data)
    except CodecError as error:
        try:
            pb = pb_parse(data)
        except DecodeError:
            return
        # protobuf still parses deprecated groups in unknown fields; we refuse them.
        assert "wire type 3" in str(error) or "wire type 4" in str(error), (data, error, pb)
        return
    assert got == from_pb(pb_parse(data))
    assert decode(encode(got)) == got


@settings(max_examples=examples(1000), deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_fail_cleanly_or_agree_with_protobuf(data):
    _differential(data)


@settings(PROPERTY, max_examples=examples(200))
@given(messages_st, st.data())
def test_corrupted_messages_fail_cleanly_or_agree_with_protobuf(m, data):
    encoded = bytearray(encode(m))
    assume(encoded)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(encoded) - 1))
        encoded[pos] = data.draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, encoded[pos] ^ 0x80]))
    _differential(bytes(encoded))


@PROPERTY
@given(messages_st, st.lists(updates_st, max_size=20), st.integers(0, 600))
def test_encode_limited_takes_the_longest_prefix_that_fits(m, updates, max_size):
    header = Message(type=m.type, sender_id=m.sender_id, target_id=m.target_id, sequence_num=m.sequence_num,
                     sender_address=m.sender_address, target_address=m.target_address,
                     timestamp_ms=m.timestamp_ms, payload=m.payload)
    header_size = len(encode(header))
    if header_size > max_size:
        with pytest.raises(CodecError):
            encode_limited(m, updates, max_size)
        return
    data, n = encode_limited(m, updates, max_size)
    assert len(data) <= max_size
    assert 0 <= n <= len(updates)
    if n < len(updates):
        assert len(data) + updates[n].encoded_size() > max_size
    header.updates = updates[:n]
    assert decode(data) == header
    assert data == encode(header)


# ------------------------------------------------------------------------------------------------------------------
# Lazy decoding: decode() validates everything up front, fields become Python objects when first read.

HEADER_FIELDS = ("type", "sender_id", "target_id", "sequence_num", "sender_address", "target_address", "timestamp_ms",
                 "payload")
UPDATE_FIELDS = ("member_id", "address", "state", "incarnation", "model_version", "active_requests", "max_capacity",
                 "grpc_address", "role", "weight", "draining", "reporter_id", "app_meta")


def _same_value(a, b) -> bool:
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@PROPERTY
@given(messages_st, st.permutations(HEADER_FIELDS + ("updates",)))
def test_lazily_read_fields_equal_protobufs_eager_parse(m, order):
    data = encode(m)
    pb = pb_parse(data)
    got = decode(data)
    # Fields read one at a time, in an arbitrary order, each compared with what upb parsed.
    for name in order:
        if name == "updates":
            assert len(got.updates) == len(pb.updates)
            for ours, theirs in zip(got.updates, pb.updates, strict=True):
                for field in UPDATE_FIELDS:
                    assert _same_value(getattr(ours, field), getattr(theirs, field)), field
        else:
            assert getattr(got, name) == getattr(pb, name), name
    assert got == m


def test_mutating_the_source_buffer_after_decode_changes_nothing():
    m = sample_message(4)
    for make in (bytearray, lambda b: memoryview(bytearray(b))):
        buffer = make(encode(m))
        got = decode(buffer)
        target = buffer.obj if isinstance(buffer, memoryview) else buffer
        target[:] = b"\xff" * len(target)
        assert got == m
        # decode released the buffer export, so the caller may even resize it.
        if isinstance(buffer, memoryview):
            buffer.release()
        target.extend(b"more")


def _with_bad_model_version(n_updates: int, bad_index: int) -> bytes:
    marker = "MARKER"
    m = sample_message(n_updates)
    m.updates[bad_index].model_version = marker
    data = encode(m)
    assert data.count(marker.encode()) == 1
    return data.replace(marker.encode(), b"v\xc3(ab1")  # same length, invalid UTF-8


def test_errors_are_raised_by_decode_not_by_reading_a_field():
    data = _with_bad_model_version(5, 2)
    with pytest.raises(CodecError, match=r"MembershipUpdate.model_version at offset \d+ is not valid UTF-8"):
        decode(data)
    with pytest.raises(DecodeError):
        pb_parse(data)
    # The same holds for framing errors past the last header field and inside the last update.
    good = encode(sample_message(5))
    for bad in (good[:-1], good + b"\x2a\x05\x0a\x03ab", good + b"\x2a\x02\x1b\x00"):
        with pytest.raises(CodecError):
            decode(bad)


@PROPERTY
@given(messages_st, st.data())
def test_once_decode_succeeds_every_read_succeeds(m, data):
    # Bytes that decode must never fail later, whatever the field: corrupt a valid message until it still decodes.
    raw = bytearray(encode(m))
    if raw:
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        got = decode(bytes(raw))
    except CodecError:
        return
    for name in HEADER_FIELDS:
        getattr(got, name)
    for u in got.updates:
        for field in UPDATE_FIELDS:
            getattr(u, field)
    assert decode(encode(got)) == got


def test_setting_a_field_of_a_decoded_message_overrides_the_decoded_value():
    original = sample_message(3)
    got = decode(encode(original))
    got.sender_id = "someone-else"
    got.target_address = "10.9.9.9:7946"
    assert got.sender_id == "someone-else"
    again = decode(encode(got))
    assert again.sender_id == "someone-else" and again.target_address == "10.9.9.9:7946"
    assert again.target_id == original.target_id and again.updates == original.updates
    # Replacing the updates before they were ever read, and changing one after it was read.
    got = decode(encode(original))
    got.updates = [Update(member_id="only")]
    assert decode(encode(got)).updates == [Update(member_id="only")]
    got = decode(encode(original))
    got.updates[1].incarnation = 99
    del got.updates[0]
    assert [u.incarnation for u in decode(encode(got)).updates] == [99, original.updates[2].incarnation]
    # A None set on a decoded message is reported by encode, as for a constructed one.
    got = decode(encode(original))
    got.target_id = None
    with pytest.raises(TypeError, match="target_id must be str"):
        encode(got)


def test_a_decoded_message_outlives_its_input_and_lets_it_go_once_read():
    import gc
    import sys

    m = sample_message(3)
    data = bytes(bytearray(encode(m)))  # a fresh object whose references only this test holds
    before = sys.getrefcount(data)
    got = decode(data)
    assert sys.getrefcount(data) == before + 1  # the message keeps its source alive ...
    del data
    gc.collect()
    assert got.sender_id == m.sender_id and got.updates == m.updates and got == m
    # ... and drops it once every lazy field has been made.
    data = bytes(bytearray(encode(m)))
    got = decode(data)
    _ = (got.sender_id, got.target_id, got.sender_address, got.target_address, got.updates)
    assert sys.getrefcount(data) == before
    # A message with nothing left to make never holds it at all.
    data = bytes(bytearray(encode(Message(type=codec.ACK, sequence_num=7))))
    decode(data)
    assert sys.getrefcount(data) == before


def test_many_decoded_messages_alive_at_once_keep_their_own_updates():
    # Decoded messages share a spare record array between them; none may see another's updates.
    messages = [sample_message(n) for n in (1, 30, 0, 8, 70, 2)]
    for m in messages:
        m.updates = [Update(member_id=f"m{len(messages)}-{i}", incarnation=i) for i in range(len(m.updates))]
    decoded = [decode(encode(m)) for m in messages * 3]
    for got, m in reversed(list(zip(decoded, messages * 3, strict=True))):
        assert got.updates == m.updates
    for _ in range(3):
        for m in messages:
            assert decode(encode(m)).updates == m.updates


def test_decoded_messages_copy_compare_pickle_and_repr_like_built_ones():
    import pickle

    m = sample_message(3)
    assert repr(decode(encode(m))) == repr(m)
    assert pickle.loads(pickle.dumps(decode(encode(m)))) == m
    got = decode(encode(m))
    clone = got.copy()
    assert clone == m
    clone.updates[0].member_id = "changed"
    clone.sender_id = "changed"
    assert got == m
    assert decode(encode(m)) == decode(encode(m))


def test_encoding_larger_than_the_stack_buffer_and_long_updates():
    # Bodies of 128 bytes and more need a longer length prefix; megabytes of text spill the buffer to the heap.
    m = Message(type=codec.SYNC, sender_id="s" * 3000, target_address="t" * 200, updates=[
        Update(member_id=f"member-{i}" * (i % 40), address="a" * (i * 37 % 300), reporter_id="é" * (i % 90))
        for i in range(400)
    ])
    data = encode(m)
    assert len(data) > 100_000
    assert data == to_pb(m).SerializeToString()
    assert decode(data) == m
    limited, n = encode_limited(m, m.updates, 50_000)
    assert 0 < n < len(m.updates) and len(limited) <= 50_000
    assert limited == to_pb(Message(type=m.type, sender_id=m.sender_id, target_address=m.target_address,
                                    updates=m.updates[:n])).SerializeToString()


# ------------------------------------------------------------------------------------------------------------------
# The opaque bytes fields: MembershipUpdate.app_meta (13) and GossipMessage.payload (9)


def test_app_meta_and_payload_are_byte_identical_to_protobuf_and_any_bytes():
    blob = bytes(range(256)) * 2  # not UTF-8, and a two-byte length prefix
    m = Message(type=codec.USER, sender_id="gw-1", target_id="gw-2", sequence_num=7, sender_address="h:1",
                timestamp_ms=5, payload=blob,
                updates=[Update(member_id="agent-1", address="h:2", role=codec.ROLE_UPSTREAM, app_meta=blob[:200])])
    data = encode(m)
    assert data == to_pb(m).SerializeToString()
    pb = pb_parse(data)
    assert pb.type == gossip_pb2.USER and pb.payload == blob and pb.updates[0].app_meta == blob[:200]
    assert pb.updates[0].role == gossip_pb2.UPSTREAM
    got = decode(data)
    assert got == m and type(got.payload) is bytes and got.updates[0].app_meta == blob[:200]
    # Field 13 is the last of an update and field 9 the last of a message, as protobuf orders them.
    assert data.endswith(b"\x4a\x80\x04" + blob)
    assert encode(Message(updates=[Update(app_meta=b"x")])) == b"\x2a\x03\x6a\x01x"
    assert Update(app_meta=b"x" * 200).encoded_size() == len(encode(Message(updates=[Update(app_meta=b"x" * 200)])))
    assert "payload=b'ab'" in repr(Message(payload=b"ab")) and "app_meta=b'c'" in repr(Update(app_meta=b"c"))
    clone = m.copy()
    assert clone == m and clone.payload == blob
    assert Message(payload=b"a") != Message(payload=b"b") and Update(app_meta=b"a") != Update(app_meta=b"b")


def test_opaque_bytes_fields_refuse_other_types():
    with pytest.raises(TypeError):
        Update(app_meta="text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Message(payload=None)  # type: ignore[arg-type]
    m = Message()
    m.payload = None  # type: ignore[assignment]
    with pytest.raises(TypeError, match="payload must be bytes"):
        encode(m)
    u = Update()
    u.app_meta = None  # type: ignore[assignment]
    with pytest.raises(TypeError, match="app_meta must be bytes"):
        encode(Message(updates=[u]))


def test_payload_counts_against_the_limit_of_encode_limited():
    updates = [Update(member_id=f"m{i}", address="10.0.0.1:7946") for i in range(30)]
    _, n_plain = encode_limited(Message(type=codec.ACK, sender_id="s"), updates, 400)
    with_payload, n_with = encode_limited(Message(type=codec.ACK, sender_id="s", payload=b"p" * 200), updates, 400)
    assert len(with_payload) <= 400 and n_with < n_plain
    assert decode(with_payload).payload == b"p" * 200
    with pytest.raises(CodecError, match="header alone"):
        encode_limited(Message(type=codec.USER, payload=b"p" * 500), [], 400)


def test_a_mutated_source_buffer_never_changes_decoded_opaque_bytes():
    m = Message(type=codec.USER, payload=b"payload", updates=[Update(member_id="a", app_meta=b"meta")])
    buffer = bytearray(encode(m))
    got = decode(buffer)
    buffer[:] = b"\xff" * len(buffer)
    assert got.payload == b"payload" and got.updates[0].app_meta == b"meta"
