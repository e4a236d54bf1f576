"""Adapters that let an llmgw replica serve LLMReplica.Generate from a real model server."""

from llmgw.backends.openai_upstream import OpenAIUpstreamBackend, SSEDecoder, UpstreamError

__all__ = ["OpenAIUpstreamBackend", "SSEDecoder", "UpstreamError"]
