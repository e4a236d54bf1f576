"""What both OpenAI fronts write on a Server-Sent-Events answer that is already under way: its end marker, and the
error event that ends it when the status line is long gone."""

from __future__ import annotations

from aiohttp import web

SSE_DONE = b"data: [DONE]\n\n"


async def end_with_error_event(response: web.StreamResponse, event: bytes) -> None:
    """End a stream with one error event and no `data: [DONE]`, so the client can tell a truncated answer from a
    complete one. A client that already left is no error."""
    try:
        await response.write(event)
        await response.write_eof()
    except ConnectionError:
        pass
