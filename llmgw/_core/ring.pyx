# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Consistent-hash ring with bounded loads (sans-IO, no clock, no sockets).

Points live in two parallel C arrays sorted by (hash, member id), so a lookup is a C binary search followed by a
clockwise walk over C arrays. Per-member state that the walk consults (in-flight load, hard capacity, suspect and
draining flags) is held in C arrays indexed by a member *slot* (the slot table shared with the picker,
slots.pyx), so the walk touches no Python object.

Bounded loads follow Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads" (2018): with
balance factor c, a member whose load is >= ceil(c * (total_load + 1) / n) is skipped, where n counts members
accepting new work (not draining) and total_load sums their loads.
"""

from libc.math cimport ceil, isfinite
from libc.stdint cimport INT64_MAX, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cimport cython

from llmgw._core.slots cimport (F_DRAINING, F_IN_USE, F_SUSPECT, MemberSlots, check_capacity, check_load,
                                check_weight, grow_array)

import mmh3

DEFAULT_VNODES = 160
DEFAULT_BALANCE = 1.25
DEFAULT_PREFIX_CHARS = 64
# A member's point count is vnodes * weight; past this a typo in a weight would eat memory instead of failing.
MAX_POINTS_PER_MEMBER = 1 << 20

cdef object _hash64 = mmh3.hash64


cpdef uint64_t hash_key(str key) except? 0:
    """Return the unsigned 64-bit MurmurHash3 (x64, 128-bit variant, low half, seed 0) of `key` as UTF-8.

    Deterministic on every platform and Python version, unlike `hash()` or the reference's `std::hash`.
    """
    return _hash64(key, signed=False)[0]


cpdef uint64_t affinity_hash(str prompt, Py_ssize_t prefix_chars=DEFAULT_PREFIX_CHARS) except? 0:
    """Return the affinity key of a prompt: `hash_key` of its first `prefix_chars` characters."""
    if prefix_chars < 1:
        raise ValueError(f"prefix_chars must be >= 1, got {prefix_chars}")
    return _hash64(prompt[:prefix_chars], signed=False)[0]


cdef inline uint64_t _as_key(object key_hash) except? 0:
    try:
        return key_hash
    except OverflowError:
        raise ValueError(f"key_hash must be an integer in [0, 2**64), got {key_hash!r}") from None


cdef class _RingSlots(MemberSlots):
    """The shared slot table plus the ring's own per-slot arrays: point counts and walk visit marks."""

    cdef int32_t* vnode_count
    cdef uint32_t* seen          # == epoch: already met on the current walk (a member has many points)

    def __cinit__(self):
        self.vnode_count = NULL
        self.seen = NULL

    def __dealloc__(self):
        free(self.vnode_count)
        free(self.seen)

    cdef int _resize(self, Py_ssize_t new_cap) except -1:
        # Own arrays first: the base sets cap_slots, which must never exceed any array's length.
        self.vnode_count = <int32_t*>grow_array(self.vnode_count, new_cap * sizeof(int32_t))
        self.seen = <uint32_t*>grow_array(self.seen, new_cap * sizeof(uint32_t))
        return MemberSlots._resize(self, new_cap)

    cdef void _reset(self, Py_ssize_t slot) noexcept:
        MemberSlots._reset(self, slot)
        self.vnode_count[slot] = 0
        self.seen[slot] = 0

    cdef void _clear_marks(self) noexcept:
        MemberSlots._clear_marks(self)
        memset(self.seen, 0, self.cap_slots * sizeof(uint32_t))


