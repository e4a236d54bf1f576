"""The gateway in front of OpenAI-compatible servers (recording mocks): what reaches the server, field by field;
what comes back; routing by model and alias; /v1/models; unknown models; the server's own 4xx errors; usage; the
conversation-opening affinity key; simulated gRPC replicas alongside."""

import asyncio
import json

import pytest
from upstream_stack import UpstreamStack, start_mocks, stream
from upstream_stack import run_against_mocks as run

from inprocess import FakeMember, wait_for
from llmgw.gateway.upstreams import affinity_key
from llmgw.replica import Replica, ReplicaConfig
from llmgw.testing.mock_openai import Fault, FaultKind, expected_text
from llmgw.upstream.backends import Backend
from llmgw.upstream.capabilities import BackendKind

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three rivers."}]

# Every field a client may send that the gateway must pass through unchanged (values as a client would write them,
# vendor fields included).
PASSTHROUGH_CHAT = [
    {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 1234},
    {"stop": ["\n", "END"], "presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.1},
    {"logit_bias": {"50256": -100}, "n": 2, "logprobs": True, "top_logprobs": 3},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
     "tool_choice": "auto", "parallel_tool_calls": False},
    {"response_format": {"type": "json_object"}, "user": "u-42", "max_completion_tokens": 7},
    {"chat_template_kwargs": {"enable_thinking": False}, "x_vendor": {"deep": [1, 2.5, None, "é"]}},
    {"stream_options": {"include_usage": True}, "stream": True},
]
PASSTHROUGH_COMPLETIONS = [
    {"temperature": 0, "seed": 7, "stop": "x", "max_tokens": 3, "echo": False, "logprobs": 2, "suffix": None},
    {"best_of": 1, "n": 1, "repeat_penalty": 1.0, "min_tokens": 1, "ignore_eos": True, "prompt": ["one prompt"]},
]


def recorded(servers):
    return [r for s in servers for r in s.generation_requests()]


@pytest.mark.parametrize("fields", PASSTHROUGH_CHAT)
def test_chat_fields_reach_the_server_unchanged(fields):
    async def scenario(gw, servers):
        body = {"model": "mock-model", "messages": CHAT, **fields}
        if body.get("stream"):
            answer = await stream(gw.http, gw.url + "/v1/chat/completions", body)
            assert answer.status == 200 and answer.done_count == 1
        else:
            status, _, raw = await gw.post("/v1/chat/completions", body)
            assert status == 200, raw
        (seen,) = recorded(servers)
        assert seen.path == "/v1/chat/completions"
        assert seen.body == body  # every field, nested values included, as the client sent them
    run(scenario)


@pytest.mark.parametrize("fields", PASSTHROUGH_COMPLETIONS)
def test_completion_fields_reach_the_server_unchanged(fields):
    async def scenario(gw, servers):
        body = {"model": "mock-model", "prompt": "Once upon a time", **fields}
        status, _, raw = await gw.post("/v1/completions", body)
        assert status == 200, raw
        (seen,) = recorded(servers)
        assert seen.path == "/v1/completions" and seen.body == body
    run(scenario)


@pytest.mark.parametrize("stream_it", [True, False])
def test_a_body_the_gateway_does_not_change_reaches_the_server_byte_for_byte(stream_it):
    # Spacing, key order, a duplicate key, escapes: all the client's, kept as written (json.dumps would not).
    sent = ('{ "messages" : [{"role":"user","content":"caf\\u00e9 \u00e9"}],"seed":1,"seed":2, "model": "mock-model",'
            ' "stream": %s , "max_tokens": 2 }' % ("true" if stream_it else "false")).encode()

    async def scenario(gw, servers):
        async with gw.http.post(gw.url + "/v1/chat/completions", data=sent,
                                headers={"Content-Type": "application/json"}) as response:
            assert response.status == 200, await response.text()
            await response.read()
        (seen,) = recorded(servers)
        assert seen.raw == sent
        assert seen.body == json.loads(sent)
    run(scenario)


