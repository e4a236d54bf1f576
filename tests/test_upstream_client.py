"""The HTTP upstream client against the deterministic mock server and a scripted misbehaving server."""

import asyncio
import email.utils
import json
import time

import pytest
from aiohttp import web

from llmgw.cluster import free_port
from llmgw.testing.mock_openai import CREATED, Fault, FaultKind, MockOpenAIServer, expected_text, render_chat
from llmgw.upstream.client import (
    Endpoint,
    StreamChunk,
    UpstreamClient,
    UpstreamLimits,
    UpstreamTimeouts,
    endpoint_url,
    validate_base_url,
)
from llmgw.upstream.errors import FailureKind, UpstreamError, classify_status, parse_retry_after

FAST = UpstreamTimeouts(connect=2.0, first_byte=5.0, idle=5.0)


def run(scenario, **mock_options):
    async def main():
        async with MockOpenAIServer(models=("mock-model", "other"), **mock_options) as mock, \
                UpstreamClient(timeouts=FAST) as client:
            return await asyncio.wait_for(scenario(mock, client), timeout=60)
    return asyncio.run(main())


async def read_all(stream):
    return [chunk async for chunk in stream]


def texts(chunks, chat):
    out = []
    for chunk in chunks:
        for choice in chunk.data["choices"]:
            piece = choice["delta"].get("content") if chat else choice["text"]
            if piece:
                out.append(piece)
    return out


def chat_body(**fields):
    return {"model": "mock-model", "messages": [{"role": "user", "content": "Tell me"}], **fields}


