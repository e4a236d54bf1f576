# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Weighted least-connections picker (sans-IO: randomness comes from an explicitly seeded C PRNG).

Among eligible members (not excluded, not draining, not dead/left, under capacity) pick the minimum of
active / weight; ties are broken uniformly at random by reservoir sampling in one pass. SUSPECT members are
eligible only when no ALIVE member is. Per-member state lives in the slot table shared with the ring (slots.pyx).
"""

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from llmgw._core.slots cimport (F_DOWN, F_DRAINING, F_IN_USE, F_SUSPECT, MemberSlots, check_capacity, check_load,
                                check_weight)

import os

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

    cdef MemberSlots _slots
    cdef uint64_t _rng

    def __cinit__(self):
        self._slots = MemberSlots()

    def __init__(self, seed=None):
        self._rng = _seed_value(seed)

    def reseed(self, seed=None):
        """Restart the tie-breaking sequence from `seed` (None: from os.urandom)."""
        self._rng = _seed_value(seed)

    def set_member(self, str member_id, *, double weight=1.0, capacity=0, state="alive", bint draining=False):
        """Add a member or update an existing one (its load is kept). `state`: alive, suspect, dead or left."""
        check_weight(weight)
        cdef int64_t cap = check_capacity(capacity)
        state_flags = _STATE_FLAGS.get(getattr(state, "value", state))
        if state_flags is None:
            raise ValueError(f"state must be one of {sorted(_STATE_FLAGS)}, got {state!r}")
        cdef MemberSlots slots = self._slots
        cdef Py_ssize_t slot
        slot_obj = slots.slot_of.get(member_id)
        if slot_obj is None:
            slot = slots.add(member_id)
        else:
            slot = slot_obj
        slots.weight[slot] = weight
        slots.capacity[slot] = cap
        slots.flags[slot] = F_IN_USE | <uint8_t>state_flags | (F_DRAINING if draining else 0)

    def remove_member(self, str member_id):
        self._slots.release(self._slots.slot(member_id))

    def set_load(self, str member_id, active):
        """Set a member's in-flight request count."""
        cdef int64_t value = check_load(active)
        self._slots.load[self._slots.slot(member_id)] = value

    def add_load(self, str member_id, delta):
        """Add `delta` (may be negative) to a member's load and return the new load; it may not go below 0."""
        return self._slots.add_load(self._slots.slot(member_id), delta)

    def load(self, str member_id) -> int:
        return self._slots.load[self._slots.slot(member_id)]

    def members(self) -> list:
        """Member ids, sorted."""
        return sorted(self._slots.slot_of)

    def __len__(self):
        return self._slots.n_members

    def __contains__(self, member_id):
        return member_id in self._slots.slot_of

    @cython.binding(False)
    def pick(self, exclude=()):
        """The eligible member with the least active / weight (random among ties), or None."""
        cdef MemberSlots slots = self._slots
        if exclude:
            slots.next_epoch()
            slots.mark_excluded(exclude)
        cdef Py_ssize_t slot = self._pick(bool(exclude))
        return None if slot < 0 else slots.names[slot]

    cdef Py_ssize_t _pick(self, bint has_exclude) noexcept:
        # Two tiers in one pass: tier 0 = ALIVE, tier 1 = SUSPECT (used only if tier 0 is empty).
        cdef Py_ssize_t best[2]
        cdef double best_score[2]
        cdef uint64_t ties[2]
        best[0] = best[1] = -1
        best_score[0] = best_score[1] = 0.0
        ties[0] = ties[1] = 0
        cdef MemberSlots slots = self._slots
        # Locals, not attribute reads: the loop writes the PRNG state, which the compiler cannot prove leaves
        # the array pointers held by the slot table unchanged.
        cdef const uint8_t* flags_at = slots.flags
        cdef const uint32_t* excluded_at = slots.excluded
        cdef const int64_t* load_at = slots.load
        cdef const int64_t* capacity_at = slots.capacity
        cdef const double* weight_at = slots.weight
        cdef uint32_t epoch = slots.epoch
        cdef Py_ssize_t s
        cdef int tier
        cdef uint8_t flags
        cdef int64_t active, cap
        cdef double score
        for s in range(slots.n_slots):
            flags = flags_at[s]
            if not (flags & F_IN_USE) or (flags & (F_DOWN | F_DRAINING)):
                continue
            if has_exclude and excluded_at[s] == epoch:
                continue
            active = load_at[s]
            cap = capacity_at[s]
            if cap > 0 and active >= cap:
                continue
            tier = 1 if (flags & F_SUSPECT) else 0
            score = <double>active / weight_at[s]
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
