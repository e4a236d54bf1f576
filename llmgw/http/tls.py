"""ssl.SSLContext builders for the HTTP front (server side) and its clients (tests, the upstream backend)."""

from __future__ import annotations

import ssl

from llmgw.replica.wire import TlsConfigError, read_pem

__all__ = ["TlsConfigError", "client_ssl_context", "server_ssl_context"]


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
