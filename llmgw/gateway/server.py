"""gRPC front of the gateway: InferenceGateway.Infer + GatewayAdmin + health + reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import grpc

from llmgw import rpc
from llmgw._proto import llmgateway_pb2 as pb
from llmgw.gateway.api import ErrorKind, GatewayConfig, GatewayError, InferenceRequest
from llmgw.gateway.gossip_member import start_gossip_member
from llmgw.gateway.grpc_transport import GrpcTransport
from llmgw.gateway.http_transport import HttpTransport, MixedTransport
from llmgw.gateway.operations import ROLLOUT_STOP_TIMEOUT_S, RolloutController, RolloutRefused
from llmgw.gateway.service import Gateway
from llmgw.gateway.shutdown import DrainReport, begin_drain, drain
from llmgw.gateway.upstreams import UpstreamTable
from llmgw.topology import is_replica
from llmgw.workers import RolloutElsewhere

log = logging.getLogger("llmgw.gateway.server")

ROLLOUT_RESTART_TIMEOUT_S = 120.0  # one replica's restart command (a real model may load for a while)
ROLLOUT_REFUSAL_CODES = {"no_restart_hook": grpc.StatusCode.FAILED_PRECONDITION,
                         "running": grpc.StatusCode.ALREADY_EXISTS, "invalid": grpc.StatusCode.INVALID_ARGUMENT}
FINISH_TO_PROTO = {"length": pb.LENGTH, "stop": pb.STOP, None: pb.FINISH_UNSPECIFIED}
# The one table from a gateway outcome to the gRPC status the client gets.
GRPC_STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorKind.UNKNOWN: grpc.StatusCode.UNKNOWN,
}


# The model of a request: InferRequest.model; a client built from the reference's proto (which has no such
# field) names it in this metadata entry instead -- its stubs cannot set field 8, metadata works with any stub.
MODEL_METADATA = "llmgw-model"


def _metadata_model(metadata) -> str:
    for name, value in metadata:
        if name == MODEL_METADATA and isinstance(value, str):
            return value
    return ""


def _stall_status(guard) -> dict:
    """The adaptive stall deadlines' GatewayStatus fields (llmgw.gateway.stall_race); none when they are off."""
    if guard is None:
        return {}
    snapshot = guard.snapshot()
    replicas = snapshot["replicas"]
    return dict(inter_token_deadline_by_replica={r: e["inter_token_deadline_s"] for r, e in replicas.items()},
                first_token_deadline_by_replica={r: e["first_token_deadline_s"] for r, e in replicas.items()},
                stall_suspicions=snapshot["events"]["suspected"],
                stall_failovers=snapshot["events"]["continuation_started"])


