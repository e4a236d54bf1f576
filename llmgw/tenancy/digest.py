"""Wire encoding of one gateway's usage digest: protobuf, proposed as an optional gossip field.

Proposed addition to proto/gossip.proto (field numbers after the existing ones; a reference peer skips field 9):

    message TenantUsage {
      string tenant = 1;
      uint64 requests = 2;          // requests admitted by the sender in its window
      uint64 tokens = 3;            // tokens used by the sender in its window
      uint32 in_flight = 4;         // the sender's running streams, now
      uint64 recent_requests = 5;   // the same two counts over the sender's recent (pacing) window
      uint64 recent_tokens = 6;
      uint64 recent_demand = 7;     // requests that arrived (admitted or refused) in the recent window
    }
    message UsageDigest {
      uint32 window_ms = 1;         // the window the counts cover
      uint32 recent_ms = 2;         // the pacing window
      uint32 cycle_ms = 3;          // how long the sender takes to send every tenant once (receivers' expiry)
      repeated TenantUsage tenants = 4;
    }
    // in GossipMessage:
    UsageDigest usage = 9;          // or `bytes usage = 9`: the same bytes on the wire

`encode_digest` / `decode_digest` produce and read exactly the bytes protobuf would for that message (the tests
check against protobuf itself), so the gossip codec can carry them as an opaque length-delimited field. Zero
values are left out (proto3), so an idle tenant costs its name and ~4 bytes.

Decoding hostile bytes never reads past the buffer, skips unknown fields, and raises `DigestError` (a ValueError)
for anything malformed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "MAX_DIGEST_BYTES",
    "MAX_TENANT_NAME",
    "DigestError",
    "TenantUsage",
    "UsageDigest",
    "decode_digest",
    "encode_digest",
    "encode_header",
    "encode_tenant",
]

# A UDP payload cannot be larger; anything bigger is not a digest.
MAX_DIGEST_BYTES = 65507
MAX_TENANT_NAME = 64

_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5
_U32_MAX = (1 << 32) - 1
_U64_MAX = (1 << 64) - 1


class DigestError(ValueError):
    """Bytes that are not a UsageDigest."""


@dataclass(frozen=True)
class TenantUsage:
    tenant: str
    requests: int = 0
    tokens: int = 0
    in_flight: int = 0
    recent_requests: int = 0
    recent_tokens: int = 0
    recent_demand: int = 0


@dataclass(frozen=True)
class UsageDigest:
    window_ms: int
    recent_ms: int
    cycle_ms: int
    tenants: tuple[TenantUsage, ...] = ()


# --------------------------------------------------------------------------------------------------------------
# Encoding


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _uint_field(field: int, value: int, maximum: int) -> bytes:
    if not 0 <= value <= maximum:
        raise ValueError(f"field {field}: {value} is out of range")
    return b"" if value == 0 else bytes([field << 3 | _WT_VARINT]) + _varint(value)


def encode_tenant(usage: TenantUsage) -> bytes:
    """One `tenants` element, tag and length included: append it to `encode_header(...)` output."""
    name = usage.tenant.encode("utf-8")
    if not 0 < len(name) <= MAX_TENANT_NAME:
        raise ValueError(f"tenant names are 1-{MAX_TENANT_NAME} bytes")
    body = (bytes([1 << 3 | _WT_LEN]) + _varint(len(name)) + name
            + _uint_field(2, usage.requests, _U64_MAX) + _uint_field(3, usage.tokens, _U64_MAX)
            + _uint_field(4, usage.in_flight, _U32_MAX) + _uint_field(5, usage.recent_requests, _U64_MAX)
            + _uint_field(6, usage.recent_tokens, _U64_MAX) + _uint_field(7, usage.recent_demand, _U64_MAX))
    return bytes([4 << 3 | _WT_LEN]) + _varint(len(body)) + body


def encode_header(window_ms: int, recent_ms: int, cycle_ms: int) -> bytes:
    return (_uint_field(1, window_ms, _U32_MAX) + _uint_field(2, recent_ms, _U32_MAX)
            + _uint_field(3, cycle_ms, _U32_MAX))


def encode_digest(digest: UsageDigest) -> bytes:
    return encode_header(digest.window_ms, digest.recent_ms, digest.cycle_ms) + b"".join(
        encode_tenant(t) for t in digest.tenants)


# --------------------------------------------------------------------------------------------------------------
# Decoding


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise DigestError(f"truncated varint at offset {pos}")
        byte = data[pos]
        pos += 1
        if shift == 63 and byte > 1:
            raise DigestError(f"varint longer than 64 bits ending at offset {pos}")
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DigestError(f"varint longer than 10 bytes at offset {pos}")


def _fields(data: bytes, pos: int, end: int) -> Iterable[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end of a length-delimited value) for each field."""
    while pos < end:
        key, pos = _read_varint(data, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise DigestError(f"field number 0 before offset {pos}")
        if wire == _WT_VARINT:
            value, pos = _read_varint(data, pos, end)
            yield field, wire, value, pos
        elif wire == _WT_LEN:
            length, pos = _read_varint(data, pos, end)
            if length > end - pos:
                raise DigestError(f"length {length} at offset {pos} runs past the end")
            yield field, wire, pos, pos + length
            pos += length
        elif wire in (_WT_I64, _WT_I32):
            size = 8 if wire == _WT_I64 else 4
            if size > end - pos:
                raise DigestError(f"truncated fixed-size field at offset {pos}")
            pos += size
        else:
            raise DigestError(f"unsupported wire type {wire} before offset {pos}")


def _decode_tenant(data: bytes, start: int, end: int) -> TenantUsage:
    name = ""
    counts = [0] * 8
    limits = (0, 0, _U64_MAX, _U64_MAX, _U32_MAX, _U64_MAX, _U64_MAX, _U64_MAX)
    for field, wire, value, value_end in _fields(data, start, end):
        if field == 1 and wire == _WT_LEN:
            if value_end - value > MAX_TENANT_NAME:
                raise DigestError(f"tenant name longer than {MAX_TENANT_NAME} bytes at offset {value}")
            try:
                name = data[value:value_end].decode("utf-8")
            except UnicodeDecodeError:
                raise DigestError(f"tenant name at offset {value} is not UTF-8") from None
        elif 2 <= field <= 7 and wire == _WT_VARINT:
            if value > limits[field]:
                raise DigestError(f"field {field} out of range: {value}")
            counts[field] = value
    if not name:
        raise DigestError(f"tenant entry without a name at offset {start}")
    return TenantUsage(name, counts[2], counts[3], counts[4], counts[5], counts[6], counts[7])


def decode_digest(data: bytes) -> UsageDigest:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DigestError("a digest is bytes")
    data = bytes(data)
    if len(data) > MAX_DIGEST_BYTES:
        raise DigestError(f"{len(data)} bytes: larger than any datagram")
    header = [0, 0, 0, 0]
    tenants: list[TenantUsage] = []
    for field, wire, value, value_end in _fields(data, 0, len(data)):
        if 1 <= field <= 3 and wire == _WT_VARINT:
            if value > _U32_MAX:
                raise DigestError(f"field {field} out of range: {value}")
            header[field] = value
        elif field == 4 and wire == _WT_LEN:
            tenants.append(_decode_tenant(data, value, value_end))
    return UsageDigest(header[1], header[2], header[3], tuple(tenants))
