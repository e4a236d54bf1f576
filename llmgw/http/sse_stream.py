"""What both OpenAI fronts write on a Server-Sent-Events answer: the response that carries it, its end marker, and
the error event that ends it when the status line is long gone."""

from __future__ import annotations

from typing import Any

from aiohttp import web

SSE_DONE = b"data: [DONE]\n\n"


class EventStreamResponse(web.StreamResponse):
    """A streamed answer whose status line and headers leave in the same write as its first events (aiohttp's
    StreamResponse sends them on their own at prepare(): one more syscall and TCP segment per response, and the
    client's first token a write later). aiohttp's own Response buffers its headers the same way; write() and
    write_eof() send the buffered headers along with their data."""

    _send_headers_immediately = False


async def start_event_stream(request: Any, headers: dict[str, str]) -> Any:
    """The streamed answer to `request`, its headers on their way with the first events: on the lean front
    (llmgw.http.lean_front) its own stream, on aiohttp an EventStreamResponse. Either has write(data) and
    write_eof(data)."""
    start = getattr(request, "start_event_stream", None)
    if start is not None:
        return start(headers)
    response = EventStreamResponse(headers=headers)
    await response.prepare(request)
    return response


async def end_with_error_event(response: Any, event: bytes) -> None:
    """End a stream with one error event and no `data: [DONE]`, so the client can tell a truncated answer from a
    complete one. A client that already left is no error."""
    try:
        await response.write(event)
        await response.write_eof()
    except ConnectionError:
        pass
