"""The incremental Server-Sent-Events parser and the OpenAI event rule, and their bytes twins (feed_data,
decode_openai_data), which must agree with them on every input."""

import json
import math

import pytest
from conftest import examples
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llmgw.upstream.sse import (
    DEFAULT_MAX_EVENT_CHARS,
    DONE,
    NOT_CERTAIN,
    MalformedOpenAIStream,
    ServerSentEvent,
    SSEError,
    SSEParser,
    decode_openai_data,
    decode_openai_event,
    loads_where_json_agrees,
)


def parse_all(stream: bytes, cuts=()) -> list[ServerSentEvent]:
    parser = SSEParser()
    events = []
    start = 0
    for cut in sorted(cuts) + [len(stream)]:
        events += parser.feed(stream[start:cut])
        start = cut
    return events


def test_framing_rules():
    stream = (b": keep-alive comment\n"
              b"data: first\n\n"
              b"event: update\nid: 7\nretry: 1500\ndata:no space\ndata:  two spaces\n\n"
              b"data\n\n"  # a field name alone: empty data
              b"unknown: ignored\ndata: x\n\n"
              b"\n\n"  # blank lines without data dispatch nothing
              b"event: lonely\n\n"  # an event type without data is dropped and does not carry over
              b"data: after\n\n")
    assert parse_all(stream) == [
        ServerSentEvent("first"),
        ServerSentEvent("no space\n two spaces", event="update", id="7", retry=1500),
        ServerSentEvent("", id="7", retry=1500),
        ServerSentEvent("x", id="7", retry=1500),
        ServerSentEvent("after", id="7", retry=1500),
    ]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(eol):
    stream = b"data: a" + eol + b"data: b" + eol + eol + b"data: [DONE]" + eol + eol
    assert [e.data for e in parse_all(stream)] == ["a\nb", DONE]


def test_crlf_split_between_chunks_is_one_line_end():
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    # The LF completes the CRLF: no blank line here, so both data lines belong to one event.
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n\r") == [ServerSentEvent("a\nb")]  # CRLF ended the line, the lone CR the event
    assert parser.feed(b"\ndata: c\n\n") == [ServerSentEvent("c")]  # that LF belonged to the CR


def test_utf8_split_inside_a_character_and_bom_at_start_only():
    stream = "\ufeffdata: héllo ✓ 🎉\n\n".encode()
    for cut in range(len(stream)):
        assert parse_all(stream, [cut]) == [ServerSentEvent("héllo ✓ 🎉")]
    # A BOM later in the stream is data, not framing.
    assert parse_all("data: \ufeffx\n\n".encode()) == [ServerSentEvent("\ufeffx")]


def test_invalid_utf8_is_an_error_and_the_parser_stays_failed():
    parser = SSEParser()
    with pytest.raises(SSEError, match="not valid UTF-8"):
        parser.feed(b"data: \xff\n\n")
    with pytest.raises(SSEError):
        parser.feed(b"data: fine\n\n")


def test_size_limit_bounds_lines_and_events():
    parser = SSEParser(max_event_chars=16)
    with pytest.raises(SSEError, match="longer than 16"):
        parser.feed(b"data: " + b"x" * 40)  # an unterminated line
    parser = SSEParser(max_event_chars=16)
    with pytest.raises(SSEError, match="longer than 16"):
        for _ in range(10):
            parser.feed(b"data: xxxx\n")  # many short data lines, never dispatched
    with pytest.raises(ValueError):
        SSEParser(max_event_chars=0)


def test_event_boundary_tells_a_clean_end_from_a_cut():
    parser = SSEParser()
    assert parser.at_event_boundary
    parser.feed(b"data: a\n")
    assert not parser.at_event_boundary  # data pending: a stream ending here lost an event
    parser.feed(b"\n")
    assert parser.at_event_boundary
    parser.feed(b"da")
    assert not parser.at_event_boundary
    parser = SSEParser()
    parser.feed("data: \u00e9\n\n".encode()[:-3])  # half of a two-byte character
    assert not parser.at_event_boundary


