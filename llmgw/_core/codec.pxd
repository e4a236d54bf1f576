# cython: language_level=3
# Typed interface of the gossip wire codec (proto/gossip.proto), for Cython modules that cimport it (swim.pyx).

from libc.stdint cimport int32_t, uint32_t, uint64_t

# MessageType
cdef enum:
    PING = 0
    PING_REQ = 1
    ACK = 2
    NACK = 3
    SYNC = 4
    SYNC_ACK = 5
    USER = 6

# MemberState
cdef enum:
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3

# Role
cdef enum:
    ROLE_UNSPECIFIED = 0
    ROLE_REPLICA = 1
    ROLE_GATEWAY = 2
    ROLE_UPSTREAM = 3

cdef enum:
    MAX_DATAGRAM = 1400
    # Far above what a 1400-byte datagram can hold (at least 2 bytes per update) and low enough that a hostile
    # 64 KiB datagram of empty updates cannot make one decode allocate tens of thousands of objects.
    MAX_UPDATES = 4096


cdef class Update:
    """One MembershipUpdate."""
    cdef public str member_id, address, model_version, grpc_address, reporter_id
    cdef public int state, role
    cdef public unsigned long long incarnation
    cdef public int active_requests, max_capacity
    cdef public double weight
    cdef public bint draining
    cdef public bytes app_meta

    cpdef Py_ssize_t encoded_size(self) except -1
    cpdef Update copy(self)
    cdef Py_ssize_t _compute_body_size(self) except -1


# Where a validated string lies in a decoded message's source bytes.
cdef struct Span:
    uint32_t offset
    uint32_t length

# One validated MembershipUpdate of a decoded message, not yet turned into an Update object.
cdef struct UpdateRecord:
    Span member_id, address, model_version, grpc_address, reporter_id, app_meta
    uint64_t incarnation
    int32_t state, active_requests, max_capacity, role
    float weight
    unsigned char draining

# Bits of Message._lazy: the fields that still exist only as spans/records of Message._source.
cdef enum:
    LAZY_SENDER_ID = 1
    LAZY_TARGET_ID = 2
    LAZY_SENDER_ADDRESS = 4
    LAZY_TARGET_ADDRESS = 8
    LAZY_UPDATES = 16


cdef class Message:
    """One GossipMessage (one UDP datagram).

    A decoded message is validated in full by decode() but keeps its strings and updates as spans of its source
    bytes until they are first read. Cython callers use the get_*/set_* methods below (the Python properties of
    the same names are slower generic attribute lookups).
    """
    cdef public int type
    cdef public unsigned long long sequence_num, timestamp_ms
    cdef public bytes payload
    cdef str _sender_id, _target_id, _sender_address, _target_address
    cdef list _updates
    cdef unsigned int _lazy
    cdef bytes _source
    cdef Span _sender_id_span, _target_id_span, _sender_address_span, _target_address_span
    cdef UpdateRecord* _records     # PyMem storage for _records_capacity; released once the updates are made
    cdef Py_ssize_t _n_records, _records_capacity

    cpdef Message copy(self)
    cdef str _load_str(self, unsigned int field)
    cdef list _load_updates(self)

    cdef inline str get_sender_id(self):
        if self._lazy & LAZY_SENDER_ID:
            return self._load_str(LAZY_SENDER_ID)
        return self._sender_id

    cdef inline str get_target_id(self):
        if self._lazy & LAZY_TARGET_ID:
            return self._load_str(LAZY_TARGET_ID)
        return self._target_id

    cdef inline str get_sender_address(self):
        if self._lazy & LAZY_SENDER_ADDRESS:
            return self._load_str(LAZY_SENDER_ADDRESS)
        return self._sender_address

    cdef inline str get_target_address(self):
        if self._lazy & LAZY_TARGET_ADDRESS:
            return self._load_str(LAZY_TARGET_ADDRESS)
        return self._target_address

    cdef inline list get_updates(self):
        if self._lazy & LAZY_UPDATES:
            return self._load_updates()
        return self._updates

    cdef inline void set_sender_id(self, str value) noexcept:
        self._sender_id = value
        self._lazy &= ~LAZY_SENDER_ID

    cdef inline void set_target_id(self, str value) noexcept:
        self._target_id = value
        self._lazy &= ~LAZY_TARGET_ID

    cdef inline void set_sender_address(self, str value) noexcept:
        self._sender_address = value
        self._lazy &= ~LAZY_SENDER_ADDRESS

    cdef inline void set_target_address(self, str value) noexcept:
        self._target_address = value
        self._lazy &= ~LAZY_TARGET_ADDRESS

    cdef inline void set_updates(self, list value) noexcept:
        self._updates = value
        self._lazy &= ~LAZY_UPDATES


cpdef bytes encode(Message msg)
cpdef Message decode(data, Py_ssize_t max_updates=*)
cpdef tuple encode_limited(Message msg, list updates, Py_ssize_t max_size=*)