def test_streamed_chat_chunks_parsed_and_raw():
    async def scenario(mock, client):
        stream = await client.open_stream(mock.base_url, Endpoint.CHAT, chat_body(stream=True, max_tokens=6))
        assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        chunks = await read_all(stream)
        assert stream.done() and not stream.cancelled
        assert await stream.read() is None  # and every call after [DONE]
        return chunks

    chunks = run(scenario)
    assert all(isinstance(c, StreamChunk) for c in chunks)
    for chunk in chunks:  # raw is exactly what the server wrote as the event's data
        assert chunk.raw == json.dumps(chunk.data, separators=(",", ":")).encode()
    assert chunks[0].data["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(texts(chunks, chat=True)) == expected_text(render_chat(chat_body()["messages"]), 6)
    assert chunks[-1].data["choices"][0]["finish_reason"] == "length"
    assert {c.data["id"] for c in chunks} == {"chatcmpl-mock-1"}
    assert all(c.data["created"] == CREATED and c.data["model"] == "mock-model" for c in chunks)


def test_non_streamed_calls_models_and_metrics():
    async def scenario(mock, client):
        chat = await client.complete(mock.base_url + "/v1/", Endpoint.CHAT, chat_body(max_tokens=4))
        completion = await client.complete(mock.base_url, Endpoint.COMPLETIONS,
                                           {"model": "other", "prompt": "Hello there", "max_tokens": 3})
        models = await client.list_models(mock.base_url)
        status, metrics = await client.get(mock.base_url, "/metrics")
        missing_status, _ = await client.get(mock.base_url, "/no-such-path")
        return chat, completion, models, status, metrics.decode(), missing_status

    chat, completion, models, status, metrics, missing_status = run(scenario)
    assert chat.data["choices"][0]["message"]["content"] == expected_text(render_chat(chat_body()["messages"]), 4)
    assert json.loads(chat.raw) == chat.data
    assert completion.data["choices"][0]["text"] == expected_text("Hello there", 3)
    assert completion.data["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert [m["id"] for m in models.data["data"]] == ["mock-model", "other"]
    assert status == 200 and missing_status == 404
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert f'{gauge}{{model_name="mock-model"}} 0.0' in metrics


def test_request_bodies_reach_the_server_unchanged():
    fields = {"temperature": 0.3, "top_p": 0.5, "top_k": 7, "min_p": 0.1, "seed": 9, "stop": ["x"],
              "presence_penalty": 0.2, "frequency_penalty": 0.1, "repetition_penalty": 1.1,
              "logit_bias": {"1": -1}, "user": "u", "x_vendor": {"a": [1, "é"]}, "response_format": {"type": "text"}}

    async def scenario(mock, client):
        body = chat_body(stream=True, max_tokens=2, **fields)
        await read_all(await client.open_stream(mock.base_url, Endpoint.CHAT, body))
        await client.complete(mock.base_url, Endpoint.COMPLETIONS, {"prompt": "p", "max_tokens": 1, **fields})
        return body, mock.generation_requests()

    body, recorded = run(scenario)
    assert recorded[0].path == "/v1/chat/completions" and recorded[0].body == body
    assert recorded[1].path == "/v1/completions" and recorded[1].body == {"prompt": "p", "max_tokens": 1, **fields}
    assert "é".encode() in recorded[0].raw  # UTF-8 as is, not \\u-escaped


def test_usage_chunk_when_asked():
    async def scenario(mock, client):
        body = chat_body(stream=True, max_tokens=3, stream_options={"include_usage": True})
        return await read_all(await client.open_stream(mock.base_url, Endpoint.CHAT, body))

    chunks = run(scenario)
    assert chunks[-1].data["choices"] == []
    prompt_tokens = len(render_chat(chat_body()["messages"]).split())
    assert chunks[-1].data["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 3,
                                        "total_tokens": prompt_tokens + 3}
    assert all("usage" in c.data and c.data["usage"] is None for c in chunks[:-1])


def test_error_statuses_are_classified_with_the_body_verbatim():
    client_error_body = b'{"error": {"message": "This model\'s maximum context length is 8 tokens", "code": 400}}'
    date = email.utils.formatdate(time.time() + 30, usegmt=True)

    async def scenario(mock, client):
        mock.inject(Fault(FaultKind.RATE_LIMIT, retry_after="7"))
        mock.inject(Fault(FaultKind.RATE_LIMIT, retry_after=date))
        mock.inject(Fault(FaultKind.SERVER_ERROR, status=503))
        mock.inject(Fault(FaultKind.SERVER_ERROR, status=500))
        mock.inject(Fault(FaultKind.CLIENT_ERROR, status=400, body=client_error_body))
        errors = []
        for _ in range(5):
            with pytest.raises(UpstreamError) as caught:
                await client.open_stream(mock.base_url, Endpoint.CHAT, chat_body(stream=True))
            errors.append(caught.value)
        with pytest.raises(UpstreamError) as caught:  # the mock's own 404 for an unknown model
            await client.complete(mock.base_url, Endpoint.CHAT, chat_body(model="nope"))
        errors.append(caught.value)
        with pytest.raises(UpstreamError) as caught:
            await client.complete(mock.base_url, Endpoint.COMPLETIONS, {"prompt": 5})
        errors.append(caught.value)
        return errors

    limited, dated, unavailable, internal, bad, unknown, invalid = run(scenario)
    assert limited.kind is FailureKind.RATE_LIMITED and limited.status == 429 and limited.retry_after == 7.0
    assert dated.kind is FailureKind.RATE_LIMITED and 25 <= dated.retry_after <= 31
    assert limited.retryable and unavailable.retryable
    assert (unavailable.kind, unavailable.status) == (FailureKind.SERVER_ERROR, 503)
    assert (internal.kind, internal.status) == (FailureKind.SERVER_ERROR, 500)
    assert (bad.kind, bad.status, bad.body) == (FailureKind.CLIENT_ERROR, 400, client_error_body)
    assert bad.content_type.startswith("application/json") and not bad.retryable
    assert "maximum context length" in bad.detail
    assert unknown.kind is FailureKind.CLIENT_ERROR and unknown.status == 404
    assert json.loads(unknown.body)["error"]["message"] == "The model `nope` does not exist."
    assert invalid.kind is FailureKind.CLIENT_ERROR and b"prompt must be a string" in invalid.body


@pytest.mark.parametrize(("fault", "kind"), [
    (Fault(FaultKind.RESET, after_chunks=3), FailureKind.RESET),
    (Fault(FaultKind.MALFORMED, after_chunks=3), FailureKind.MALFORMED),
    (Fault(FaultKind.ERROR_EVENT, after_chunks=3), FailureKind.SERVER_ERROR),
    (Fault(FaultKind.NO_DONE, after_chunks=3), FailureKind.INCOMPLETE),
    (Fault(FaultKind.STALL, after_chunks=3), FailureKind.TIMEOUT_IDLE),
    (Fault(FaultKind.TRUNCATED, after_chunks=3), FailureKind.INCOMPLETE),
])
@pytest.mark.parametrize("endpoint", [Endpoint.COMPLETIONS, Endpoint.CHAT])
def test_mid_stream_faults_deliver_what_arrived_then_fail(fault, kind, endpoint):
    body = ({"prompt": "Go", "stream": True, "max_tokens": 8} if endpoint is Endpoint.COMPLETIONS
            else chat_body(stream=True, max_tokens=8))

    async def scenario(mock, client):
        mock.inject(fault)
        stream = await client.open_stream(mock.base_url, endpoint, body,
                                          timeouts=UpstreamTimeouts(connect=1, first_byte=5, idle=0.4))
        received = []
        with pytest.raises(UpstreamError) as caught:
            while True:
                chunk = await stream.read()
                assert chunk is not None, "the stream must not end cleanly"
                received.append(chunk)
        assert stream.done()
        with pytest.raises(UpstreamError):  # the failure is sticky
            await stream.read()
        return received, caught.value

    received, error = run(scenario)
    assert error.kind is kind
    chat = endpoint is Endpoint.CHAT
    context = render_chat(chat_body()["messages"]) if chat else "Go"
    assert "".join(texts(received, chat)) == expected_text(context, 3)  # exactly the 3 tokens before the fault
    if kind is FailureKind.SERVER_ERROR:
        assert error.status == 500 and json.loads(error.body)["message"] == "injected error mid-stream"


def test_no_done_after_a_complete_answer_is_still_incomplete():
    async def scenario(mock, client):
        mock.inject(Fault(FaultKind.NO_DONE, after_chunks=None))
        stream = await client.open_stream(mock.base_url, Endpoint.COMPLETIONS,
                                          {"prompt": "a", "stream": True, "max_tokens": 2})
        with pytest.raises(UpstreamError) as caught:
            await read_all(stream)
        return caught.value

    error = run(scenario)
    assert error.kind is FailureKind.INCOMPLETE and "without data: [DONE] after 3 events" in error.detail


def test_done_without_finish_reason_is_incomplete_unless_allowed():
    async def scenario(mock, client):
        mock.inject(Fault(FaultKind.TRUNCATED, after_chunks=None), times=2)
        body = {"prompt": "a", "stream": True, "max_tokens": 4}
        stream = await client.open_stream(mock.base_url, Endpoint.COMPLETIONS, body)
        with pytest.raises(UpstreamError) as caught:
            await read_all(stream)
        lenient = await client.open_stream(mock.base_url, Endpoint.COMPLETIONS, body, require_finish_reason=False)
        return caught.value, await read_all(lenient)

    error, chunks = run(scenario)
    assert error.kind is FailureKind.INCOMPLETE and "never got a finish_reason" in error.detail
    assert "".join(texts(chunks, chat=False)) == expected_text("a", 4)


def test_first_byte_timeout_and_connect_refused():
    async def scenario(mock, client):
        mock.inject(Fault(FaultKind.STALL, after_chunks=0))
        started = time.monotonic()
        stream = await client.open_stream(mock.base_url, Endpoint.COMPLETIONS, {"prompt": "a", "stream": True},
                                          timeouts=UpstreamTimeouts(first_byte=0.5, idle=30))
        with pytest.raises(UpstreamError) as first_byte:
            await stream.read()
        waited = time.monotonic() - started
        closed_port = free_port()  # nothing listens here
        with pytest.raises(UpstreamError) as refused:
            await client.open_stream(f"http://127.0.0.1:{closed_port}", Endpoint.CHAT, chat_body(stream=True))
        with pytest.raises(UpstreamError) as refused_models:
            await client.list_models(f"http://127.0.0.1:{closed_port}")
        return first_byte.value, waited, refused.value, refused_models.value

    first_byte, waited, refused, refused_models = run(scenario)
    assert first_byte.kind is FailureKind.TIMEOUT_FIRST_BYTE and 0.4 <= waited < 3
    assert refused.kind is FailureKind.CONNECT and refused_models.kind is FailureKind.CONNECT


def test_cancel_closes_the_connection_and_the_server_sees_it():
    async def scenario(mock, client):
        stream = await client.open_stream(mock.base_url, Endpoint.COMPLETIONS,
                                          {"prompt": "a", "stream": True, "max_tokens": 1000})
        first = await stream.read()
        assert first is not None and mock.running == 1
        assert stream.cancel() is True
        assert stream.cancel() is False  # idempotent: nothing left to stop
        assert stream.done() and stream.cancelled and await stream.read() is None
        for _ in range(200):
            if mock.running == 0:
                break
            await asyncio.sleep(0.01)
        return mock.running, mock.client_disconnects

    running, disconnects = run(scenario, token_delay=0.01)
    assert running == 0 and disconnects == 1


def test_concurrent_streams_and_load_gauges():
    async def scenario(mock, client):
        async def one(i):
            stream = await client.open_stream(mock.base_url, Endpoint.COMPLETIONS,
                                              {"prompt": f"p{i}", "stream": True, "max_tokens": 5})
            return "".join(texts(await read_all(stream), chat=False))

        tasks = [asyncio.create_task(one(i)) for i in range(12)]
        await asyncio.sleep(0.03)
        _, metrics = await client.get(mock.base_url, "/metrics")
        answers = await asyncio.gather(*tasks)
        return answers, metrics.decode()

    answers, metrics = run(scenario, token_delay=0.02, max_running=4)
    assert answers == [expected_text(f"p{i}", 5) for i in range(12)]
    assert 'vllm:num_requests_running{model_name="mock-model"} 4.0' in metrics
    assert 'vllm:num_requests_waiting{model_name="mock-model"} 8.0' in metrics
    assert 'vllm:kv_cache_usage_perc{model_name="mock-model"} 1.0' in metrics


# --- a scripted server for what the mock never does ----------------------------------------------------------

def run_scripted(scenario):
    peers = []

    async def handler(request):
        peers.append(request.transport.get_extra_info("peername"))
        script = request.headers["X-Script"]
        if script == "json":
            return web.json_response({"choices": []})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if script == "pings":
            for _ in range(100):
                await response.write(b": ping\n\n")
                await asyncio.sleep(0.05)
        elif script == "cut":
            await response.write(b'data: {"a": 1}\n\ndata: {"b"')
        elif script == "after-done":
            await response.write(b'data: {"choices": [{"index": 0, "finish_reason": "stop"}]}\r\n\r\n'
                                 b'data: [DONE]\r\n\r\ndata: {"late": true}\r\n\r\n')
        elif script == "bad-utf8":
            await response.write(b'data: {"a": "\xff"}\n\n')
        elif script == "split":
            for piece in (b'da', b'ta: {"choices": [{"finish_reason": "\xc3', b'\xa9"}]}\r', b'\n\r\n',
                          b'data: [DONE]\n', b'\n'):
                await response.write(piece)
                await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            async with UpstreamClient(timeouts=UpstreamTimeouts(first_byte=0.5, idle=0.5)) as client:
                return await asyncio.wait_for(scenario(client, base), timeout=30), peers
        finally:
            await runner.cleanup()

    return asyncio.run(main())


async def open_script(client, base, script):
    return await client.open_stream(base, Endpoint.COMPLETIONS, {"prompt": "x", "stream": True},
                                    headers={"X-Script": script})


def test_stream_defects_and_connection_reuse():
    async def scenario(client, base):
        results = {}
        for script in ("json", "pings", "cut", "bad-utf8"):
            try:
                await read_all(await open_script(client, base, script))
            except UpstreamError as exc:
                results[script] = exc
        chunks = {}
        for script in ("after-done", "split", "after-done"):
            chunks[script] = [c.data for c in await read_all(await open_script(client, base, script))]
            for _ in range(200):  # the end of the body may come just after [DONE]; then the connection is idle
                if client.idle_connections:
                    break
                await asyncio.sleep(0.01)
            assert client.idle_connections == 1
        return results, chunks

    (results, chunks), peers = run_scripted(scenario)
    assert results["json"].kind is FailureKind.MALFORMED and results["json"].body == b'{"choices": []}'
    assert results["pings"].kind is FailureKind.TIMEOUT_FIRST_BYTE  # comments are not a first event
    assert results["cut"].kind is FailureKind.INCOMPLETE and "inside an event" in results["cut"].detail
    assert results["bad-utf8"].kind is FailureKind.MALFORMED and "UTF-8" in results["bad-utf8"].detail
    assert chunks == {"after-done": [{"choices": [{"index": 0, "finish_reason": "stop"}]}],
                      "split": [{"choices": [{"finish_reason": "é"}]}]}
    # The streams that ended with [DONE] gave their connection back to the pool: the last three share one.
    assert len(set(peers[-3:])) == 1


def test_settings_are_validated():
    with pytest.raises(ValueError):
        UpstreamTimeouts(idle=0)
    with pytest.raises(ValueError):
        UpstreamTimeouts(connect=-1)
    with pytest.raises(ValueError):
        UpstreamLimits(max_connections=0)
    with pytest.raises(ValueError):
        UpstreamLimits(max_connections_per_server=-1)
    with pytest.raises(ValueError):
        validate_base_url("localhost:8000")
    assert endpoint_url("http://h:1/v1/", "/v1/models") == "http://h:1/v1/models"
    assert endpoint_url("http://h:1", "/v1/models") == "http://h:1/v1/models"
    assert endpoint_url("http://h:1/prefix", "/metrics") == "http://h:1/prefix/metrics"

    async def closed():
        client = UpstreamClient()
        await client.close()
        with pytest.raises(RuntimeError, match="closed"):
            await client.open_stream("http://127.0.0.1:1", Endpoint.CHAT, {})
    asyncio.run(closed())


def test_retry_after_parsing_and_status_classes():
    now = 1_000_000.0
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after(email.utils.formatdate(now + 10, usegmt=True), now=now) == pytest.approx(10.0)
    assert parse_retry_after(email.utils.formatdate(now - 10, usegmt=True), now=now) == 0.0
    for unreadable in (None, "", "soon", "-3", "nan", "inf"):
        assert parse_retry_after(unreadable) is None
    assert classify_status(429) is FailureKind.RATE_LIMITED
    assert classify_status(404) is FailureKind.CLIENT_ERROR
    assert classify_status(502) is FailureKind.SERVER_ERROR


def test_a_cancelled_read_and_leaving_a_stream_context_close_the_connection():
    async def scenario(mock, client):
        body = {"prompt": "a", "stream": True, "max_tokens": 1000}
        stream = await client.open_stream(mock.base_url, Endpoint.COMPLETIONS, body)
        await stream.read()
        reader = asyncio.create_task(stream.read())
        await asyncio.sleep(0)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        async with await client.open_stream(mock.base_url, Endpoint.COMPLETIONS, body) as second:
            assert await second.read() is not None
        assert second.cancelled
        async with await client.open_stream(mock.base_url, Endpoint.COMPLETIONS, {**body, "max_tokens": 2}) as third:
            await read_all(third)
        assert third.done() and not third.cancelled
        for _ in range(300):
            if mock.client_disconnects == 2 and mock.running == 0:
                break
            await asyncio.sleep(0.01)
        return mock.client_disconnects, mock.running

    assert run(scenario, token_delay=0.02) == (2, 0)
