"""Server-Sent Events, sans-IO: feed bytes as they arrive, get complete events back.

The framing follows the WHATWG EventSource rules the model servers write to (and clients such as the OpenAI SDK
read with): UTF-8 text; lines end with CRLF, LF or CR; a blank line dispatches the event; `data:` lines of one event
are joined with LF; lines starting with ":" are comments (keep-alive pings); one space after the colon is dropped;
`event`, `id` and `retry` are kept; other fields are ignored; a partial event at the end of the stream is
discarded (so `at_event_boundary` tells a cleanly ended stream from one cut inside an event).

This file does not know about HTTP or OpenAI; `decode_openai_event` at the bottom is the one OpenAI rule: every
event's data is either the `[DONE]` sentinel or a JSON object, anything else is a malformed stream.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any, Final

DONE: Final = "[DONE]"

# One regex finds the next line end; "\r\n" is tried first so a CRLF is one line end, not two.
_LINE_END = re.compile(r"\r\n|\r|\n")

DEFAULT_MAX_EVENT_CHARS: Final = 8 * 1024 * 1024


class SSEError(ValueError):
    """The byte stream is not a valid event stream (bad UTF-8, an event over the size limit)."""


class MalformedOpenAIStream(SSEError):
    """The event stream is valid SSE but not a valid OpenAI stream (data that is not a JSON object)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


class SSEParser:
    """Incremental event-stream parser. `feed(bytes)` returns the events those bytes completed, in order; any split
    of the same byte stream into chunks yields the same events. Errors are SSEError and leave the parser unusable
    (a stream that is malformed once is not trusted again)."""

    def __init__(self, *, max_event_chars: int = DEFAULT_MAX_EVENT_CHARS) -> None:
        if max_event_chars < 1:
            raise ValueError(f"max_event_chars must be >= 1, got {max_event_chars!r}")
        self._max_event_chars = max_event_chars
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self._line_parts: list[str] = []  # text of the current line so far (no line end seen yet)
        self._line_chars = 0
        self._skip_lf = False  # the previous chunk ended with CR: a LF starting this one completes that CRLF
        self._at_start = True  # a UTF-8 byte order mark is dropped only at the very start
        self._data: list[str] = []
        self._data_chars = 0
        self._event_type = ""
        self._last_id = ""
        self._retry: int | None = None
        self._failed: SSEError | None = None

    @property
    def at_event_boundary(self) -> bool:
        """True when no partial line or undispatched data is pending: the stream could end here cleanly."""
        return not self._line_parts and not self._data and not self._event_type and not self._pending_bytes()

    def _pending_bytes(self) -> bool:
        buffered, _ = self._decoder.getstate()
        return bool(buffered)

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if self._failed is not None:
            raise self._failed
        try:
            text = self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            self._failed = SSEError(f"event stream is not valid UTF-8: {exc.reason} at byte {exc.start} of a chunk")
            raise self._failed from exc
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._skip_lf:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        if not self._line_parts and not self._data and text.endswith("\n\n") and "\r" not in text:
            return self._whole_events(text)
        # Most chunks use LF only: str.split is the fast path; the regex handles CR and CRLF.
        if "\r" in text:
            lines = _LINE_END.split(text)
            # A CR at the very end may be the first half of a CRLF whose LF arrives in the next chunk.
            self._skip_lf = text.endswith("\r")
        else:
            lines = text.split("\n")
        rest = lines.pop()  # the text after the last line end: the start of a line not yet complete
        events: list[ServerSentEvent] = []
        if lines:
            if self._line_parts:
                self._line_parts.append(lines[0])
                lines[0] = "".join(self._line_parts)
                self._line_parts.clear()
                self._line_chars = 0
            for line in lines:
                event = self._process_line(line)
                if event is not None:
                    events.append(event)
        if rest:
            self._line_chars += len(rest)
            if self._line_chars > self._max_event_chars:
                self._fail(f"a line of the event stream is longer than {self._max_event_chars} characters")
            self._line_parts.append(rest)
        return events

    def _whole_events(self, text: str) -> list[ServerSentEvent]:
        """The fast path of feed(): `text` starts at a line start with nothing pending and ends at the end of an
        event (LF line ends only) -- what a model server sends per network read. An event that is one `data:`
        line is dispatched directly; any other block goes through the line rules, followed by the blank line
        that ended it, so the events are the ones the general path makes (the blocks are split at each
        "\\n\\n", and a block holding a line end is exactly a run of lines before that blank line)."""
        events: list[ServerSentEvent] = []
        blocks = text.split("\n\n")
        blocks.pop()  # "": the text ends with the blank line that dispatches the last block
        for block in blocks:
            if block.startswith("data:") and "\n" not in block and not self._event_type:
                value = block[6:] if block.startswith(" ", 5) else block[5:]
                if len(value) + 1 > self._max_event_chars:
                    self._fail(f"an event of the event stream is longer than {self._max_event_chars} characters")
                events.append(ServerSentEvent(data=value, event="message", id=self._last_id, retry=self._retry))
                continue
            for line in block.split("\n"):
                event = self._process_line(line)
                if event is not None:
                    events.append(event)
            event = self._dispatch()
            if event is not None:
                events.append(event)
        return events

    def _fail(self, message: str) -> None:
        self._failed = SSEError(message)
        raise self._failed

    def _process_line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            return None
        if line.startswith("data:"):  # nearly every line: skip the general field parsing
            name, colon, value = "data", ":", line[5:]
        else:
            name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data_chars += len(value) + 1
            if self._data_chars > self._max_event_chars:
                self._fail(f"an event of the event stream is longer than {self._max_event_chars} characters")
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._data:
            # No data: per the standard nothing is dispatched, and the event type does not carry over.
            self._event_type = ""
            return None
        event = ServerSentEvent(data="\n".join(self._data), event=self._event_type or "message", id=self._last_id,
                                retry=self._retry)
        self._data.clear()
        self._data_chars = 0
        self._event_type = ""
        return event


def decode_openai_event(event: ServerSentEvent) -> dict[str, Any] | None:
    """The JSON object an OpenAI-compatible stream carries in one event, or None for the `[DONE]` sentinel.

    Raises MalformedOpenAIStream for anything else: data that is not JSON, or JSON that is not an object.
    """
    data = event.data
    if data == DONE:
        return None
    try:
        value = _loads_object(data)
    except ValueError as exc:
        raise MalformedOpenAIStream(f"stream event data is not JSON ({exc}): {_excerpt(data)}") from exc
    if not isinstance(value, dict):
        raise MalformedOpenAIStream(f"stream event data is JSON but not an object: {_excerpt(data)}")
    return value


# json.loads' own scanner, called directly: for data that is one JSON object and nothing else (every event of an
# OpenAI stream) it gives what json.loads gives, without the two whitespace matches and two Python frames around
# it -- once per streamed event. Anything else goes through json.loads, which makes the same value or error.
_scan_once: Callable[[str, int], tuple[Any, int]] = vars(json.JSONDecoder())["scan_once"]  # set in its __init__


def _loads_object(data: str) -> Any:
    if data[:1] == "{":
        try:
            value, end = _scan_once(data, 0)
        except StopIteration:
            return json.loads(data)
        if end == len(data):
            return value
    return json.loads(data)


def _excerpt(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
