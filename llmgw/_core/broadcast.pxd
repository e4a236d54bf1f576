# cython: language_level=3
# Retransmit-limited dissemination queue (cimported by swim.pyx).

from llmgw._core.codec cimport Update


cdef class Broadcast:
    cdef public Update update
    cdef public int transmits
    cdef public int budget_mult
    cdef public long long order


cdef class BroadcastQueue:
    cdef dict _items
    cdef long long _order

    cpdef void push(self, Update update, int budget_mult=*)
    cpdef list ordered(self)
    cpdef void mark_sent(self, list ordered, Py_ssize_t count, int limit)
    cpdef void clear(self)
