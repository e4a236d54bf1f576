# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Weighted least-connections picker (sans-IO: randomness comes from an explicitly seeded C PRNG).

Among eligible members (not excluded, not draining, not dead/left, under capacity) pick the minimum of
active / weight; ties are broken uniformly at random by reservoir sampling in one pass. SUSPECT members are
eligible only when no ALIVE member is.
"""

cimport cython
from libc.math cimport isfinite
from libc.stdint cimport INT64_MAX, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memset

import os

cdef uint8_t F_IN_USE = 1
cdef uint8_t F_SUSPECT = 2
cdef uint8_t F_DOWN = 4       # dead or left: never eligible
cdef uint8_t F_DRAINING = 8

# Accepts MemberState members too: they are str subclasses whose .value is one of these keys.
cdef dict _STATE_FLAGS = {"alive": 0, "suspect": F_SUSPECT, "dead": F_DOWN, "left": F_DOWN}


cdef inline uint64_t _splitmix64(uint64_t* state) noexcept:
    # Steele, Lea, Flood, "Fast splittable pseudorandom number generators" (2014): tiny state, full period,
    # good enough for tie-breaking and deterministic for a given seed.
    state[0] += <uint64_t>0x9E3779B97F4A7C15
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
    return z ^ (z >> 31)


cdef uint64_t _seed_value(object seed) except? 0:
    if seed is None:
        return int.from_bytes(os.urandom(8), "little")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    return seed & 0xFFFFFFFFFFFFFFFF


cdef class LeastConnectionsPicker:
    """Weighted least-connections over a set of members, each with weight, capacity, state and load.

    `seed` makes tie-breaking reproducible; None seeds from os.urandom.
    """

    cdef int64_t* _active
    cdef int64_t* _capacity
    cdef double* _weight
    cdef uint8_t* _flags
    cdef uint32_t* _excluded
    cdef uint32_t _epoch
    cdef Py_ssize_t _n_slots
    cdef Py_ssize_t _cap_slots
    cdef list _names
    cdef dict _slot_of
    cdef list _free_slots
    cdef uint64_t _rng

    def __cinit__(self):
        self._active = NULL
        self._capacity = NULL
        self._weight = NULL
        self._flags = NULL
        self._excluded = NULL
        self._n_slots = 0
        self._cap_slots = 0
        self._epoch = 0

    def __dealloc__(self):
        free(self._active)
        free(self._capacity)
        free(self._weight)
        free(self._flags)
        free(self._excluded)

    def __init__(self, seed=None):
        self._names = []
        self._slot_of = {}
        self._free_slots = []
        self._rng = _seed_value(seed)

    def reseed(self, seed=None):
        """Restart the tie-breaking sequence from `seed` (None: from os.urandom)."""
        self._rng = _seed_value(seed)

    def set_member(self, str member_id, *, double weight=1.0, capacity=0, state="alive", bint draining=False):
        """Add a member or update an existing one (its load is kept). `state`: alive, suspect, dead or left."""
        if not isfinite(weight) or weight <= 0.0:
            raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            raise TypeError(f"capacity must be an int, got {capacity!r}")
        if capacity < 0 or capacity > INT64_MAX:
            raise ValueError(f"capacity must be >= 0 (0 = unlimited), got {capacity}")
        state_flags = _STATE_FLAGS.get(getattr(state, "value", state))
        if state_flags is None:
            raise ValueError(f"state must be one of {sorted(_STATE_FLAGS)}, got {state!r}")
        cdef Py_ssize_t slot
        slot_obj = self._slot_of.get(member_id)
        if slot_obj is None:
            slot = self._new_slot(member_id)
        else:
            slot = slot_obj
        self._weight[slot] = weight
        self._capacity[slot] = capacity
        self._flags[slot] = F_IN_USE | <uint8_t>state_flags | (F_DRAINING if draining else 0)

    def remove_member(self, str member_id):
        cdef Py_ssize_t slot = self._slot(member_id)
        self._flags[slot] = 0
        self._active[slot] = 0
        self._names[slot] = None
        del self._slot_of[member_id]
        self._free_slots.append(slot)

    def set_load(self, str member_id, active):
        """Set a member's in-flight request count."""
        if not isinstance(active, int) or isinstance(active, bool):
            raise TypeError(f"load must be an int, got {active!r}")
        if active < 0 or active > INT64_MAX // 2:
            raise ValueError(f"load must be >= 0, got {active}")
        self._active[self._slot(member_id)] = active

    def add_load(self, str member_id, delta):
        """Add `delta` (may be negative) to a member's load and return the new load; it may not go below 0."""
        cdef Py_ssize_t slot = self._slot(member_id)
        cdef int64_t d = delta
        if self._active[slot] + d < 0:
            raise ValueError(f"load of {member_id!r} would become {self._active[slot] + d} (< 0)")
        self._active[slot] += d
        return self._active[slot]

    def load(self, str member_id) -> int:
        return self._active[self._slot(member_id)]

    def members(self) -> list:
        """Member ids, sorted."""
        return sorted(self._slot_of)

    def __len__(self):
        return len(self._slot_of)

    def __contains__(self, member_id):
        return member_id in self._slot_of

    @cython.binding(False)
    def pick(self, exclude=()):
        """The eligible member with the least active / weight (random among ties), or None."""
        if exclude:
            if isinstance(exclude, (str, bytes)):
                raise TypeError("exclude must be a collection of member ids, not a single string")
            self._epoch += 1
            if self._epoch == 0:
                memset(self._excluded, 0, self._cap_slots * sizeof(uint32_t))
                self._epoch = 1
            for member_id in exclude:
                slot_obj = self._slot_of.get(member_id)
                if slot_obj is not None:
                    self._excluded[<Py_ssize_t>slot_obj] = self._epoch
        cdef Py_ssize_t slot = self._pick(bool(exclude))
        return None if slot < 0 else self._names[slot]

    cdef Py_ssize_t _pick(self, bint has_exclude) noexcept:
        # Two tiers in one pass: tier 0 = ALIVE, tier 1 = SUSPECT (used only if tier 0 is empty).
        cdef Py_ssize_t best[2]
        cdef double best_score[2]
        cdef uint64_t ties[2]
        best[0] = best[1] = -1
        best_score[0] = best_score[1] = 0.0
        ties[0] = ties[1] = 0
        cdef Py_ssize_t s
        cdef int tier
        cdef uint8_t flags
        cdef int64_t active, cap
        cdef double score
        for s in range(self._n_slots):
            flags = self._flags[s]
            if not (flags & F_IN_USE) or (flags & (F_DOWN | F_DRAINING)):
                continue
            if has_exclude and self._excluded[s] == self._epoch:
                continue
            active = self._active[s]
            cap = self._capacity[s]
            if cap > 0 and active >= cap:
                continue
            tier = 1 if (flags & F_SUSPECT) else 0
            score = <double>active / self._weight[s]
            if best[tier] < 0 or score < best_score[tier]:
                best[tier] = s
                best_score[tier] = score
                ties[tier] = 1
            elif score == best_score[tier]:
                # Reservoir sampling: the k-th tied member replaces the choice with probability 1/k.
                ties[tier] += 1
                if _splitmix64(&self._rng) % ties[tier] == 0:
                    best[tier] = s
        return best[0] if best[0] >= 0 else best[1]

    cdef Py_ssize_t _slot(self, str member_id) except -1:
        slot = self._slot_of.get(member_id)
        if slot is None:
            raise KeyError(f"unknown member {member_id!r}")
        return slot

    cdef Py_ssize_t _new_slot(self, str member_id) except -1:
        cdef Py_ssize_t slot
        if self._free_slots:
            slot = self._free_slots.pop()
            self._names[slot] = member_id
        else:
            if self._n_slots == self._cap_slots:
                self._grow(max(8, self._cap_slots * 2))
            slot = self._n_slots
            self._n_slots += 1
            self._names.append(member_id)
        self._slot_of[member_id] = slot
        self._active[slot] = 0
        self._capacity[slot] = 0
        self._weight[slot] = 1.0
        self._flags[slot] = 0
        self._excluded[slot] = 0
        return slot

    cdef int _grow(self, Py_ssize_t new_cap) except -1:
        self._active = <int64_t*>_realloc(self._active, new_cap * sizeof(int64_t))
        self._capacity = <int64_t*>_realloc(self._capacity, new_cap * sizeof(int64_t))
        self._weight = <double*>_realloc(self._weight, new_cap * sizeof(double))
        self._flags = <uint8_t*>_realloc(self._flags, new_cap * sizeof(uint8_t))
        self._excluded = <uint32_t*>_realloc(self._excluded, new_cap * sizeof(uint32_t))
        self._cap_slots = new_cap
        return 0


cdef void* _realloc(void* ptr, size_t size) except NULL:
    cdef void* grown = realloc(ptr, size)
    if grown == NULL:
        raise MemoryError()
    return grown
