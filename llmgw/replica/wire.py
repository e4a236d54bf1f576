"""gRPC plumbing shared by the replica and gateway servers: tolerant request decoding, health, reflection,
member-table conversion."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc
from google.protobuf.message import DecodeError

from llmgw._proto import llmgateway_pb2 as pb

log = logging.getLogger("llmgw.wire")


@dataclasses.dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request whose bytes did not decode (e.g. invalid UTF-8 in a proto3 string).

    grpc turns a raising deserializer into an opaque INTERNAL error; handing the handler this marker instead lets
    it answer INVALID_ARGUMENT with a message the caller can act on.
    """

    message: str


def tolerant_deserializer(message_cls):
    def deserialize(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError as exc:
            return UndecodableRequest(f"request is not a valid {message_cls.DESCRIPTOR.name} "
                                      f"(invalid UTF-8 in a string field?): {exc}")

    return deserialize


def unary_stream(handler, request_cls, response_cls=None):
    return grpc.unary_stream_rpc_method_handler(
        handler,
        request_deserializer=tolerant_deserializer(request_cls),
        response_serializer=(response_cls.SerializeToString if response_cls else None),
    )


def stream_stream(handler, request_cls, response_cls):
    return grpc.stream_stream_rpc_method_handler(
        handler,
        request_deserializer=tolerant_deserializer(request_cls),
        response_serializer=response_cls.SerializeToString,
    )


def unary_unary(handler, request_cls, response_cls):
    return grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=tolerant_deserializer(request_cls),
        response_serializer=response_cls.SerializeToString,
    )


def add_health_and_reflection(server: grpc.aio.Server, service_names: list[str]):
    """Register grpc.health.v1 (every service SERVING) and reflection; returns the health servicer."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    return health_servicer


async def set_serving(health_servicer, service_names: list[str], serving: bool) -> None:
    from grpc_health.v1 import health_pb2

    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


def member_info(member, self_id: str) -> pb.MemberInfo:
    """llmgw.gossip.Member (or anything with the same attributes) -> MemberInfo."""
    return pb.MemberInfo(
        member_id=member.member_id,
        address=member.address or "",
        grpc_address=member.grpc_address or "",
        role=member.role,
        state=member.state,
        incarnation=int(member.incarnation),
        active_requests=int(member.active_requests),
        max_capacity=int(member.max_capacity),
        model_version=member.model_version or "",
        weight=float(member.weight),
        draining=bool(member.draining),
        is_self=member.member_id == self_id,
    )


def service_name(service: str) -> str:
    return pb.DESCRIPTOR.services_by_name[service].full_name


async def serve_until_signalled(stop, stop_timeout_s: float = 10.0) -> None:
    """Run until SIGTERM/SIGINT, then await `stop()` (bounded) so gossip can announce the leave."""
    import signal

    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
    try:
        await asyncio.wait_for(stop(), timeout=stop_timeout_s)
    except asyncio.TimeoutError:
        log.warning("shutdown did not finish within %.1f s", stop_timeout_s)


# ---- TLS ----------------------------------------------------------------------------------------------------
class TlsConfigError(ValueError):
    """A certificate, key or CA file is missing, unreadable or not PEM."""


def read_pem(path: str, what: str) -> bytes:
    """The bytes of a PEM file, or TlsConfigError naming the file and what it was meant to hold."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise TlsConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"{what} {path} is not a PEM file")
    return data


def read_gossip_key(path: str) -> bytes:
    """The shared gossip key in `path` (surrounding whitespace, e.g. a trailing newline, is not part of it);
    ValueError naming the file when it cannot be read or is too short to be a key."""
    from llmgw.gossip.auth import MIN_KEY_SIZE

    try:
        with open(path, "rb") as fh:
            key = fh.read(64 * 1024 + 1).strip()
    except OSError as exc:
        raise ValueError(f"cannot read gossip key file {path}: {exc.strerror or exc}") from None
    if len(key) > 64 * 1024:
        raise ValueError(f"gossip key file {path} is over 64 KiB: not a key")
    if len(key) < MIN_KEY_SIZE:
        raise ValueError(f"gossip key file {path} holds {len(key)} bytes; a key needs at least {MIN_KEY_SIZE}")
    return key


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None = None) -> grpc.ServerCredentials:
    """TLS for a gRPC server; with `client_ca_file`, clients must present a certificate signed by that CA."""
    cert = read_pem(cert_file, "TLS certificate")
    key = read_pem(key_file, "TLS private key")
    client_ca = read_pem(client_ca_file, "TLS client CA") if client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def channel_credentials(ca_file: str | None = None, cert_file: str | None = None,
                        key_file: str | None = None) -> grpc.ChannelCredentials:
    """TLS for a gRPC client: trust `ca_file` (None = the system roots); `cert_file` + `key_file` for mutual TLS."""
    if (cert_file is None) != (key_file is None):
        raise TlsConfigError("a client certificate needs both its certificate and its key file")
    ca = read_pem(ca_file, "TLS CA") if ca_file else None
    cert = read_pem(cert_file, "TLS client certificate") if cert_file else None
    key = read_pem(key_file, "TLS client key") if key_file else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def add_port(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind `address` in plaintext or, given credentials, with TLS; returns the bound port (0 = failed)."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)
