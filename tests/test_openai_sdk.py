"""The official openai SDK as a real client of the HTTP front over loopback: sync and async clients, streaming and
not, chat and completions, errors as the SDK's exception types."""

import asyncio

import openai
import pytest
from test_http_server import FakeMember, run_stack

from llmgw.replica import Faults

EXPECTED = "".join(f"token_{i}" for i in range(5))


def sync_client(s):
    return openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=20.0)


def async_client(s):
    return openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=20.0)


def test_sync_client_completions_and_chat_streaming_and_not():
    def use_sdk(s):
        with sync_client(s) as client:
            done = client.completions.create(model="v1", prompt="hello there", max_tokens=5)
            assert done.choices[0].text == EXPECTED and done.choices[0].finish_reason == "length"
            assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (2, 5)
            pieces = [c.choices[0].text for c in client.completions.create(
                model="v1", prompt="hello there", max_tokens=5, stream=True)]
            assert pieces == [f"token_{i}" for i in range(5)]
            chat = client.chat.completions.create(model="v1", max_tokens=5,
                                                  messages=[{"role": "user", "content": "hi"}])
            assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == EXPECTED
            assert chat.usage.total_tokens == chat.usage.prompt_tokens + 5
            chunks = list(client.chat.completions.create(
                model="v1", max_tokens=5, messages=[{"role": "user", "content": "hi"}], stream=True,
                stream_options={"include_usage": True}))
            assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == EXPECTED
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
            models = client.models.list()
            assert [m.id for m in models.data] == ["v1"]

    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.add_replica("r2", token_delay_ms=1)
        await s.start()
        # The sync SDK blocks: it runs on a thread while the gateway serves it from this loop.
        await asyncio.wait_for(asyncio.to_thread(use_sdk, s), 25.0)

    run_stack(scenario)


def test_async_client_completions_and_chat_streaming_and_not_with_headers():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start()
        async with async_client(s) as client:
            raw = await client.completions.with_raw_response.create(model="v1", prompt="p", max_tokens=5,
                                                                     extra_headers={"X-Request-Id": "sdk-1"})
            assert raw.headers["x-llmgw-replica"] == "r1" and raw.headers["x-request-id"] == "sdk-1"
            assert raw.parse().choices[0].text == EXPECTED
            stream = await client.completions.create(model="v1", prompt="p", max_tokens=5, stream=True,
                                                     extra_body={"hedge": True})
            assert [c.choices[0].text async for c in stream] == [f"token_{i}" for i in range(5)]
            chat = await client.chat.completions.create(model="v1", max_completion_tokens=5,
                                                        messages=[{"role": "system", "content": "s"},
                                                                  {"role": "user", "content": "u"}])
            assert chat.choices[0].message.content == EXPECTED and chat.id.startswith("chatcmpl-")
            stream = await client.chat.completions.create(model="v1", max_tokens=5, stream=True,
                                                          messages=[{"role": "user", "content": "u"}])
            chunks = [c async for c in stream]
            assert chunks[0].choices[0].delta.role == "assistant"
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == EXPECTED
            assert chunks[-1].choices[0].finish_reason == "length"

    run_stack(scenario)


def test_sdk_sees_errors_as_its_exception_types():
    async def scenario(s):
        rep = await s.add_replica("r1", capacity=1, token_delay_ms=40)  # the hog below runs 2 s
        await s.start(gateway={"max_tokens_cap": 50, "queue_size": 0, "max_attempts": 1,
                               "inter_token_timeout_s": 0.2})
        async with async_client(s) as client:
            with pytest.raises(openai.BadRequestError) as err:
                await client.completions.create(model="v1", prompt="p", max_tokens=51)
            assert err.value.status_code == 400 and "max_tokens" in err.value.message
            # Fill the only slot: with no queue the next request is refused at once with 429.
            hog = await client.completions.create(model="v1", prompt="hog", max_tokens=50, stream=True)
            first = await anext(aiter(hog))
            assert first.choices[0].text == "token_0" and rep.active == 1
            with pytest.raises(openai.RateLimitError) as err:
                await client.chat.completions.create(model="v1", messages=[{"role": "user", "content": "x"}])
            assert err.value.response.headers["retry-after"] == "1"
            await hog.close()
            # A stream that breaks after its headers: the SDK raises on the error event.
            await rep.stop(0.1)
            s.replicas.pop("r1")
            stalling = await s.add_replica("r2", capacity=1, token_delay_ms=5, faults=Faults(stall_after=2))
            s.membership.set(FakeMember("r1", "127.0.0.1:1", state="dead"), "dead")
            stream = await client.completions.create(model="v1", prompt="breaks", max_tokens=10, stream=True)
            got = []
            with pytest.raises(openai.APIError, match="attempts"):
                async for chunk in stream:
                    got.append(chunk.choices[0].text)
            assert got == ["token_0", "token_1"] and stalling.served_total == 0

    run_stack(scenario)
