"""The incremental Server-Sent-Events parser and the OpenAI event rule."""

import json

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from llmgw.upstream.sse import DONE, MalformedOpenAIStream, ServerSentEvent, SSEError, SSEParser, decode_openai_event


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
    stream = b"".join(b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\n\n" for c in chunks)
    stream += b"data: [DONE]\n\n"
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    decoded = [decode_openai_event(e) for e in parse_all(stream, cuts)]
    assert decoded == [*chunks, None]
