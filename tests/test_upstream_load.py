"""Server-reported load feeds the picker: running + waiting requests count, and a KV-full server (its cache usage
at or above KV_CACHE_FULL) is passed by while another server has room, then used again once it reports room."""

from __future__ import annotations

import pytest

from llmgw.gateway.capacity import Capacity, Ticket
from llmgw.gateway.membership import MembershipView
from llmgw.gateway.upstreams import UpstreamTable
from llmgw.routing import Router, make_policy
from llmgw.upstream.backends import KV_CACHE_FULL, KV_FULL_EXTRA_LOAD, Backend, ServerLoad
from llmgw.upstream.discovery import Change, UpstreamEvent

A, B = "http://10.0.0.1:8000", "http://10.0.0.2:8000"


class _Gateway:
    """What UpstreamTable drives: the membership view (Gateway.apply_member)."""

    def __init__(self, view: MembershipView) -> None:
        self.view = view

    def apply_member(self, member, state: str) -> None:
        self.view.apply(member, state)


def _routing(policy: str, *, capacity: int = 0):
    router = Router(seed=3)
    view = MembershipView(router)
    table = UpstreamTable()
    table.attach(_Gateway(view))
    capacity_book = Capacity(view, make_policy(policy, router), loop_time=lambda: 0.0)

    def report(url: str, running: int, waiting: int, kv: float | None, change: Change = Change.UPDATED) -> None:
        backend = Backend(base_url=url, models=("m",), models_configured=True, capacity=capacity)
        table.apply([UpstreamEvent(change, backend.with_load(ServerLoad(running, waiting, kv)))])

    report(A, 2, 0, 0.10, Change.ADDED)
    report(B, 2, 0, 0.10, Change.ADDED)
    return router, capacity_book, report


def _pick(capacity_book: Capacity, prompt: str) -> str | None:
    ticket = Ticket(prompt=prompt, exclude=set())
    if not capacity_book.try_acquire(ticket):
        return None
    chosen = ticket.replica_id
    capacity_book.give_back(ticket)  # a look at the choice, not a request: leave the load as reported
    return chosen


def _prompt_routed_to(router: Router, member: str) -> str:
    for n in range(1000):
        prompt = f"conversation opening {n}"
        if router.route(prompt).member == member:
            return prompt
    raise AssertionError(f"no prompt hashes to {member}")


@pytest.mark.parametrize("capacity", [0, 16])
def test_affinity_passes_a_kv_full_server_by_and_returns_when_it_drains(capacity):
    router, capacity_book, report = _routing("affinity", capacity=capacity)
    prompt = _prompt_routed_to(router, A)
    assert _pick(capacity_book, prompt) == A

    report(A, 2, 0, 0.97)  # the same two requests, but its KV cache is full
    assert _pick(capacity_book, prompt) == B
    assert router.route(prompt).reason == "affinity"  # the bounded-load walk moved on to B, not a fallback

    report(A, 1, 0, 0.40)  # drained: its prefix cache is still there, the key goes home
    assert _pick(capacity_book, prompt) == A


def test_least_connections_avoids_a_kv_full_server_with_fewer_requests():
    _, capacity_book, report = _routing("least_connections")
    report(A, 1, 0, KV_CACHE_FULL)  # fewer requests than B, but no room left in its cache
    report(B, 30, 5, 0.60)
    assert {_pick(capacity_book, f"p{n}") for n in range(20)} == {B}
    report(A, 1, 0, KV_CACHE_FULL - 0.01)
    assert {_pick(capacity_book, f"p{n}") for n in range(20)} == {A}


def test_when_every_server_is_kv_full_requests_still_flow_to_the_least_loaded():
    _, capacity_book, report = _routing("least_connections")
    report(A, 3, 0, 0.99)
    report(B, 9, 0, 0.98)
    assert _pick(capacity_book, "p") == A


def test_running_and_waiting_requests_are_the_load_below_the_threshold():
    router, _, report = _routing("affinity")
    report(A, 5, 7, 0.94)
    report(B, 5, 7, None)  # a server that does not report its cache
    assert router.load(A) == 12 and router.load(B) == 12


def test_routing_load_rule():
    def load(running: int, waiting: int, kv: float | None, capacity: int = 0) -> int:
        return Backend(base_url=A, capacity=capacity).with_load(ServerLoad(running, waiting, kv)).routing_load

    assert Backend(base_url=A).routing_load == 0  # no report: no load beyond the gateway's own requests
    assert load(3, 4, 0.5) == 7
    assert load(3, 4, KV_CACHE_FULL) == 7 + KV_FULL_EXTRA_LOAD
    # With a capacity, a KV-full server is one request short of full (the gateway adds at most one more
    # before the next report) -- never over its capacity because of the cache alone.
    assert load(3, 0, 0.99, capacity=16) == 15
    assert load(20, 0, 0.99, capacity=16) == 20


def test_with_a_capacity_a_kv_full_server_takes_at_most_one_more_request():
    _, capacity_book, report = _routing("affinity", capacity=4)
    report(A, 1, 0, 0.99)
    report(B, 4, 0, 0.20)  # B is full
    first = Ticket(prompt="p", exclude=set())
    assert capacity_book.try_acquire(first) and first.replica_id == A
    assert not capacity_book.try_acquire(Ticket(prompt="p", exclude=set()))
    capacity_book.give_back(first)
