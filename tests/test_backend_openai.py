"""OpenAIUpstreamBackend end to end against a real OpenAI-compatible server: an llmgw gateway's own HTTP front,
backed by real simulated replicas (no mocks)."""

import asyncio
import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_http_server import FakeMember, run_stack, wait_for

from llmgw.backends import OpenAIUpstreamBackend, SSEDecoder, UpstreamError
from llmgw.replica import Faults


def tokens(n, start=0):
    return [f"token_{i}" for i in range(start, start + n)]


async def collect(agen):
    return [t async for t in agen]


def test_sse_decoder_follows_the_framing_rules():
    d = SSEDecoder()
    lines = [b": keep-alive comment\n", b"event: message\n", b"data: {\"a\":\n", b"data:1}\r\n", b"\r\n",
             b"\n", b"id: 7\n", b"data: [DONE]\n", b"\n"]
    assert [e for e in map(d.line, lines) if e is not None] == ['{"a":\n1}', "[DONE]"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
                        max_size=30), min_size=1, max_size=5), st.booleans())
def test_sse_decoder_round_trips_what_the_front_writes(payloads, crlf):
    from llmgw.http.openai_api import sse

    end = b"\r\n" if crlf else b"\n"
    stream = b"".join(sse(p).replace(b"\n", end) for p in payloads)
    decoder = SSEDecoder()
    lines = stream.split(end)
    got = [decoder.line(line + end) for line in lines[:-1]]
    assert [json.loads(e) for e in got if e is not None] == payloads


def test_constructor_rejects_bad_settings():
    for kwargs in ({"upstream_url": "ftp://x"}, {"model": ""}, {"timeout_s": 0}, {"max_connections": 0}):
        args = {"upstream_url": "http://127.0.0.1:1", "model": "m", **kwargs}
        with pytest.raises(ValueError):
            OpenAIUpstreamBackend(args.pop("upstream_url"), args.pop("model"), **args)
    assert OpenAIUpstreamBackend("http://h:1/v1/", "m").completions_url == "http://h:1/v1/completions"
    assert OpenAIUpstreamBackend("http://h:1", "m").completions_url == "http://h:1/v1/completions"


def test_streams_tokens_and_resumes_with_the_text_so_far(caplog):
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.add_replica("r2", token_delay_ms=1)
        await s.start()
        async with OpenAIUpstreamBackend(s.url, "v1", timeout_s=5) as backend:
            assert await collect(backend.generate("tell me", 5, [])) == tokens(5)
            with caplog.at_level(logging.INFO, logger="llmgw.http.openai"):
                resumed = await collect(backend.generate("tell me", 5, ["token_0", "token_1"]))
            # The upstream answered a new request for the 3 missing tokens of "tell me" + the text so far.
            assert len(resumed) == 3
            line = [r for r in caplog.records if r.getMessage() == "request"][-1]
            assert (line.prompt_chars, line.tokens, line.outcome) == (len("tell me" + "token_0token_1"), 3, "ok")
            served = sum(r.served_total for r in s.replicas.values())
            assert await collect(backend.generate("tell me", 2, ["a", "b"])) == []
            assert sum(r.served_total for r in s.replicas.values()) == served  # nothing asked upstream

    run_stack(scenario)


def test_upstream_errors_are_classified():
    async def scenario(s):
        rep = await s.add_replica("r1", capacity=1, token_delay_ms=50)  # the hog below runs 2.5 s
        await s.start(gateway={"max_tokens_cap": 50, "queue_size": 0})
        async with OpenAIUpstreamBackend(s.url + "/v1", "v1", timeout_s=5) as backend:
            with pytest.raises(UpstreamError) as err:
                await collect(backend.generate("p", 51, []))
            assert (err.value.kind, err.value.status) == ("invalid", 400) and "max_tokens" in err.value.message
            hog = backend.generate("hog", 50, [])
            assert await anext(hog) == "token_0"
            with pytest.raises(UpstreamError) as err:
                await collect(backend.generate("p", 2, []))
            assert (err.value.kind, err.value.status) == ("busy", 429)
            await hog.aclose()
            await wait_for(lambda: rep.active == 0, what="the hog's slot")
            s.membership.set(FakeMember("r1", rep.grpc_address, state="dead"), "dead")
            await wait_for(lambda: not s.gateway.view.routable(), what="r1 to leave routing")
            with pytest.raises(UpstreamError) as err:
                await collect(backend.generate("p", 2, []))
            assert (err.value.kind, err.value.status) == ("unavailable", 503)
        async with OpenAIUpstreamBackend("http://127.0.0.1:9", "v1", timeout_s=2) as nowhere:
            with pytest.raises(UpstreamError) as err:
                await collect(nowhere.generate("p", 2, []))
            assert err.value.kind == "unavailable" and err.value.status is None

    run_stack(scenario)


def test_a_stream_that_breaks_upstream_is_an_error_not_a_short_answer():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=2, faults=Faults(stall_after=2))
        await s.start(gateway={"max_attempts": 1, "inter_token_timeout_s": 0.2})
        async with OpenAIUpstreamBackend(s.url, "v1", timeout_s=5) as backend:
            got = []
            with pytest.raises(UpstreamError, match="after 2 tokens") as err:
                async for token in backend.generate("p", 6, []):
                    got.append(token)
            assert got == tokens(2) and err.value.kind == "unavailable"

    run_stack(scenario)


def test_a_silent_upstream_times_out():
    async def scenario(s):
        rep = await s.add_replica("r1", token_delay_ms=2, faults=Faults(stall_after=1))
        await s.start(gateway={"inter_token_timeout_s": 10.0})
        async with OpenAIUpstreamBackend(s.url, "v1", timeout_s=0.3) as backend:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(UpstreamError, match="Timeout"):
                await collect(backend.generate("p", 6, []))
            assert loop.time() - started < 3.0
        # Giving up closed the connection, so the upstream released the replica too.
        await wait_for(lambda: rep.active == 0 and s.gateway.in_flight == {}, 3.0, "the upstream slot")

    run_stack(scenario)


def test_closing_the_iterator_cancels_upstream_and_connections_are_limited():
    async def scenario(s):
        rep = await s.add_replica("r1", capacity=8, token_delay_ms=20)
        await s.start()
        async with OpenAIUpstreamBackend(s.url, "v1", timeout_s=5, max_connections=1) as backend:
            stream = backend.generate("long", 200, [])
            assert await anext(stream) == "token_0" and rep.active == 1
            await stream.aclose()
            await wait_for(lambda: rep.active == 0 and s.gateway.in_flight == {}, 3.0, "the upstream slot")
            results = await asyncio.gather(*(collect(backend.generate(f"q{i}", 3, [])) for i in range(3)))
            assert results == [tokens(3)] * 3
            assert rep.peak_active == 1  # one connection: the three requests ran one after another

    run_stack(scenario)
