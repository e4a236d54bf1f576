# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Lifeguard dynamic suspicion (memberlist suspicion.go): how long a SUSPECT member has to refute.

The timeout starts at ``max_timeout`` and shrinks logarithmically towards ``min_timeout`` as k independent
confirmations arrive (distinct reporter ids other than the first reporter):

    timeout(c) = max(min, max - (max - min) * log(c + 1) / log(k + 1))

A timer carries the incarnation it was raised at; the state machine ignores it once that incarnation is refuted.
"""

from libc.math cimport log


cdef class Suspicion:
    def __init__(self, unsigned long long incarnation, double start, double min_timeout, double max_timeout,
                 int k, str first_reporter):
        if min_timeout < 0:
            raise ValueError("min_timeout must be >= 0")
        self.incarnation = incarnation
        self.start = start
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout if max_timeout > min_timeout else min_timeout
        self.k = k if k > 0 else 0
        self.confirmers = {first_reporter}
        self.deadline = start + self.timeout()

    cpdef int confirmations(self):
        """Independent confirmations so far (the first reporter does not count)."""
        return len(self.confirmers) - 1

    cpdef double timeout(self):
        cdef int c = len(self.confirmers) - 1
        cdef double t
        if self.k < 1 or c >= self.k:
            return self.min_timeout
        t = self.max_timeout - (self.max_timeout - self.min_timeout) * log(c + 1.0) / log(self.k + 1.0)
        return t if t > self.min_timeout else self.min_timeout

    cpdef bint confirm(self, str reporter):
        """Count an independent confirmation; True when it is new (the deadline then moved closer)."""
        if not reporter or reporter in self.confirmers:
            return False
        self.confirmers.add(reporter)
        self.deadline = self.start + self.timeout()
        return True
