# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Gossip wire codec: hand-written protobuf encoding of proto/gossip.proto (GossipMessage, MembershipUpdate).

Byte-identical to the generated protobuf classes (and so to the reference C++ system) and faster than them,
because it knows the schema. Encoding is one pass that writes every field straight into a stack buffer (only
a message far above a datagram's size spills to the heap) and copies it once into the result bytes.

Decoding has the contract of protobuf's upb backend: decode() validates the whole datagram up front (so every
error surfaces there) and records where each string and each update lies, in C arrays owned by the Message; the
Python objects (header strings, the updates list, each Update) are only made when first read, and then cached.
The message keeps a reference to its source bytes (a private copy when the input was a mutable buffer), so
reading a field later can neither fail nor see a change the caller made. Strings are made through a small
cache that hands back the same str object for the member ids and addresses every datagram repeats.
benchmarks/bench_codec.py has the figures.

Decoding follows proto3 rules: unknown fields of every supported wire type are skipped (also inside a
MembershipUpdate), the last occurrence of a non-repeated field wins, a known field seen with the wrong wire type
is treated as unknown, unknown enum values are kept as plain ints, and strings must be valid UTF-8. Anything
malformed raises CodecError, a ValueError; decoding never reads past the buffer and never allocates in
proportion to a length it has not checked against the buffer.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.exc cimport PyErr_Clear
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.math cimport HUGE_VALF
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memmove, memset


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
    PING=PING, PING_REQ=PING_REQ, ACK=ACK, NACK=NACK, SYNC=SYNC, SYNC_ACK=SYNC_ACK, USER=USER,
    ALIVE=ALIVE, SUSPECT=SUSPECT, DEAD=DEAD, LEFT=LEFT,
    ROLE_UNSPECIFIED=ROLE_UNSPECIFIED, ROLE_REPLICA=ROLE_REPLICA, ROLE_GATEWAY=ROLE_GATEWAY,
    ROLE_UPSTREAM=ROLE_UPSTREAM,
    MAX_DATAGRAM=MAX_DATAGRAM, MAX_UPDATES=MAX_UPDATES,
)

_MESSAGE_TYPE_NAMES = {PING: "PING", PING_REQ: "PING_REQ", ACK: "ACK", NACK: "NACK", SYNC: "SYNC",
                       SYNC_ACK: "SYNC_ACK", USER: "USER"}
_STATE_NAMES = {ALIVE: "ALIVE", SUSPECT: "SUSPECT", DEAD: "DEAD", LEFT: "LEFT"}
_ROLE_NAMES = {ROLE_UNSPECIFIED: "ROLE_UNSPECIFIED", ROLE_REPLICA: "ROLE_REPLICA", ROLE_GATEWAY: "ROLE_GATEWAY",
               ROLE_UPSTREAM: "ROLE_UPSTREAM"}

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
    TAG_PAYLOAD = (9 << 3) | WT_LEN
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
    TAG_APP_META = (13 << 3) | WT_LEN

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
    return _utf8_of(<PyObject*>s, size, field)


cdef inline const char* _utf8_of(PyObject* s, Py_ssize_t* size, str field) except NULL:
    # Takes a borrowed pointer so that reading an attribute costs no reference counting; the caller keeps the
    # owner alive. Almost every gossip string is ASCII, whose characters are its UTF-8 bytes: read them in place.
    if s != <PyObject*>None and PyUnicode_IS_COMPACT_ASCII(s):
        size[0] = PyUnicode_GET_LENGTH(s)
        return <const char*>PyUnicode_DATA(s)
    return _utf8_slow(<str>s, size, field)


cdef inline Py_ssize_t _str_field_size(str s, str field) except -1:
    cdef Py_ssize_t n
    _utf8(s, &n, field)
    if n == 0:
        return 0
    return 1 + _varint_size(<uint64_t>n) + n


cdef inline Py_ssize_t _bytes_length(bytes data, str field) except -1:
    if data is None:
        raise TypeError(f"{field} must be bytes, not None")
    return PyBytes_GET_SIZE(data)


cdef inline Py_ssize_t _varint_field_size(uint64_t v) noexcept nogil:
    if v == 0:
        return 0
    return 1 + _varint_size(v)


cdef inline unsigned char* _put_varint(unsigned char* p, uint64_t v) noexcept nogil:
    while v >= 0x80:
        p[0] = <unsigned char>(v | 0x80)
        v >>= 7
        p += 1
    p[0] = <unsigned char>v
    return p + 1


# The _put_* writers do no bounds checks: callers reserve the worst case for a whole update (or header) first.

cdef inline unsigned char* _put_varint_field(unsigned char* p, unsigned char tag, uint64_t v) noexcept nogil:
    if v != 0:
        p[0] = tag
        if v < 0x80:
            p[1] = <unsigned char>v
            return p + 2
        return _put_varint(p + 1, v)
    return p


