"""The gateway's request path, top to bottom: route -> admit -> stream -> fail over.

`Gateway.infer(request)` is the one entry point every front-end uses. It yields each token index exactly once, in
order, ending with an is_final event, or raises a GatewayError; it never ends quietly on a partial answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import uuid
from typing import AsyncIterator, Callable, Iterable

import grpc

from llmgw._proto import llmgateway_pb2 as pb
from llmgw.gateway.admission import Admission, QueueFull, QueueTimeout
from llmgw.gateway.api import (DeadlineExceeded, GatewayConfig, InferenceRequest, InvalidArgument,
                               ResourceExhausted, TokenEvent, Unavailable, check_request)
from llmgw.gateway.membership import MembershipView
from llmgw.gateway.pool import ChannelPool

log = logging.getLogger("llmgw.gateway")

# Refusals (replica full or draining) do not use up attempts, but a request may not bounce around forever.
MAX_REFUSALS = 20

FINISH_REASONS = {pb.LENGTH: "length", pb.STOP: "stop"}


@dataclasses.dataclass(eq=False)
class _Ticket:
    """One request's claim on replica capacity, as seen by admission."""

    prompt: str
    exclude: set[str]
    replica_id: str | None = None
    address: str = ""


class _AttemptFailed(Exception):
    """One replica could not continue the stream; `kind` says whether to count it as a failed attempt."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind  # "error" | "stall" | "busy" | "draining"
        self.detail = detail


@dataclasses.dataclass
class GatewayStats:
    served_total: int = 0
    failovers_total: int = 0
    rejected_total: int = 0
    failed_total: int = 0


class Gateway:
    """Routes, admits and streams requests to replicas; failover is token-exact.

    `membership` is any object with `members(include_self=False)` and `subscribe(cb) -> unsubscribe` yielding
    llmgw.gossip.Member / MemberEvent values; when omitted, start() runs a threaded GossipNode.

    Extension seams: `exclusion_sources` (callables returning replica ids to skip, e.g. open circuit breakers) and
    `attempt_listeners` (called with (replica_id, outcome, ttft_s) after every replica attempt; outcome is "first_token"
    (with the time to first token), "ok", "error", "stall", "busy", "draining" or "cancelled").
    """

    def __init__(self, config: GatewayConfig, *, membership=None, router=None) -> None:
        config.validate()
        self.config = config
        if router is None:
            from llmgw.routing import Router

            router = Router(vnodes=config.vnodes, balance=config.balance, prefix_chars=config.prefix_chars)
        self.router = router
        self.membership = membership
        self.gossip = None
        self.pool = ChannelPool()
        self.view = MembershipView(router, _NoMembers(), on_change=self._capacity_changed,
                                   on_removed=self._replica_removed)
        self.admission: Admission[_Ticket] = Admission(self._try_acquire, self._give_back,
                                                       max_waiters=config.queue_size,
                                                       timeout_s=config.queue_timeout_s)
        self.in_flight: dict[str, int] = {}
        self.stats = GatewayStats()
        self.exclusion_sources: list[Callable[[], Iterable[str]]] = []
        self.attempt_listeners: list[Callable[[str, str, float | None], None]] = []
        self._started = False
        self._rng = random.Random()

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def start(self, grpc_address: str = "") -> None:
        if self.membership is None:
            self.gossip = await self._start_gossip(grpc_address)
            self.membership = self.gossip
        self.view.source = self.membership
        self.view.start()
        self._started = True

    async def _start_gossip(self, grpc_address: str):
        from llmgw.gossip import GossipConfig, GossipNode

        cfg = self.config
        port = cfg.gossip_port
        if not port:
            port = int(grpc_address.rsplit(":", 1)[1]) + 10000
        advertise = f"{cfg.advertise}:{port}" if cfg.advertise else None
        node = GossipNode(cfg.gateway_id, bind=f"{cfg.host}:{port}", advertise=advertise, seeds=tuple(cfg.seeds),
                          role="gateway", grpc_address=grpc_address,
                          config=GossipConfig.preset(cfg.gossip_config), threaded=True)
        await node.start()
        return node

    async def stop(self) -> None:
        self.view.stop()
        self.admission.close()
        if self.gossip is not None:
            try:
                await asyncio.wait_for(self.gossip.stop(leave=True), timeout=5.0)
            except Exception:  # a failed leave must not keep channels open
                log.exception("gossip stop failed")
        await self.pool.close()

    def members(self) -> list:
        """The member table as this gateway sees it (itself included when gossip runs)."""
        if self.membership is None:
            return []
        try:
            return list(self.membership.members(include_self=True))
        except TypeError:  # a membership source without the include_self switch
            return list(self.membership.members())

    @property
    def queued(self) -> int:
        return len(self.admission)

    # ---- the request path ------------------------------------------------------------------------------
    async def infer(self, request: InferenceRequest) -> AsyncIterator[TokenEvent]:
        """Every token of the answer, one event each: indices 0, 1, ... exactly once, the last with is_final."""
        async with contextlib.aclosing(self.infer_batches(request)) as batches:
            async for batch in batches:
                for event in batch:
                    yield event

    async def infer_batches(self, request: InferenceRequest) -> AsyncIterator[list[TokenEvent]]:
        """Like infer(), grouped as the tokens arrived from the replica (front-ends that coalesce use this)."""
        check_request(request, self.config)
        loop = asyncio.get_running_loop()
        timeout = request.timeout_s if request.timeout_s and request.timeout_s > 0 else self.config.request_timeout_s
        deadline = loop.time() + min(timeout, self.config.request_timeout_s)
        request_id = request.request_id or uuid.uuid4().hex
        forwarded: list[str] = []  # tokens the caller already has: the resume point on failover
        ticket = _Ticket(request.prompt, set())
        failures = refusals = 0
        reasons: list[str] = []
        while True:
            # 1. route + admit (routing happens inside admission, atomically with taking the capacity)
            await self._admit(ticket, deadline, resumed=bool(failures or refusals), reasons=reasons)
            replica_id = ticket.replica_id
            # 2. stream
            try:
                async with contextlib.aclosing(
                        self._stream(ticket, request, request_id, forwarded, deadline)) as stream:
                    async for batch in stream:
                        yield batch
                self.stats.served_total += 1
                return
            # 3. fail over
            except _AttemptFailed as failure:
                reasons.append(f"{replica_id}: {failure}")
                self._notify(replica_id, failure.kind, None)
                if failure.kind == "busy":
                    refusals += 1
                    self.view.mark_busy(replica_id, loop.time() + self.config.busy_backoff_s)
                    loop.call_later(self.config.busy_backoff_s, self._capacity_changed)
                elif failure.kind == "draining":
                    refusals += 1
                    ticket.exclude.add(replica_id)
                else:
                    failures += 1
                    ticket.exclude.add(replica_id)
                if failures >= self.config.max_attempts or refusals > MAX_REFUSALS:
                    self.stats.failed_total += 1
                    raise Unavailable(f"request {request_id} failed after {failures} attempts and {refusals} "
                                      f"refusals, {len(forwarded)} of {request.max_tokens} tokens sent: "
                                      + "; ".join(reasons[-4:])) from None
                self.stats.failovers_total += 1
                log.info("request %s: failing over from %s at token %d (%s)", request_id, replica_id,
                         len(forwarded), failure)
            except (asyncio.CancelledError, GeneratorExit):
                self._notify(replica_id, "cancelled", None)
                raise
            except DeadlineExceeded:
                self.stats.failed_total += 1
                raise
            finally:
                self._give_back(ticket)

    async def _admit(self, ticket: _Ticket, deadline: float, *, resumed: bool, reasons: list[str]) -> None:
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            self.stats.failed_total += 1
            raise DeadlineExceeded("request deadline passed before a replica was found")
        if not (self.view.routable() - ticket.exclude - self._policy_exclusions()):
            self.stats.failed_total += 1
            tail = (": " + "; ".join(reasons[-4:])) if reasons else ""
            raise Unavailable("no replica available" + tail)
        try:
            # A resumed request already waited its turn once: it goes to the head of the queue.
            await self.admission.acquire(ticket, front=resumed, timeout_s=remaining)
        except QueueFull as exc:
            self.stats.rejected_total += 1
            raise ResourceExhausted(str(exc), retry_after_s=1.0) from None
        except QueueTimeout as exc:
            if loop.time() >= deadline:
                self.stats.failed_total += 1
                raise DeadlineExceeded("request deadline passed while queued") from None
            self.stats.rejected_total += 1
            raise ResourceExhausted(str(exc), retry_after_s=1.0) from None

    async def _stream(self, ticket: _Ticket, request: InferenceRequest, request_id: str, forwarded: list[str],
                      deadline: float) -> AsyncIterator[list[TokenEvent]]:
        loop = asyncio.get_running_loop()
        cfg = self.config
        replica_id = ticket.replica_id
        expected = len(forwarded)
        started = loop.time()
        call = self.pool.generate(ticket.address)(
            pb.GenerateRequest(request_id=request_id, prompt=request.prompt, max_tokens=request.max_tokens,
                               tokens_already_generated=expected, generated_tokens=forwarded,
                               max_tokens_per_message=cfg.upstream_batch),
            timeout=max(0.001, deadline - started))
        first = True
        complete = False
        try:
            async with asyncio.timeout(min(deadline, started + cfg.first_token_timeout_s)) as watchdog:
                while True:
                    msg = await call.read()
                    watchdog.reschedule(None)  # never fire while the caller holds the event
                    if msg is grpc.aio.EOF:
                        raise _AttemptFailed("error", "stream ended before the final token")
                    # Reference replicas leave index unset (0): then order is the only index there is.
                    if msg.index != expected and msg.index != 0:
                        raise _AttemptFailed("error", f"replica sent index {msg.index}, expected {expected}")
                    if first:
                        first = False
                        self._notify(replica_id, "first_token", loop.time() - started)
                    more = msg.more_tokens
                    if msg.is_final and not msg.token and not more:  # a final message with no token
                        complete = True
                        yield [TokenEvent(expected, "", replica_id, True,
                                          FINISH_REASONS.get(msg.finish_reason, "length"))]
                        self._notify(replica_id, "ok", None)
                        return
                    count = 1 + len(more)
                    if expected + count > request.max_tokens or (
                            not msg.is_final and expected + count >= request.max_tokens):
                        raise _AttemptFailed("error", "replica sent more tokens than max_tokens")
                    if count == 1:
                        batch = [TokenEvent(expected, msg.token, replica_id)]
                        forwarded.append(msg.token)
                    else:
                        tokens = [msg.token, *more]
                        batch = [TokenEvent(expected + k, tok, replica_id) for k, tok in enumerate(tokens)]
                        forwarded.extend(tokens)
                    expected += count
                    if msg.is_final:
                        batch[-1].is_final = True
                        batch[-1].finish_reason = FINISH_REASONS.get(msg.finish_reason, "length")
                        complete = True
                        yield batch
                        self._notify(replica_id, "ok", None)
                        return
                    yield batch
                    watchdog.reschedule(min(deadline, loop.time() + cfg.inter_token_timeout_s))
        except TimeoutError:
            if loop.time() >= deadline:
                raise DeadlineExceeded(f"request deadline passed after {len(forwarded)} tokens") from None
            phase = "first token" if first else f"token {expected}"
            raise _AttemptFailed("stall", f"no {phase} within "
                                 f"{cfg.first_token_timeout_s if first else cfg.inter_token_timeout_s:g} s") from None
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(f"replica {replica_id}: {exc.details()}") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and loop.time() >= deadline - 0.005:
                raise DeadlineExceeded(f"request deadline passed after {len(forwarded)} tokens") from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise _AttemptFailed("busy", exc.details() or "replica at capacity") from None
            if code == grpc.StatusCode.UNAVAILABLE and (exc.details() or "").startswith("draining"):
                raise _AttemptFailed("draining", "replica is draining") from None
            raise _AttemptFailed("error", f"{code.name}: {exc.details()}") from None
        finally:
            # After the final token the replica is only sending its OK status: cancelling then would make a
            # completed stream look abandoned on the replica side.
            if not complete and not call.done():
                call.cancel()

    # ---- capacity bookkeeping (synchronous: atomic on the event loop) ----------------------------------
    def _try_acquire(self, ticket: _Ticket) -> bool:
        blocked = self.view.unavailable(asyncio.get_running_loop().time())
        blocked |= ticket.exclude
        blocked |= self._policy_exclusions()
        replica_id = self._pick(ticket.prompt, blocked)
        if replica_id is None:
            return False
        address = self.view.addresses.get(replica_id)
        if address is None:
            return False
        self.view.acquired(replica_id)
        self.in_flight[replica_id] = self.in_flight.get(replica_id, 0) + 1
        ticket.replica_id, ticket.address = replica_id, address
        return True

    def _pick(self, prompt: str, blocked: set[str]) -> str | None:
        policy = self.config.routing
        if policy == "affinity":
            return self.router.route(prompt, exclude=blocked).member
        candidates = [m for m in self.view.routable() if m not in blocked]
        if not candidates:
            return None
        if policy == "random":
            return self._rng.choice(candidates)
        return min(candidates, key=lambda m: (self.router.load(m) / self.router.info(m).weight, self._rng.random()))

    def _give_back(self, ticket: _Ticket) -> None:
        replica_id = ticket.replica_id
        if replica_id is None:
            return
        ticket.replica_id = None
        self.view.released(replica_id)
        left = self.in_flight.get(replica_id, 0) - 1
        if left > 0:
            self.in_flight[replica_id] = left
        else:
            self.in_flight.pop(replica_id, None)
        self._capacity_changed()

    def _capacity_changed(self) -> None:
        if self.admission.queue:
            self.admission.capacity_changed()

    def _replica_removed(self, replica_id: str, address: str) -> None:
        if address not in self.view.addresses.values():
            self.pool.discard(address)

    def _policy_exclusions(self) -> set[str]:
        out: set[str] = set()
        for source in self.exclusion_sources:
            out.update(source())
        return out

    def _notify(self, replica_id: str | None, outcome: str, ttft_s: float | None) -> None:
        if replica_id is None:
            return
        for listener in self.attempt_listeners:
            try:
                listener(replica_id, outcome, ttft_s)
            except Exception:  # a faulty policy must not break the request path
                log.exception("attempt listener failed")


class _NoMembers:
    def members(self, include_self: bool = False):
        return []

    def subscribe(self, cb):
        return lambda: None
