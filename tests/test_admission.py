"""Admission: strict FIFO, bounded queue, no credit leak (core with hypothesis, asyncio shell with real tasks)."""

import asyncio

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from llmgw.gateway.admission import Admission, AdmissionQueue, Outcome, QueueFull, QueueTimeout


class Slots:
    """A pool of interchangeable capacity units, like a set of replicas with room."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    def try_acquire(self, waiter) -> bool:
        if self.used < self.capacity:
            self.used += 1
            return True
        return False


def test_admits_directly_when_nobody_waits():
    q = AdmissionQueue(max_waiters=2)
    slots = Slots(1)
    assert q.submit("a", 10.0, slots.try_acquire) is Outcome.ADMITTED
    assert q.submit("b", 10.0, slots.try_acquire) is Outcome.QUEUED
    assert q.submit("c", 10.0, slots.try_acquire) is Outcome.QUEUED
    assert q.submit("d", 10.0, slots.try_acquire) is Outcome.REJECTED
    assert q.waiters() == ["b", "c"]


def test_arrival_never_overtakes_a_waiter_even_when_capacity_is_free():
    q = AdmissionQueue(max_waiters=5)
    slots = Slots(0)
    assert q.submit("a", 10.0, slots.try_acquire) is Outcome.QUEUED
    slots.capacity = 1  # capacity appears, but nobody has pumped yet
    assert q.submit("b", 10.0, slots.try_acquire) is Outcome.QUEUED
    assert slots.used == 0
    assert q.pump(slots.try_acquire) == ["a"]
    assert q.waiters() == ["b"]


def test_release_with_nobody_waiting_leaves_no_credit():
    q = AdmissionQueue(max_waiters=5)
    slots = Slots(1)
    for _ in range(10):  # ten "completions" while the queue is empty
        assert q.pump(slots.try_acquire) == []
    assert slots.used == 0
    assert q.submit("a", 1.0, slots.try_acquire) is Outcome.ADMITTED
    assert q.submit("b", 1.0, slots.try_acquire) is Outcome.QUEUED
    assert q.pump(slots.try_acquire) == []  # no slot was freed: b still waits


def test_front_submission_goes_ahead_of_waiters_and_ignores_the_bound():
    q = AdmissionQueue(max_waiters=1)
    slots = Slots(0)
    q.submit("a", 10.0, slots.try_acquire)
    assert q.submit("resumed", 10.0, slots.try_acquire, front=True) is Outcome.QUEUED
    assert q.waiters() == ["resumed", "a"]


def test_expire_and_cancel():
    q = AdmissionQueue(max_waiters=5)
    slots = Slots(0)
    q.submit("a", 1.0, slots.try_acquire)
    q.submit("b", 2.0, slots.try_acquire)
    q.submit("c", 3.0, slots.try_acquire)
    assert q.next_deadline() == 1.0
    assert q.cancel("b") is True
    assert q.cancel("b") is False
    assert q.expire(1.5) == ["a"]
    assert q.waiters() == ["c"]
    assert q.next_deadline() == 3.0


def test_negative_bound_is_rejected():
    with pytest.raises(ValueError):
        AdmissionQueue(max_waiters=-1)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.floats(0.1, 5.0)),
        st.tuples(st.just("finish"), st.integers(0, 50)),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
        st.tuples(st.just("tick"), st.floats(0.0, 2.0)),
    ),
    max_size=80,
)


@settings(max_examples=examples(300), deadline=None)
@given(capacity=st.integers(0, 4), max_waiters=st.integers(0, 6), script=ops)
def test_fifo_order_bound_and_no_credit_leak(capacity, max_waiters, script):
    """Against a model: admissions happen in arrival order, capacity is never exceeded, and a waiter is never
    left waiting while a slot is free (work conserving) -- which also rules out accumulated credit."""
    q = AdmissionQueue(max_waiters=max_waiters)
    slots = Slots(capacity)
    now = 0.0
    next_id = 0
    running: list[int] = []
    admitted_order: list[int] = []
    arrival_order: list[int] = []
    gone: set[int] = set()  # cancelled or expired before admission

    def admit_hook(w):
        if slots.try_acquire(w):
            running.append(w)
            admitted_order.append(w)
            return True
        return False

    for op, arg in script:
        if op == "arrive":
            w = next_id
            next_id += 1
            arrival_order.append(w)
            waiting_before = len(q)
            outcome = q.submit(w, now + arg, admit_hook)
            if outcome is Outcome.REJECTED:
                assert waiting_before >= max_waiters
                gone.add(w)
            elif outcome is Outcome.ADMITTED:
                assert waiting_before == 0
        elif op == "finish" and running:
            running.pop(arg % len(running))
            slots.used -= 1
            q.pump(admit_hook)
        elif op == "cancel" and len(q):
            victim = q.waiters()[arg % len(q)]
            assert q.cancel(victim)
            gone.add(victim)
        elif op == "tick":
            now += arg
            gone.update(q.expire(now))
        assert slots.used <= capacity
        assert len(q) <= max_waiters
        if len(q):
            assert slots.used == capacity  # nobody waits while a slot is free
    expected = [w for w in arrival_order if w not in gone and w not in q.waiters()]
    assert admitted_order == expected


async def _eventually(predicate, timeout=2.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_async_shell_fifo_timeout_cancel_and_full():
    async def scenario():
        slots = Slots(1)
        released = []

        def release(w):
            released.append(w)
            slots.used -= 1

        adm = Admission(slots.try_acquire, release, max_waiters=2, timeout_s=5.0)
        await adm.acquire("first")
        order = []

        async def wait(name, timeout=None):
            await adm.acquire(name, timeout_s=timeout)
            order.append(name)

        t1 = asyncio.create_task(wait("w1"))
        await _eventually(lambda: len(adm) == 1)
        t2 = asyncio.create_task(wait("w2"))
        await _eventually(lambda: len(adm) == 2)
        with pytest.raises(QueueFull):
            await adm.acquire("w3")
        t2.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t2
        assert adm.queue.waiters() == ["w1"]
        slots.used -= 1  # "first" finishes
        adm.capacity_changed()
        await asyncio.wait_for(t1, 1.0)
        assert order == ["w1"]
        with pytest.raises(QueueTimeout):
            await adm.acquire("late", timeout_s=0.05)
        assert len(adm) == 0
        adm.close()

    asyncio.run(asyncio.wait_for(scenario(), 10.0))


def test_async_shell_waiter_cancelled_right_after_admission_returns_capacity():
    async def scenario():
        slots = Slots(0)
        released = []

        def release(w):
            released.append(w)
            slots.used -= 1

        adm = Admission(slots.try_acquire, release, max_waiters=2, timeout_s=5.0)
        task = asyncio.create_task(adm.acquire("w"))
        await _eventually(lambda: len(adm) == 1)
        slots.capacity = 1
        adm.capacity_changed()  # admits w: its future is resolved...
        task.cancel()  # ...but the task is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await task
        assert released == ["w"]
        assert slots.used == 0
        adm.close()

    asyncio.run(asyncio.wait_for(scenario(), 10.0))