def test_openai_events():
    assert decode_openai_event(ServerSentEvent(DONE)) is None
    assert decode_openai_event(ServerSentEvent('{"a": [1, 2]}')) == {"a": [1, 2]}
    with pytest.raises(MalformedOpenAIStream, match="not JSON"):
        decode_openai_event(ServerSentEvent("{not json"))
    with pytest.raises(MalformedOpenAIStream, match="not an object"):
        decode_openai_event(ServerSentEvent("[1, 2]"))
    with pytest.raises(MalformedOpenAIStream, match="not JSON"):
        decode_openai_event(ServerSentEvent("[DONE] "))  # the sentinel is exact


# --- any split of the byte stream gives the same events -------------------------------------------------------

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=30)


@st.composite
def event_streams(draw):
    """A random well-formed stream (random line endings, comments, multi-line data) and its expected events."""
    events = draw(st.lists(st.tuples(st.lists(_text, min_size=1, max_size=3), st.sampled_from(["", "message", "x"]),
                                     st.booleans()), max_size=6))
    parts, expected = [], []
    for lines, event_type, with_comment in events:
        eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
        if with_comment:
            parts.append(":" + draw(_text) + eol)
        if event_type:
            parts.append(f"event: {event_type}{eol}")
        for line in lines:
            parts.append(f"data: {line}{eol}")
        parts.append(eol)
        expected.append(ServerSentEvent("\n".join(lines), event=event_type or "message"))
    return "".join(parts).encode(), expected


@settings(max_examples=examples(300), deadline=None)
@given(event_streams(), st.data())
def test_any_split_gives_the_same_events(stream_and_events, data):
    stream, expected = stream_and_events
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert parse_all(stream, cuts) == expected
    # Byte by byte, too.
    assert parse_all(stream, range(1, len(stream))) == expected


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=10)), max_size=4),
                max_size=5), st.data())
