"""Server-Sent Events, sans-IO: feed bytes as they arrive, get complete events back.

The framing follows the WHATWG EventSource rules the model servers write to (and clients such as the OpenAI SDK
read with): UTF-8 text; lines end with CRLF, LF or CR; a blank line dispatches the event; `data:` lines of one event
are joined with LF; lines starting with ":" are comments (keep-alive pings); one space after the colon is dropped;
`event`, `id` and `retry` are kept; other fields are ignored; a partial event at the end of the stream is
discarded (so `at_event_boundary` tells a cleanly ended stream from one cut inside an event).

Two ways to read a stream, one per parser: `feed` returns ServerSentEvent objects (str fields); `feed_data` returns
only each event's data, as the UTF-8 bytes the server sent, and works on bytes throughout -- for a proxy that
passes those bytes on and needs neither the event type nor the id, it skips decoding each chunk to str and encoding
each event's data back. Both apply the same rules with the same verdicts (see feed_data).

This file does not know about HTTP; the OpenAI rule at the bottom (`decode_openai_event`, and `decode_openai_data`
for bytes) is that every event's data is either the `[DONE]` sentinel or a JSON object, anything else is a malformed
stream.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any, Final

import orjson

DONE: Final = "[DONE]"
DONE_BYTES: Final = b"[DONE]"

# One regex finds the next line end; "\r\n" is tried first so a CRLF is one line end, not two.
_LINE_END = re.compile(r"\r\n|\r|\n")
_LINE_END_BYTES = re.compile(rb"\r\n|\r|\n")
_BOM_BYTES: Final = codecs.BOM_UTF8
_CR: Final = 0x0D
_LF: Final = 0x0A

# Which of the two reading methods a parser serves (set by its first call; see SSEParser).
_FEED: Final = "feed"
_FEED_DATA: Final = "feed_data"

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
    (a stream that is malformed once is not trusted again).

    `feed_data(bytes)` is the bytes twin of `feed`: the data of each event as UTF-8 bytes. A parser serves one of
    the two methods for its whole life (they keep separate state); calling the other one raises RuntimeError."""

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
        self._method: str | None = None
        # feed_data's state, the bytes counterparts of the above. Sizes are still counted in characters
        # (_line_chars, _data_chars), so both methods fail a stream at the same point.
        self._utf8_tail = b""  # the first bytes of a character whose other bytes have not arrived yet
        self._raw_line_parts: list[bytes] = []
        self._raw_data: list[bytes] = []
        self._raw_event_type = b""

    @property
    def at_event_boundary(self) -> bool:
        """True when no partial line or undispatched data is pending: the stream could end here cleanly."""
        return (not self._line_parts and not self._data and not self._event_type and not self._pending_bytes()
                and not self._raw_line_parts and not self._raw_data and not self._raw_event_type
                and not self._utf8_tail)

    def _pending_bytes(self) -> bool:
        buffered, _ = self._decoder.getstate()
        return bool(buffered)

    def _claim(self, method: str) -> None:
        if self._method is not None:
            raise RuntimeError(f"this SSEParser serves {self._method}(); {method}() needs a parser of its own")
        self._method = method

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if self._method is not _FEED:
            self._claim(_FEED)
        if self._failed is not None:
            raise self._failed
        try:
            text = self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            self._failed = _not_utf8(exc)
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

    # --- feed_data: the same rules on bytes -------------------------------------------------------------------

    def feed_data(self, chunk: bytes) -> list[bytes]:
        """The data of each event `chunk` completed, as UTF-8 bytes: exactly `[e.data.encode() for e in feed(chunk)]`
        for the same stream split the same way, and SSEError on the same chunk with the same message.

        It mirrors feed() step for step on bytes, which is exact because every framing byte (CR, LF, ":", " ",
        the field names) is ASCII and never part of a multi-byte character. Like feed(), it only parses whole
        characters: the start of a character cut by the chunk's end waits in `_utf8_tail`, and the bytes are
        checked by the same UTF-8 decoder function feed()'s incremental decoder calls, on the same bytes, so
        invalid UTF-8 fails on the same chunk at the same byte. ASCII chunks (the common case) skip even that.
        Size limits count characters, as feed() does; the count costs a decode only for non-ASCII text, and on
        the fast path only once the byte length (never below it) reaches the limit. `id:` and `retry:` lines are
        skipped: no data depends on them."""
        if self._method is not _FEED_DATA:
            self._claim(_FEED_DATA)
        if self._failed is not None:
            raise self._failed
        if self._utf8_tail or not chunk.isascii():
            chunk = self._whole_characters(chunk)
        if not chunk:
            return []
        if self._at_start:
            self._at_start = False
            if chunk.startswith(_BOM_BYTES):
                chunk = chunk[3:]
        if self._skip_lf:
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        # A byte is searched for as an int (0x0D, 0x0A): `b"\r" in chunk` first tries the argument as an int, and
        # the TypeError it makes and clears costs several times the search.
        if not self._raw_line_parts and not self._raw_data and chunk.endswith(b"\n\n") and _CR not in chunk:
            end = len(chunk) - 2
            if chunk.find(_LF) == end and chunk.startswith(b"data:") and not self._raw_event_type:
                # One event of one data line, what a model server sends per token: _whole_events_data without
                # the split, a third less time per chunk.
                value = chunk[6:end] if chunk[5] == 0x20 else chunk[5:end]
                if len(value) >= self._max_event_chars and _chars(value) >= self._max_event_chars:
                    self._fail(f"an event of the event stream is longer than {self._max_event_chars} characters")
                return [value]
            return self._whole_events_data(chunk)
        if _CR in chunk:
            lines = _LINE_END_BYTES.split(chunk)
            self._skip_lf = chunk.endswith(b"\r")
        else:
            lines = chunk.split(b"\n")
        rest = lines.pop()
        datas: list[bytes] = []
        if lines:
            if self._raw_line_parts:
                self._raw_line_parts.append(lines[0])
                lines[0] = b"".join(self._raw_line_parts)
                self._raw_line_parts.clear()
                self._line_chars = 0
            for line in lines:
                data = self._process_data_line(line)
                if data is not None:
                    datas.append(data)
        if rest:
            self._line_chars += _chars(rest)
            if self._line_chars > self._max_event_chars:
                self._fail(f"a line of the event stream is longer than {self._max_event_chars} characters")
            self._raw_line_parts.append(rest)
        return datas

    def _whole_characters(self, chunk: bytes) -> bytes:
        """`chunk` after any bytes held back from the previous one, up to its last whole character; the bytes of a
        character it cuts are held back. SSEError if the bytes are not UTF-8. This is what feed()'s incremental
        decoder does (codecs.BufferedIncrementalDecoder with codecs.utf_8_decode), minus keeping the text."""
        tail = self._utf8_tail
        data = tail + chunk if tail else chunk
        try:
            _, whole = codecs.utf_8_decode(data, "strict", False)
        except UnicodeDecodeError as exc:
            self._failed = _not_utf8(exc)
            raise self._failed from exc
        if whole == len(data):
            self._utf8_tail = b""
            return data
        self._utf8_tail = data[whole:]
        return data[:whole]

    def _whole_events_data(self, chunk: bytes) -> list[bytes]:
        """feed_data's fast path, _whole_events on bytes: a block that is one `data:` line is its event's data."""
        datas: list[bytes] = []
        blocks = chunk.split(b"\n\n")
        blocks.pop()
        for block in blocks:
            if block.startswith(b"data:") and _LF not in block and not self._raw_event_type:
                value = block[6:] if block.startswith(b" ", 5) else block[5:]
                if len(value) >= self._max_event_chars and _chars(value) >= self._max_event_chars:
                    self._fail(f"an event of the event stream is longer than {self._max_event_chars} characters")
                datas.append(value)
                continue
            for line in block.split(b"\n"):
                data = self._process_data_line(line)
                if data is not None:
                    datas.append(data)
            data = self._dispatch_data()
            if data is not None:
                datas.append(data)
        return datas

    def _process_data_line(self, line: bytes) -> bytes | None:
        if not line:
            return self._dispatch_data()
        if line[0] == 0x3A:  # ":"
            return None
        if line.startswith(b"data:"):
            name, colon, value = b"data", b":", line[5:]
        else:
            name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data_chars += _chars(value) + 1
            if self._data_chars > self._max_event_chars:
                self._fail(f"an event of the event stream is longer than {self._max_event_chars} characters")
            self._raw_data.append(value)
        elif name == b"event":
            self._raw_event_type = value  # no data depends on it, but a pending one means "inside an event"
        return None

    def _dispatch_data(self) -> bytes | None:
        if not self._raw_data:
            self._raw_event_type = b""
            return None
        data = b"\n".join(self._raw_data)
        self._raw_data.clear()
        self._data_chars = 0
        self._raw_event_type = b""
        return data


