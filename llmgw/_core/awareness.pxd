# cython: language_level=3
# Lifeguard local health awareness (cimported by swim.pyx).

cdef class Awareness:
    cdef readonly int score
    cdef readonly int max_score

    cpdef void apply(self, int delta)
    cpdef double scale(self)
