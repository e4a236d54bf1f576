"""A throwaway certificate for tests that serve TLS on loopback, made with the openssl command."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed_localhost(directory: Path) -> tuple[str, str]:
    """(certificate, key) files for 127.0.0.1 / localhost; the certificate is its own CA."""
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key_file), "-out", str(cert_file), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=30)
    return str(cert_file), str(key_file)
