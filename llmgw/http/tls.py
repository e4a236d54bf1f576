"""Moved to llmgw.tls (one TLS module for both transports). This re-export stays only until the files that still
import it from here (llmgw/gateway/app.py) are switched; new code imports llmgw.tls."""

from llmgw.tls import TlsConfigError, client_ssl_context, server_ssl_context

__all__ = ["TlsConfigError", "client_ssl_context", "server_ssl_context"]
