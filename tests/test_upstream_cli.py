"""`llmgw gateway --http-port PORT --upstream URL` is a working gateway by itself: no gossip seeds, no replica, no
model list, no id -- the upstream learns its models from its /v1/models and the official openai SDK gets, through
the gateway, the answers it gets from the server directly. Child processes: the mock OpenAI server
(`python -m llmgw.testing.mock_openai`) and the gateway, both on ephemeral loopback ports (the gRPC and gossip
ports are given only so the test never takes the machine's default ones)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import openai
import pytest
from test_agent_process import MODEL, MockProcess, http_request

from llmgw.cluster import MemberProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0
ROUTABLE_TIMEOUT_S = 10.0
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rocks."}]


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=20.0)


def _wait_routable(gateway_url: str) -> dict:
    deadline = time.monotonic() + ROUTABLE_TIMEOUT_S
    while True:
        status, _, body = http_request(gateway_url, "GET", "/readyz")
        if status == 200:
            return json.loads(body)
        assert time.monotonic() < deadline, f"/readyz still {status} after {ROUTABLE_TIMEOUT_S} s: {body!r}"
        time.sleep(0.05)


@pytest.fixture
def mock(tmp_path):
    server = MockProcess(tmp_path / "mock.log")
    yield server
    server.kill()


def test_a_gateway_with_only_an_upstream_url_serves_the_openai_sdk(tmp_path, mock):
    http_port = free_port("127.0.0.1")
    argv = [sys.executable, "-m", "llmgw", "gateway", "--http-port", str(http_port), "--upstream", mock.url,
            "--port", str(free_port("127.0.0.1")), "--gossip-port", str(free_port("127.0.0.1", kind=2))]
    gateway = MemberProcess(argv, tmp_path / "gateway.log", name="gateway", cwd=ROOT)
    try:
        line = gateway.wait_ready(READY_TIMEOUT_S)
        gateway_url = f"http://127.0.0.1:{http_port}"
        assert f"http={gateway_url}" in line
        # The server joins routing once its /v1/models has answered: nothing else told the gateway about it.
        assert _wait_routable(gateway_url)["routable_replicas"] == [mock.url]

        with _client(gateway_url) as via, _client(mock.url) as direct:
            assert [m.id for m in via.models.list().data] == [MODEL]

            chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
            answer, direct_answer = via.chat.completions.create(**chat), direct.chat.completions.create(**chat)
            assert answer.choices[0].message.content == direct_answer.choices[0].message.content
            assert answer.choices[0].message.content  # not two empty answers
            assert answer.usage.model_dump() == direct_answer.usage.model_dump()  # the server's own usage

            def streamed_chat(client: openai.OpenAI) -> str:
                return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    **chat, stream=True) if c.choices)

            assert streamed_chat(via) == streamed_chat(direct) == answer.choices[0].message.content

            completion = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "seed": 7}
            assert via.completions.create(**completion).choices[0].text == \
                direct.completions.create(**completion).choices[0].text
            pieces = [c.choices[0].text for c in via.completions.create(**completion, stream=True) if c.choices]
            assert "".join(pieces) == direct.completions.create(**completion).choices[0].text
            assert len([p for p in pieces if p]) == 6  # streamed piece by piece, not as one block

            with pytest.raises(openai.NotFoundError) as missing:
                via.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2)
            assert missing.value.body["code"] == "model_not_found"

        # Straight to the server, chat as chat: no adapter process, no prompt rebuilt from the messages.
        chats = [r for r in mock.generation_requests() if r["path"] == "/v1/chat/completions"]
        assert len(chats) == 4  # two through the gateway, two direct
        assert all(r["body"]["messages"] == MESSAGES for r in chats)

        assert gateway.stop(15.0) == 0, gateway.log_tail()
    finally:
        gateway.kill()