def test_openai_stream_round_trip_under_any_split(chunks, data):
    """Both ways of reading a stream (feed + decode_openai_event, feed_data + decode_openai_data) give back what
    was sent, however the bytes were cut."""
    stream = b"".join(b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\n\n" for c in chunks)
    stream += b"data: [DONE]\n\n"
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    assert [decode_openai_event(e) for e in parse_all(stream, cuts)] == [*chunks, None]
    parser = SSEParser()
    from_bytes = []
    for piece in split_at(stream, cuts):
        from_bytes += [decode_openai_data(raw) for raw in parser.feed_data(piece)]
    assert from_bytes == [*chunks, None]
    assert parser.at_event_boundary


# --- feed_data: the data of each event as bytes, by the same rules as feed -------------------------------------

def split_at(stream: bytes, cuts) -> list[bytes]:
    chunks, start = [], 0
    for cut in sorted(cuts) + [len(stream)]:
        chunks.append(stream[start:cut])
        start = cut
    return chunks


def via_feed(parser, chunk):
    return [event.data.encode("utf-8") for event in parser.feed(chunk)]


def via_feed_data(parser, chunk):
    return parser.feed_data(chunk)


def run_parser(read, chunks, max_event_chars=DEFAULT_MAX_EVENT_CHARS):
    """Per chunk: what `read(parser, chunk)` returned, or the SSEError it raised, and at_event_boundary after it."""
    parser = SSEParser(max_event_chars=max_event_chars)
    outcomes = []
    for chunk in chunks:
        try:
            got = read(parser, chunk)
        except SSEError as exc:
            got = f"SSEError: {exc}"
        outcomes.append((got, parser.at_event_boundary))
    return outcomes


def assert_twins(chunks, max_event_chars=DEFAULT_MAX_EVENT_CHARS):
    """feed_data gives, chunk by chunk, what feed gives (encoded), fails on the same chunk with the same message
    and agrees on at_event_boundary; returns those outcomes."""
    expected = run_parser(via_feed, chunks, max_event_chars)
    assert run_parser(via_feed_data, chunks, max_event_chars) == expected
    return expected


def all_data(outcomes) -> list[bytes]:
    return [data for got, _ in outcomes for data in got]


FRAMING_STREAM = (b": keep-alive comment\n"
                  b"data: first\n\n"
                  b"event: update\nid: 7\nretry: 1500\ndata:no space\ndata:  two spaces\n\n"
                  b"data\n\n"
                  b"unknown: ignored\ndata: x\n\n"
                  b"\n\n"
                  b"event: lonely\n\n"
                  b"data: after\n\n")


def test_feed_data_follows_the_framing_rules():
    expected = [b"first", b"no space\n two spaces", b"", b"x", b"after"]
    assert all_data(assert_twins([FRAMING_STREAM])) == expected
    assert all_data(assert_twins(split_at(FRAMING_STREAM, range(1, len(FRAMING_STREAM))))) == expected


def test_feed_data_whole_events_per_chunk():
    parser = SSEParser()
    assert parser.feed_data(b'data: {"a":1}\n\n') == [b'{"a":1}']
    assert parser.feed_data(b'data:{"b":2}\n\ndata: [DONE]\n\n') == [b'{"b":2}', b"[DONE]"]
    assert parser.at_event_boundary
    assert parser.feed_data(b"event: e\n") == []
    assert not parser.at_event_boundary  # an event type pending: inside an event
    assert parser.feed_data(b"data: c\n\ndata: d\n\n") == [b"c", b"d"]
    assert parser.at_event_boundary
    assert parser.feed_data(b"event: e\n") == []
    assert parser.feed_data(b"data: c\n\n") == [b"c"]  # one event per chunk, as a server sends a token
    assert parser.at_event_boundary
    assert [parser.feed_data(chunk) for chunk in (b"data:x\n\n", b"data:\n\n", b"data: \n\n", b"data:  y\n\n",
                                                  b"data: z\n", b"\n")] == [[b"x"], [b""], [b""], [b" y"], [], [b"z"]]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_feed_data_every_line_ending(eol):
    stream = b"data: a" + eol + b"data: b" + eol + eol + b"data: [DONE]" + eol + eol
    assert all_data(assert_twins([stream])) == [b"a\nb", b"[DONE]"]
    for cut in range(len(stream) + 1):
        assert all_data(assert_twins(split_at(stream, [cut]))) == [b"a\nb", b"[DONE]"]


def test_feed_data_crlf_split_between_chunks_is_one_line_end():
    parser = SSEParser()
    assert parser.feed_data(b"data: a\r") == []
    assert parser.feed_data(b"\ndata: b\r") == []
    assert parser.feed_data(b"\n\r") == [b"a\nb"]
    assert parser.feed_data(b"\ndata: c\n\n") == [b"c"]


def test_feed_data_utf8_split_inside_a_character_and_bom_at_start_only():
    stream = "\ufeffdata: héllo ✓ 🎉\n\n".encode()
    for cut in range(len(stream) + 1):
        assert all_data(assert_twins(split_at(stream, [cut]))) == ["héllo ✓ 🎉".encode()]
    assert assert_twins([b"\xef", b"\xbb", b"\xbfdata: x\n\n"]) == [([], False), ([], False), ([b"x"], True)]
    assert assert_twins([b"", b"\xef\xbb\xbfdata: x\n\n"]) == [([], True), ([b"x"], True)]
    # Only the first character of the stream is dropped as a BOM: after it, "\ufeffdata" is an unknown field.
    assert all_data(assert_twins([b"\xef\xbb\xbf\xef\xbb\xbfdata: y\n\ndata: z\n\n"])) == [b"z"]
    assert SSEParser().feed_data("data: \ufeffx\n\n".encode()) == ["\ufeffx".encode()]


@pytest.mark.parametrize("chunks", [
    [b"data: \xff\n\n"],
    [b"data: ok\n\n", b"data: \xed\xa0\x80\n\n"],  # an encoded surrogate
    [b"data: \xe2\x82", b"x\n\n"],  # a character cut by the chunk end, then a byte that cannot continue it
    [b"data: \xf0\x9f", b"\x8e", b"\x28\n\n"],
    [b"data: \xf0\x9f\x8e", b"\x89\n\n", b"\xc3", b"data: y\n\n"],
    [b"data: \xc0\xaf\n\n"],  # an overlong encoding
    [b"\xef\xbb", b"data"],  # half a BOM, then not the rest of it
])
def test_feed_data_invalid_utf8_fails_on_the_same_chunk_and_stays_failed(chunks):
    outcomes = assert_twins(chunks + [b"data: fine\n\n"])
    failed = [i for i, (got, _) in enumerate(outcomes) if isinstance(got, str)]
    assert failed and failed == list(range(failed[0], len(outcomes)))
    assert outcomes[failed[0]][0].startswith("SSEError: event stream is not valid UTF-8")
    parser = SSEParser()
    with pytest.raises(SSEError, match="not valid UTF-8"):
        for chunk in chunks:
            parser.feed_data(chunk)
    with pytest.raises(SSEError, match="not valid UTF-8"):
        parser.feed_data(b"data: fine\n\n")


def test_feed_data_size_limit_counts_characters_not_bytes():
    # max_event_chars=6: five two-byte characters (10 bytes) and the line end the join would add fit; six do not.
    parser = SSEParser(max_event_chars=6)
    assert parser.feed_data("data: ééééé\n\n".encode()) == ["ééééé".encode()]
    with pytest.raises(SSEError, match="an event of the event stream is longer than 6 characters"):
        SSEParser(max_event_chars=6).feed_data("data: éééééé\n\n".encode())
    # An unterminated line: "data: éééé" is 10 characters (14 bytes).
    assert SSEParser(max_event_chars=10).feed_data("data: éééé".encode()) == []
    with pytest.raises(SSEError, match="a line of the event stream is longer than 9 characters"):
        SSEParser(max_event_chars=9).feed_data("data: éééé".encode())
    for limit in range(1, 16):
        for stream in ("data: ééééé\n\n", "data: éé\ndata: é🎉\n\n", "data: éééé", "data: é\r\n\r\n", "x: ééé\n"):
            encoded = stream.encode()
            for cut in range(len(encoded) + 1):
                assert_twins(split_at(encoded, [cut]), max_event_chars=limit)


def test_feed_data_event_boundary_tells_a_clean_end_from_a_cut():
    parser = SSEParser()
    assert parser.at_event_boundary
    parser.feed_data(b"data: a\n")
    assert not parser.at_event_boundary
    parser.feed_data(b"\n")
    assert parser.at_event_boundary
    parser.feed_data(b"da")
    assert not parser.at_event_boundary
    parser = SSEParser()
    parser.feed_data(b"\xc3")  # only the first byte of a character is pending
    assert not parser.at_event_boundary


def test_a_parser_serves_one_method():
    parser = SSEParser()
    parser.feed(b"data: a\n\n")
    with pytest.raises(RuntimeError, match=r"serves feed\(\); feed_data\(\)"):
        parser.feed_data(b"data: b\n\n")
    parser = SSEParser()
    parser.feed_data(b"")
    with pytest.raises(RuntimeError, match=r"serves feed_data\(\); feed\(\)"):
        parser.feed(b"data: b\n\n")


# Pieces of event streams: field names with and without the colon and space, comments, every line end, several
# characters of 2 to 4 bytes, a BOM, whole lines and events; and byte sequences that are not UTF-8 (or cut
# characters, valid until the next byte arrives).
_SSE_PIECES = [b"data:", b"data: ", b"data", b"event:", b"event: x", b"id: 7", b"id:\x00", b"retry: 15",
               b"retry: x", b":", b": ping", b"unknown: y", b"x", b" ", b"{}", b"[DONE]", b"\n", b"\r", b"\r\n",
               b"\n\n", b"\r\n\r\n", "é".encode(), "✓".encode(), "🎉".encode(), "\ufeff".encode(),
               b"data: a\n", b"data:b\r\n", "data: é✓\r".encode(), b"event: e\n", b"data: {}\n\n", b"data: [DONE]\n\n"]
_NOT_UTF8 = [b"\xff", b"\xc3", b"\x80", b"\xe2\x82", b"\xed\xa0\x80", b"\xf0\x9f\x8e", b"\xf4\x90\x80\x80", b"\xc0\xaf"]


@st.composite
def sse_ish_streams(draw):
    pieces = draw(st.lists(st.sampled_from(_SSE_PIECES), max_size=40))
    if draw(st.integers(0, 3)) == 0:  # a quarter of the streams carry bytes that are not UTF-8
        for piece in draw(st.lists(st.sampled_from(_NOT_UTF8), min_size=1, max_size=2)):
            pieces.insert(draw(st.integers(0, len(pieces))), piece)
    return b"".join(pieces)


@settings(max_examples=examples(600), deadline=None)
@given(sse_ish_streams(), st.data(), st.sampled_from([DEFAULT_MAX_EVENT_CHARS, 1, 3, 8, 20]))
def test_feed_data_agrees_with_feed_on_any_stream_and_split(stream, data, max_event_chars):
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert_twins(split_at(stream, cuts), max_event_chars)
    assert_twins(split_at(stream, range(1, len(stream))), max_event_chars)  # byte by byte


@settings(max_examples=examples(300), deadline=None)
@given(event_streams(), st.data())
def test_feed_data_gives_each_events_data_under_any_split(stream_and_events, data):
    stream, expected = stream_and_events
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert all_data(assert_twins(split_at(stream, cuts))) == [event.data.encode() for event in expected]


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.lists(st.lists(_text, min_size=1, max_size=2), min_size=1, max_size=3), max_size=5))
def test_feed_data_chunks_of_whole_events(chunks_of_events):
    """What a model server sends per network read (the fast path): whole events, LF line ends."""
    chunks = [b"".join(b"".join(b"data: " + line.encode() + b"\n" for line in lines) + b"\n" for lines in events)
              for events in chunks_of_events]
    assert assert_twins(chunks) == [(["\n".join(lines).encode() for lines in events], True)
                                    for events in chunks_of_events]