def test_answers_are_the_servers_own_streamed_and_whole():
    async def scenario(gw, servers):
        direct = servers[0].base_url
        for path, body, chat in (("/v1/chat/completions", {"model": "mock-model", "messages": CHAT,
                                                           "max_tokens": 9, "logprobs": True}, True),
                                 ("/v1/completions", {"model": "mock-model", "prompt": "abc", "max_tokens": 9,
                                                      "logprobs": 1}, False)):
            status, headers, raw = await gw.post(path, body)
            _, _, raw_direct = await gw.post(path, body, base=direct)
            via, mine = json.loads(raw), json.loads(raw_direct)
            assert status == 200 and headers["Content-Type"].startswith("application/json")
            assert {k: v for k, v in via.items() if k != "id"} == {k: v for k, v in mine.items() if k != "id"}
            assert via["usage"] == mine["usage"]  # the server's usage, not a word count
            streamed = await stream(gw.http, gw.url + path, {**body, "stream_options": {"include_usage": True}})
            streamed_direct = await stream(gw.http, direct + path, {**body, "stream_options": {"include_usage": True}})
            assert streamed.done_count == 1 and streamed.text(chat) == streamed_direct.text(chat)
            ids = {e["id"] for e in streamed.events if isinstance(e, dict)}
            assert len(ids) == 1  # one id for the whole answer
            strip = [{k: v for k, v in e.items() if k != "id"} if isinstance(e, dict) else e
                     for e in streamed.events]
            strip_direct = [{k: v for k, v in e.items() if k != "id"} if isinstance(e, dict) else e
                            for e in streamed_direct.events]
            assert strip == strip_direct  # every event, logprobs and usage included, as the server wrote it
    run(scenario)


def test_aliases_route_within_the_models_servers_and_answer_in_the_clients_name():
    async def scenario(gw, servers):
        a, b = servers
        for _ in range(6):
            body = {"model": "small", "prompt": f"p{_}", "max_tokens": 2}
            status, headers, raw = await gw.post("/v1/completions", body)
            assert status == 200 and json.loads(raw)["model"] == "small"  # the client's name back
            assert headers["X-LLMGW-Replica"] == Backend(a.base_url).id
            answer = await stream(gw.http, gw.url + "/v1/completions", {**body, "model": "other"})
            assert {e["model"] for e in answer.events if isinstance(e, dict)} == {"other"}
        assert {r.body["model"] for r in a.generation_requests()} == {"mock-model"}  # the server's own name
        # An alias changes the body: it is encoded anew, every other field as it was.
        assert all(r.raw != json.dumps({**r.body, "model": "small"}).encode() and b'"model":"mock-model"' in r.raw
                   for r in a.generation_requests())
        assert len(b.generation_requests()) == 6
        async with gw.http.get(gw.url + "/v1/models") as response:
            listed = {m["id"]: m["upstreams"] for m in (await response.json())["data"]}
        assert listed == {"mock-model": 2, "small": 1, "other": 1}
        status, _, raw = await gw.post("/v1/chat/completions", {"model": "missing", "messages": CHAT})
        error = json.loads(raw)["error"]
        assert status == 404 and error["code"] == "model_not_found" and error["param"] == "model"
        assert len(recorded(servers)) == 12  # the unknown model reached no server

    async def main():
        servers = await start_mocks(2)
        upstreams = [Backend(servers[0].base_url, models=("mock-model",), aliases=(("small", "mock-model"),),
                             models_configured=True),
                     Backend(servers[1].base_url, models=("mock-model",), aliases=(("other", "mock-model"),),
                             models_configured=True)]
        gateway = UpstreamStack(upstreams)
        try:
            await gateway.start()
            await asyncio.wait_for(scenario(gateway, servers), 60)
        finally:
            await gateway.close()
            for server in servers:
                await server.stop()
    asyncio.run(main())


def test_the_servers_own_4xx_reaches_the_client_as_written():
    async def scenario(gw, servers):
        body = b'{"object":"error","message":"max_tokens is too large","type":"BadRequestError","code":400}'
        for server in servers:
            server.inject(Fault(FaultKind.CLIENT_ERROR, status=422, body=body), times=2)
        status, headers, raw = await gw.post("/v1/chat/completions", {"model": "mock-model", "messages": CHAT})
        assert (status, raw) == (422, body) and headers["Content-Type"].startswith("application/json")
        answer = await stream(gw.http, gw.url + "/v1/completions", {"model": "mock-model", "prompt": "x"})
        assert (answer.status, answer.raw) == (422, body)
        assert len(recorded(servers)) == 2  # refused once each: no other server was asked
    run(scenario)


def test_usage_is_the_servers_and_an_answer_complete_but_for_done_is_complete():
    # (A server that sends no usage at all -- llama.cpp -- is tests/test_llamacpp_gateway.py's.)
    async def scenario(gw, servers):
        body = {"model": "mock-model", "prompt": "hi", "max_tokens": 4, "stream_options": {"include_usage": True}}
        answer = await stream(gw.http, gw.url + "/v1/completions", body)
        usage = [e for e in answer.events if isinstance(e, dict) and e.get("usage")]
        assert usage[-1]["usage"]["completion_tokens"] == 4 and "llmgw_usage" not in usage[-1]  # the server's
        for server in servers:  # the whole answer, every finish_reason, then the connection closes: no [DONE]
            server.inject(Fault(FaultKind.NO_DONE, after_chunks=None))
        answer = await stream(gw.http, gw.url + "/v1/completions", {**body, "stream_options": None})
        assert answer.done_count == 1 and answer.text(False) == expected_text("hi", 4)
        assert not [e for e in answer.events if isinstance(e, dict) and e.get("usage")]  # not asked: none added
    run(scenario)


