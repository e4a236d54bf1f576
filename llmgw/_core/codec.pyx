# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Gossip wire codec: hand-written protobuf encoding of proto/gossip.proto (GossipMessage, MembershipUpdate).

Byte-identical to the generated protobuf classes (and so to the reference C++ system) and faster than them,
because it knows the schema: sizes are computed first, then every field is written straight into the final bytes
object with no intermediate message objects; decoding builds the Python objects in one pass and reuses the str
objects of recently seen member ids and addresses. benchmarks/bench_codec.py has the figures.

Decoding follows proto3 rules: unknown fields of every supported wire type are skipped (also inside a
MembershipUpdate), the last occurrence of a non-repeated field wins, a known field seen with the wrong wire type
is treated as unknown, unknown enum values are kept as plain ints, and strings must be valid UTF-8. Anything
malformed raises CodecError, a ValueError; decoding never reads past the buffer and never allocates in
proportion to a length it has not checked against the buffer.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.exc cimport PyErr_Clear
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from libc.math cimport HUGE_VALF
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy


cdef extern from "Python.h":
    # Declared here without Cython's automatic error check so that a UnicodeError can be turned into CodecError
    # (or a clearer encode error) without the cost of a try block on every string.
    const char* _utf8_and_size "PyUnicode_AsUTF8AndSize"(object s, Py_ssize_t* size)
    PyObject* _decode_utf8 "PyUnicode_DecodeUTF8"(const char* s, Py_ssize_t size, const char* errors)
    bint PyUnicode_IS_ASCII(PyObject* s)
    bint PyUnicode_IS_COMPACT_ASCII(PyObject* s)
    void* PyUnicode_DATA(PyObject* s)
    Py_ssize_t PyUnicode_GET_LENGTH(PyObject* s)
    void Py_INCREF(PyObject* o)
    void Py_XDECREF(PyObject* o)


class CodecError(ValueError):
    """A datagram (or a message to encode) that does not follow proto/gossip.proto."""


# Python-visible copies of the C enums declared in codec.pxd (Cython cannot bind a Python global to the same
# name as a C constant with plain assignment).
globals().update(
    PING=PING, PING_REQ=PING_REQ, ACK=ACK, NACK=NACK, SYNC=SYNC, SYNC_ACK=SYNC_ACK,
    ALIVE=ALIVE, SUSPECT=SUSPECT, DEAD=DEAD, LEFT=LEFT,
    ROLE_UNSPECIFIED=ROLE_UNSPECIFIED, ROLE_REPLICA=ROLE_REPLICA, ROLE_GATEWAY=ROLE_GATEWAY,
    MAX_DATAGRAM=MAX_DATAGRAM, MAX_UPDATES=MAX_UPDATES,
)

_MESSAGE_TYPE_NAMES = {PING: "PING", PING_REQ: "PING_REQ", ACK: "ACK", NACK: "NACK", SYNC: "SYNC",
                       SYNC_ACK: "SYNC_ACK"}
_STATE_NAMES = {ALIVE: "ALIVE", SUSPECT: "SUSPECT", DEAD: "DEAD", LEFT: "LEFT"}
_ROLE_NAMES = {ROLE_UNSPECIFIED: "ROLE_UNSPECIFIED", ROLE_REPLICA: "ROLE_REPLICA", ROLE_GATEWAY: "ROLE_GATEWAY"}

# Wire types (protobuf encoding spec).
cdef enum:
    WT_VARINT = 0
    WT_I64 = 1
    WT_LEN = 2
    WT_I32 = 5

# Single-byte tags, (field_number << 3) | wire_type, of every known field. All field numbers are < 16.
cdef enum:
    # GossipMessage
    TAG_TYPE = (1 << 3) | WT_VARINT
    TAG_SENDER_ID = (2 << 3) | WT_LEN
    TAG_TARGET_ID = (3 << 3) | WT_LEN
    TAG_SEQUENCE_NUM = (4 << 3) | WT_VARINT
    TAG_UPDATES = (5 << 3) | WT_LEN
    TAG_SENDER_ADDRESS = (6 << 3) | WT_LEN
    TAG_TARGET_ADDRESS = (7 << 3) | WT_LEN
    TAG_TIMESTAMP_MS = (8 << 3) | WT_VARINT
    # MembershipUpdate
    TAG_MEMBER_ID = (1 << 3) | WT_LEN
    TAG_ADDRESS = (2 << 3) | WT_LEN
    TAG_STATE = (3 << 3) | WT_VARINT
    TAG_INCARNATION = (4 << 3) | WT_VARINT
    TAG_MODEL_VERSION = (5 << 3) | WT_LEN
    TAG_ACTIVE_REQUESTS = (6 << 3) | WT_VARINT
    TAG_MAX_CAPACITY = (7 << 3) | WT_VARINT
    TAG_GRPC_ADDRESS = (8 << 3) | WT_LEN
    TAG_ROLE = (9 << 3) | WT_VARINT
    TAG_WEIGHT = (10 << 3) | WT_I32
    TAG_DRAINING = (11 << 3) | WT_VARINT
    TAG_REPORTER_ID = (12 << 3) | WT_LEN