class GatewayServer:
    """Owns the grpc.aio server, the Gateway behind it (reaching replicas over gRPC) and, unless a membership
    source is given, the gateway's gossip member."""

    def __init__(self, config: GatewayConfig, *, membership=None, router=None,
                 server_credentials: grpc.ServerCredentials | None = None,
                 replica_credentials: grpc.ChannelCredentials | None = None) -> None:
        """`server_credentials` serves the gRPC port over TLS (llmgw.tls.server_credentials);
        `replica_credentials` reaches replicas over TLS (llmgw.tls.channel_credentials)."""
        self.config = config
        self.transport = GrpcTransport(replica_credentials, sessions=config.replica_sessions,
                                       upstream_batch=config.upstream_batch)
        # OpenAI-compatible model servers share the request path with gRPC replicas: http(s) addresses go over HTTP.
        self.upstreams = UpstreamTable(config.upstreams)
        transport = MixedTransport(self.transport, HttpTransport(self.upstreams.backend, self.upstreams.client))
        self.gateway = Gateway(config, transport, membership=membership, router=router, upstreams=self.upstreams)
        self.gossip: Any = None  # the GossipNode this server started (when no membership source was given)
        # The request listener the composition root registered for metrics and the request log (gateway.app).
        self.metrics_listener: Any = None
        # This process's part in a `--workers N` group (llmgw.gateway.worker_wiring.WorkerParts), or None.
        self.worker_parts: Any = None
        self.server_credentials = server_credentials
        self.port = config.port
        self._rpc: rpc.RpcServer | None = None
        restart = None
        if config.restart_command:
            from llmgw.rollout import CommandTemplateRestart
            from llmgw.workers import child_environment

            # Without the worker variables: a restarted replica must not write into the gateway's metric files.
            restart = CommandTemplateRestart(config.restart_command, timeout_s=ROLLOUT_RESTART_TIMEOUT_S,
                                             env=child_environment())
        # The gateway's one rolling update, shared with the HTTP front (gateway.app hands it to start_http).
        self.rollouts = RolloutController(self.gateway, self.gateway.drains, restart,
                                          drain_replica=self.transport.drain_replica)

    @property
    def grpc_address(self) -> str:
        return f"{self.config.advertise or self.config.host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve gRPC, then follow the membership (starting this gateway's gossip member unless a source
        was given: peers must learn a bound address), then report SERVING."""
        self._rpc = rpc.RpcServer({
            "InferenceGateway": {
                "Infer": rpc.unary_stream(self.Infer, pb.InferRequest, pb.InferResponse),
            },
            "GatewayAdmin": {
                "Members": rpc.unary_unary(self.Members, pb.MembersRequest, pb.MembersResponse),
                "GetStatus": rpc.unary_unary(self.GetStatus, pb.GatewayStatusRequest, pb.GatewayStatus),
                "StartRollout": rpc.unary_stream(self.StartRollout, pb.RolloutRequest, pb.RolloutEvent),
                "GetRollout": rpc.unary_unary(self.GetRollout, pb.GetRolloutRequest, pb.RolloutState),
                "AbortRollout": rpc.unary_unary(self.AbortRollout, pb.GetRolloutRequest, pb.RolloutState),
            },
        }, self.config.host, self.config.port, self.server_credentials, reuse_port=self.config.reuse_port)
        self.port = await self._rpc.start()
        if self.gateway.membership is None:
            self.gossip = await start_gossip_member(self.config, self.grpc_address)
        await self.gateway.start(self.gossip)
        await self._rpc.set_serving(True)
        log.info("gateway %s serving on %s", self.config.gateway_id, self.grpc_address)

    async def drain(self, grace_s: float) -> DrainReport:
        """The graceful part of a shutdown (llmgw.gateway.shutdown): not ready at once (gRPC health NOT_SERVING,
        HTTP /readyz 503), new requests refused with UNAVAILABLE, open ones given `grace_s` to finish and then
        ended with UNAVAILABLE. stop() follows."""
        begin_drain(self.gateway)
        if self._rpc is not None:
            await self._rpc.set_serving(False)
        return await drain(self.gateway, grace_s)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving (after drain(), open streams are done and `grace` only covers their last messages),
        then leave gossip."""
        await self.rollouts.close()  # restores routing; a replica mid-restart finishes its restart command
        if self._rpc is not None:
            await self._rpc.stop(grace)  # NOT_SERVING first, then grace for open streams
        await self.gateway.stop()
        if self.gossip is not None:
            try:
                await asyncio.wait_for(self.gossip.stop(leave=True), timeout=5.0)
            except Exception:  # a failed leave must not keep the process from stopping
                log.exception("gossip stop failed")

    async def Infer(self, request, context: grpc.aio.ServicerContext):
        if isinstance(request, rpc.UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        timeout_s = request.timeout_s if request.timeout_s > 0 else None
        remaining = context.time_remaining()
        if remaining is not None:
            timeout_s = remaining if timeout_s is None else min(timeout_s, remaining)
        metadata = context.invocation_metadata() or ()
        model = request.model or _metadata_model(metadata)
        try:  # API keys (metadata `authorization: Bearer <key>`); open without a key file
            caller = self.gateway.tenancy.caller(metadata, model)
        except GatewayError as exc:
            await context.abort(GRPC_STATUS.get(exc.kind, grpc.StatusCode.UNKNOWN), exc.message)
        req = InferenceRequest(prompt=request.prompt, max_tokens=request.max_tokens, hedge=request.hedge,
                               request_id=request.request_id, client_id=request.client_id, timeout_s=timeout_s,
                               tenant=caller.tenant if caller else "", key_id=caller.key_id if caller else "",
                               front="grpc", model=model, trace_carrier=metadata)
        if self.upstreams.configured:  # a model server's request: a completions body with the sampling fields
            self.upstreams.route_grpc(req, request)
        request_id = request.request_id
        per_message = request.max_tokens_per_message
        response = pb.InferResponse
        try:
            async for batch in self.gateway.infer_batches(req):
                if per_message <= 1 or len(batch) == 1:
                    for ev in batch:
                        yield response(token=ev.token, is_final=ev.is_final, replica_id=ev.replica_id,
                                       request_id=request_id, index=ev.index,
                                       finish_reason=FINISH_TO_PROTO.get(ev.finish_reason, pb.FINISH_UNSPECIFIED))
                    continue
                for at in range(0, len(batch), per_message):
                    chunk = batch[at:at + per_message]
                    head, tail = chunk[0], chunk[-1]
                    yield response(token=head.token, more_tokens=[ev.token for ev in chunk[1:]],
                                   is_final=tail.is_final, replica_id=head.replica_id, request_id=request_id,
                                   index=head.index,
                                   finish_reason=FINISH_TO_PROTO.get(tail.finish_reason, pb.FINISH_UNSPECIFIED))
        except GatewayError as exc:
            retry_after = getattr(exc, "retry_after_s", None)
            if retry_after is not None:
                context.set_trailing_metadata((("retry-after-s", f"{retry_after:g}"),))
            await context.abort(GRPC_STATUS.get(exc.kind, grpc.StatusCode.UNKNOWN), exc.message)

    async def Members(self, request, context):
        members = self.gateway.members()
        breakers = self.gateway.breaker_states()
        drained = self.gateway.drains.drained
        infos = []
        for m in members:
            info = rpc.member_info(m, self.config.gateway_id)
            if is_replica(m):
                info.breaker = breakers.get(m.member_id, "closed")
                # This gateway sends it nothing new, whether the replica itself drains or an operator (or a
                # rolling update) took it out of this gateway's routing.
                info.draining = info.draining or m.member_id in drained
            infos.append(info)
        return pb.MembersResponse(self_id=self.config.gateway_id, members=infos)

    async def GetStatus(self, request, context):
        gw = self.gateway
        hedges = gw.hedge_stats()
        return pb.GatewayStatus(
            gateway_id=self.config.gateway_id, pid=os.getpid(), in_flight=sum(gw.in_flight.values()),
            queued=gw.queued, served_total=gw.stats.served_total, failovers_total=gw.stats.failovers_total,
            rejected_total=gw.stats.rejected_total, failed_total=gw.stats.failed_total,
            in_flight_by_replica=dict(gw.in_flight), grpc_address=self.grpc_address,
            gossip_address=self.gossip.address if self.gossip is not None else "",
            breaker_by_replica=gw.breaker_states(), hedges_started=hedges["hedges_started"],
            hedges_won=hedges["won"], hedges_lost=hedges["lost"], hedges_cancelled=hedges["cancelled"],
            hedges_denied=hedges["policy_hedges_denied"] + hedges["denied_no_capacity"],
            policy_hedges=hedges["policy_hedges_issued"], **_stall_status(gw.stall_guard),
        )

    # ---- rolling updates ----------------------------------------------------------------------------------
    async def StartRollout(self, request, context):
        """Start a rolling update and stream its progress until it ends. The update runs on its own task: a
        caller that goes away does not abort it (AbortRollout does)."""
        if isinstance(request, rpc.UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        options = {name: getattr(request, name) for name in ("drain_timeout_s", "rejoin_timeout_s",
                                                             "restart_timeout_s") if getattr(request, name) > 0}
        # In a worker of `--workers N` (llmgw.gateway.worker_wiring): one update for the whole group.
        parts = self.worker_parts
        starter = parts.rollouts if parts is not None else self.rollouts
        try:
            events = starter.start_watched(request.version, replicas=list(request.replicas) or None,
                                           require_another_alive=not request.allow_single_replica, **options)
        except RolloutRefused as exc:
            await context.abort(ROLLOUT_REFUSAL_CODES[exc.reason], exc.message)
        except RolloutElsewhere as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, exc.message)
        async with contextlib.aclosing(events):
            async for event in events:
                yield pb.RolloutEvent(kind=event.kind, replica_id=event.replica_id or "", step=event.step or "",
                                      detail=event.detail, state=event.state)

    async def GetRollout(self, request, context):
        parts = self.worker_parts
        if parts is not None:  # wherever in the group it runs, or ran last (as the HTTP admin answers)
            return _rollout_message(await parts.rollouts.status())
        return self._rollout_state()

    async def AbortRollout(self, request, context):
        parts = self.worker_parts
        try:
            if parts is not None:  # the group's update, whichever worker runs it
                status = await parts.rollouts.abort()
                return _rollout_message(status if status is not None else await parts.rollouts.status())
            await self.rollouts.abort()
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"the rolling update did not stop within {ROLLOUT_STOP_TIMEOUT_S:g} s")
        return self._rollout_state()

    def _rollout_state(self) -> pb.RolloutState:
        rollout = self.rollouts.rollout
        return _rollout_message(None if rollout is None else rollout.status.to_dict())


def _rollout_message(status: dict[str, Any] | None) -> pb.RolloutState:
    """A rollout status (llmgw.rollout.RolloutStatus.to_dict(), as WorkerRollouts relays it too) as the RPC's
    message; state "none" when no rolling update was started."""
    if status is None:
        return pb.RolloutState(state="none")

    def incarnation(value: int | None) -> int:
        return -1 if value is None else value

    return pb.RolloutState(
        version=status["new_version"], state=status["state"], index=status["index"], total=status["total"],
        current_replica=status["current_replica"] or "", failed_replica=status["failed_replica"] or "",
        error=status["error"] or "", restored=bool(status["restored"]),
        replicas=[pb.RolloutReplica(replica_id=p["replica_id"], step=p["step"],
                                    old_incarnation=incarnation(p["old_incarnation"]),
                                    new_incarnation=incarnation(p["new_incarnation"]), error=p["error"] or "")
                  for p in status["replicas"]])