def test_a_conversation_keeps_its_server_across_turns():
    assert affinity_key("chat", {"messages": CHAT}) == affinity_key(
        "chat", {"messages": CHAT + [{"role": "assistant", "content": "Nile."}, {"role": "user", "content": "More"}]})
    assert affinity_key("chat", {"messages": CHAT}) != affinity_key(
        "chat", {"messages": [CHAT[0], {"role": "user", "content": "Another question"}]})
    assert affinity_key("completions", {"prompt": "abc"}) == "abc"
    assert affinity_key("chat", {"model": "m", "messages": "not a list"})  # never empty

    async def scenario(gw, servers):
        history = list(CHAT)
        served = set()
        for turn in range(5):
            status, headers, raw = await gw.post("/v1/chat/completions", {"model": "mock-model",
                                                                          "messages": history, "max_tokens": 3})
            assert status == 200
            served.add(headers["X-LLMGW-Replica"])
            history += [json.loads(raw)["choices"][0]["message"], {"role": "user", "content": f"turn {turn}"}]
        assert len(served) == 1
    run(scenario, mocks=3)


def test_simulated_grpc_replicas_serve_the_models_no_upstream_serves():
    async def scenario(gw, servers):
        replica = Replica(ReplicaConfig(replica_id="sim-1", port=0, gossip_port=None, max_capacity=4,
                                        model_version="v1"))
        await replica.start()
        try:
            gw.membership.set(FakeMember("sim-1", replica.grpc_address), "joined")
            await wait_for(lambda: "sim-1" in gw.server.gateway.view.addresses, 5.0, "the replica to join")
            status, headers, raw = await gw.post("/v1/completions", {"model": "anything", "prompt": "hello",
                                                                     "max_tokens": 3})
            assert status == 200 and headers["X-LLMGW-Replica"] == "sim-1"
            assert json.loads(raw)["id"].startswith("cmpl-")
            status, headers, _ = await gw.post("/v1/completions", {"model": "mock-model", "prompt": "hello",
                                                                   "max_tokens": 3})
            assert status == 200 and headers["X-LLMGW-Replica"].startswith("http://")
            assert len(recorded(servers)) == 1
            async with gw.http.get(gw.url + "/v1/models") as response:
                listed = {m["id"] for m in (await response.json())["data"]}
            assert listed == {"v1", "mock-model"}
        finally:
            await replica.stop(0.1)
    run(scenario, mocks=1)


def test_a_url_alone_learns_its_models_and_an_unhealthy_server_leaves_routing():
    async def scenario(gw, servers):
        a, b = servers
        assert gw.upstreams.models() == {"mock-model": 2}
        await a.stop()
        await wait_for(lambda: gw.upstreams.models() == {"mock-model": 1}, 10.0, "the stopped server to leave")
        for k in range(4):
            status, headers, _ = await gw.post("/v1/completions", {"model": "mock-model", "prompt": f"{k}"})
            assert status == 200 and headers["X-LLMGW-Replica"] == Backend(b.base_url).id
    run(scenario)



def test_grpc_infer_reaches_a_model_server_with_its_sampling_fields():
    import grpc

    from llmgw._proto import llmgateway_pb2 as pb

    async def scenario(gw, servers):
        async with grpc.aio.insecure_channel(gw.server.grpc_address) as channel:
            infer = channel.unary_stream("/llmgateway.InferenceGateway/Infer",
                                         request_serializer=pb.InferRequest.SerializeToString,
                                         response_deserializer=pb.InferResponse.FromString)
            message = pb.InferRequest(prompt="grpc prompt", max_tokens=6, temperature=0.0, top_k=5, seed=11,
                                      stop=["zzz"], repetition_penalty=1.0)
            tokens = [r.token async for r in infer(message) if r.token]
        assert "".join(tokens) == expected_text("grpc prompt", 6)
        (seen,) = recorded(servers)
        assert seen.path == "/v1/completions"
        assert seen.body == {"model": "mock-model", "prompt": "grpc prompt", "max_tokens": 6, "stream": True,
                             "temperature": 0.0, "top_k": 5, "seed": 11, "stop": ["zzz"], "repetition_penalty": 1.0}
    run(scenario)


