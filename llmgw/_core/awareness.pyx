# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Lifeguard local health awareness (memberlist awareness.go).

A node that misses ACKs and NACKs, or has to refute suspicions of itself, is more likely the slow one than its
peers are: its score rises, and probe interval and probe timeout are multiplied by ``scale() = 1 + score``, so a
struggling node accuses others less eagerly. Successful probes lower the score.
"""


cdef class Awareness:
    def __init__(self, int max_multiplier):
        if max_multiplier < 1:
            raise ValueError("max_multiplier must be >= 1")
        self.max_score = max_multiplier - 1
        self.score = 0

    cpdef void apply(self, int delta):
        cdef int v = self.score + delta
        if v < 0:
            v = 0
        if v > self.max_score:
            v = self.max_score
        self.score = v

    cpdef double scale(self):
        return 1.0 + self.score
