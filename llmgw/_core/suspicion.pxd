# cython: language_level=3
# Lifeguard dynamic suspicion timer (cimported by swim.pyx).

cdef class Suspicion:
    cdef public unsigned long long incarnation
    cdef public double start, min_timeout, max_timeout, deadline
    cdef public int k
    cdef public set confirmers

    cpdef int confirmations(self)
    cpdef double timeout(self)
    cpdef bint confirm(self, str reporter)