def test_servers_advertised_by_agents_on_the_mesh_are_routed_to_while_healthy():
    import dataclasses

    from llmgw.upstream.backends import HealthState
    from llmgw.upstream.metadata import encode_backend

    @dataclasses.dataclass(frozen=True)
    class AgentMember:  # what the gossip layer reports for an `llmgw agent` sidecar
        member_id: str
        app_meta: bytes
        state: str = "alive"
        role: str = "upstream"
        grpc_address: str = ""

    async def scenario(gw, servers):
        (server,) = servers
        advertised = Backend(server.base_url, kind=BackendKind.VLLM, models=("mock-model",), models_configured=True,
                             health=HealthState.HEALTHY)
        gw.membership.set(AgentMember("agent-1", encode_backend(advertised)), "joined")
        await wait_for(lambda: gw.upstreams.models() == {"mock-model": 1}, 5.0, "the advertised server")
        status, headers, _ = await gw.post("/v1/completions", {"model": "mock-model", "prompt": "via agent"})
        assert status == 200 and headers["X-LLMGW-Replica"] == advertised.id
        sick = advertised.with_health(HealthState.UNHEALTHY)
        gw.membership.set(AgentMember("agent-1", encode_backend(sick)), "updated")
        await wait_for(lambda: gw.upstreams.models() == {}, 5.0, "the unhealthy server to leave routing")
        status, _, _ = await gw.post("/v1/completions", {"model": "mock-model", "prompt": "via agent"})
        assert status == 404
        gw.membership.set(AgentMember("agent-1", encode_backend(advertised)), "updated")
        await wait_for(lambda: gw.upstreams.models() == {"mock-model": 1}, 5.0, "the server to be back")
        status, _, _ = await gw.post("/v1/completions", {"model": "mock-model", "prompt": "via agent"})
        assert status == 200
        gw.membership.set(AgentMember("agent-1", encode_backend(advertised), state="dead"), "updated")
        await wait_for(lambda: not gw.upstreams.backends, 5.0, "the dead agent's server to be forgotten")
        assert advertised.id not in gw.server.gateway.view.addresses
        assert len(recorded(servers)) == 2

    async def main():
        servers = await start_mocks(1)
        gateway = UpstreamStack([])
        try:
            await gateway.start()
            await asyncio.wait_for(scenario(gateway, servers), 60)
        finally:
            await gateway.close()
            await servers[0].stop()
    asyncio.run(main())


def test_events_that_arrived_together_leave_as_one_chunk():
    from llmgw.gateway.attempt import Job
    from llmgw.gateway.http_transport import HttpTransport
    from llmgw.gateway.upstreams import passthrough_request

    class Target:
        def __init__(self, backend):
            self.replica_id, self.address = backend.id, backend.base_url

    async def main():
        (server,) = await start_mocks(1)  # no token delay: the events come faster than they are read
        backend = Backend(server.base_url, models=("mock-model",), models_configured=True)
        transport = HttpTransport({backend.id: backend}.get)
        body = {"model": "mock-model", "prompt": "burst", "max_tokens": 200, "stream": True}
        job = Job(passthrough_request("completions", body, request_id="r1"), "r1",
                  asyncio.get_running_loop().time() + 30)
        try:
            stream_ = transport.open(Target(backend), job, 30.0)
            chunks = []
            while (chunk := await stream_.read()) is not None:
                chunks.append(chunk)
                job.forwarded.extend(chunk.tokens)
                if chunk.is_final:
                    break
        finally:
            await transport.close()
            await server.stop()
        assert "".join(job.forwarded) == expected_text("burst", 200) and chunks[-1].is_final
        assert sum(len(c.raw) for c in chunks) == 201  # every server event travels on, once (200 + the finish)
        assert len(chunks) < 100  # ... and most of them together with others
        assert [c.index for c in chunks] == [sum(len(c.tokens) for c in chunks[:k]) for k in range(len(chunks))]
    asyncio.run(main())



# ---- the status line and headers leave with the first events ---------------------------------------------------
def test_the_headers_leave_in_one_write_with_the_first_event(monkeypatch):
    from test_http_openai import SocketWrites, assert_headers_left_with_the_first_event, first_recv_of_a_stream

    from llmgw.testing.mock_openai import MockOpenAIServer

    writes = SocketWrites(monkeypatch)

    async def main():
        # The first token comes late, so the client waits in recv() when the gateway starts its answer.
        server = MockOpenAIServer(first_token_delay=0.3)
        await server.start()
        gateway = UpstreamStack([Backend(server.base_url, kind=BackendKind.VLLM)])
        try:
            await gateway.start()
            body = {"model": "mock-model", "messages": CHAT, "stream": True, "max_tokens": 3}
            for _ in range(3):
                first = await asyncio.wait_for(
                    asyncio.to_thread(first_recv_of_a_stream, gateway.front.port, body), 30)
                assert_headers_left_with_the_first_event(first, writes.gateway_answers())
            assert len(writes.gateway_answers()) == 3
        finally:
            await gateway.close()
            await server.stop()
    asyncio.run(main())