cdef inline unsigned char* _put_str_field(unsigned char* p, unsigned char tag, const char* s,
                                          Py_ssize_t n) noexcept nogil:
    if n != 0:
        p[0] = tag
        if n < 0x80:
            p[1] = <unsigned char>n
            p += 2
        else:
            p = _put_varint(p + 1, <uint64_t>n)
        _copy_short(p, s, n)
        p += n
    return p


cdef inline void _copy_short(unsigned char* dst, const char* src, Py_ssize_t n) noexcept nogil:
    # Gossip strings are mostly 4..16 bytes: two overlapping loads and stores beat a call to memcpy (and, like it,
    # touch only src[:n] and dst[:n]).
    cdef uint64_t a, b
    cdef uint32_t c, d
    if n >= 8 and n <= 16:
        memcpy(&a, src, 8)
        memcpy(&b, src + n - 8, 8)
        memcpy(dst + n - 8, &b, 8)
        memcpy(dst, &a, 8)
    elif n >= 4 and n < 8:
        memcpy(&c, src, 4)
        memcpy(&d, src + n - 4, 4)
        memcpy(dst + n - 4, &d, 4)
        memcpy(dst, &c, 4)
    else:
        memcpy(dst, src, n)


cdef inline unsigned char* _put_fixed32_field(unsigned char* p, unsigned char tag, uint32_t bits) noexcept nogil:
    if bits != 0:
        p[0] = tag
        p[1] = <unsigned char>(bits & 0xFF)
        p[2] = <unsigned char>((bits >> 8) & 0xFF)
        p[3] = <unsigned char>((bits >> 16) & 0xFF)
        p[4] = <unsigned char>(bits >> 24)
        return p + 5
    return p


cdef enum:
    # A full datagram (MAX_DATAGRAM) fits here, so gossip traffic never touches the heap while encoding.
    STACK_BUFFER_SIZE = 2048
    # Worst-case bytes of an update besides its string contents: its tag and 5-byte length prefix, 6 string/bytes
    # tags with 5-byte length prefixes, 5 varints of up to 10 bytes (4 sign-extended int32s, 1 uint64) with tags,
    # the float32 weight and the bool.
    UPDATE_OVERHEAD_MAX = 6 + 6 * 6 + 5 * 11 + 5 + 2
    # The same for the message's own fields: 3 varints with tags, 4 string tags with length prefixes.
    HEADER_OVERHEAD_MAX = 3 * 11 + 4 * 6


cdef struct Buffer:
    unsigned char* start
    unsigned char* p
    unsigned char* end
    unsigned char* heap     # PyMem storage once the caller's stack array is outgrown, else NULL


cdef int _grow(Buffer* b, Py_ssize_t need) except -1:
    cdef Py_ssize_t used = b.p - b.start
    cdef Py_ssize_t capacity = (b.end - b.start) * 2
    cdef unsigned char* fresh
    while capacity - used < need:
        capacity *= 2
    fresh = <unsigned char*>PyMem_Malloc(capacity)
    if fresh == NULL:
        raise MemoryError()
    memcpy(fresh, b.start, used)
    PyMem_Free(b.heap)
    b.heap = fresh
    b.start = fresh
    b.p = fresh + used
    b.end = fresh + capacity
    return 0


cdef inline int _reserve(Buffer* b, Py_ssize_t need) except -1:
    if b.end - b.p < need:
        return _grow(b, need)
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


cdef str _new_span_str(const unsigned char* p, Py_ssize_t n, size_t slot):
    """Cache miss: make the str for p[:n] (validated by decode) and remember it if it is a short ASCII one."""
    cdef str s = PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    if n <= STRING_CACHE_MAX_LENGTH and PyUnicode_IS_ASCII(<PyObject*>s):
        # The newest string takes the first way; the one it displaces moves to the second (least recently added).
        Py_XDECREF(_string_cache[slot + 1])
        _string_cache[slot + 1] = _string_cache[slot]
        Py_INCREF(<PyObject*>s)
        _string_cache[slot] = <PyObject*>s
    return s


cdef inline str _span_str(const unsigned char* base, Span span):
    cdef const unsigned char* p = base + span.offset
    cdef Py_ssize_t n = span.length
    cdef PyObject* cached
    cdef size_t slot = 0
    if n <= STRING_CACHE_MAX_LENGTH:
        # Two-way set associative: a pair of hot strings that hash alike must not evict each other forever.
        slot = _string_slot(p, n) & ~(<size_t>1)
        cached = _string_cache[slot]
        if cached != NULL and PyUnicode_GET_LENGTH(cached) == n and _same_bytes(
                <const unsigned char*>PyUnicode_DATA(cached), p, n):
            return <str>cached
        cached = _string_cache[slot + 1]
        if cached != NULL and PyUnicode_GET_LENGTH(cached) == n and _same_bytes(
                <const unsigned char*>PyUnicode_DATA(cached), p, n):
            return <str>cached
    return _new_span_str(p, n, slot)


