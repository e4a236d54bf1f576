"""gRPC front of the gateway: InferenceGateway.Infer + GatewayAdmin + health + reflection."""

from __future__ import annotations

import logging
import os

import grpc

from llmgw._proto import llmgateway_pb2 as pb
from llmgw.gateway.api import GatewayConfig, GatewayError, InferenceRequest
from llmgw.gateway.request_path import Gateway
from llmgw.replica import wire

log = logging.getLogger("llmgw.gateway.server")

GATEWAY_SERVICES = ["InferenceGateway", "GatewayAdmin"]
FINISH_TO_PROTO = {"length": pb.LENGTH, "stop": pb.STOP, None: pb.FINISH_UNSPECIFIED}


class GatewayServer:
    """Owns the grpc.aio server and the Gateway behind it."""

    def __init__(self, config: GatewayConfig, *, membership=None, router=None) -> None:
        self.config = config
        self.gateway = Gateway(config, membership=membership, router=router)
        self.port = config.port
        self._server: grpc.aio.Server | None = None
        self._health = None

    @property
    def grpc_address(self) -> str:
        return f"{self.config.advertise or self.config.host}:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if self.config.reuse_port else 0)])
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("llmgateway.InferenceGateway", {
                "Infer": wire.unary_stream(self.Infer, pb.InferRequest, pb.InferResponse),
            }),
            grpc.method_handlers_generic_handler("llmgateway.GatewayAdmin", {
                "Members": wire.unary_unary(self.Members, pb.MembersRequest, pb.MembersResponse),
                "GetStatus": wire.unary_unary(self.GetStatus, pb.GatewayStatusRequest, pb.GatewayStatus),
            }),
        ))
        names = [wire.service_name(s) for s in GATEWAY_SERVICES]
        self._health = wire.add_health_and_reflection(server, names)
        self.port = server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {self.config.host}:{self.config.port}")
        await server.start()
        self._server = server
        await self.gateway.start(self.grpc_address)
        await wire.set_serving(self._health, names, True)
        log.info("gateway %s serving on %s", self.config.gateway_id, self.grpc_address)

    async def stop(self, grace: float = 1.0) -> None:
        if self._health is not None:
            await wire.set_serving(self._health, [wire.service_name(s) for s in GATEWAY_SERVICES], False)
        if self._server is not None:
            await self._server.stop(grace)
        await self.gateway.stop()

    async def Infer(self, request, context: grpc.aio.ServicerContext):
        if isinstance(request, wire.UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        timeout_s = request.timeout_s if request.timeout_s > 0 else None
        remaining = context.time_remaining()
        if remaining is not None:
            timeout_s = remaining if timeout_s is None else min(timeout_s, remaining)
        req = InferenceRequest(prompt=request.prompt, max_tokens=request.max_tokens, hedge=request.hedge,
                               request_id=request.request_id, client_id=request.client_id, timeout_s=timeout_s)
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
            await context.abort(exc.code, exc.message)

    async def Members(self, request, context):
        members = self.gateway.members()
        return pb.MembersResponse(self_id=self.config.gateway_id,
                                  members=[wire.member_info(m, self.config.gateway_id) for m in members])

    async def GetStatus(self, request, context):
        gw = self.gateway
        return pb.GatewayStatus(
            gateway_id=self.config.gateway_id, pid=os.getpid(), in_flight=sum(gw.in_flight.values()),
            queued=gw.queued, served_total=gw.stats.served_total, failovers_total=gw.stats.failovers_total,
            rejected_total=gw.stats.rejected_total, failed_total=gw.stats.failed_total,
            in_flight_by_replica=dict(gw.in_flight), grpc_address=self.grpc_address,
            gossip_address=gw.gossip.address if gw.gossip is not None else "",
        )
