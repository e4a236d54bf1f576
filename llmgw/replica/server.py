"""Simulated replica: grpc.aio LLMReplica + ReplicaAdmin + health + reflection, publishing its load by gossip."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random

import grpc

from llmgw import rpc
from llmgw._proto import llmgateway_pb2 as pb
from llmgw.gossip import GossipConfig, GossipNode
from llmgw.logs import request_log
from llmgw.replica import model
from llmgw.topology import gossip_port_for
from llmgw.tracing import parse_traceparent

log = logging.getLogger("llmgw.replica")


# Gossip carries load to gateways; publishing every single change would flood update_meta at thousands of
# changes per second while gossip only disseminates a few times per second anyway.
META_FLUSH_S = 0.02
# Upper bound on how long Drain waits for in-flight streams when the caller set no deadline.
DRAIN_MAX_WAIT_S = 300.0
# Most events in one SessionResponse: far below grpc's 4 MB message limit even with long tokens.
SESSION_MAX_EVENTS = 1024
# How long a closing session waits for its cancelled streams to finish their bookkeeping.
SESSION_CLOSE_TIMEOUT_S = 5.0


class ReplicaAbort(Exception):
    """A stream ends with this gRPC status instead of its final token. Generate turns it into the call's status,
    GenerateSession into the stream's closing event."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclasses.dataclass
class ReplicaConfig:
    replica_id: str = "replica-1"
    host: str = "127.0.0.1"
    port: int = 50051
    advertise: str = ""  # host other nodes use to reach us; defaults to host
    gossip_port: int | None = 0  # 0 = llmgw.topology.gossip_port_for(port), None = no gossip
    seeds: tuple[str, ...] = ()
    gossip_config: str = "lan"
    # Shared gossip key (llmgw.gossip.auth); None = unsigned gossip. Same key on every member of the cluster.
    gossip_key: bytes | None = dataclasses.field(default=None, repr=False)
    token_delay_ms: float = 100.0
    prefill_ms_per_kchar: float = 1.0
    prefix_cache_size: int = 1024
    max_capacity: int = 4
    model_version: str = "v1"
    weight: float = 1.0
    limits: model.Limits = dataclasses.field(default_factory=model.Limits)
    faults: model.Faults = dataclasses.field(default_factory=model.Faults)
    seed: int | None = None
    # TLS for the gRPC port (llmgw.tls.server_credentials); None = plaintext.
    server_credentials: grpc.ServerCredentials | None = None
    # Serve GenerateSession (many streams on one call from a gateway); False = Generate only, as the reference.
    sessions: bool = True


