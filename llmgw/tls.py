"""TLS material for both transports: gRPC server/channel credentials and ssl.SSLContexts for HTTP.

Every builder reads its PEM files itself first, so a missing or wrong file is a TlsConfigError naming the file and
what it was meant to hold, before grpc's or ssl's terse errors.
"""

from __future__ import annotations

import ssl

import grpc

__all__ = ["TlsConfigError", "channel_credentials", "client_ssl_context", "read_pem", "server_credentials",
           "server_ssl_context"]


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


# ---- gRPC -----------------------------------------------------------------------------------------------------
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


# ---- HTTP -----------------------------------------------------------------------------------------------------
def server_ssl_context(cert_file: str, key_file: str, client_ca_file: str | None = None) -> ssl.SSLContext:
    """HTTPS for the HTTP front; with `client_ca_file`, clients must present a certificate signed by that CA."""
    read_pem(cert_file, "TLS certificate")  # a clear error before ssl's terse ones
    read_pem(key_file, "TLS private key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
        if client_ca_file:
            read_pem(client_ca_file, "TLS client CA")
            context.load_verify_locations(cafile=client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise TlsConfigError(f"TLS certificate {cert_file} / key {key_file}: {exc.reason or exc}") from None
    return context


def client_ssl_context(ca_file: str | None = None, cert_file: str | None = None,
                       key_file: str | None = None) -> ssl.SSLContext:
    """A verifying client context trusting `ca_file` (None = the system roots), optionally with a client cert."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        if ca_file:
            read_pem(ca_file, "TLS CA")
            context.load_verify_locations(cafile=ca_file)
        if cert_file or key_file:
            if not (cert_file and key_file):
                raise TlsConfigError("a client certificate needs both its certificate and its key file")
            context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise TlsConfigError(f"TLS client setup: {exc.reason or exc}") from None
    return context