@st.composite
def whole_event_chunks(draw):
    """Chunks of whole events with LF line ends, mostly one event of one `data:` line, spelled every way; now and
    then a comment, event type or id first, or a chunk that only sets the type of the event in the next one."""
    chunks = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 5)) == 0:
            chunks.append(b"event: pending\n")
            continue
        events = []
        for _ in range(draw(st.integers(1, 3))):
            first = draw(st.sampled_from([b"", b"", b"", b"event: x\n", b": ping\n", b"id: 1\n"]))
            lines = draw(st.lists(st.tuples(st.sampled_from([b"data: ", b"data:", b"data:  "]), _text),
                                  min_size=1, max_size=2))
            events.append(first + b"".join(prefix + text.encode() + b"\n" for prefix, text in lines) + b"\n")
        chunks.append(b"".join(events))
    return chunks


@settings(max_examples=examples(300), deadline=None)
@given(whole_event_chunks())
def test_feed_data_agrees_with_feed_on_whole_event_chunks(chunks):
    assert_twins(chunks)


# --- decode_openai_data: decode_openai_event on bytes ----------------------------------------------------------

def verdict(decode, data):
    """What `decode(data)` gives. A value as its repr, which for JSON values tells apart everything json can make:
    int, float and bool, the sign of -0.0, NaN (equal to itself here), the order of keys."""
    try:
        value = decode(data)
    except MalformedOpenAIStream as exc:
        return "error", str(exc)
    except RecursionError:  # json's scanner on deep nesting: the reference raises it, so must the twin
        return "RecursionError", None
    return "value", repr(value)


