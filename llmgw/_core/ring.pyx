# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Consistent-hash ring with bounded loads (sans-IO, no clock, no sockets).

Points live in two parallel C arrays sorted by (hash, member id), so a lookup is a C binary search followed by a
clockwise walk over C arrays. Per-member state that the walk consults (in-flight load, hard capacity, suspect and
draining flags) is held in C arrays indexed by a member *slot*, so the walk touches no Python object.

Bounded loads follow Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads" (2018): with
balance factor c, a member whose load is >= ceil(c * (total_load + 1) / n) is skipped, where n counts members
accepting new work (not draining) and total_load sums their loads.
"""

from libc.math cimport ceil, isfinite
from libc.stdint cimport INT64_MAX, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memset

cimport cython

import mmh3

DEFAULT_VNODES = 160
DEFAULT_BALANCE = 1.25
DEFAULT_PREFIX_CHARS = 64
# A member's point count is vnodes * weight; past this a typo in a weight would eat memory instead of failing.
MAX_POINTS_PER_MEMBER = 1 << 20

cdef uint8_t F_IN_USE = 1
cdef uint8_t F_SUSPECT = 2
cdef uint8_t F_DRAINING = 4

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


cdef inline int _check_exclude(object exclude) except -1:
    # A bare string is a collection of characters: excluding "r1" would silently exclude members "r" and "1".
    if isinstance(exclude, (str, bytes)):
        raise TypeError("exclude must be a collection of member ids, not a single string")
    return 0


cdef class HashRing:
    """Consistent-hash ring of members with virtual nodes, weights, bounded loads and hard capacities.

    `vnodes` points per member at weight 1.0 (a member gets max(1, round(vnodes * weight)) points).
    `balance` is the bounded-loads factor c (>= 1.0); None or 0 turns bounding off.
    `point_bits` (1..64) truncates point hashes; only tests use fewer than 64 bits, to force point collisions.
    """

    cdef uint64_t* _points
    cdef int32_t* _point_slot
    cdef Py_ssize_t _n_points

    cdef int64_t* _load
    cdef int64_t* _capacity
    cdef double* _weight
    cdef int32_t* _vnode_count
    cdef uint8_t* _flags
    cdef uint32_t* _seen
    cdef uint32_t* _excluded
    cdef uint32_t _epoch
    cdef Py_ssize_t _n_slots
    cdef Py_ssize_t _cap_slots

    cdef list _names
    cdef dict _slot_of
    cdef list _free_slots
    cdef Py_ssize_t _n_members
    cdef Py_ssize_t _n_accepting
    cdef int64_t _total_load

    cdef double _balance
    cdef int _vnodes
    cdef uint64_t _point_mask

    def __cinit__(self):
        self._points = NULL
        self._point_slot = NULL
        self._load = NULL
        self._capacity = NULL
        self._weight = NULL
        self._vnode_count = NULL
        self._flags = NULL
        self._seen = NULL
        self._excluded = NULL
        self._n_points = 0
        self._n_slots = 0
        self._cap_slots = 0
        self._epoch = 0

    def __dealloc__(self):
        free(self._points)
        free(self._point_slot)
        free(self._load)
        free(self._capacity)
        free(self._weight)
        free(self._vnode_count)
        free(self._flags)
        free(self._seen)
        free(self._excluded)

    def __init__(self, vnodes=DEFAULT_VNODES, balance=DEFAULT_BALANCE, *, point_bits=64):
        if not isinstance(vnodes, int) or isinstance(vnodes, bool) or not 1 <= vnodes <= MAX_POINTS_PER_MEMBER:
            raise ValueError(f"vnodes must be an int in [1, {MAX_POINTS_PER_MEMBER}], got {vnodes!r}")
        if not isinstance(point_bits, int) or isinstance(point_bits, bool) or not 1 <= point_bits <= 64:
            raise ValueError(f"point_bits must be an int in [1, 64], got {point_bits!r}")
        self._vnodes = vnodes
        self._balance = _check_balance(balance)
        self._point_mask = <uint64_t>0xFFFFFFFFFFFFFFFF if point_bits == 64 else ((<uint64_t>1 << point_bits) - 1)
        self._names = []
        self._slot_of = {}
        self._free_slots = []
        self._n_members = 0
        self._n_accepting = 0
        self._total_load = 0

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
        cdef int64_t cap = _check_capacity(capacity)
        cdef int32_t count = _vnode_count_for(self._vnodes, weight)
        cdef Py_ssize_t slot
        cdef object existing = self._slot_of.get(member_id)
        if existing is None:
            slot = self._new_slot(member_id)
            self._weight[slot] = weight
            self._capacity[slot] = cap
            self._flags[slot] = F_IN_USE | (F_SUSPECT if suspect else 0) | (F_DRAINING if draining else 0)
            self._n_members += 1
            if not draining:
                self._n_accepting += 1
            self._insert_points(member_id, slot, count)
            return
        slot = existing
        self._capacity[slot] = cap
        self._set_flag(slot, F_SUSPECT, suspect)
        self._set_draining(slot, draining)
        if count != self._vnode_count[slot]:
            self._remove_points(slot)
            self._insert_points(member_id, slot, count)
        self._weight[slot] = weight

    def remove_member(self, str member_id):
        """Remove a member; only the keys it owned move (to their next member clockwise)."""
        cdef Py_ssize_t slot = self._slot(member_id)
        self._remove_points(slot)
        if not (self._flags[slot] & F_DRAINING):
            self._n_accepting -= 1
            self._total_load -= self._load[slot]
        self._n_members -= 1
        self._flags[slot] = 0
        self._load[slot] = 0
        self._names[slot] = None
        del self._slot_of[member_id]
        self._free_slots.append(slot)

    def set_suspect(self, str member_id, bint suspect):
        """Mark a member SUSPECT (skipped while any ALIVE member is eligible) or ALIVE again."""
        self._set_flag(self._slot(member_id), F_SUSPECT, suspect)

    def set_draining(self, str member_id, bint draining):
        """A draining member keeps its points (so its keys come back to it) but takes no new work."""
        self._set_draining(self._slot(member_id), draining)

    def set_capacity(self, str member_id, capacity):
        """Hard limit on in-flight requests (0 = unlimited)."""
        self._capacity[self._slot(member_id)] = _check_capacity(capacity)

    def set_load(self, str member_id, active):
        """Set a member's in-flight request count."""
        cdef Py_ssize_t slot = self._slot(member_id)
        cdef int64_t value = _check_load(active)
        if not (self._flags[slot] & F_DRAINING):
            self._total_load += value - self._load[slot]
        self._load[slot] = value

    def add_load(self, str member_id, delta):
        """Add `delta` (may be negative) to a member's load and return the new load; it may not go below 0."""
        cdef Py_ssize_t slot = self._slot(member_id)
        cdef int64_t d = delta
        if self._load[slot] + d < 0:
            raise ValueError(f"load of {member_id!r} would become {self._load[slot] + d} (< 0)")
        if not (self._flags[slot] & F_DRAINING):
            self._total_load += d
        self._load[slot] += d
        return self._load[slot]

    def load(self, str member_id) -> int:
        """A member's in-flight request count."""
        return self._load[self._slot(member_id)]

    def total_load(self) -> int:
        """Sum of the loads of members accepting new work (the bound's numerator)."""
        return self._total_load

    def weight(self, str member_id) -> float:
        return self._weight[self._slot(member_id)]

    def capacity(self, str member_id) -> int:
        return self._capacity[self._slot(member_id)]

    def is_suspect(self, str member_id) -> bool:
        return bool(self._flags[self._slot(member_id)] & F_SUSPECT)

    def is_draining(self, str member_id) -> bool:
        return bool(self._flags[self._slot(member_id)] & F_DRAINING)

    def vnode_count(self, str member_id) -> int:
        """Number of points the member holds on the ring."""
        return self._vnode_count[self._slot(member_id)]

    def members(self) -> list:
        """Member ids, sorted."""
        return sorted(self._slot_of)

    @property
    def point_count(self) -> int:
        return self._n_points

    def points(self) -> list:
        """All (point_hash, member_id) pairs in ring order (for inspection and tests; allocates)."""
        return [(self._points[i], self._names[self._point_slot[i]]) for i in range(self._n_points)]

    def __len__(self):
        return self._n_members

    def __contains__(self, member_id):
        return member_id in self._slot_of

    # ------------------------------------------------------------------ lookups

    @cython.binding(False)
    def owner(self, key_hash):
        """The member owning `key_hash` on the bare ring (ignores loads, flags and capacity); None if empty."""
        cdef uint64_t h = _as_key(key_hash)
        if self._n_points == 0:
            return None
        cdef Py_ssize_t i = self._lower_bound(h)
        return self._names[self._point_slot[i]]

    @cython.binding(False)
    def lookup(self, key_hash, exclude=()):
        """The first eligible member clockwise from `key_hash`, or None.

        Eligible: not in `exclude`, not draining, load under the bound and under its capacity. SUSPECT members
        are taken only when no ALIVE member is routable at all (ignoring the bound); if an ALIVE member is
        routable but over the bound, None is returned so the caller's fallback (least connections) picks it.
        """
        cdef uint64_t h = _as_key(key_hash)
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
            load = self._load[slot]
            cap = self._capacity[slot]
            if self._flags[slot] == F_IN_USE and (cap == 0 or load < cap) and load < self._bound():
                return self._names[slot]
        self._next_epoch()
        if exclude:
            _check_exclude(exclude)
            self._mark_excluded(exclude)
            has_exclude = True
        slot = self._walk(h, has_exclude)
        if slot < 0:
            return None
        return self._names[slot]

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
        self._next_epoch()
        if exclude:
            _check_exclude(exclude)
            self._mark_excluded(exclude)
        cdef uint32_t epoch = self._epoch
        cdef Py_ssize_t i = self._lower_bound(h)
        cdef Py_ssize_t remaining = self._n_points, seen = 0
        cdef int32_t slot
        while remaining > 0:  # at most one lap of the ring
            slot = self._point_slot[i]
            if self._seen[slot] != epoch:
                self._seen[slot] = epoch
                seen += 1
                if self._excluded[slot] != epoch and not (self._flags[slot] & F_DRAINING):
                    result.append(self._names[slot])
                    if len(result) == n:
                        break
                if seen == self._n_members:
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
        cdef uint32_t epoch = self._epoch
        cdef int64_t bound = self._bound()
        cdef Py_ssize_t i = self._lower_bound(h)
        cdef Py_ssize_t remaining = self._n_points, seen = 0
        cdef int32_t slot, suspect_fallback = -1
        cdef uint8_t flags
        cdef int64_t load, cap
        while remaining > 0:  # at most one lap of the ring
            slot = self._point_slot[i]
            if self._seen[slot] != epoch:
                self._seen[slot] = epoch
                seen += 1
                flags = self._flags[slot]
                load = self._load[slot]
                cap = self._capacity[slot]
                if (not (flags & F_DRAINING) and load < bound and (cap == 0 or load < cap)
                        and not (has_exclude and self._excluded[slot] == epoch)):
                    if not (flags & F_SUSPECT):
                        return slot
                    if suspect_fallback < 0:
                        suspect_fallback = slot
                if seen == self._n_members:
                    break
            remaining -= 1
            i += 1
            if i == self._n_points:
                i = 0
        if suspect_fallback >= 0 and not self._any_alive_routable(has_exclude):
            return suspect_fallback
        return -1

    cdef bint _any_alive_routable(self, bint has_exclude) noexcept:
        cdef Py_ssize_t s
        cdef uint8_t flags
        for s in range(self._n_slots):
            flags = self._flags[s]
            if (flags & F_IN_USE) and not (flags & (F_SUSPECT | F_DRAINING)):
                if has_exclude and self._excluded[s] == self._epoch:
                    continue
                if self._capacity[s] == 0 or self._load[s] < self._capacity[s]:
                    return True
        return False

    cdef inline void _next_epoch(self) noexcept:
        self._epoch += 1
        if self._epoch == 0:
            # Wrapped after 2**32 calls: stale marks could equal the new epoch, so clear them.
            if self._cap_slots:
                memset(self._seen, 0, self._cap_slots * sizeof(uint32_t))
                memset(self._excluded, 0, self._cap_slots * sizeof(uint32_t))
            self._epoch = 1

    cdef int _mark_excluded(self, object exclude) except -1:
        cdef object slot
        cdef dict slot_of = self._slot_of
        for member_id in exclude:
            slot = slot_of.get(member_id)
            if slot is not None:
                self._excluded[<Py_ssize_t>slot] = self._epoch
        return 0

    cdef Py_ssize_t _slot(self, str member_id) except -1:
        slot = self._slot_of.get(member_id)
        if slot is None:
            raise KeyError(f"unknown member {member_id!r}")
        return slot

    cdef void _set_flag(self, Py_ssize_t slot, uint8_t flag, bint on) noexcept:
        if on:
            self._flags[slot] |= flag
        else:
            self._flags[slot] &= ~flag

    cdef void _set_draining(self, Py_ssize_t slot, bint draining) noexcept:
        cdef bint was = (self._flags[slot] & F_DRAINING) != 0
        if was == draining:
            return
        self._set_flag(slot, F_DRAINING, draining)
        if draining:
            self._n_accepting -= 1
            self._total_load -= self._load[slot]
        else:
            self._n_accepting += 1
            self._total_load += self._load[slot]

    cdef Py_ssize_t _new_slot(self, str member_id) except -1:
        cdef Py_ssize_t slot
        if self._free_slots:
            slot = self._free_slots.pop()
            self._names[slot] = member_id
        else:
            if self._n_slots == self._cap_slots:
                self._grow_slots(max(8, self._cap_slots * 2))
            slot = self._n_slots
            self._n_slots += 1
            self._names.append(member_id)
        self._slot_of[member_id] = slot
        self._load[slot] = 0
        self._capacity[slot] = 0
        self._weight[slot] = 1.0
        self._vnode_count[slot] = 0
        self._flags[slot] = 0
        self._seen[slot] = 0
        self._excluded[slot] = 0
        return slot

    cdef int _grow_slots(self, Py_ssize_t new_cap) except -1:
        self._load = <int64_t*>_grow(self._load, new_cap * sizeof(int64_t))
        self._capacity = <int64_t*>_grow(self._capacity, new_cap * sizeof(int64_t))
        self._weight = <double*>_grow(self._weight, new_cap * sizeof(double))
        self._vnode_count = <int32_t*>_grow(self._vnode_count, new_cap * sizeof(int32_t))
        self._flags = <uint8_t*>_grow(self._flags, new_cap * sizeof(uint8_t))
        self._seen = <uint32_t*>_grow(self._seen, new_cap * sizeof(uint32_t))
        self._excluded = <uint32_t*>_grow(self._excluded, new_cap * sizeof(uint32_t))
        self._cap_slots = new_cap
        return 0

    cdef int _insert_points(self, str member_id, Py_ssize_t slot, int32_t count) except -1:
        """Merge the member's `count` points into the sorted arrays in O(total points)."""
        cdef uint64_t mask = self._point_mask
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
                    take_old = sa == slot or self._names[sa] < member_id
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
        self._vnode_count[slot] = count
        return 0

    cdef void _remove_points(self, Py_ssize_t slot) noexcept:
        cdef Py_ssize_t i, out = 0
        for i in range(self._n_points):
            if self._point_slot[i] != slot:
                self._points[out] = self._points[i]
                self._point_slot[out] = self._point_slot[i]
                out += 1
        self._n_points = out
        self._vnode_count[slot] = 0


cdef void* _grow(void* ptr, size_t size) except NULL:
    cdef void* grown = realloc(ptr, size)
    if grown == NULL:
        raise MemoryError()
    return grown


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


cdef int64_t _check_capacity(object capacity) except -1:
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise TypeError(f"capacity must be an int, got {capacity!r}")
    if capacity < 0 or capacity > INT64_MAX:
        raise ValueError(f"capacity must be >= 0 (0 = unlimited), got {capacity}")
    return capacity


cdef int64_t _check_load(object active) except -1:
    if not isinstance(active, int) or isinstance(active, bool):
        raise TypeError(f"load must be an int, got {active!r}")
    if active < 0 or active > INT64_MAX // 2:
        raise ValueError(f"load must be >= 0, got {active}")
    return active


cdef int32_t _vnode_count_for(int vnodes, double weight) except -1:
    if not isfinite(weight) or weight <= 0.0:
        raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
    cdef double scaled = vnodes * weight
    if scaled > MAX_POINTS_PER_MEMBER:
        raise ValueError(f"vnodes * weight = {scaled:g} exceeds {MAX_POINTS_PER_MEMBER} points per member")
    cdef int32_t count = <int32_t>(scaled + 0.5)
    return count if count >= 1 else 1