cdef class HashRing:
    """Consistent-hash ring of members with virtual nodes, weights, bounded loads and hard capacities.

    `vnodes` points per member at weight 1.0 (a member gets max(1, round(vnodes * weight)) points).
    `balance` is the bounded-loads factor c (>= 1.0); None or 0 turns bounding off.
    `point_bits` (1..64) truncates point hashes; only tests use fewer than 64 bits, to force point collisions.
    """

    cdef uint64_t* _points
    cdef int32_t* _point_slot
    cdef Py_ssize_t _n_points

    cdef _RingSlots _slots
    cdef Py_ssize_t _n_accepting
    cdef int64_t _total_load

    cdef double _balance
    cdef int _vnodes
    cdef uint64_t _point_mask

    def __cinit__(self):
        self._points = NULL
        self._point_slot = NULL
        self._n_points = 0
        self._slots = _RingSlots()
        self._n_accepting = 0
        self._total_load = 0

    def __dealloc__(self):
        free(self._points)
        free(self._point_slot)

    def __init__(self, vnodes=DEFAULT_VNODES, balance=DEFAULT_BALANCE, *, point_bits=64):
        if not isinstance(vnodes, int) or isinstance(vnodes, bool) or not 1 <= vnodes <= MAX_POINTS_PER_MEMBER:
            raise ValueError(f"vnodes must be an int in [1, {MAX_POINTS_PER_MEMBER}], got {vnodes!r}")
        if not isinstance(point_bits, int) or isinstance(point_bits, bool) or not 1 <= point_bits <= 64:
            raise ValueError(f"point_bits must be an int in [1, 64], got {point_bits!r}")
        self._vnodes = vnodes
        self._balance = _check_balance(balance)
        self._point_mask = <uint64_t>0xFFFFFFFFFFFFFFFF if point_bits == 64 else ((<uint64_t>1 << point_bits) - 1)

    # ------------------------------------------------------------------ configuration

    @property
    def vnodes(self) -> int:
        """Points per member at weight 1.0."""
        return self._vnodes

    @property
    def balance(self):
        """Bounded-loads factor c, or None when bounding is off."""
        return self._balance if self._balance > 0 else None

    @balance.setter
    def balance(self, value):
        self._balance = _check_balance(value)

    def bound(self):
        """The current load bound ceil(c * (total_load + 1) / n_accepting), or None when unbounded."""
        cdef int64_t b = self._bound()
        return None if b == INT64_MAX else b

    cdef inline int64_t _bound(self) noexcept:
        if self._balance <= 0 or self._n_accepting == 0:
            return INT64_MAX
        return <int64_t>ceil(self._balance * <double>(self._total_load + 1) / <double>self._n_accepting)

    # ------------------------------------------------------------------ membership

    def set_member(self, str member_id, *, double weight=1.0, capacity=0, bint suspect=False,
                   bint draining=False):
        """Add a member or update an existing one. Only a weight change moves keys (and only this member's)."""
        cdef int64_t cap = check_capacity(capacity)
        cdef int32_t count = _vnode_count_for(self._vnodes, weight)
        cdef _RingSlots slots = self._slots
        cdef Py_ssize_t slot
        cdef object existing = slots.slot_of.get(member_id)
        if existing is None:
            slot = slots.add(member_id)
            slots.weight[slot] = weight
            slots.capacity[slot] = cap
            slots.flags[slot] = F_IN_USE | (F_SUSPECT if suspect else 0) | (F_DRAINING if draining else 0)
            if not draining:
                self._n_accepting += 1
            self._insert_points(member_id, slot, count)
            return
        slot = existing
        slots.capacity[slot] = cap
        slots.set_flag(slot, F_SUSPECT, suspect)
        self._set_draining(slot, draining)
        if count != slots.vnode_count[slot]:
            self._remove_points(slot)
            self._insert_points(member_id, slot, count)
        slots.weight[slot] = weight

    def remove_member(self, str member_id):
        """Remove a member; only the keys it owned move (to their next member clockwise)."""
        cdef _RingSlots slots = self._slots
        cdef Py_ssize_t slot = slots.slot(member_id)
        self._remove_points(slot)
        if not (slots.flags[slot] & F_DRAINING):
            self._n_accepting -= 1
            self._total_load -= slots.load[slot]
        slots.release(slot)

    def set_suspect(self, str member_id, bint suspect):
        """Mark a member SUSPECT (skipped while any ALIVE member is eligible) or ALIVE again."""
        self._slots.set_flag(self._slots.slot(member_id), F_SUSPECT, suspect)

    def set_draining(self, str member_id, bint draining):
        """A draining member keeps its points (so its keys come back to it) but takes no new work."""
        self._set_draining(self._slots.slot(member_id), draining)

    def set_capacity(self, str member_id, capacity):
        """Hard limit on in-flight requests (0 = unlimited)."""
        self._slots.capacity[self._slots.slot(member_id)] = check_capacity(capacity)

    def set_load(self, str member_id, active):
        """Set a member's in-flight request count."""
        cdef _RingSlots slots = self._slots
        cdef Py_ssize_t slot = slots.slot(member_id)
        cdef int64_t value = check_load(active)
        if not (slots.flags[slot] & F_DRAINING):
            self._total_load += value - slots.load[slot]
        slots.load[slot] = value

    def add_load(self, str member_id, delta):
        """Add `delta` (may be negative) to a member's load and return the new load; it may not go below 0."""
        cdef _RingSlots slots = self._slots
        cdef Py_ssize_t slot = slots.slot(member_id)
        cdef int64_t before = slots.load[slot]
        cdef int64_t after = slots.add_load(slot, delta)
        if not (slots.flags[slot] & F_DRAINING):
            self._total_load += after - before
        return after

    def load(self, str member_id) -> int:
        """A member's in-flight request count."""
        return self._slots.load[self._slots.slot(member_id)]

    def total_load(self) -> int:
        """Sum of the loads of members accepting new work (the bound's numerator)."""
        return self._total_load

    def weight(self, str member_id) -> float:
        return self._slots.weight[self._slots.slot(member_id)]

    def capacity(self, str member_id) -> int:
        return self._slots.capacity[self._slots.slot(member_id)]

    def is_suspect(self, str member_id) -> bool:
        return bool(self._slots.flags[self._slots.slot(member_id)] & F_SUSPECT)

    def is_draining(self, str member_id) -> bool:
        return bool(self._slots.flags[self._slots.slot(member_id)] & F_DRAINING)

    def vnode_count(self, str member_id) -> int:
        """Number of points the member holds on the ring."""
        return self._slots.vnode_count[self._slots.slot(member_id)]

    def members(self) -> list:
        """Member ids, sorted."""
        return sorted(self._slots.slot_of)

    @property
    def point_count(self) -> int:
        return self._n_points

    def points(self) -> list:
        """All (point_hash, member_id) pairs in ring order (for inspection and tests; allocates)."""
        cdef list names = self._slots.names
        return [(self._points[i], names[self._point_slot[i]]) for i in range(self._n_points)]

    def __len__(self):
        return self._slots.n_members

    def __contains__(self, member_id):
        return member_id in self._slots.slot_of

    # ------------------------------------------------------------------ lookups

    @cython.binding(False)
    def owner(self, key_hash):
        """The member owning `key_hash` on the bare ring (ignores loads, flags and capacity); None if empty."""
        cdef uint64_t h = _as_key(key_hash)
        if self._n_points == 0:
            return None
        cdef Py_ssize_t i = self._lower_bound(h)
        return self._slots.names[self._point_slot[i]]

    @cython.binding(False)
    def lookup(self, key_hash, exclude=()):
        """The first eligible member clockwise from `key_hash`, or None.

        Eligible: not in `exclude`, not draining, load under the bound and under its capacity. SUSPECT members
        are taken only when no ALIVE member is routable at all (ignoring the bound); if an ALIVE member is
        routable but over the bound, None is returned so the caller's fallback (least connections) picks it.
        """
        cdef uint64_t h = _as_key(key_hash)
        cdef _RingSlots slots = self._slots
        cdef bint has_exclude = False
        cdef Py_ssize_t first
        cdef int32_t slot
        cdef int64_t load, cap
        if self._n_points == 0:
            return None
        if not exclude:
            # Fast path, the common case: the owner itself is ALIVE, accepting, under capacity and the bound.
            first = self._lower_bound(h)
            slot = self._point_slot[first]
            load = slots.load[slot]
            cap = slots.capacity[slot]
            if slots.flags[slot] == F_IN_USE and (cap == 0 or load < cap) and load < self._bound():
                return slots.names[slot]
        slots.next_epoch()
        if exclude:
            slots.mark_excluded(exclude)
            has_exclude = True
        slot = self._walk(h, has_exclude)
        if slot < 0:
            return None
        return slots.names[slot]

    @cython.binding(False)
    def preference_list(self, key_hash, Py_ssize_t n, exclude=()):
        """Up to `n` distinct members in ring order from `key_hash`, skipping excluded and draining ones.

        Loads, capacity and suspicion are ignored: this is the failover/hedging order, not a routing decision.
        """
        cdef uint64_t h = _as_key(key_hash)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        cdef list result = []
        if n == 0 or self._n_points == 0:
            return result
        cdef _RingSlots slots = self._slots
        slots.next_epoch()
        if exclude:
            slots.mark_excluded(exclude)
        cdef uint32_t epoch = slots.epoch
        cdef uint32_t* seen_at = slots.seen
        cdef const uint32_t* excluded_at = slots.excluded
        cdef const uint8_t* flags = slots.flags
        cdef Py_ssize_t n_members = slots.n_members
        cdef Py_ssize_t i = self._lower_bound(h)
        cdef Py_ssize_t remaining = self._n_points, seen = 0
        cdef int32_t slot
        while remaining > 0:  # at most one lap of the ring
            slot = self._point_slot[i]
            if seen_at[slot] != epoch:
                seen_at[slot] = epoch
                seen += 1
                if excluded_at[slot] != epoch and not (flags[slot] & F_DRAINING):
                    result.append(slots.names[slot])
                    if len(result) == n:
                        break
                if seen == n_members:
                    break
            remaining -= 1
            i += 1
            if i == self._n_points:
                i = 0
        return result

    # ------------------------------------------------------------------ internals

    cdef inline Py_ssize_t _lower_bound(self, uint64_t h) noexcept:
        """Index of the first point >= h, wrapping to 0 past the last point (clockwise successor).

        Branch-free halving (the compiler emits a conditional move): key hashes are random, so a branchy binary
        search mispredicts about half its steps, which costs more than the whole walk.
        """
        cdef const uint64_t* base = self._points
        cdef Py_ssize_t n = self._n_points, half
        while n > 1:
            half = n >> 1
            base = base + half if base[half] < h else base
            n -= half
        cdef Py_ssize_t pos = (base - self._points) + (base[0] < h)
        return 0 if pos == self._n_points else pos

    cdef int32_t _walk(self, uint64_t h, bint has_exclude) noexcept:
        if self._n_points == 0:
            return -1
        cdef _RingSlots slots = self._slots
        # Locals, not attribute reads: the loop writes seen_at[], which the compiler cannot prove leaves the
        # array pointers held by the slot table unchanged.
        cdef uint32_t epoch = slots.epoch
        cdef uint32_t* seen_at = slots.seen
        cdef const uint32_t* excluded_at = slots.excluded
        cdef const uint8_t* flags_at = slots.flags
        cdef const int64_t* load_at = slots.load
        cdef const int64_t* capacity_at = slots.capacity
        cdef Py_ssize_t n_members = slots.n_members
        cdef int64_t bound = self._bound()
        cdef Py_ssize_t i = self._lower_bound(h)
        cdef Py_ssize_t remaining = self._n_points, seen = 0
        cdef int32_t slot, suspect_fallback = -1
        cdef uint8_t flags
        cdef int64_t load, cap
        while remaining > 0:  # at most one lap of the ring
            slot = self._point_slot[i]
            if seen_at[slot] != epoch:
                seen_at[slot] = epoch
                seen += 1
                flags = flags_at[slot]
                load = load_at[slot]
                cap = capacity_at[slot]
                if (not (flags & F_DRAINING) and load < bound and (cap == 0 or load < cap)
                        and not (has_exclude and excluded_at[slot] == epoch)):
                    if not (flags & F_SUSPECT):
                        return slot
                    if suspect_fallback < 0:
                        suspect_fallback = slot
                if seen == n_members:
                    break
            remaining -= 1
            i += 1
            if i == self._n_points:
                i = 0
        if suspect_fallback >= 0 and not self._any_alive_routable(has_exclude):
            return suspect_fallback
        return -1

    cdef bint _any_alive_routable(self, bint has_exclude) noexcept:
        cdef _RingSlots slots = self._slots
        cdef Py_ssize_t s
        cdef uint8_t flags
        for s in range(slots.n_slots):
            flags = slots.flags[s]
            if (flags & F_IN_USE) and not (flags & (F_SUSPECT | F_DRAINING)):
                if has_exclude and slots.excluded[s] == slots.epoch:
                    continue
                if slots.capacity[s] == 0 or slots.load[s] < slots.capacity[s]:
                    return True
        return False

    cdef void _set_draining(self, Py_ssize_t slot, bint draining) noexcept:
        cdef _RingSlots slots = self._slots
        cdef bint was = (slots.flags[slot] & F_DRAINING) != 0
        if was == draining:
            return
        slots.set_flag(slot, F_DRAINING, draining)
        if draining:
            self._n_accepting -= 1
            self._total_load -= slots.load[slot]
        else:
            self._n_accepting += 1
            self._total_load += slots.load[slot]

    cdef int _insert_points(self, str member_id, Py_ssize_t slot, int32_t count) except -1:
        """Merge the member's `count` points into the sorted arrays in O(total points)."""
        cdef uint64_t mask = self._point_mask
        cdef list names = self._slots.names
        cdef list fresh = sorted([<uint64_t>(_hash64(f"{member_id}#{i}", signed=False)[0]) & mask
                                  for i in range(count)])
        cdef Py_ssize_t total = self._n_points + count
        cdef uint64_t* new_points = <uint64_t*>malloc(max(total, 1) * sizeof(uint64_t))
        cdef int32_t* new_slots = <int32_t*>malloc(max(total, 1) * sizeof(int32_t))
        if new_points == NULL or new_slots == NULL:
            free(new_points)
            free(new_slots)
            raise MemoryError()
        cdef Py_ssize_t a = 0, b = 0, out = 0
        cdef uint64_t ha, hb
        cdef int32_t sa
        cdef bint take_old
        while a < self._n_points or b < count:
            if b == count:
                take_old = True
            elif a == self._n_points:
                take_old = False
            else:
                ha = self._points[a]
                hb = fresh[b]
                if ha != hb:
                    take_old = ha < hb
                else:
                    # Collision: order by member id so the result does not depend on insertion order.
                    sa = self._point_slot[a]
                    take_old = sa == slot or names[sa] < member_id
            if take_old:
                new_points[out] = self._points[a]
                new_slots[out] = self._point_slot[a]
                a += 1
            else:
                new_points[out] = fresh[b]
                new_slots[out] = <int32_t>slot
                b += 1
            out += 1
        free(self._points)
        free(self._point_slot)
        self._points = new_points
        self._point_slot = new_slots
        self._n_points = total
        self._slots.vnode_count[slot] = count
        return 0

    cdef void _remove_points(self, Py_ssize_t slot) noexcept:
        cdef Py_ssize_t i, out = 0
        for i in range(self._n_points):
            if self._point_slot[i] != slot:
                self._points[out] = self._points[i]
                self._point_slot[out] = self._point_slot[i]
                out += 1
        self._n_points = out
        self._slots.vnode_count[slot] = 0


cdef double _check_balance(object balance) except -1.0:
    if balance is None:
        return 0.0
    try:
        value = float(balance)
    except (TypeError, ValueError):
        raise TypeError(f"balance must be a number or None, got {balance!r}") from None
    if value == 0.0:
        return 0.0
    if not isfinite(value) or value < 1.0:
        raise ValueError(f"balance must be >= 1.0 (or None/0 for unbounded), got {balance!r}")
    return value


cdef int32_t _vnode_count_for(int vnodes, double weight) except -1:
    check_weight(weight)
    cdef double scaled = vnodes * weight
    if scaled > MAX_POINTS_PER_MEMBER:
        raise ValueError(f"vnodes * weight = {scaled:g} exceeds {MAX_POINTS_PER_MEMBER} points per member")
    cdef int32_t count = <int32_t>(scaled + 0.5)
    return count if count >= 1 else 1