def reference_verdict(data: bytes):
    return verdict(lambda raw: decode_openai_event(ServerSentEvent(raw.decode("utf-8"))), data)


def assert_decoders_agree(data: bytes):
    expected = reference_verdict(data)
    assert verdict(decode_openai_data, data) == expected
    return expected


_EDGE_NUMBERS = [2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 10**19, -10**19, 10**20, 2**100, -0.0,
                 1e308, 5e-324, 0.1, 1 / 3]
_json_scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from(_EDGE_NUMBERS) | st.floats()
                 | st.text(st.characters(codec="utf-8"), max_size=8))
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(max_size=4), inner, max_size=4), max_leaves=12)
# Spliced into dumped JSON: structure, number and string syntax, escapes (lone surrogates), json-only literals,
# numbers orjson reads differently, whitespace json does not accept, a BOM, NUL and other controls.
_JSON_MUTATIONS = ["{", "}", "[", "]", '"', ",", ":", "0", "1", "-", ".", "e", "E", "+", " ", "\t", "\n", "\r",
                   "\x0c", "\x00", "\x1f", "\x7f", "\\", "\\u", "\\ud800", "\\udc00", "\\ud83d\\ude00", "NaN",
                   "Infinity", "-Infinity", "1e400", "\ufeff", "\u00a0", "\u2028", "é", "null", "true", "[DONE]",
                   "99999999999999999999", "-9223372036854775809", '"a":1,', '{"a":1}']


