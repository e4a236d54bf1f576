"""gRPC server plumbing shared by the replica and the gateway: tolerant request decoding, method-handler builders,
health + reflection, binding a port, one start/stop helper, and the Members RPC's member table."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from llmgw._proto import llmgateway_pb2 as pb

log = logging.getLogger("llmgw.rpc")

Handler = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request whose bytes did not decode (e.g. invalid UTF-8 in a proto3 string).

    grpc turns a raising deserializer into an opaque INTERNAL error; handing the handler this marker instead lets
    it answer INVALID_ARGUMENT with a message the caller can act on.
    """

    message: str


def tolerant_deserializer(message_cls: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except DecodeError as exc:
            return UndecodableRequest(f"request is not a valid {message_cls.DESCRIPTOR.name} "
                                      f"(invalid UTF-8 in a string field?): {exc}")

    return deserialize


def unary_stream(handler: Handler, request_cls: Any, response_cls: Any = None) -> grpc.RpcMethodHandler:
    return grpc.unary_stream_rpc_method_handler(
        handler,
        request_deserializer=tolerant_deserializer(request_cls),
        response_serializer=(response_cls.SerializeToString if response_cls else None),
    )


def stream_stream(handler: Handler, request_cls: Any, response_cls: Any) -> grpc.RpcMethodHandler:
    return grpc.stream_stream_rpc_method_handler(
        handler,
        request_deserializer=tolerant_deserializer(request_cls),
        response_serializer=response_cls.SerializeToString,
    )


def unary_unary(handler: Handler, request_cls: Any, response_cls: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=tolerant_deserializer(request_cls),
        response_serializer=response_cls.SerializeToString,
    )


def service_name(service: str) -> str:
    """The full name of a service of proto/llmgateway.proto ("LLMReplica" -> "llmgateway.LLMReplica")."""
    return pb.DESCRIPTOR.services_by_name[service].full_name


def add_health_and_reflection(server: grpc.aio.Server, service_names: list[str]) -> Any:
    """Register grpc.health.v1 (every service SERVING) and reflection; returns the health servicer."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # the stubs lack health.aio
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    return health_servicer


async def set_serving(health_servicer: Any, service_names: list[str], serving: bool) -> None:
    from grpc_health.v1 import health_pb2

    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


def add_port(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind `address` in plaintext or, given credentials, with TLS; returns the bound port (0 = failed)."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


class RpcServer:
    """One grpc.aio server serving some services of proto/llmgateway.proto, with health and reflection.

        server = RpcServer({"LLMReplica": {"Generate": unary_stream(...)}}, host, port, credentials)
        port = await server.start()        # OSError when the port cannot be bound
        await server.set_serving(True)     # after whatever else must be up (gossip) is up
        ...
        await server.stop(grace)           # NOT_SERVING first, so health checkers drain us before the port closes
    """

    def __init__(self, services: Mapping[str, Mapping[str, grpc.RpcMethodHandler]], host: str, port: int,
                 credentials: grpc.ServerCredentials | None = None, *, reuse_port: bool = False) -> None:
        self.host = host
        self.port = port
        self._services = services
        self._credentials = credentials
        self._reuse_port = reuse_port
        self._names = [service_name(s) for s in services]
        self._server: grpc.aio.Server | None = None
        self._health: Any = None

    async def start(self) -> int:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if self._reuse_port else 0)])
        server.add_generic_rpc_handlers(tuple(
            grpc.method_handlers_generic_handler(name, dict(methods))
            for name, methods in zip(self._names, self._services.values(), strict=True)))
        self._health = add_health_and_reflection(server, self._names)
        port = add_port(server, f"{self.host}:{self.port}", self._credentials)
        if port == 0:
            raise OSError(f"cannot bind gRPC port {self.host}:{self.port}")
        await server.start()
        self.port = port
        self._server = server
        return port

    async def set_serving(self, serving: bool) -> None:
        if self._health is not None:
            await set_serving(self._health, self._names, serving)

    async def stop(self, grace: float | None) -> None:
        """NOT_SERVING, then stop accepting and give in-flight calls `grace` seconds. Idempotent."""
        await self.set_serving(False)
        if self._server is not None:
            await self._server.stop(grace)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class MemberView(Protocol):
    """What the Members RPC shows of a member (llmgw.gossip.Member has these)."""

    @property
    def member_id(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def grpc_address(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def incarnation(self) -> int: ...
    @property
    def active_requests(self) -> int: ...
    @property
    def max_capacity(self) -> int: ...
    @property
    def model_version(self) -> str: ...
    @property
    def weight(self) -> float: ...
    @property
    def draining(self) -> bool: ...


def member_info(member: MemberView, self_id: str) -> pb.MemberInfo:
    """llmgw.gossip.Member (or anything with the same attributes) -> MemberInfo."""
    return pb.MemberInfo(
        member_id=member.member_id,
        address=member.address or "",
        grpc_address=member.grpc_address or "",
        role=str(member.role),
        state=str(member.state),
        incarnation=int(member.incarnation),
        active_requests=int(member.active_requests),
        max_capacity=int(member.max_capacity),
        model_version=member.model_version or "",
        weight=float(member.weight),
        draining=bool(member.draining),
        is_self=member.member_id == self_id,
    )