# Smallest double that rounds to float32 infinity (FLT_MAX plus half an ulp; the tie goes to the even infinity).
cdef double FLOAT32_OVERFLOW = 3.4028235677973366e38


# ---------------------------------------------------------------------------------------------------------------
# Encoding primitives

cdef inline Py_ssize_t _varint_size(uint64_t v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline uint64_t _int32_wire(int v) noexcept nogil:
    # protobuf sign-extends negative int32/enum values to 64 bits, which makes them 10-byte varints.
    return <uint64_t><int64_t>v


cdef inline uint32_t _float32_bits(double x) noexcept nogil:
    cdef float f
    cdef uint32_t bits
    # An out-of-range double-to-float conversion is undefined behaviour in C; saturate to infinity explicitly.
    if x >= FLOAT32_OVERFLOW:
        f = HUGE_VALF
    elif x <= -FLOAT32_OVERFLOW:
        f = -HUGE_VALF
    else:
        f = <float>x
    memcpy(&bits, &f, 4)
    return bits


cdef const char* _utf8_slow(str s, Py_ssize_t* size, str field) except NULL:
    cdef const char* data
    if s is None:
        raise TypeError(f"{field} must be str, not None")
    data = _utf8_and_size(s, size)
    if data == NULL:
        PyErr_Clear()
        raise CodecError(f"{field} cannot be encoded as UTF-8 (lone surrogate?): {s!r}")
    return data


cdef inline const char* _utf8(str s, Py_ssize_t* size, str field) except NULL:
    # Almost every gossip string is ASCII, whose characters are its UTF-8 bytes: read them in place.
    if s is not None and PyUnicode_IS_COMPACT_ASCII(<PyObject*>s):
        size[0] = PyUnicode_GET_LENGTH(<PyObject*>s)
        return <const char*>PyUnicode_DATA(<PyObject*>s)
    return _utf8_slow(s, size, field)


cdef inline Py_ssize_t _str_field_size(str s, str field) except -1:
    cdef Py_ssize_t n
    _utf8(s, &n, field)
    if n == 0:
        return 0
    return 1 + _varint_size(<uint64_t>n) + n


cdef inline Py_ssize_t _varint_field_size(uint64_t v) noexcept nogil:
    if v == 0:
        return 0
    return 1 + _varint_size(v)


cdef struct Writer:
    unsigned char* p
    unsigned char* end


cdef int _overflow() except -1:
    # Sizes are computed just before writing, so this means a field changed between the two passes (only
    # possible from a finalizer run by the garbage collector); refuse rather than write out of bounds.
    raise RuntimeError("gossip message changed while it was being encoded")


cdef inline unsigned char* _put_varint(unsigned char* p, uint64_t v) noexcept nogil:
    while v >= 0x80:
        p[0] = <unsigned char>(v | 0x80)
        v >>= 7
        p += 1
    p[0] = <unsigned char>v
    return p + 1


cdef inline int _write_varint_field(Writer* w, unsigned char tag, uint64_t v) except -1:
    if v == 0:
        return 0
    if w.end - w.p < 1 + _varint_size(v):
        _overflow()
    w.p[0] = tag
    w.p = _put_varint(w.p + 1, v)
    return 0


cdef inline int _write_str_field(Writer* w, unsigned char tag, str s, str field) except -1:
    cdef Py_ssize_t n
    cdef const char* data = _utf8(s, &n, field)
    if n == 0:
        return 0
    if w.end - w.p < 1 + _varint_size(<uint64_t>n) + n:
        _overflow()
    w.p[0] = tag
    w.p = _put_varint(w.p + 1, <uint64_t>n)
    memcpy(w.p, data, n)
    w.p += n
    return 0


cdef inline int _write_fixed32_field(Writer* w, unsigned char tag, uint32_t bits) except -1:
    if bits == 0:
        return 0
    if w.end - w.p < 5:
        _overflow()
    w.p[0] = tag
    w.p[1] = <unsigned char>(bits & 0xFF)
    w.p[2] = <unsigned char>((bits >> 8) & 0xFF)
    w.p[3] = <unsigned char>((bits >> 16) & 0xFF)
    w.p[4] = <unsigned char>(bits >> 24)
    w.p += 5
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Decoding primitives

cdef struct Reader:
    const unsigned char* base   # start of the whole datagram, for offsets in error messages
    const unsigned char* p
    const unsigned char* end


cdef int _read_varint_slow(Reader* r, uint64_t* out) except -1:
    cdef const unsigned char* p = r.p
    cdef uint64_t result = 0
    cdef unsigned int shift = 0
    cdef unsigned char b
    cdef int i
    if r.end - p >= 10:
        # Enough bytes left for the longest varint: no bounds check per byte.
        for i in range(10):
            b = p[i]
            # Bits past 64 in a tenth byte are dropped, as protobuf does.
            result |= (<uint64_t>(b & 0x7F)) << shift
            if b < 0x80:
                r.p = p + i + 1
                out[0] = result
                return 0
            shift += 7
        raise CodecError(f"varint longer than 10 bytes at offset {r.p - r.base}")
    for i in range(r.end - p):
        b = p[i]
        result |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            r.p = p + i + 1
            out[0] = result
            return 0
        shift += 7
    raise CodecError(f"truncated varint at offset {r.p - r.base}")


cdef inline int _read_varint(Reader* r, uint64_t* out) except -1:
    if r.p < r.end and r.p[0] < 0x80:
        out[0] = r.p[0]
        r.p += 1
        return 0
    return _read_varint_slow(r, out)


cdef int _read_length_slow(Reader* r, Py_ssize_t* out) except -1:
    cdef uint64_t length
    cdef const unsigned char* start = r.p
    _read_varint(r, &length)
    # protobuf reads lengths as 32-bit varints and rejects longer (overlong) encodings; so do we.
    if r.p - start > 5:
        raise CodecError(f"length varint longer than 5 bytes at offset {start - r.base}")
    # Compared as unsigned so that a huge claimed length cannot wrap around.
    if length > <uint64_t>(r.end - r.p):
        raise CodecError(f"length {length} at offset {r.p - r.base} runs past the end of the datagram "
                         f"({r.end - r.p} bytes left)")
    out[0] = <Py_ssize_t>length
    return 0


cdef inline int _read_length(Reader* r, Py_ssize_t* out) except -1:
    # Gossip strings and updates are almost always shorter than 128 bytes: a one-byte length.
    cdef Py_ssize_t length
    if r.p < r.end and r.p[0] < 0x80:
        length = r.p[0]
        if length < r.end - r.p:
            r.p += 1
            out[0] = length
            return 0
    return _read_length_slow(r, out)


cdef inline int _read_tag(Reader* r, uint32_t* out) except -1:
    cdef uint64_t tag
    cdef Py_ssize_t offset = r.p - r.base
    _read_varint(r, &tag)
    # Tags are 32-bit varints in protobuf: at most 5 bytes, even when an overlong encoding has a small value.
    if r.p - r.base - offset > 5:
        raise CodecError(f"tag varint longer than 5 bytes at offset {offset}")
    if (tag >> 32) != 0:
        raise CodecError(f"tag {tag} at offset {offset} is out of range")
    if (tag >> 3) == 0:
        raise CodecError(f"field number 0 at offset {offset}")
    out[0] = <uint32_t>tag
    return 0


# Gossip repeats the same few hundred strings (member ids, addresses, versions) in every datagram. A small cache
# of the ASCII ones turns most string decodes into a hash and a byte comparison, and hands the caller the same str
# object each time, whose hash is already computed for the dict lookups that follow.
cdef enum:
    STRING_CACHE_SLOTS = 1024       # a power of two
    STRING_CACHE_MAX_LENGTH = 64    # longer strings are rare and would make hashing cost more than it saves

# Owned references (or NULL); only exact, ASCII str objects made by this module are stored.
cdef PyObject* _string_cache[STRING_CACHE_SLOTS]


cdef inline uint64_t _load_u64(const unsigned char* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


cdef inline size_t _string_slot(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    # Hashes the first, middle and last 8 bytes (all bytes when shorter): a collision only costs a miss, because
    # a hit is confirmed by comparing every byte.
    cdef uint64_t h = <uint64_t>n * 0x9E3779B97F4A7C15ULL
    cdef Py_ssize_t i
    if n >= 8:
        h ^= _load_u64(p)
        h *= 0xFF51AFD7ED558CCDULL
        h ^= _load_u64(p + (n >> 1) - 4) if n >= 16 else 0
        h *= 0xC4CEB9FE1A85EC53ULL
        h ^= _load_u64(p + n - 8)
    else:
        for i in range(n):
            h = (h ^ p[i]) * 0x100000001B3ULL
    h *= 0xFF51AFD7ED558CCDULL
    h ^= h >> 29
    return <size_t>(h >> 20) & (STRING_CACHE_SLOTS - 1)


cdef inline bint _same_bytes(const unsigned char* a, const unsigned char* b, Py_ssize_t n) noexcept nogil:
    # Short keys compare in two overlapping 8-byte loads instead of a call to memcmp.
    if n >= 8:
        if _load_u64(a) != _load_u64(b) or _load_u64(a + n - 8) != _load_u64(b + n - 8):
            return False
        return n <= 16 or memcmp(a + 8, b + 8, n - 16) == 0
    return memcmp(a, b, n) == 0


cdef str _decode_new_string(Reader* r, Py_ssize_t n, size_t slot, str field):
    """Cache miss: decode r.p[:n] (validating UTF-8) and remember it if it is a short ASCII string."""
    cdef PyObject* raw = _decode_utf8(<const char*>r.p, n, NULL)
    if raw == NULL:
        PyErr_Clear()
        raise CodecError(f"{field} at offset {r.p - r.base} is not valid UTF-8")
    r.p += n
    if n <= STRING_CACHE_MAX_LENGTH and PyUnicode_IS_ASCII(raw):
        # The newest string takes the first way; the one it displaces moves to the second (least recently added).
        Py_XDECREF(_string_cache[slot + 1])
        _string_cache[slot + 1] = _string_cache[slot]
        Py_INCREF(raw)
        _string_cache[slot] = raw
    # raw is a new reference and the cast takes another; hand one back (after the cast, so it stays alive).
    s = <str>raw
    Py_XDECREF(raw)
    return s


cdef inline str _read_string(Reader* r, str field):
    cdef Py_ssize_t n
    cdef PyObject* cached
    cdef size_t slot = 0
    _read_length(r, &n)
    if n == 0:
        return ""
    if n <= STRING_CACHE_MAX_LENGTH:
        # Two-way set associative: a pair of hot strings that hash alike must not evict each other forever.
        slot = _string_slot(r.p, n) & ~(<size_t>1)
        cached = _string_cache[slot]
        if cached != NULL and PyUnicode_GET_LENGTH(cached) == n and _same_bytes(
                <const unsigned char*>PyUnicode_DATA(cached), r.p, n):
            r.p += n
            return <str>cached
        cached = _string_cache[slot + 1]
        if cached != NULL and PyUnicode_GET_LENGTH(cached) == n and _same_bytes(
                <const unsigned char*>PyUnicode_DATA(cached), r.p, n):
            r.p += n
            return <str>cached
    return _decode_new_string(r, n, slot, field)


cdef int _skip_field(Reader* r, uint32_t tag) except -1:
    cdef uint64_t ignored
    cdef Py_ssize_t n
    cdef uint32_t wire_type = tag & 7
    if wire_type == WT_VARINT:
        _read_varint(r, &ignored)
    elif wire_type == WT_I64:
        if r.end - r.p < 8:
            raise CodecError(f"truncated fixed64 field at offset {r.p - r.base}")
        r.p += 8
    elif wire_type == WT_LEN:
        _read_length(r, &n)
        r.p += n
    elif wire_type == WT_I32:
        if r.end - r.p < 4:
            raise CodecError(f"truncated fixed32 field at offset {r.p - r.base}")
        r.p += 4
    else:
        # 3 and 4 are the deprecated groups (never produced for this schema), 6 and 7 do not exist.
        raise CodecError(f"unsupported wire type {wire_type} (field {tag >> 3}) at offset {r.p - r.base}")
    return 0


cdef inline int32_t _as_int32(uint64_t v) noexcept nogil:
    # protobuf keeps the low 32 bits of an int32/enum varint.
    return <int32_t><uint32_t>v


# ---------------------------------------------------------------------------------------------------------------
# Messages

cdef inline str _enum_repr(int value, dict names):
    name = names.get(value)
    return name if name is not None else str(value)


@cython.freelist(256)
cdef class Update:
    """A MembershipUpdate: one member's state as rumoured by gossip.

    Fields mirror proto/gossip.proto. ``state`` and ``role`` keep unknown enum values as plain ints (protobuf
    open enums). ``weight`` travels as a float32, so only float32-representable values survive a round trip.
    """

    def __cinit__(self):
        # Objects made by Update.__new__ (decoding, unpickling) skip __init__; never leave a str field None.
        self.member_id = ""
        self.address = ""
        self.model_version = ""
        self.grpc_address = ""
        self.reporter_id = ""

    def __init__(self, str member_id not None="", str address not None="", int state=0,
                 unsigned long long incarnation=0, str model_version not None="", int active_requests=0,
                 int max_capacity=0, str grpc_address not None="", int role=0, double weight=0.0,
                 bint draining=False, str reporter_id not None=""):
        self.member_id = member_id
        self.address = address
        self.state = state
        self.incarnation = incarnation
        self.model_version = model_version
        self.active_requests = active_requests
        self.max_capacity = max_capacity
        self.grpc_address = grpc_address
        self.role = role
        self.weight = weight
        self.draining = draining
        self.reporter_id = reporter_id

    cdef Py_ssize_t _compute_body_size(self) except -1:
        cdef Py_ssize_t size = 0
        size += _str_field_size(self.member_id, "member_id")
        size += _str_field_size(self.address, "address")
        size += _varint_field_size(_int32_wire(self.state))
        size += _varint_field_size(self.incarnation)
        size += _str_field_size(self.model_version, "model_version")
        size += _varint_field_size(_int32_wire(self.active_requests))
        size += _varint_field_size(_int32_wire(self.max_capacity))
        size += _str_field_size(self.grpc_address, "grpc_address")
        size += _varint_field_size(_int32_wire(self.role))
        if _float32_bits(self.weight) != 0:
            size += 5
        if self.draining:
            size += 2
        size += _str_field_size(self.reporter_id, "reporter_id")
        self._body_size = size
        return size

    cpdef Py_ssize_t encoded_size(self) except -1:
        """Bytes this update adds to a GossipMessage: tag, length prefix and body."""
        return _update_field_size(self)

    cpdef Update copy(self):
        cdef Update other = Update.__new__(Update)
        other.member_id = self.member_id
        other.address = self.address
        other.state = self.state
        other.incarnation = self.incarnation
        other.model_version = self.model_version
        other.active_requests = self.active_requests
        other.max_capacity = self.max_capacity
        other.grpc_address = self.grpc_address
        other.role = self.role
        other.weight = self.weight
        other.draining = self.draining
        other.reporter_id = self.reporter_id
        return other

    def __eq__(self, other):
        if not isinstance(other, Update):
            return NotImplemented
        cdef Update o = <Update>other
        return (
            self.member_id == o.member_id
            and self.address == o.address
            and self.state == o.state
            and self.incarnation == o.incarnation
            and self.model_version == o.model_version
            and self.active_requests == o.active_requests
            and self.max_capacity == o.max_capacity
            and self.grpc_address == o.grpc_address
            and self.role == o.role
            # NaN equals NaN here so that decode(encode(u)) == u holds for every encodable update.
            and (self.weight == o.weight or (self.weight != self.weight and o.weight != o.weight))
            and self.draining == o.draining
            and self.reporter_id == o.reporter_id
        )

    # Mutable: equal updates may not stay equal, so they must not be dict keys.
    __hash__ = None

    def __reduce__(self):
        # Cython cannot derive pickling for a class with __cinit__; copy.deepcopy and multiprocessing need it.
        return (Update, (self.member_id, self.address, self.state, self.incarnation, self.model_version,
                         self.active_requests, self.max_capacity, self.grpc_address, self.role, self.weight,
                         self.draining, self.reporter_id))

    def __repr__(self):
        parts = []
        if self.member_id:
            parts.append(f"member_id={self.member_id!r}")
        if self.address:
            parts.append(f"address={self.address!r}")
        if self.state:
            parts.append(f"state={_enum_repr(self.state, _STATE_NAMES)}")
        if self.incarnation:
            parts.append(f"incarnation={self.incarnation}")
        if self.model_version:
            parts.append(f"model_version={self.model_version!r}")
        if self.active_requests:
            parts.append(f"active_requests={self.active_requests}")
        if self.max_capacity:
            parts.append(f"max_capacity={self.max_capacity}")
        if self.grpc_address:
            parts.append(f"grpc_address={self.grpc_address!r}")
        if self.role:
            parts.append(f"role={_enum_repr(self.role, _ROLE_NAMES)}")
        if self.weight:
            parts.append(f"weight={self.weight!r}")
        if self.draining:
            parts.append("draining=True")
        if self.reporter_id:
            parts.append(f"reporter_id={self.reporter_id!r}")
        return f"Update({', '.join(parts)})"


@cython.freelist(16)
cdef class Message:
    """A GossipMessage: one UDP datagram. ``updates`` is a list of Update."""

    def __cinit__(self):
        self.sender_id = ""
        self.target_id = ""
        self.sender_address = ""
        self.target_address = ""
        self.updates = []

    def __init__(self, int type=0, str sender_id not None="", str target_id not None="",
                 unsigned long long sequence_num=0, updates=None, str sender_address not None="",
                 str target_address not None="", unsigned long long timestamp_ms=0):
        self.type = type
        self.sender_id = sender_id
        self.target_id = target_id
        self.sequence_num = sequence_num
        if updates is not None:
            self.updates = list(updates)
            for i, u in enumerate(self.updates):
                if not isinstance(u, Update):
                    raise TypeError(f"updates[{i}] is {u.__class__.__name__}, expected Update")
        self.sender_address = sender_address
        self.target_address = target_address
        self.timestamp_ms = timestamp_ms

    cdef Py_ssize_t _header_size(self) except -1:
        cdef Py_ssize_t size = 0
        size += _varint_field_size(_int32_wire(self.type))
        size += _str_field_size(self.sender_id, "sender_id")
        size += _str_field_size(self.target_id, "target_id")
        size += _varint_field_size(self.sequence_num)
        size += _str_field_size(self.sender_address, "sender_address")
        size += _str_field_size(self.target_address, "target_address")
        size += _varint_field_size(self.timestamp_ms)
        return size

    cpdef Message copy(self):
        """A copy whose updates list and Update objects are new (changing it never changes self)."""
        cdef Message other = Message.__new__(Message)
        other.type = self.type
        other.sender_id = self.sender_id
        other.target_id = self.target_id
        other.sequence_num = self.sequence_num
        other.sender_address = self.sender_address
        other.target_address = self.target_address
        other.timestamp_ms = self.timestamp_ms
        if self.updates is not None:
            other.updates = [(<Update?>u).copy() for u in self.updates]
        return other

    def __eq__(self, other):
        if not isinstance(other, Message):
            return NotImplemented
        cdef Message o = <Message>other
        return (
            self.type == o.type
            and self.sender_id == o.sender_id
            and self.target_id == o.target_id
            and self.sequence_num == o.sequence_num
            and self.sender_address == o.sender_address
            and self.target_address == o.target_address
            and self.timestamp_ms == o.timestamp_ms
            and (self.updates or []) == (o.updates or [])
        )

    __hash__ = None

    def __reduce__(self):
        return (Message, (self.type, self.sender_id, self.target_id, self.sequence_num, self.updates,
                          self.sender_address, self.target_address, self.timestamp_ms))

    def __repr__(self):
        parts = [f"type={_enum_repr(self.type, _MESSAGE_TYPE_NAMES)}"]
        if self.sender_id:
            parts.append(f"sender_id={self.sender_id!r}")
        if self.target_id:
            parts.append(f"target_id={self.target_id!r}")
        if self.sequence_num:
            parts.append(f"sequence_num={self.sequence_num}")
        if self.updates:
            parts.append(f"updates={self.updates!r}")
        if self.sender_address:
            parts.append(f"sender_address={self.sender_address!r}")
        if self.target_address:
            parts.append(f"target_address={self.target_address!r}")
        if self.timestamp_ms:
            parts.append(f"timestamp_ms={self.timestamp_ms}")
        return f"Message({', '.join(parts)})"


# ---------------------------------------------------------------------------------------------------------------
# Encoding

cdef Update _not_an_update(object item, Py_ssize_t i):
    raise TypeError(f"updates[{i}] is {type(item).__name__}, expected Update")


cdef inline Update _update_at(list updates, Py_ssize_t i):
    cdef PyObject* item = PyList_GET_ITEM(updates, i)
    if type(<object>item) is Update or isinstance(<object>item, Update):
        return <Update>item
    return _not_an_update(<object>item, i)


cdef inline Py_ssize_t _update_field_size(Update u) except -1:
    cdef Py_ssize_t body = u._compute_body_size()
    return 1 + _varint_size(<uint64_t>body) + body


cdef int _write_update(Writer* w, Update u) except -1:
    cdef Py_ssize_t body = u._body_size
    cdef unsigned char* body_end
    if w.end - w.p < 1 + _varint_size(<uint64_t>body) + body:
        _overflow()
    w.p[0] = TAG_UPDATES
    w.p = _put_varint(w.p + 1, <uint64_t>body)
    body_end = w.p + body
    # A Writer bounded by this update's body makes a size mismatch fail here instead of corrupting the next one.
    cdef Writer inner
    inner.p = w.p
    inner.end = body_end
    _write_str_field(&inner, TAG_MEMBER_ID, u.member_id, "member_id")
    _write_str_field(&inner, TAG_ADDRESS, u.address, "address")
    _write_varint_field(&inner, TAG_STATE, _int32_wire(u.state))
    _write_varint_field(&inner, TAG_INCARNATION, u.incarnation)
    _write_str_field(&inner, TAG_MODEL_VERSION, u.model_version, "model_version")
    _write_varint_field(&inner, TAG_ACTIVE_REQUESTS, _int32_wire(u.active_requests))
    _write_varint_field(&inner, TAG_MAX_CAPACITY, _int32_wire(u.max_capacity))
    _write_str_field(&inner, TAG_GRPC_ADDRESS, u.grpc_address, "grpc_address")
    _write_varint_field(&inner, TAG_ROLE, _int32_wire(u.role))
    _write_fixed32_field(&inner, TAG_WEIGHT, _float32_bits(u.weight))
    _write_varint_field(&inner, TAG_DRAINING, 1 if u.draining else 0)
    _write_str_field(&inner, TAG_REPORTER_ID, u.reporter_id, "reporter_id")
    if inner.p != body_end:
        _overflow()
    w.p = body_end
    return 0


cdef bytes _encode(Message msg, list updates, Py_ssize_t n_updates, Py_ssize_t total):
    """Write msg's header fields and updates[:n_updates] (sizes already computed) into a new bytes object."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef Writer w
    cdef Py_ssize_t i
    w.p = <unsigned char*>PyBytes_AS_STRING(out)
    w.end = w.p + total
    # Field-number order, as protobuf writes it, so the bytes are identical to SerializeToString().
    _write_varint_field(&w, TAG_TYPE, _int32_wire(msg.type))
    _write_str_field(&w, TAG_SENDER_ID, msg.sender_id, "sender_id")
    _write_str_field(&w, TAG_TARGET_ID, msg.target_id, "target_id")
    _write_varint_field(&w, TAG_SEQUENCE_NUM, msg.sequence_num)
    if n_updates > 0 and (updates is None or PyList_GET_SIZE(updates) < n_updates):
        _overflow()
    for i in range(n_updates):
        _write_update(&w, _update_at(updates, i))
    _write_str_field(&w, TAG_SENDER_ADDRESS, msg.sender_address, "sender_address")
    _write_str_field(&w, TAG_TARGET_ADDRESS, msg.target_address, "target_address")
    _write_varint_field(&w, TAG_TIMESTAMP_MS, msg.timestamp_ms)
    if w.p != w.end:
        _overflow()
    return out


cpdef bytes encode(Message msg):
    """Serialize msg (header and all of msg.updates) to protobuf wire bytes.

    Raises TypeError for a None string field or a non-Update in msg.updates, CodecError for a string that is not
    encodable as UTF-8.
    """
    if msg is None:
        raise TypeError("encode() needs a Message, not None")
    cdef list updates = msg.updates
    cdef Py_ssize_t total = msg._header_size()
    cdef Py_ssize_t n = 0
    cdef Py_ssize_t i
    if updates is not None:
        n = PyList_GET_SIZE(updates)
        for i in range(n):
            total += _update_field_size(_update_at(updates, i))
    return _encode(msg, updates, n, total)


cpdef tuple encode_limited(Message msg, list updates, Py_ssize_t max_size=MAX_DATAGRAM):
    """Encode msg's header fields plus the longest prefix of ``updates`` that keeps the result <= max_size bytes.

    msg.updates is ignored. Returns (bytes, number of updates included). Raises CodecError if the header alone
    does not fit.
    """
    if msg is None:
        raise TypeError("encode_limited() needs a Message, not None")
    cdef Py_ssize_t total = msg._header_size()
    cdef Py_ssize_t n = 0
    cdef Py_ssize_t size
    cdef Py_ssize_t count
    if total > max_size:
        raise CodecError(f"the message header alone is {total} bytes, over the limit of {max_size}")
    if updates is not None:
        count = PyList_GET_SIZE(updates)
        while n < count:
            size = _update_field_size(_update_at(updates, n))
            if total + size > max_size:
                break
            total += size
            n += 1
    return (_encode(msg, updates, n, total), n)


# ---------------------------------------------------------------------------------------------------------------
# Decoding

cdef Update _decode_update(Reader* r):
    """Decode one MembershipUpdate from r.p up to r.end."""
    cdef Update u = Update.__new__(Update)
    cdef uint32_t tag
    cdef uint64_t v
    cdef uint32_t bits
    cdef float f
    while r.p < r.end:
        if r.p[0] < 0x80:
            tag = r.p[0]
            r.p += 1
            if tag < 8:
                raise CodecError(f"field number 0 at offset {r.p - 1 - r.base}")
        else:
            _read_tag(r, &tag)
        if tag == TAG_MEMBER_ID:
            u.member_id = _read_string(r, "MembershipUpdate.member_id")
        elif tag == TAG_ADDRESS:
            u.address = _read_string(r, "MembershipUpdate.address")
        elif tag == TAG_STATE:
            _read_varint(r, &v)
            u.state = _as_int32(v)
        elif tag == TAG_INCARNATION:
            _read_varint(r, &v)
            u.incarnation = v
        elif tag == TAG_MODEL_VERSION:
            u.model_version = _read_string(r, "MembershipUpdate.model_version")
        elif tag == TAG_ACTIVE_REQUESTS:
            _read_varint(r, &v)
            u.active_requests = _as_int32(v)
        elif tag == TAG_MAX_CAPACITY:
            _read_varint(r, &v)
            u.max_capacity = _as_int32(v)
        elif tag == TAG_GRPC_ADDRESS:
            u.grpc_address = _read_string(r, "MembershipUpdate.grpc_address")
        elif tag == TAG_ROLE:
            _read_varint(r, &v)
            u.role = _as_int32(v)
        elif tag == TAG_WEIGHT:
            if r.end - r.p < 4:
                raise CodecError(f"truncated MembershipUpdate.weight at offset {r.p - r.base}")
            bits = (<uint32_t>r.p[0] | (<uint32_t>r.p[1] << 8) | (<uint32_t>r.p[2] << 16)
                    | (<uint32_t>r.p[3] << 24))
            memcpy(&f, &bits, 4)
            u.weight = <double>f
            r.p += 4
        elif tag == TAG_DRAINING:
            _read_varint(r, &v)
            u.draining = v != 0
        elif tag == TAG_REPORTER_ID:
            u.reporter_id = _read_string(r, "MembershipUpdate.reporter_id")
        else:
            _skip_field(r, tag)
    return u


cdef Message _decode_message(const unsigned char* data, Py_ssize_t size, Py_ssize_t max_updates):
    cdef Reader r
    cdef Reader sub
    cdef Message msg = Message.__new__(Message)
    cdef list updates = msg.updates
    cdef Py_ssize_t n_updates = 0
    cdef Py_ssize_t length
    cdef uint32_t tag
    cdef uint64_t v
    r.base = data
    r.p = data
    r.end = data + size
    while r.p < r.end:
        if r.p[0] < 0x80:
            tag = r.p[0]
            r.p += 1
            if tag < 8:
                raise CodecError(f"field number 0 at offset {r.p - 1 - r.base}")
        else:
            _read_tag(&r, &tag)
        if tag == TAG_UPDATES:
            _read_length(&r, &length)
            if n_updates >= max_updates:
                raise CodecError(f"more than {max_updates} updates in one message")
            sub.base = r.base
            sub.p = r.p
            sub.end = r.p + length
            updates.append(_decode_update(&sub))
            n_updates += 1
            r.p = sub.end
        elif tag == TAG_TYPE:
            _read_varint(&r, &v)
            msg.type = _as_int32(v)
        elif tag == TAG_SENDER_ID:
            msg.sender_id = _read_string(&r, "sender_id")
        elif tag == TAG_TARGET_ID:
            msg.target_id = _read_string(&r, "target_id")
        elif tag == TAG_SEQUENCE_NUM:
            _read_varint(&r, &v)
            msg.sequence_num = v
        elif tag == TAG_SENDER_ADDRESS:
            msg.sender_address = _read_string(&r, "sender_address")
        elif tag == TAG_TARGET_ADDRESS:
            msg.target_address = _read_string(&r, "target_address")
        elif tag == TAG_TIMESTAMP_MS:
            _read_varint(&r, &v)
            msg.timestamp_ms = v
        else:
            _skip_field(&r, tag)
    return msg


cpdef Message decode(data, Py_ssize_t max_updates=MAX_UPDATES):
    """Parse one datagram (bytes, bytearray, memoryview or any buffer) into a Message.

    Raises CodecError for malformed input (including more than max_updates updates) and TypeError for an object
    that is not a buffer.
    """
    cdef Py_buffer view
    cdef Message msg
    if PyBytes_CheckExact(data):
        return _decode_message(<const unsigned char*>PyBytes_AS_STRING(data), len(<bytes>data), max_updates)
    try:
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    except BufferError:
        # A non-contiguous view cannot be exported as one span; copy it once.
        data = bytes(memoryview(data))
        return _decode_message(<const unsigned char*>PyBytes_AS_STRING(data), len(<bytes>data), max_updates)
    try:
        msg = _decode_message(<const unsigned char*>view.buf, view.len, max_updates)
    finally:
        PyBuffer_Release(&view)
    return msg
