"""Real-backend adapter: stream tokens from any OpenAI-compatible server (vLLM, SGLang, llama.cpp, another llmgw
gateway's HTTP front) through its `/v1/completions` endpoint with `stream: true`.

A replica built on this adapter answers LLMReplica.Generate with what the upstream streams: each SSE chunk's text
is one token. A failed-over stream resumes by sending the prompt plus the text already produced, asking for the
tokens still missing -- a real model then continues the text where the previous replica stopped.

Errors are UpstreamError with `kind` saying how the replica should answer Generate:
"invalid" (upstream 400/413/422: INVALID_ARGUMENT), "busy" (429: RESOURCE_EXHAUSTED, try elsewhere),
"unavailable" (anything else, including a stream that breaks or ends without `data: [DONE]`: UNAVAILABLE, so the
gateway fails over). A stream that ends early with [DONE] and finish_reason "stop" is a complete answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import aiohttp

log = logging.getLogger("llmgw.backends.openai")

_INVALID = (400, 404, 413, 422)


class UpstreamError(Exception):
    def __init__(self, message: str, *, kind: str = "unavailable", status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind  # "invalid" | "busy" | "unavailable"
        self.status = status


def _kind_for_status(status: int) -> str:
    if status in _INVALID:
        return "invalid"
    if status == 429:
        return "busy"
    return "unavailable"


class SSEDecoder:
    """Server-Sent Events framing (WHATWG rules the upstream servers use): `data:` lines of one event are joined
    with newlines, a blank line dispatches the event, comment lines (":") and other fields are ignored."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def line(self, raw: bytes) -> str | None:
        """Feed one line (with or without its line ending); returns the event's data when it completes one."""
        text = raw.decode("utf-8").rstrip("\r\n")
        if not text:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if text.startswith(":"):
            return None
        field, _, value = text.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


class OpenAIUpstreamBackend:
    """Streams completions from one OpenAI-compatible server.

    `upstream_url` is the server's base URL with or without the trailing "/v1" ("http://host:8000" or
    "http://host:8000/v1"). `timeout_s` bounds connecting and every wait for the next chunk (a silent upstream is
    an error after that long), not the whole stream: the gateway's request deadline covers that. At most
    `max_connections` requests run upstream at once; more wait for a connection.
    """

    def __init__(self, upstream_url: str, model: str, *, timeout_s: float = 30.0, max_connections: int = 64,
                 api_key: str | None = None) -> None:
        if not isinstance(upstream_url, str) or not upstream_url.startswith(("http://", "https://")):
            raise ValueError(f"upstream_url must be an http(s) URL, got {upstream_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError("model must be a non-empty string")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"max_connections must be an integer >= 1, got {max_connections!r}")
        base = upstream_url.rstrip("/")
        self.completions_url = (base if base.endswith("/v1") else base + "/v1") + "/completions"
        self.model = model
        self.timeout_s = float(timeout_s)
        self.max_connections = max_connections
        self._headers = {"Accept": "text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use: a ClientSession belongs to the running loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout_s, sock_read=self.timeout_s),
                headers=self._headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> OpenAIUpstreamBackend:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def generate(self, prompt: str, max_tokens: int, already: list[str]) -> AsyncIterator[str]:
        """Yield the answer's tokens after `already` (the tokens a previous replica produced), up to
        max_tokens in total. Closing the iterator early closes the upstream connection, which cancels the
        upstream request."""
        remaining = max_tokens - len(already)
        if remaining <= 0:
            return
        body = {"model": self.model, "prompt": prompt + "".join(already), "max_tokens": remaining, "stream": True}
        try:
            async with self._client().post(self.completions_url, json=body) as response:
                if response.status != 200:
                    raise UpstreamError(await _error_message(response), kind=_kind_for_status(response.status),
                                        status=response.status)
                async for token in self._tokens(response, remaining):
                    yield token
        except UpstreamError as exc:
            log.debug("upstream %s: %s", self.completions_url, exc.message)
            raise
        except (TimeoutError, aiohttp.ClientError, UnicodeDecodeError, ValueError) as exc:
            log.debug("upstream %s failed: %r", self.completions_url, exc)
            raise UpstreamError(f"upstream {self.completions_url}: {type(exc).__name__}: {exc}") from exc

    async def _tokens(self, response: aiohttp.ClientResponse, remaining: int) -> AsyncIterator[str]:
        decoder = SSEDecoder()
        produced = 0
        async for raw in response.content:
            data = decoder.line(raw)
            if data is None:
                continue
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if not isinstance(chunk, dict):
                raise UpstreamError(f"upstream sent a non-object chunk: {data[:200]}")
            if "error" in chunk:
                error = chunk["error"]
                message = error.get("message") if isinstance(error, dict) else str(error)
                raise UpstreamError(f"upstream stream failed after {produced} tokens: {message}")
            for choice in chunk.get("choices") or ():
                text = choice.get("text") if isinstance(choice, dict) else None
                if text:
                    produced += 1
                    if produced > remaining:
                        raise UpstreamError(f"upstream sent more than the {remaining} tokens asked for")
                    yield text
        raise UpstreamError(f"upstream stream ended after {produced} tokens without [DONE]")


async def _error_message(response: aiohttp.ClientResponse) -> str:
    text = (await response.text(errors="replace"))[:2000]
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text.strip() or response.reason or "no details"
    return f"upstream answered HTTP {response.status}: {message}"
