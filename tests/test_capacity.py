"""Capacity (llmgw.gateway.capacity): taking and giving back slots, exclusions, busy marks, breaker probe slots;
and routing drains, which only tell their owner when a replica may take requests again."""

from __future__ import annotations

from inprocess import FakeMember
from llmgw.gateway.capacity import Capacity, RoutingDrains, Ticket
from llmgw.gateway.membership import MembershipView
from llmgw.policy import BreakerBoard, BreakerConfig
from llmgw.policy.breaker import FAILURE_ERROR
from llmgw.routing import Router, make_policy


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def capacity_over(*replicas: tuple[str, int], breakers=None, clock=None, policy="least_connections"):
    router = Router(seed=3)
    view = MembershipView(router)
    for rid, cap in replicas:
        view.apply(FakeMember(rid, f"10.0.0.1:{len(view.addresses) + 1}", max_capacity=cap), "alive")
    clock = clock or Clock()
    cap = Capacity(view, make_policy(policy, router), breakers, clock=clock, loop_time=clock)
    cap.replicas_changed()
    return cap, clock


def test_slots_are_taken_up_to_capacity_and_given_back():
    cap, _ = capacity_over(("a", 1), ("b", 2))
    tickets = [Ticket("p", set()) for _ in range(4)]
    assert [cap.try_acquire(t) for t in tickets] == [True, True, True, False]
    assert cap.in_flight == {"a": 1, "b": 2}
    assert {t.replica_id for t in tickets[:3]} == {"a", "b"} and tickets[3].replica_id is None
    holder = next(t for t in tickets if t.replica_id == "a")
    address = holder.address
    assert cap.give_back(holder) is True and holder.replica_id is None
    assert cap.give_back(holder) is False  # nothing held: nothing returned twice
    assert cap.in_flight == {"b": 2}
    again = Ticket("p", set())
    assert cap.try_acquire(again) and (again.replica_id, again.address) == ("a", address)


def test_a_ticket_never_returns_to_a_replica_it_excludes_and_sources_exclude_for_everyone():
    cap, _ = capacity_over(("a", 4), ("b", 4))
    tried = Ticket("p", {"a"})
    assert cap.try_acquire(tried) and tried.replica_id == "b"
    drains = RoutingDrains()
    cap.exclusion_sources.append(drains.excluded)
    drains.drain("b")
    assert cap.routable() == {"a"} and cap.excluded() == {"b"}
    assert not cap.try_acquire(Ticket("p", {"a"}))
    other = Ticket("q", set())
    assert cap.try_acquire(other) and other.replica_id == "a"


def test_busy_marks_expire_on_the_loop_clock():
    cap, clock = capacity_over(("a", 4))
    cap.mark_busy("a", until=clock.now + 0.25)
    assert not cap.try_acquire(Ticket("p", set()))
    clock.now += 0.25
    assert cap.try_acquire(Ticket("p", set()))


def test_open_breaker_excludes_and_half_open_gives_one_probe_slot_freed_without_a_verdict():
    clock = Clock()
    board = BreakerBoard(BreakerConfig(window_size=2, min_window_outcomes=2, consecutive_failures=2,
                                       cooldown_s=1.0, slow_detection=False), clock=clock)
    cap, _ = capacity_over(("a", 4), ("b", 4), breakers=board, clock=clock)
    for _ in range(2):
        ticket = Ticket("p", {"b"})
        assert cap.try_acquire(ticket) and ticket.replica_id == "a"
        cap.report_failure(ticket, FAILURE_ERROR)
        cap.report_failure(ticket, FAILURE_ERROR)  # reported once per ticket, whatever the caller does
        cap.give_back(ticket)
    assert cap.breaker_states() == {"a": "open", "b": "closed"}
    assert cap.routable() == {"b"} and not cap.try_acquire(Ticket("p", {"b"}))
    clock.now += 1.0  # cooldown over: one probe may go
    probe = Ticket("p", {"b"})
    assert cap.try_acquire(probe) and probe.replica_id == "a" and probe.probe
    assert not cap.try_acquire(Ticket("p", {"b"}))  # the only probe slot is taken
    cap.give_back(probe)  # cancelled before any verdict: the slot is free again
    second = Ticket("p", {"b"})
    assert cap.try_acquire(second) and second.probe
    cap.report_success(second, ttft_s=0.01, mean_itl_s=None)
    cap.give_back(second)
    assert cap.breaker_states()["a"] == "closed"


def test_replicas_that_leave_are_forgotten_by_the_breakers():
    clock = Clock()
    board = BreakerBoard(BreakerConfig(consecutive_failures=1, slow_detection=False), clock=clock)
    cap, _ = capacity_over(("a", 4), ("b", 4), breakers=board, clock=clock)
    assert cap.breaker_states() == {"a": "closed", "b": "closed"}
    assert cap.view.apply(FakeMember("b", "10.0.0.1:2", state="dead"), "dead") == ["10.0.0.1:2"]
    cap.replicas_changed()
    assert cap.breaker_states() == {"a": "closed"} and cap.routable() == {"a"}


def test_undrain_tells_the_owner_drain_does_not():
    told = []
    drains = RoutingDrains(on_undrain=lambda: told.append(True))
    drains.drain("a")
    drains.undrain("b")  # not drained: nothing changes
    assert told == [] and drains.excluded() == {"a"}
    drains.undrain("a")
    assert told == [True] and drains.excluded() == set()


def test_the_gateway_drives_membership_into_capacity_admission_and_the_transport():
    """A joining replica frees capacity for a queued request; a departed one's connection is dropped."""
    import asyncio

    from replica_fakes import answer, fake_gateway, healthy

    from llmgw.gateway import InferenceRequest

    async def scenario():
        async def collect(gateway, prompt):
            return [e.index async for e in gateway.infer(InferenceRequest(prompt=prompt, max_tokens=2))]

        def slow(resume, max_tokens):  # holds its only slot for 0.3 s
            return [0.3, *answer(resume, max_tokens)]

        gateway, transport = await fake_gateway({"a": slow}, capacity=1)
        first = asyncio.ensure_future(collect(gateway, "one"))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(collect(gateway, "two"))
        await asyncio.sleep(0.02)
        assert gateway.queued == 1
        transport.scripts["b"] = healthy()
        gateway.membership.set(FakeMember("b", "fake:b", max_capacity=1), "joined")
        assert await asyncio.wait_for(second, 1.0) == [0, 1]  # admitted on b without waiting for a
        assert ("b", 0) in transport.opened and not first.done()
        assert await asyncio.wait_for(first, 2.0) == [0, 1]
        gateway.membership.set(FakeMember("b", "fake:b", state="dead"), "updated")
        await asyncio.sleep(0.02)  # the update crosses to the loop
        assert transport.forgotten == ["fake:b"] and gateway.routable() == {"a"}
        await gateway.stop()
        assert transport.closed

    asyncio.run(asyncio.wait_for(scenario(), 10))