@st.composite
def json_ish(draw) -> str:
    objects = st.dictionaries(st.text(max_size=4), _json_values, max_size=5)
    value = draw(objects if draw(st.integers(0, 4)) else _json_values)  # mostly objects, as a stream carries
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])),
                      separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
    text = draw(st.sampled_from(["", " ", "\t\r\n"])) + text + draw(st.sampled_from(["", " ", "\n"]))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        where = draw(st.integers(0, len(text)))
        text = text[:where] + draw(st.sampled_from(_JSON_MUTATIONS)) + text[where + draw(st.integers(0, 2)):]
    return text


@settings(max_examples=examples(1500), deadline=None)
@given(json_ish())
@example('{"a": NaN, "b": Infinity, "c": -Infinity}')
@example('{"a": 1e400}')
@example('{"a": 18446744073709551616, "b": -9223372036854775809, "c": 100000000000000000000}')
@example('{"a": "\\ud800", "b": "\\udc00\\ud800"}')
@example('{"a": 1, "b": 2, "a": 3}')
@example('{"a": -0.0, "b": -0, "c": 1e-400, "d": 1E5, "e": 0.1e1}')
@example(' \t{"a": 1}\r\n')
@example('\ufeff{"a": 1}')
@example('{"a": 1} x')
@example('{"a": 1}\x00')
@example('{"a": "\x01"}')
def test_decode_openai_data_agrees_with_decode_openai_event(text):
    assert_decoders_agree(text.encode("utf-8"))


