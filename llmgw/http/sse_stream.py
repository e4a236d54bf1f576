"""What both OpenAI fronts write on a Server-Sent-Events answer: the response that carries it, its end marker, and
the error event that ends it when the status line is long gone."""

from __future__ import annotations

from aiohttp import web

SSE_DONE = b"data: [DONE]\n\n"


class EventStreamResponse(web.StreamResponse):
    """A streamed answer whose status line and headers leave in the same write as its first events (aiohttp's
    StreamResponse sends them on their own at prepare(): one more syscall and TCP segment per response, and the
    client's first token a write later). aiohttp's own Response buffers its headers the same way; write() and
    write_eof() send the buffered headers along with their data."""

    _send_headers_immediately = False


async def end_with_error_event(response: web.StreamResponse, event: bytes) -> None:
    """End a stream with one error event and no `data: [DONE]`, so the client can tell a truncated answer from a
    complete one. A client that already left is no error."""
    try:
        await response.write(event)
        await response.write_eof()
    except ConnectionError:
        pass