class Replica:
    """One simulated replica. `await start()`, then serve until `await stop()`."""

    def __init__(self, config: ReplicaConfig, *, metrics=None) -> None:
        self.config = config
        self.active = 0
        # A llmgw.metrics.ReplicaMetrics, or None for no metrics.
        self.metrics = metrics
        if metrics is not None:
            metrics.active.set_function(lambda: self.active)
            metrics.capacity.set(config.max_capacity)
        self.faults = dataclasses.replace(config.faults)
        self.cache = model.PrefixCache(config.prefix_cache_size)
        self.peak_active = 0
        self.served_total = 0
        self.rejected_total = 0
        self.draining = False
        self.gossip: GossipNode | None = None
        self.port = config.port
        self._rng = random.Random(config.seed)
        self._rpc: rpc.RpcServer | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # Stalled streams wait on this so stop() can release them instead of leaving tasks behind.
        self._stopping = asyncio.Event()
        self._started_at = 0.0  # event-loop time: the origin of the engine's pause schedule (Faults.pause_*)
        self._meta_dirty = False
        self.sessions_open = 0
        self.session_streams_total = 0

    # ---- lifecycle -------------------------------------------------------------------------------------
    @property
    def grpc_address(self) -> str:
        return f"{self.config.advertise or self.config.host}:{self.port}"

    async def start(self) -> None:
        self._started_at = asyncio.get_running_loop().time()
        replica_methods = {
            "Generate": rpc.unary_stream(self.Generate, pb.GenerateRequest, pb.GenerateResponse),
            "Drain": rpc.unary_unary(self.Drain, pb.DrainRequest, pb.DrainResponse),
        }
        if self.config.sessions:
            replica_methods["GenerateSession"] = rpc.stream_stream(self.GenerateSession, pb.SessionRequest,
                                                                   pb.SessionResponse)
        server = rpc.RpcServer({
            "LLMReplica": replica_methods,
            "ReplicaAdmin": {
                "SetFaults": rpc.unary_unary(self.SetFaults, pb.Faults, pb.Faults),
                "GetStatus": rpc.unary_unary(self.GetStatus, pb.StatusRequest, pb.ReplicaStatus),
                "Members": rpc.unary_unary(self.Members, pb.MembersRequest, pb.MembersResponse),
            },
        }, self.config.host, self.config.port, self.config.server_credentials)
        self.port = await server.start()
        self._rpc = server
        if self.config.gossip_port is not None:
            await self._start_gossip()
        await server.set_serving(True)
        log.info("replica %s serving on %s", self.config.replica_id, self.grpc_address)

    async def _start_gossip(self) -> None:
        cfg = self.config
        gossip_port = cfg.gossip_port or gossip_port_for(self.port)
        preset = GossipConfig.preset(cfg.gossip_config)
        advertise = f"{cfg.advertise}:{gossip_port}" if cfg.advertise else None
        self.gossip = GossipNode(
            cfg.replica_id, bind=f"{cfg.host}:{gossip_port}", advertise=advertise, seeds=tuple(cfg.seeds),
            role="replica", grpc_address=self.grpc_address, model_version=cfg.model_version,
            max_capacity=cfg.max_capacity, weight=cfg.weight, config=preset, key=cfg.gossip_key,
        )
        await self.gossip.start()

    async def stop(self, grace: float = 1.0) -> None:
        self._stopping.set()
        if self._rpc is not None:
            await self._rpc.set_serving(False)
        if self.gossip is not None:
            try:
                await asyncio.wait_for(self.gossip.stop(leave=True), timeout=5.0)
            except Exception:  # a failed leave must not prevent the server from stopping
                log.exception("gossip stop failed")
        if self._rpc is not None:
            await self._rpc.stop(grace)

    async def wait_for_termination(self) -> None:
        if self._rpc is not None:
            await self._rpc.wait_for_termination()

    # ---- load publication -------------------------------------------------------------------------------
    def _load_changed(self) -> None:
        if self.gossip is None or self._meta_dirty:
            return
        self._meta_dirty = True
        asyncio.get_running_loop().call_later(META_FLUSH_S, self._flush_meta)

    def _flush_meta(self) -> None:
        self._meta_dirty = False
        if self.gossip is not None:
            self.gossip.update_meta(active_requests=self.active)

    # ---- LLMReplica -------------------------------------------------------------------------------------
    async def Generate(self, request, context: grpc.aio.ServicerContext):
        if isinstance(request, rpc.UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if not request.traceparent and log.isEnabledFor(logging.INFO):
            # A caller may send its trace context as metadata only: the request's log line names its trace.
            for key, value in context.invocation_metadata() or ():
                if key == "traceparent" and isinstance(value, str):
                    request.traceparent = value
                    break
        try:
            async with contextlib.aclosing(self._serve(request)) as responses:
                async for response in responses:
                    yield response
        except ReplicaAbort as exc:
            await context.abort(exc.code, exc.details)

    async def GenerateSession(self, requests, context: grpc.aio.ServicerContext):
        session = _Session(self)
        reader = asyncio.get_running_loop().create_task(session.read(requests))
        self.sessions_open += 1
        try:
            yield pb.SessionResponse()  # no events: tells the gateway the session is accepted
            while True:
                events = await session.next_events()
                if events is None:
                    break
                yield pb.SessionResponse(events=events)
        finally:
            self.sessions_open -= 1
            reader.cancel()
            await session.close()
        if session.invalid is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, session.invalid)

    def _refusal(self, request) -> ReplicaAbort | None:
        """Why this stream cannot start here (counted as a rejection when it is about state, not the request)."""
        problem = model.check_generate(request.prompt, request.max_tokens, request.tokens_already_generated,
                                       self.config.limits)
        if problem:
            return ReplicaAbort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if self.draining:
            self.rejected_total += 1
            return ReplicaAbort(grpc.StatusCode.UNAVAILABLE, "draining")
        if self.faults.reject_all:
            self.rejected_total += 1
            return ReplicaAbort(grpc.StatusCode.UNAVAILABLE, "rejecting all requests (fault injection)")
        if self.active >= self.config.max_capacity:
            self.rejected_total += 1
            return ReplicaAbort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"replica {self.config.replica_id} at capacity {self.config.max_capacity}")
        return None

    async def _serve(self, request):
        """One stream, whichever RPC carries it: admission against capacity, generation, accounting. Ends after
        the final response or raises ReplicaAbort."""
        # Check and increment with no await in between: the loop makes the pair atomic.
        refusal = self._refusal(request)
        if refusal is not None:
            raise refusal
        self.active += 1
        if self.active > self.peak_active:
            self.peak_active = self.active
        self._idle.clear()
        self._load_changed()
        generate = self._generate
        started = asyncio.get_running_loop().time()
        # How the stream ended, as its gRPC status (the metrics label it by name).
        outcome, tokens = grpc.StatusCode.CANCELLED, 0
        try:
            async with contextlib.aclosing(generate(request)) as responses:
                async for response in responses:
                    tokens += (1 if response.token else 0) + len(response.more_tokens)
                    if response.is_final:
                        # Counted before the yield: the caller may close the stream as soon as it has this.
                        self.served_total += 1
                        outcome = grpc.StatusCode.OK
                    yield response
        except ReplicaAbort as exc:
            outcome = exc.code
            raise
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:
            outcome = grpc.StatusCode.INTERNAL
            raise
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()
            self._load_changed()
            if self.metrics is not None:
                self.metrics.request_finished(outcome, tokens=tokens)
            if log.isEnabledFor(logging.INFO):
                self._log_request(request, outcome, tokens, asyncio.get_running_loop().time() - started)

    def _log_request(self, request, outcome: grpc.StatusCode, tokens: int, seconds: float) -> None:
        """The one info line per stream. With the caller's W3C traceparent (the gateway's attempt span) it carries
        trace_id and parent_span_id, so a trace can be followed from the gateway into this replica's log."""
        context = parse_traceparent(request.traceparent) if request.traceparent else None
        trace = {"trace_id": context[0], "parent_span_id": context[1]} if context is not None else {}
        request_log(log, "request", id=request.request_id, replica=self.config.replica_id,
                    outcome=outcome.name.lower(), tokens=tokens, resumed_from=request.tokens_already_generated,
                    duration_ms=round(seconds * 1000.0, 3), **trace)

    async def _generate(self, request):
        loop = asyncio.get_running_loop()
        prompt, max_tokens, first = request.prompt, request.max_tokens, request.tokens_already_generated
        per_message = max(1, request.max_tokens_per_message)
        faults = self.faults
        fail_at = model.failure_position(self._rng.random(), faults.error_rate, first, max_tokens,
                                         self._rng.random())
        cached = self.cache.lookup_and_insert(prompt)
        delay = self.config.token_delay_ms / 1000.0
        due = loop.time() + model.prefill_seconds(len(prompt), cached, self.config.prefill_ms_per_kchar)
        due += faults.stall_before_first_ms / 1000.0
        if first >= max_tokens:  # a resume that has nothing left: just close the stream properly
            yield pb.GenerateResponse(is_final=True, index=max_tokens, finish_reason=pb.LENGTH)
            return
        emitted = 0
        index = first
        while index < max_tokens:
            faults = self.faults  # admin changes apply to running streams too
            if emitted == faults.crash_after:
                log.warning("replica %s crashing after %d tokens (fault injection)", self.config.replica_id,
                            emitted)
                os._exit(17)
            if emitted == faults.stall_after:
                log.warning("replica %s stalling after %d tokens (fault injection)", self.config.replica_id,
                            emitted)
                await self._stopping.wait()
                raise ReplicaAbort(grpc.StatusCode.UNAVAILABLE, "replica stopped while stalled")
            if emitted == fail_at:
                raise ReplicaAbort(grpc.StatusCode.INTERNAL, "injected error (fault injection)")
            step = model.token_step(delay * faults.effective_slow_factor(), faults.jitter, self._rng.random())
            due = model.after_pause(due + step, self._started_at, faults.pause_every_ms / 1000.0,
                                    faults.pause_ms / 1000.0)
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            # Tokens whose time has also come (we fell behind, or delay is 0) go in the same message when the
            # caller allows it -- never past a fault point, so faults still hit at an exact token.
            count = 1
            limit = min(per_message, max_tokens - index)
            for point in (faults.crash_after, faults.stall_after, fail_at):
                if point is not None and point > emitted:
                    limit = min(limit, point - emitted)
            if limit > 1:
                now = loop.time()
                while count < limit and due + step <= now:
                    due += step
                    count += 1
            last = index + count == max_tokens
            if count == 1:
                yield pb.GenerateResponse(token=model.token_for(prompt, index), index=index, is_final=last,
                                          finish_reason=pb.LENGTH if last else pb.FINISH_UNSPECIFIED)
            else:
                yield pb.GenerateResponse(
                    token=model.token_for(prompt, index), index=index, is_final=last,
                    more_tokens=[model.token_for(prompt, k) for k in range(index + 1, index + count)],
                    finish_reason=pb.LENGTH if last else pb.FINISH_UNSPECIFIED)
            index += count
            emitted += count

    async def Drain(self, request, context: grpc.aio.ServicerContext):
        self.draining = True
        if self.gossip is not None:
            self.gossip.update_meta(draining=True)
        if self._rpc is not None:
            # Load balancers and probes that speak grpc.health stop sending work here too.
            await self._rpc.set_serving(False)
        remaining = context.time_remaining()
        limit = DRAIN_MAX_WAIT_S if remaining is None else max(0.0, remaining - 0.05)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=limit)
        except TimeoutError:
            log.warning("drain of %s timed out with %d streams in flight", self.config.replica_id, self.active)
            return pb.DrainResponse(success=False)
        return pb.DrainResponse(success=True)

    # ---- ReplicaAdmin -----------------------------------------------------------------------------------
    async def SetFaults(self, request, context):
        if isinstance(request, rpc.UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        changes = {}
        if request.set_error_rate:
            if not 0.0 <= request.error_rate <= 1.0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "error_rate must be within [0, 1]")
            changes["error_rate"] = request.error_rate
        if request.set_reject_all:
            changes["reject_all"] = request.reject_all
        if request.set_stall_after:
            changes["stall_after"] = request.stall_after
        if request.set_crash_after:
            changes["crash_after"] = request.crash_after
        if request.set_slow_factor:
            if request.slow_factor < 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "slow_factor must be >= 0")
            changes["slow_factor"] = request.slow_factor
        if request.set_stall_before_first:
            if request.stall_before_first_ms < 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stall_before_first_ms must be >= 0")
            changes["stall_before_first_ms"] = request.stall_before_first_ms
        # Replace, don't mutate: a running stream re-reads self.faults per token and sees a consistent set.
        self.faults = dataclasses.replace(self.faults, **changes)
        if changes:
            log.info("replica %s faults now %s", self.config.replica_id, self.faults)
        f = self.faults
        return pb.Faults(error_rate=f.error_rate, reject_all=f.reject_all, stall_after=f.stall_after,
                         crash_after=f.crash_after, slow_factor=f.slow_factor,
                         stall_before_first_ms=f.stall_before_first_ms)

    async def GetStatus(self, request, context):
        return pb.ReplicaStatus(
            replica_id=self.config.replica_id, active_requests=self.active, max_capacity=self.config.max_capacity,
            model_version=self.config.model_version, draining=self.draining, served_total=self.served_total,
            prefix_cache_hits=self.cache.hits, pid=os.getpid(), rejected_total=self.rejected_total,
            grpc_address=self.grpc_address,
            gossip_address=self.gossip.address if self.gossip is not None else "", peak_active=self.peak_active,
            prefix_cache_lookups=self.cache.lookups, sessions_open=self.sessions_open,
            session_streams_total=self.session_streams_total,
        )

    async def Members(self, request, context):
        if self.gossip is None:
            return pb.MembersResponse(self_id=self.config.replica_id)
        members = self.gossip.members(include_self=True)
        return pb.MembersResponse(self_id=self.config.replica_id,
                                  members=[rpc.member_info(m, self.config.replica_id) for m in members])


