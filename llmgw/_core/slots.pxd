# cython: language_level=3
# Per-member slot table shared by the ring and the picker (cimported by ring.pyx and picker.pyx).

from libc.stdint cimport int64_t, uint8_t, uint32_t

# Bits of MemberSlots.flags. A slot whose flags lack F_IN_USE is free (removed member or never used).
cdef enum:
    F_IN_USE = 1
    F_SUSPECT = 2
    F_DRAINING = 4
    F_DOWN = 8       # dead or left (picker only): never eligible


cdef class MemberSlots:
    # Parallel C arrays indexed by slot, valid for slots [0, n_slots); routing loops read them directly.
    cdef int64_t* load
    cdef int64_t* capacity
    cdef double* weight
    cdef uint8_t* flags
    cdef uint32_t* excluded      # == epoch: excluded for the current call
    cdef uint32_t epoch
    cdef Py_ssize_t n_slots      # high-water mark: slots ever handed out (free ones included)
    cdef Py_ssize_t cap_slots    # allocated length of every array
    cdef Py_ssize_t n_members
    cdef list names              # slot -> member id (None when free)
    cdef dict slot_of            # member id -> slot
    cdef list free_slots

    cdef Py_ssize_t slot(self, str member_id) except -1
    cdef Py_ssize_t add(self, str member_id) except -1
    cdef int release(self, Py_ssize_t slot) except -1
    cdef void set_flag(self, Py_ssize_t slot, uint8_t flag, bint on) noexcept
    cdef int64_t add_load(self, Py_ssize_t slot, object delta) except -1
    cdef void next_epoch(self) noexcept
    cdef int mark_excluded(self, object exclude) except -1

    # Hooks for subclasses that keep more per-slot arrays; each override must call the base method.
    cdef int _resize(self, Py_ssize_t new_cap) except -1
    cdef void _reset(self, Py_ssize_t slot) noexcept
    cdef void _clear_marks(self) noexcept


cdef void* grow_array(void* ptr, size_t size) except NULL
cdef int64_t check_capacity(object capacity) except -1
cdef int64_t check_load(object active) except -1
cdef int check_weight(double weight) except -1