def _not_utf8(exc: UnicodeDecodeError) -> SSEError:
    return SSEError(f"event stream is not valid UTF-8: {exc.reason} at byte {exc.start} of a chunk")


def _chars(whole_utf8: bytes) -> int:
    """How many characters `whole_utf8` (valid UTF-8, whole characters only) holds."""
    return len(whole_utf8) if whole_utf8.isascii() else len(whole_utf8.decode("utf-8"))


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
    except RecursionError as exc:  # json's scanner takes a frame per level: a hostile server can nest deeper
        raise MalformedOpenAIStream(f"stream event data is nested too deeply to read: {_excerpt(data)}") from exc
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


def decode_openai_data(data: bytes) -> dict[str, Any] | None:
    """decode_openai_event for an event's data as bytes (what SSEParser.feed_data returns): the same value or the
    same error as `decode_openai_event(ServerSentEvent(data.decode()))`, for any data that is UTF-8. Data that is
    not UTF-8 (which feed_data never returns) is MalformedOpenAIStream.

    orjson parses the common case from the bytes (0.6 us for a typical chunk where json's scanner takes 1.5 us on
    the str, before the str is even made), and its answer is kept only where it is known to be json's; anything
    else is answered by decode_openai_event itself, so every error, and its message, is the reference's.

    Where the two parsers part (found with orjson 3.13; tests/test_upstream_sse.py checks the installed one):
    - orjson rejects NaN, Infinity and -Infinity, a number that overflows a double (1e400; json makes it inf),
      a lone surrogate in a \\u escape, and nesting deeper than 1024: its error sends the data to json.
    - orjson turns an integer beyond 64 bits into a float (json keeps the int). Such an integer has at least 19
      digits, so data holding a run of 19 digits anywhere goes to json.
    - json's scanner takes a frame per level of nesting and raises RecursionError (not an SSEError) when those
      and the caller's frames reach the recursion limit (1000), where orjson, up to 1024 levels, answers: data
      with more than _ORJSON_MAX_BRACKETS brackets goes to json, so the verdict there is json's too.
    - The same either way: duplicate keys (the last value wins, at the first key's place), floats (both round
      correctly: 4.8 million random decimal strings agreed to the bit), -0.0 and -0 (int 0), 1e-400 (0.0),
      whitespace (space, tab, CR, LF only), a BOM (an error), trailing data (an error), control characters in a
      string (an error), U+2028 and DEL in a string (kept).
    """
    if data == DONE_BYTES:
        return None
    value = loads_where_json_agrees(data)
    if type(value) is dict:
        return value
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedOpenAIStream(f"stream event data is not UTF-8 ({exc.reason}): {data[:200]!r}") from exc
    return decode_openai_event(ServerSentEvent(text))


NOT_CERTAIN: Final = object()  # loads_where_json_agrees: ask json


def loads_where_json_agrees(data: bytes) -> Any:
    """orjson's value of `data` where it is known to be json.loads' value of the same text (the cases are in
    decode_openai_data's docstring), else NOT_CERTAIN: the caller asks json, for its value or its error."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return NOT_CERTAIN
    if data.translate(_DIGITS_AS_ZERO).find(_DIGIT_RUN) >= 0 or (
            len(data) > _ORJSON_MAX_BRACKETS and data.count(b"{") + data.count(b"[") > _ORJSON_MAX_BRACKETS):
        return NOT_CERTAIN
    return value


# Bytes -> b"0" for a digit, b" " for anything else: a run of 19 digits is then a search for one fixed string.
_DIGITS_AS_ZERO: Final = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_DIGIT_RUN: Final = b"0" * 19
# Data with at most this many brackets nests no deeper, far from json's recursion limit (1000 frames, less the
# caller's); more goes to json, though it is rarely deep (a chunk with many top_logprobs).
_ORJSON_MAX_BRACKETS: Final = 256
