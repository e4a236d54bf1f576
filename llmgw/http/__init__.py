"""HTTP front of the gateway: the OpenAI-compatible API (openai_api.py), health/metrics/admin (admin.py) and the
aiohttp server that carries both on the gateway's event loop (server.py)."""

from llmgw.http.server import HttpFront, start_http

__all__ = ["HttpFront", "start_http"]