class _Session:
    """The replica's half of one GenerateSession: the streams it started, and the events waiting to be sent.

    Events of every stream go out together, as many as are ready when the previous message has been written, so
    a busy replica sends one message per round instead of one per token per stream.
    """

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.streams: dict[int, asyncio.Task] = {}
        self.outbox: list[pb.SessionEvent] = []
        self.ready = asyncio.Event()
        self.requests_done = False
        self.invalid: str | None = None  # set when the gateway sent something undecodable: the session ends

    async def read(self, requests) -> None:
        try:
            async for message in requests:
                if isinstance(message, rpc.UndecodableRequest):
                    self.invalid = message.message
                    return
                for start in message.start:
                    self._start(start.stream_id, start.request)
                for stream_id in message.cancel:
                    task = self.streams.pop(stream_id, None)
                    if task is not None:
                        task.cancel()
        except grpc.aio.AioRpcError:
            pass  # the gateway went away: close() ends what is left
        finally:
            self.requests_done = True
            self.ready.set()

    def _start(self, stream_id: int, request) -> None:
        if stream_id in self.streams:
            self._emit(pb.SessionEvent(stream_id=stream_id, status_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                       status_details=f"stream id {stream_id} is already in use"))
            return
        self.replica.session_streams_total += 1
        self.streams[stream_id] = asyncio.get_running_loop().create_task(self._run(stream_id, request))

    async def _run(self, stream_id: int, request) -> None:
        try:
            async with contextlib.aclosing(self.replica._serve(request)) as responses:
                async for response in responses:
                    self._emit(pb.SessionEvent(stream_id=stream_id, response=response))
        except ReplicaAbort as exc:
            self._emit(pb.SessionEvent(stream_id=stream_id, status_code=exc.code.value[0],
                                       status_details=exc.details))
        except asyncio.CancelledError:
            pass  # the gateway cancelled it, or the session is closing: nobody waits for more
        except Exception as exc:  # a bug must end this stream, not the session and every stream on it
            log.exception("replica %s: session stream %d failed", self.replica.config.replica_id, stream_id)
            self._emit(pb.SessionEvent(stream_id=stream_id, status_code=grpc.StatusCode.INTERNAL.value[0],
                                       status_details=f"replica error: {exc!r}"))
        finally:
            if self.streams.get(stream_id) is asyncio.current_task():
                del self.streams[stream_id]
            self.ready.set()

    def _emit(self, event: pb.SessionEvent) -> None:
        self.outbox.append(event)
        self.ready.set()

    async def next_events(self) -> list[pb.SessionEvent] | None:
        """The events ready to send (waiting for some), or None once the gateway closed its side and every
        stream has ended."""
        while not self.outbox:
            if self.invalid is not None or (self.requests_done and not self.streams):
                return None
            self.ready.clear()
            await self.ready.wait()
        events = self.outbox[:SESSION_MAX_EVENTS]
        del self.outbox[:SESSION_MAX_EVENTS]
        return events

    async def close(self) -> None:
        tasks = list(self.streams.values())
        self.streams.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=SESSION_CLOSE_TIMEOUT_S)