cdef inline uint32_t _load_u32(const unsigned char* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline bint _is_ascii(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    # Word at a time; the last (possibly overlapping) word covers the tail.
    cdef uint64_t bits = 0
    cdef Py_ssize_t i = 0
    if n >= 8:
        while i + 8 < n:
            bits |= _load_u64(p + i)
            i += 8
        bits |= _load_u64(p + n - 8)
    elif n >= 4:
        bits = _load_u32(p) | _load_u32(p + n - 4)
    else:
        while i < n:
            bits |= p[i]
            i += 1
    return (bits & 0x8080808080808080ULL) == 0


cdef int _check_utf8(Reader* r, Py_ssize_t n, const char* field) except -1:
    # Non-ASCII text is rare in gossip; CPython's own strict decoder is the reference for what valid UTF-8 is.
    cdef PyObject* decoded = _decode_utf8(<const char*>r.p, n, NULL)
    if decoded == NULL:
        PyErr_Clear()
        raise CodecError(f"{field.decode('ascii')} at offset {r.p - r.base} is not valid UTF-8")
    Py_XDECREF(decoded)
    return 0


cdef inline int _read_span(Reader* r, Span* span, const char* field) except -1:
    """Validate a string field at r.p and record where its bytes are."""
    cdef Py_ssize_t n
    _read_length(r, &n)
    if n != 0 and not _is_ascii(r.p, n):
        _check_utf8(r, n, field)
    span.offset = <uint32_t>(r.p - r.base)
    span.length = <uint32_t>n
    r.p += n
    return 0


cdef inline int _read_bytes_span(Reader* r, Span* span) except -1:
    """Record where a bytes field at r.p lies (any bytes are valid: no UTF-8 check)."""
    cdef Py_ssize_t n
    _read_length(r, &n)
    span.offset = <uint32_t>(r.p - r.base)
    span.length = <uint32_t>n
    r.p += n
    return 0


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
        self.app_meta = b""

    def __init__(self, str member_id not None="", str address not None="", int state=0,
                 unsigned long long incarnation=0, str model_version not None="", int active_requests=0,
                 int max_capacity=0, str grpc_address not None="", int role=0, double weight=0.0,
                 bint draining=False, str reporter_id not None="", bytes app_meta not None=b""):
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
        self.app_meta = app_meta

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
        size += _str_size(_bytes_length(self.app_meta, "app_meta"))
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
        other.app_meta = self.app_meta
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
            and self.app_meta == o.app_meta
        )

    # Mutable: equal updates may not stay equal, so they must not be dict keys.
    __hash__ = None

    def __reduce__(self):
        # Cython cannot derive pickling for a class with __cinit__; copy.deepcopy and multiprocessing need it.
        return (Update, (self.member_id, self.address, self.state, self.incarnation, self.model_version,
                         self.active_requests, self.max_capacity, self.grpc_address, self.role, self.weight,
                         self.draining, self.reporter_id, self.app_meta))

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
        if self.app_meta:
            parts.append(f"app_meta={self.app_meta!r}")
        return f"Update({', '.join(parts)})"


@cython.freelist(16)
cdef class Message:
    """A GossipMessage: one UDP datagram. ``updates`` is a list of Update.

    A message returned by decode() is fully validated but makes its strings and Update objects only when they
    are first read (and then keeps them); assigning a field replaces its decoded value.
    """

    def __cinit__(self):
        self._sender_id = ""
        self._target_id = ""
        self._sender_address = ""
        self._target_address = ""
        self.payload = b""
        # The (empty) updates list is made on first access: most messages built for sending never need it.
        self._lazy = LAZY_UPDATES

    def __dealloc__(self):
        _release_records(self._records, self._records_capacity)

    def __init__(self, int type=0, str sender_id not None="", str target_id not None="",
                 unsigned long long sequence_num=0, updates=None, str sender_address not None="",
                 str target_address not None="", unsigned long long timestamp_ms=0, bytes payload not None=b""):
        self.type = type
        self.set_sender_id(sender_id)
        self.set_target_id(target_id)
        self.sequence_num = sequence_num
        if updates is not None:
            updates = list(updates)
            for i, u in enumerate(updates):
                if not isinstance(u, Update):
                    raise TypeError(f"updates[{i}] is {u.__class__.__name__}, expected Update")
            self.set_updates(updates)
        self.set_sender_address(sender_address)
        self.set_target_address(target_address)
        self.timestamp_ms = timestamp_ms
        self.payload = payload

    @property
    def sender_id(self):
        return self.get_sender_id()

    @sender_id.setter
    def sender_id(self, str value):
        self.set_sender_id(value)

    @property
    def target_id(self):
        return self.get_target_id()

    @target_id.setter
    def target_id(self, str value):
        self.set_target_id(value)

    @property
    def sender_address(self):
        return self.get_sender_address()

    @sender_address.setter
    def sender_address(self, str value):
        self.set_sender_address(value)

    @property
    def target_address(self):
        return self.get_target_address()

    @target_address.setter
    def target_address(self, str value):
        self.set_target_address(value)

    @property
    def updates(self):
        return self.get_updates()

    @updates.setter
    def updates(self, list value):
        self.set_updates(value)

    cdef str _load_str(self, unsigned int field):
        # A local reference: nothing that runs while the str is made can free the bytes the span points into.
        cdef bytes source = self._source
        cdef const unsigned char* base = <const unsigned char*>PyBytes_AS_STRING(source)
        cdef str s
        if field == LAZY_SENDER_ID:
            s = _span_str(base, self._sender_id_span)
            self._sender_id = s
        elif field == LAZY_TARGET_ID:
            s = _span_str(base, self._target_id_span)
            self._target_id = s
        elif field == LAZY_SENDER_ADDRESS:
            s = _span_str(base, self._sender_address_span)
            self._sender_address = s
        else:
            s = _span_str(base, self._target_address_span)
            self._target_address = s
        self._lazy &= ~field
        if self._lazy == 0:
            self._source = None
        return s

    cdef list _load_updates(self):
        # The records are detached first, so that even a re-entrant access (from a finalizer run by an
        # allocation below) finds a consistent message rather than records being freed under this loop.
        cdef UpdateRecord* records = self._records
        cdef Py_ssize_t n = self._n_records
        cdef Py_ssize_t capacity = self._records_capacity
        cdef bytes source = self._source
        cdef const unsigned char* base
        cdef UpdateRecord* rec
        cdef Update u
        cdef list updates
        cdef Py_ssize_t i
        self._records = NULL
        self._n_records = 0
        self._records_capacity = 0
        try:
            updates = PyList_New(n)
            if n:
                base = <const unsigned char*>PyBytes_AS_STRING(source)
                for i in range(n):
                    rec = &records[i]
                    u = Update.__new__(Update)
                    if rec.member_id.length:
                        u.member_id = _span_str(base, rec.member_id)
                    if rec.address.length:
                        u.address = _span_str(base, rec.address)
                    u.state = rec.state
                    u.incarnation = rec.incarnation
                    if rec.model_version.length:
                        u.model_version = _span_str(base, rec.model_version)
                    u.active_requests = rec.active_requests
                    u.max_capacity = rec.max_capacity
                    if rec.grpc_address.length:
                        u.grpc_address = _span_str(base, rec.grpc_address)
                    u.role = rec.role
                    u.weight = <double>rec.weight
                    u.draining = rec.draining
                    if rec.reporter_id.length:
                        u.reporter_id = _span_str(base, rec.reporter_id)
                    if rec.app_meta.length:
                        u.app_meta = PyBytes_FromStringAndSize(<const char*>base + rec.app_meta.offset,
                                                               rec.app_meta.length)
                    Py_INCREF(<PyObject*>u)  # PyList_SET_ITEM steals it
                    PyList_SET_ITEM(updates, i, u)
        except BaseException:
            # Only MemoryError can get here (decode validated everything): keep the records for a later retry.
            if self._records == NULL:
                self._records = records
                self._n_records = n
                self._records_capacity = capacity
                records = NULL
            raise
        finally:
            _release_records(records, capacity)
        self._updates = updates
        self._lazy &= ~LAZY_UPDATES
        if self._lazy == 0:
            self._source = None
        return updates

    cpdef Message copy(self):
        """A copy whose updates list and Update objects are new (changing it never changes self)."""
        cdef Message other = Message.__new__(Message)
        cdef list updates = self.get_updates()
        other.type = self.type
        other.set_sender_id(self.get_sender_id())
        other.set_target_id(self.get_target_id())
        other.sequence_num = self.sequence_num
        other.set_sender_address(self.get_sender_address())
        other.set_target_address(self.get_target_address())
        other.timestamp_ms = self.timestamp_ms
        other.payload = self.payload
        if updates is not None:
            other.set_updates([(<Update?>u).copy() for u in updates])
        return other

    def __eq__(self, other):
        if not isinstance(other, Message):
            return NotImplemented
        cdef Message o = <Message>other
        return (
            self.type == o.type
            and self.get_sender_id() == o.get_sender_id()
            and self.get_target_id() == o.get_target_id()
            and self.sequence_num == o.sequence_num
            and self.get_sender_address() == o.get_sender_address()
            and self.get_target_address() == o.get_target_address()
            and self.timestamp_ms == o.timestamp_ms
            and self.payload == o.payload
            and (self.get_updates() or []) == (o.get_updates() or [])
        )

    __hash__ = None

    def __reduce__(self):
        return (Message, (self.type, self.get_sender_id(), self.get_target_id(), self.sequence_num,
                          self.get_updates(), self.get_sender_address(), self.get_target_address(),
                          self.timestamp_ms, self.payload))

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
        if self.payload:
            parts.append(f"payload={self.payload!r}")
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


cdef int _append_update(Buffer* b, Update u) except -1:
    """Write u as one `updates` field at b.p, in field-number order as protobuf writes it."""
    cdef Py_ssize_t n_member, n_address, n_version, n_grpc, n_reporter
    cdef Py_ssize_t n_app_meta = _bytes_length(u.app_meta, "app_meta")
    # Nothing between here and the writes below runs Python code, so these pointers into u's strings stay valid.
    cdef const char* member = _utf8_of(<PyObject*>u.member_id, &n_member, "member_id")
    cdef const char* address = _utf8_of(<PyObject*>u.address, &n_address, "address")
    cdef const char* version = _utf8_of(<PyObject*>u.model_version, &n_version, "model_version")
    cdef const char* grpc = _utf8_of(<PyObject*>u.grpc_address, &n_grpc, "grpc_address")
    cdef const char* reporter = _utf8_of(<PyObject*>u.reporter_id, &n_reporter, "reporter_id")
    cdef const char* app_meta = PyBytes_AS_STRING(u.app_meta)
    cdef unsigned char* head
    cdef unsigned char* p
    cdef Py_ssize_t body
    cdef Py_ssize_t extra
    _reserve(b, UPDATE_OVERHEAD_MAX + n_member + n_address + n_version + n_grpc + n_reporter + n_app_meta)
    head = b.p
    # The body is written after a one-byte length prefix, which is what every update shorter than 128 bytes gets.
    p = head + 2
    p = _put_str_field(p, TAG_MEMBER_ID, member, n_member)
    p = _put_str_field(p, TAG_ADDRESS, address, n_address)
    p = _put_varint_field(p, TAG_STATE, _int32_wire(u.state))
    p = _put_varint_field(p, TAG_INCARNATION, u.incarnation)
    p = _put_str_field(p, TAG_MODEL_VERSION, version, n_version)
    p = _put_varint_field(p, TAG_ACTIVE_REQUESTS, _int32_wire(u.active_requests))
    p = _put_varint_field(p, TAG_MAX_CAPACITY, _int32_wire(u.max_capacity))
    p = _put_str_field(p, TAG_GRPC_ADDRESS, grpc, n_grpc)
    p = _put_varint_field(p, TAG_ROLE, _int32_wire(u.role))
    p = _put_fixed32_field(p, TAG_WEIGHT, _float32_bits(u.weight))
    if u.draining:
        p[0] = TAG_DRAINING
        p[1] = 1
        p += 2
    p = _put_str_field(p, TAG_REPORTER_ID, reporter, n_reporter)
    p = _put_str_field(p, TAG_APP_META, app_meta, n_app_meta)
    body = p - (head + 2)
    head[0] = TAG_UPDATES
    if body < 0x80:
        head[1] = <unsigned char>body
    else:
        # A longer body needs a longer prefix: slide the body up (the reservation counted a 5-byte prefix).
        extra = _varint_size(<uint64_t>body) - 1
        memmove(head + 2 + extra, head + 2, body)
        _put_varint(head + 1, <uint64_t>body)
        p += extra
    b.p = p
    return 0


cdef inline Py_ssize_t _str_size(Py_ssize_t n) noexcept nogil:
    if n == 0:
        return 0
    return 1 + _varint_size(<uint64_t>n) + n


cdef bytes _encode(Message msg, list updates, Py_ssize_t max_size, Py_ssize_t* n_written):
    """Encode msg's own fields and the longest prefix of updates that keeps the result <= max_size bytes."""
    cdef unsigned char stack[STACK_BUFFER_SIZE]
    cdef Buffer b
    cdef Py_ssize_t n_sender, n_target, n_sender_address, n_target_address
    cdef Py_ssize_t head_size, tail_size, mark
    cdef Py_ssize_t i = 0
    cdef unsigned char* p
    cdef uint64_t type_wire = _int32_wire(msg.type)
    # Owned references: the pointers below stay valid whatever the loop over updates runs.
    cdef str sender_id = msg.get_sender_id()
    cdef str target_id = msg.get_target_id()
    cdef str sender_address = msg.get_sender_address()
    cdef str target_address = msg.get_target_address()
    cdef bytes payload = msg.payload
    cdef Py_ssize_t n_payload = _bytes_length(payload, "payload")
    cdef const char* sender = _utf8(sender_id, &n_sender, "sender_id")
    cdef const char* target = _utf8(target_id, &n_target, "target_id")
    cdef const char* sender_addr = _utf8(sender_address, &n_sender_address, "sender_address")
    cdef const char* target_addr = _utf8(target_address, &n_target_address, "target_address")
    # Fields 6..9 follow the updates (field 5) on the wire, so their size is set aside before packing updates.
    tail_size = (_str_size(n_sender_address) + _str_size(n_target_address)
                 + _varint_field_size(msg.timestamp_ms) + _str_size(n_payload))
    head_size = (_varint_field_size(type_wire) + _str_size(n_sender) + _str_size(n_target)
                 + _varint_field_size(msg.sequence_num))
    if head_size + tail_size > max_size:
        raise CodecError(f"the message header alone is {head_size + tail_size} bytes, over the limit of "
                         f"{max_size}")
    b.start = stack
    b.p = stack
    b.end = stack + STACK_BUFFER_SIZE
    b.heap = NULL
    try:
        _reserve(&b, HEADER_OVERHEAD_MAX + n_sender + n_target + n_sender_address + n_target_address)
        p = b.p
        p = _put_varint_field(p, TAG_TYPE, type_wire)
        p = _put_str_field(p, TAG_SENDER_ID, sender, n_sender)
        p = _put_str_field(p, TAG_TARGET_ID, target, n_target)
        b.p = _put_varint_field(p, TAG_SEQUENCE_NUM, msg.sequence_num)
        if updates is not None:
            # The size is re-read every time: _update_at may run Python code (isinstance) that changes the list.
            while i < PyList_GET_SIZE(updates):
                mark = b.p - b.start
                _append_update(&b, _update_at(updates, i))
                if b.p - b.start + tail_size > max_size:
                    b.p = b.start + mark
                    break
                i += 1
        _reserve(&b, 3 * 6 + 11 + n_sender_address + n_target_address + n_payload)
        p = b.p
        p = _put_str_field(p, TAG_SENDER_ADDRESS, sender_addr, n_sender_address)
        p = _put_str_field(p, TAG_TARGET_ADDRESS, target_addr, n_target_address)
        p = _put_varint_field(p, TAG_TIMESTAMP_MS, msg.timestamp_ms)
        b.p = _put_str_field(p, TAG_PAYLOAD, PyBytes_AS_STRING(payload), n_payload)
        n_written[0] = i
        return PyBytes_FromStringAndSize(<char*>b.start, b.p - b.start)
    finally:
        PyMem_Free(b.heap)


cpdef bytes encode(Message msg):
    """Serialize msg (header and all of msg.updates) to protobuf wire bytes.

    Raises TypeError for a None string field or a non-Update in msg.updates, CodecError for a string that is not
    encodable as UTF-8.
    """
    cdef Py_ssize_t n
    if msg is None:
        raise TypeError("encode() needs a Message, not None")
    return _encode(msg, msg.get_updates(), PY_SSIZE_T_MAX, &n)


cpdef tuple encode_limited(Message msg, list updates, Py_ssize_t max_size=MAX_DATAGRAM):
    """Encode msg's header fields plus the longest prefix of ``updates`` that keeps the result <= max_size bytes.

    msg.updates is ignored. Returns (bytes, number of updates included). Raises CodecError if the header alone
    does not fit.
    """
    cdef Py_ssize_t n
    cdef bytes data
    if msg is None:
        raise TypeError("encode_limited() needs a Message, not None")
    data = _encode(msg, updates, max_size, &n)
    return (data, n)


# ---------------------------------------------------------------------------------------------------------------
# Decoding

cdef enum:
    # First allocation of update records is sized from the datagram (an update takes ~40 bytes on the wire) but
    # capped, so a huge buffer does not reserve memory for updates it may not hold; it doubles from there.
    MIN_UPDATE_BYTES_GUESS = 24
    INITIAL_RECORDS_MAX = 64
    SPARE_RECORDS_MAX = 64
    # Spans are 32-bit; protobuf itself refuses messages of 2 GiB or more.
    MAX_MESSAGE_BYTES = 0x7FFFFFFF


# One spare record array, kept when a message is done with its records, so that the next decode reuses it
# instead of paying for a malloc and a free per datagram (arrays over SPARE_RECORDS_MAX are always freed).
cdef UpdateRecord* _spare_records = NULL
cdef Py_ssize_t _spare_capacity = 0


cdef void _release_records(UpdateRecord* records, Py_ssize_t capacity) noexcept:
    global _spare_records, _spare_capacity
    if records == NULL:
        return
    if _spare_capacity < capacity <= SPARE_RECORDS_MAX:
        PyMem_Free(_spare_records)
        _spare_records = records
        _spare_capacity = capacity
    else:
        PyMem_Free(records)


cdef UpdateRecord* _grow_records(Message msg, Py_ssize_t size, Py_ssize_t max_updates) except NULL:
    global _spare_records, _spare_capacity
    cdef Py_ssize_t wanted
    cdef UpdateRecord* grown
    if msg._records_capacity == 0 and _spare_records != NULL:
        msg._records = _spare_records
        msg._records_capacity = _spare_capacity
        _spare_records = NULL
        _spare_capacity = 0
        return msg._records
    if msg._records_capacity == 0:
        wanted = size // MIN_UPDATE_BYTES_GUESS + 1
        if wanted > INITIAL_RECORDS_MAX:
            wanted = INITIAL_RECORDS_MAX
    else:
        wanted = msg._records_capacity * 2
    if wanted > max_updates:
        wanted = max_updates
    # Owned by msg as soon as it exists, so that __dealloc__ frees it if decoding fails further on.
    grown = <UpdateRecord*>PyMem_Realloc(msg._records, wanted * sizeof(UpdateRecord))
    if grown == NULL:
        raise MemoryError()
    msg._records = grown
    msg._records_capacity = wanted
    return grown


cdef inline int _tag_byte(Reader* r, uint32_t* tag) except -1:
    # Every known field has a one-byte tag; longer tags are read (and checked) by _read_tag.
    if r.p[0] < 0x80:
        tag[0] = r.p[0]
        r.p += 1
        if tag[0] < 8:
            raise CodecError(f"field number 0 at offset {r.p - 1 - r.base}")
        return 0
    return _read_tag(r, tag)


cdef int _parse_update(Reader* r, UpdateRecord* rec) except -1:
    """Validate one MembershipUpdate body (r.p up to r.end) into rec, which the caller has zeroed."""
    cdef uint32_t tag
    cdef uint64_t v
    # Fast path: the fields in field-number order, as protobuf (and this codec) write them. Each check is its own
    # well-predicted branch, where one dispatch on the tag would be an indirect jump mispredicted on most fields.
    # Whatever does not follow that order (absent fields aside) is left to the general loop below, which resumes
    # where this stopped, so fields are still applied in stream order and the last occurrence wins.
    if r.p < r.end and r.p[0] == TAG_MEMBER_ID:
        r.p += 1
        _read_span(r, &rec.member_id, "MembershipUpdate.member_id")
    if r.p < r.end and r.p[0] == TAG_ADDRESS:
        r.p += 1
        _read_span(r, &rec.address, "MembershipUpdate.address")
    if r.p < r.end and r.p[0] == TAG_STATE:
        r.p += 1
        _read_varint(r, &v)
        rec.state = _as_int32(v)
    if r.p < r.end and r.p[0] == TAG_INCARNATION:
        r.p += 1
        _read_varint(r, &v)
        rec.incarnation = v
    if r.p < r.end and r.p[0] == TAG_MODEL_VERSION:
        r.p += 1
        _read_span(r, &rec.model_version, "MembershipUpdate.model_version")
    if r.p < r.end and r.p[0] == TAG_ACTIVE_REQUESTS:
        r.p += 1
        _read_varint(r, &v)
        rec.active_requests = _as_int32(v)
    if r.p < r.end and r.p[0] == TAG_MAX_CAPACITY:
        r.p += 1
        _read_varint(r, &v)
        rec.max_capacity = _as_int32(v)
    if r.p < r.end and r.p[0] == TAG_GRPC_ADDRESS:
        r.p += 1
        _read_span(r, &rec.grpc_address, "MembershipUpdate.grpc_address")
    if r.p < r.end and r.p[0] == TAG_ROLE:
        r.p += 1
        _read_varint(r, &v)
        rec.role = _as_int32(v)
    if r.p < r.end and r.p[0] == TAG_WEIGHT:
        r.p += 1
        _read_weight(r, rec)
    if r.p < r.end and r.p[0] == TAG_DRAINING:
        r.p += 1
        _read_varint(r, &v)
        rec.draining = v != 0
    if r.p < r.end and r.p[0] == TAG_REPORTER_ID:
        r.p += 1
        _read_span(r, &rec.reporter_id, "MembershipUpdate.reporter_id")
    if r.p < r.end and r.p[0] == TAG_APP_META:
        r.p += 1
        _read_bytes_span(r, &rec.app_meta)
    while r.p < r.end:
        _tag_byte(r, &tag)
        if tag == TAG_MEMBER_ID:
            _read_span(r, &rec.member_id, "MembershipUpdate.member_id")
        elif tag == TAG_ADDRESS:
            _read_span(r, &rec.address, "MembershipUpdate.address")
        elif tag == TAG_STATE:
            _read_varint(r, &v)
            rec.state = _as_int32(v)
        elif tag == TAG_INCARNATION:
            _read_varint(r, &v)
            rec.incarnation = v
        elif tag == TAG_MODEL_VERSION:
            _read_span(r, &rec.model_version, "MembershipUpdate.model_version")
        elif tag == TAG_ACTIVE_REQUESTS:
            _read_varint(r, &v)
            rec.active_requests = _as_int32(v)
        elif tag == TAG_MAX_CAPACITY:
            _read_varint(r, &v)
            rec.max_capacity = _as_int32(v)
        elif tag == TAG_GRPC_ADDRESS:
            _read_span(r, &rec.grpc_address, "MembershipUpdate.grpc_address")
        elif tag == TAG_ROLE:
            _read_varint(r, &v)
            rec.role = _as_int32(v)
        elif tag == TAG_WEIGHT:
            _read_weight(r, rec)
        elif tag == TAG_DRAINING:
            _read_varint(r, &v)
            rec.draining = v != 0
        elif tag == TAG_REPORTER_ID:
            _read_span(r, &rec.reporter_id, "MembershipUpdate.reporter_id")
        elif tag == TAG_APP_META:
            _read_bytes_span(r, &rec.app_meta)
        else:
            _skip_field(r, tag)
    return 0


cdef inline int _read_weight(Reader* r, UpdateRecord* rec) except -1:
    cdef uint32_t bits
    if r.end - r.p < 4:
        raise CodecError(f"truncated MembershipUpdate.weight at offset {r.p - r.base}")
    bits = (<uint32_t>r.p[0] | (<uint32_t>r.p[1] << 8) | (<uint32_t>r.p[2] << 16)
            | (<uint32_t>r.p[3] << 24))
    memcpy(&rec.weight, &bits, 4)
    r.p += 4
    return 0


cdef Message _decode_message(bytes source, Py_ssize_t max_updates):
    cdef const unsigned char* data = <const unsigned char*>PyBytes_AS_STRING(source)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(source)
    cdef Message msg = Message.__new__(Message)
    cdef UpdateRecord* records = NULL
    cdef Py_ssize_t capacity = 0
    cdef Py_ssize_t n_updates = 0
    cdef Py_ssize_t length
    cdef Reader r
    cdef Reader sub
    cdef Span sender_id, target_id, sender_address, target_address, payload
    cdef uint32_t tag
    cdef uint64_t v
    cdef unsigned int lazy = LAZY_UPDATES
    if size > MAX_MESSAGE_BYTES:
        raise CodecError(f"{size} bytes is over protobuf's 2 GiB message limit")
    memset(&sender_id, 0, sizeof(Span))
    memset(&target_id, 0, sizeof(Span))
    memset(&sender_address, 0, sizeof(Span))
    memset(&target_address, 0, sizeof(Span))
    memset(&payload, 0, sizeof(Span))
    r.base = data
    r.p = data
    r.end = data + size
    while r.p < r.end:
        _tag_byte(&r, &tag)
        if tag == TAG_UPDATES:
            _read_length(&r, &length)
            if n_updates >= max_updates:
                raise CodecError(f"more than {max_updates} updates in one message")
            if n_updates == capacity:
                records = _grow_records(msg, size, max_updates)
                capacity = msg._records_capacity
            memset(&records[n_updates], 0, sizeof(UpdateRecord))
            sub.base = r.base
            sub.p = r.p
            sub.end = r.p + length
            _parse_update(&sub, &records[n_updates])
            n_updates += 1
            r.p = sub.end
        elif tag == TAG_TYPE:
            _read_varint(&r, &v)
            msg.type = _as_int32(v)
        elif tag == TAG_SENDER_ID:
            _read_span(&r, &sender_id, "sender_id")
        elif tag == TAG_TARGET_ID:
            _read_span(&r, &target_id, "target_id")
        elif tag == TAG_SEQUENCE_NUM:
            _read_varint(&r, &v)
            msg.sequence_num = v
        elif tag == TAG_SENDER_ADDRESS:
            _read_span(&r, &sender_address, "sender_address")
        elif tag == TAG_TARGET_ADDRESS:
            _read_span(&r, &target_address, "target_address")
        elif tag == TAG_TIMESTAMP_MS:
            _read_varint(&r, &v)
            msg.timestamp_ms = v
        elif tag == TAG_PAYLOAD:
            _read_bytes_span(&r, &payload)
        else:
            _skip_field(&r, tag)
    # Empty strings need no span: __cinit__ already set every string field to "".
    if sender_id.length:
        msg._sender_id_span = sender_id
        lazy |= LAZY_SENDER_ID
    if target_id.length:
        msg._target_id_span = target_id
        lazy |= LAZY_TARGET_ID
    if sender_address.length:
        msg._sender_address_span = sender_address
        lazy |= LAZY_SENDER_ADDRESS
    if target_address.length:
        msg._target_address_span = target_address
        lazy |= LAZY_TARGET_ADDRESS
    if payload.length:
        # Made now rather than lazily: only USER datagrams carry one, and their receiver always reads it.
        msg.payload = PyBytes_FromStringAndSize(<const char*>data + payload.offset, payload.length)
    msg._n_records = n_updates
    msg._lazy = lazy
    if lazy != LAZY_UPDATES or n_updates:
        msg._source = source
    return msg


cdef bytes _private_copy(data):
    """data's bytes as a new bytes object: the message must not change when the caller reuses its buffer."""
    cdef Py_buffer view
    try:
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    except BufferError:
        # A non-contiguous view cannot be exported as one span.
        return bytes(memoryview(data))
    try:
        return PyBytes_FromStringAndSize(<const char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


cpdef Message decode(data, Py_ssize_t max_updates=MAX_UPDATES):
    """Parse and validate one datagram (bytes, bytearray, memoryview or any buffer) into a Message.

    Every error is raised here; the message's strings and Update objects are made when first read, which cannot
    fail. Raises CodecError for malformed input (including more than max_updates updates) and TypeError for an
    object that is not a buffer.
    """
    if PyBytes_CheckExact(data):
        return _decode_message(<bytes>data, max_updates)
    return _decode_message(_private_copy(data), max_updates)
