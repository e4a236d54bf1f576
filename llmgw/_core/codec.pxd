# cython: language_level=3
# Typed interface of the gossip wire codec (proto/gossip.proto), for Cython modules that cimport it (swim.pyx).

# MessageType
cdef enum:
    PING = 0
    PING_REQ = 1
    ACK = 2
    NACK = 3
    SYNC = 4
    SYNC_ACK = 5

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
    # Body length computed by the sizing pass of encode and reused by the writing pass of the same call.
    cdef Py_ssize_t _body_size

    cpdef Py_ssize_t encoded_size(self) except -1
    cpdef Update copy(self)
    cdef Py_ssize_t _compute_body_size(self) except -1


cdef class Message:
    """One GossipMessage (one UDP datagram)."""
    cdef public int type
    cdef public str sender_id, target_id, sender_address, target_address
    cdef public unsigned long long sequence_num, timestamp_ms
    cdef public list updates

    cpdef Message copy(self)
    cdef Py_ssize_t _header_size(self) except -1


cpdef bytes encode(Message msg)
cpdef Message decode(data, Py_ssize_t max_updates=*)
cpdef tuple encode_limited(Message msg, list updates, Py_ssize_t max_size=*)