def _same_json(a, b) -> bool:
    """Equal values of the same types, key order included (NaN equals NaN, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return a == b


@settings(max_examples=examples(1500), deadline=None)
@given(json_ish())
@example('[1, {"a": NaN}]')
@example('99999999999999999999')
@example('"\\ud800"')
def test_loads_where_json_agrees_gives_json_s_value_or_defers_to_json(text):
    # Any JSON value (request bodies are read with it too), not only objects.
    value = loads_where_json_agrees(text.encode("utf-8"))
    if value is NOT_CERTAIN:
        return
    assert _same_json(value, json.loads(text)), text


@settings(max_examples=examples(500), deadline=None)
@given(st.dictionaries(st.text(max_size=4), _json_values, max_size=5), st.booleans())
def test_decode_openai_data_reads_any_object_as_json_does(value, ensure_ascii):
    assert assert_decoders_agree(json.dumps(value, ensure_ascii=ensure_ascii).encode())[0] == "value"


def test_decode_openai_data_values():
    assert decode_openai_data(b"[DONE]") is None
    assert decode_openai_data(b'{"a": [1, 2]}') == {"a": [1, 2]}
    chunk = (b'{"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
             b'"delta":{"content":" w\xc3\xb6rd"},"logprobs":null,"finish_reason":null}]}')
    assert decode_openai_data(chunk) == json.loads(chunk)
    # Where orjson alone would differ from json: integers beyond 64 bits stay ints, NaN and Infinity are read.
    big = decode_openai_data(b'{"u": 18446744073709551616, "i": -9223372036854775809, "z": 100000000000000000000}')
    assert big == {"u": 2**64, "i": -2**63 - 1, "z": 10**20} and all(type(v) is int for v in big.values())
    special = decode_openai_data(b'{"n": NaN, "p": Infinity, "m": -Infinity, "o": 1e400}')
    assert math.isnan(special["n"]) and special["p"] == special["o"] == math.inf and special["m"] == -math.inf
    assert decode_openai_data(b'{"s": "\\ud800"}') == {"s": "\ud800"}
    assert list(decode_openai_data(b'{"a": 1, "b": 2, "a": 3}').items()) == [("a", 3), ("b", 2)]
    zeros = decode_openai_data(b'{"f": -0.0, "i": -0}')
    assert math.copysign(1, zeros["f"]) == -1 and type(zeros["i"]) is int
    # 19 digits inside a string: orjson is right, but the check only sees a run of digits; the value is the same.
    assert decode_openai_data(b'{"id": "chatcmpl-1234567890123456789"}') == {"id": "chatcmpl-1234567890123456789"}


@pytest.mark.parametrize("data", [b"[DONE] ", b" [DONE]", b"[1, 2]", b'"s"', b"1", b"null", b"true", b"", b"{",
                                  b'{"a": 1} x', b'\xef\xbb\xbf{"a": 1}', b'{"a": "\x01"}', b'{"a": 1,}'])
def test_decode_openai_data_errors_are_the_references(data):
    kind, message = assert_decoders_agree(data)
    assert kind == "error" and message.startswith("stream event data is JSON but not an object"
                                                  if data in (b"[1, 2]", b'"s"', b"1", b"null", b"true")
                                                  else "stream event data is not JSON")


@pytest.mark.parametrize("depth", [10, 255, 256, 300, 600, 1000, 1024, 1025, 5000])
def test_decode_openai_data_deep_nesting(depth):
    # orjson reads up to 1024 levels; json's scanner raises RecursionError well before that.
    assert_decoders_agree(b'{"a": ' + b"[" * depth + b"]" * depth + b"}")
    assert_decoders_agree(b'{"a": ' + b'{"b": ' * depth + b"1" + b"}" * depth + b"}")


def test_decode_openai_data_many_shallow_brackets():
    data = b'{"a": [' + b", ".join([b"[]"] * 400) + b"]}"
    assert assert_decoders_agree(data)[0] == "value"


def test_decode_openai_data_rejects_bytes_that_are_not_utf8():
    with pytest.raises(MalformedOpenAIStream, match="not UTF-8"):
        decode_openai_data(b'{"a": "\xff"}')


def test_data_nested_deeper_than_json_can_read_is_malformed_not_a_crash():
    deep = '{"a": ' * 5000 + "1" + "}" * 5000
    with pytest.raises(MalformedOpenAIStream, match="nested too deeply"):
        decode_openai_event(ServerSentEvent(deep))
    with pytest.raises(MalformedOpenAIStream, match="nested too deeply"):
        decode_openai_data(deep.encode())
