# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Retransmit-limited dissemination queue (memberlist queue.go).

One pending rumour per member (a newer rumour about a member replaces the older one). Rumours are piggybacked
least-sent first, newest first among equals; each is sent ``limit * budget_mult`` times and then dropped, where the
state machine sets limit = lambda * ceil(log10(N + 1)).
"""


cdef class Broadcast:
    pass


def _priority(Broadcast b):
    return (b.transmits, -b.order)


cdef class BroadcastQueue:
    def __init__(self):
        self._items = {}
        self._order = 0

    def __len__(self):
        return len(self._items)

    def __bool__(self):
        return bool(self._items)

    cpdef void push(self, Update update, int budget_mult=1):
        cdef Broadcast b = Broadcast.__new__(Broadcast)
        b.update = update
        b.transmits = 0
        b.budget_mult = budget_mult if budget_mult > 0 else 1
        self._order += 1
        b.order = self._order
        self._items[update.member_id] = b

    cpdef list ordered(self):
        """Pending broadcasts in send order."""
        cdef list queue = list(self._items.values())
        if len(queue) > 1:
            queue.sort(key=_priority)
        return queue

    cpdef void mark_sent(self, list ordered, Py_ssize_t count, int limit):
        """The first count entries of ordered went out once more; retire those that reached their budget."""
        cdef Py_ssize_t i
        cdef Broadcast b
        for i in range(count):
            b = ordered[i]
            b.transmits += 1
            if b.transmits >= limit * b.budget_mult and self._items.get(b.update.member_id) is b:
                del self._items[b.update.member_id]

    cpdef void clear(self):
        self._items.clear()
