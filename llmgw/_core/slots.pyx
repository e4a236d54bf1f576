# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Per-member slot table: the member bookkeeping the ring and the picker share (sans-IO).

Each member owns a small integer *slot*; its routing state (in-flight load, hard capacity, weight, flags and the
per-call exclusion mark) lives in parallel C arrays indexed by that slot, so routing loops touch no Python object.
Freed slots are reused before the arrays grow; growth doubles, so adding a member is amortised O(1).

Exclusion marks use an epoch: a call bumps `epoch` and stamps excluded slots with it, so clearing the marks of the
previous call costs nothing. Subclasses that keep more per-slot arrays override the `_resize`, `_reset` and
`_clear_marks` hooks (calling the base method).
"""

from libc.stdint cimport INT64_MAX, int64_t, uint8_t, uint32_t
from libc.math cimport isfinite
from libc.stdlib cimport free, realloc
from libc.string cimport memset


cdef class MemberSlots:
    """Member id <-> slot map with growable per-slot C arrays (C-level API only)."""

    def __cinit__(self):
        self.load = NULL
        self.capacity = NULL
        self.weight = NULL
        self.flags = NULL
        self.excluded = NULL
        self.epoch = 0
        self.n_slots = 0
        self.cap_slots = 0
        self.n_members = 0
        self.names = []
        self.slot_of = {}
        self.free_slots = []

    def __dealloc__(self):
        free(self.load)
        free(self.capacity)
        free(self.weight)
        free(self.flags)
        free(self.excluded)

    cdef Py_ssize_t slot(self, str member_id) except -1:
        """The slot of a known member; KeyError for an unknown one."""
        slot = self.slot_of.get(member_id)
        if slot is None:
            raise KeyError(f"unknown member {member_id!r}")
        return slot

    cdef Py_ssize_t add(self, str member_id) except -1:
        """Give a member not yet present a slot, every per-slot value reset (load 0, capacity 0, weight 1, no
        flags: the caller sets F_IN_USE once the member is configured)."""
        cdef Py_ssize_t slot
        if self.free_slots:
            slot = self.free_slots.pop()
            self.names[slot] = member_id
        else:
            if self.n_slots == self.cap_slots:
                self._resize(max(8, self.cap_slots * 2))
            slot = self.n_slots
            self.n_slots += 1
            self.names.append(member_id)
        self.slot_of[member_id] = slot
        self.n_members += 1
        self._reset(slot)
        return slot

    cdef int release(self, Py_ssize_t slot) except -1:
        """Forget the member in `slot`; the slot becomes free (flags 0, so loops skip it) and load 0."""
        del self.slot_of[self.names[slot]]
        self.names[slot] = None
        self.flags[slot] = 0
        self.load[slot] = 0
        self.n_members -= 1
        self.free_slots.append(slot)
        return 0

    cdef void set_flag(self, Py_ssize_t slot, uint8_t flag, bint on) noexcept:
        if on:
            self.flags[slot] |= flag
        else:
            self.flags[slot] &= ~flag

    cdef int64_t add_load(self, Py_ssize_t slot, object delta) except -1:
        """Add `delta` (may be negative) to the slot's load and return the new load; it may not go below 0."""
        cdef int64_t d = delta
        if self.load[slot] + d < 0:
            raise ValueError(f"load of {self.names[slot]!r} would become {self.load[slot] + d} (< 0)")
        self.load[slot] += d
        return self.load[slot]

    cdef void next_epoch(self) noexcept:
        """Start a call: marks stamped by earlier calls no longer count."""
        self.epoch += 1
        if self.epoch == 0:
            # Wrapped after 2**32 calls: stale marks could equal the new epoch, so clear them.
            if self.cap_slots:
                self._clear_marks()
            self.epoch = 1

    cdef int mark_excluded(self, object exclude) except -1:
        """Stamp the slots of the known members in `exclude` with the current epoch (unknown ids are ignored)."""
        # A bare string is a collection of characters: excluding "r1" would silently exclude members "r" and "1".
        if isinstance(exclude, (str, bytes)):
            raise TypeError("exclude must be a collection of member ids, not a single string")
        cdef object slot
        cdef dict slot_of = self.slot_of
        for member_id in exclude:
            slot = slot_of.get(member_id)
            if slot is not None:
                self.excluded[<Py_ssize_t>slot] = self.epoch
        return 0

    cdef int _resize(self, Py_ssize_t new_cap) except -1:
        self.load = <int64_t*>grow_array(self.load, new_cap * sizeof(int64_t))
        self.capacity = <int64_t*>grow_array(self.capacity, new_cap * sizeof(int64_t))
        self.weight = <double*>grow_array(self.weight, new_cap * sizeof(double))
        self.flags = <uint8_t*>grow_array(self.flags, new_cap * sizeof(uint8_t))
        self.excluded = <uint32_t*>grow_array(self.excluded, new_cap * sizeof(uint32_t))
        self.cap_slots = new_cap
        return 0

    cdef void _reset(self, Py_ssize_t slot) noexcept:
        self.load[slot] = 0
        self.capacity[slot] = 0
        self.weight[slot] = 1.0
        self.flags[slot] = 0
        self.excluded[slot] = 0

    cdef void _clear_marks(self) noexcept:
        memset(self.excluded, 0, self.cap_slots * sizeof(uint32_t))


cdef void* grow_array(void* ptr, size_t size) except NULL:
    """realloc that raises MemoryError instead of returning NULL (the old block stays valid then)."""
    cdef void* grown = realloc(ptr, size)
    if grown == NULL:
        raise MemoryError()
    return grown


cdef int64_t check_capacity(object capacity) except -1:
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise TypeError(f"capacity must be an int, got {capacity!r}")
    if capacity < 0 or capacity > INT64_MAX:
        raise ValueError(f"capacity must be >= 0 (0 = unlimited), got {capacity}")
    return capacity


cdef int64_t check_load(object active) except -1:
    if not isinstance(active, int) or isinstance(active, bool):
        raise TypeError(f"load must be an int, got {active!r}")
    if active < 0 or active > INT64_MAX // 2:
        raise ValueError(f"load must be >= 0, got {active}")
    return active


cdef int check_weight(double weight) except -1:
    if not isfinite(weight) or weight <= 0.0:
        raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
    return 0
