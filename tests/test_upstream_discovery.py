"""Upstreams written down (backends.py), advertised over gossip (metadata.py) and discovered (discovery.py)."""

import asyncio
import contextlib
import json
import tomllib

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from inprocess import run_bounded as run
from inprocess import wait_for
from llmgw.cluster import free_port
from llmgw.testing.mock_openai import MockOpenAIServer
from llmgw.upstream.backends import (
    Backend,
    DnsUpstream,
    HealthState,
    ServerLoad,
    UpstreamConfigError,
    canonical_id,
    parse_upstream_arg,
    parse_upstream_args,
    parse_upstream_tables,
)
from llmgw.upstream.capabilities import BackendKind, ChatPrefill
from llmgw.upstream.client import UpstreamClient
from llmgw.upstream.discovery import (
    Change,
    DnsSource,
    GossipSource,
    StaticSource,
    UpstreamEvent,
    UpstreamRegistry,
    diff,
    resolve_with_loop,
    sources_for,
)
from llmgw.upstream.metadata import (
    MAX_METADATA_BYTES,
    MetadataError,
    MetadataTooLarge,
    UnsupportedVersion,
    decode_backend,
    encode_backend,
)
from llmgw.upstream.probe import ProbeSettings

FAST = ProbeSettings(interval_s=0.05, timeout_s=0.5, unhealthy_after=2, models_refresh_s=5.0,
                     models_retry_max_s=0.2)


@contextlib.asynccontextmanager
async def running(source, events):
    task = asyncio.ensure_future(source.run(events.extend))
    await asyncio.sleep(0)  # let it start
    try:
        yield source
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


# --- ids and the written forms ----------------------------------------------------------------------------

@pytest.mark.parametrize("url,expected", [
    ("http://10.0.0.5:8000", "http://10.0.0.5:8000"),
    ("http://10.0.0.5:8000/", "http://10.0.0.5:8000"),
    ("http://10.0.0.5:8000/v1", "http://10.0.0.5:8000"),
    ("http://10.0.0.5:8000/v1/", "http://10.0.0.5:8000"),
    ("HTTP://Model-Host", "http://model-host:80"),
    ("https://model-host/serving/llama/v1", "https://model-host:443/serving/llama"),
    ("http://[FD00::1]:8000", "http://[fd00::1]:8000"),
])
def test_the_id_is_the_canonical_url(url, expected):
    assert canonical_id(url) == expected
    assert Backend(url).id == expected


@pytest.mark.parametrize("url", ["ftp://host:1", "host:8000", "http://", "http://host:8000?x=1", "http://h#frag",
                                 "http://user:pw@host:8000", "http://host:99999", "http://host:0", 8000])
def test_unusable_urls_are_refused(url):
    with pytest.raises(ValueError):
        canonical_id(url)


def test_url_alone_learns_its_models():
    spec = parse_upstream_arg("http://10.0.0.5:8000")
    assert spec == Backend("http://10.0.0.5:8000")
    assert not spec.models_configured and spec.models == ()
    assert spec.kind is BackendKind.OPENAI_COMPATIBLE and spec.weight == 1.0 and spec.capacity == 0


def test_url_with_options():
    spec = parse_upstream_arg("http://h:8000, kind=vllm ,model=meta-llama/Llama-3.1-8B,model=qwen2:7b,model=odd=name,"
                              "alias=llama3=meta-llama/Llama-3.1-8B,alias=q=odd=name,weight=2.5,capacity=8,"
                              "chat_prefill=open_template,id=box-1")
    assert isinstance(spec, Backend)
    assert spec.kind is BackendKind.VLLM
    assert spec.models == ("meta-llama/Llama-3.1-8B", "qwen2:7b", "odd=name") and spec.models_configured
    # An alias splits at its first "=": a client name cannot hold "=", a server name can.
    assert spec.aliases == (("llama3", "meta-llama/Llama-3.1-8B"), ("q", "odd=name"))
    assert spec.server_model("q") == "odd=name"
    assert spec.weight == 2.5 and spec.capacity == 8 and spec.id == "box-1"
    assert spec.chat_prefill is ChatPrefill.OPEN_TEMPLATE
    assert spec.capabilities.chat_prefill is ChatPrefill.OPEN_TEMPLATE


def test_alias_targets_must_be_among_configured_models():
    with pytest.raises(UpstreamConfigError, match=r"--upstream .*alias target\(s\) \['b=c=qwen2:7b'\]"):
        parse_upstream_arg("http://h:8000,model=qwen2:7b,alias=a=b=c=qwen2:7b")


def test_dns_target_with_options():
    spec = parse_upstream_arg("dns://vllm.default.svc.cluster.local:8000,kind=sglang,refresh=2,scheme=https,"
                              "capacity=32")
    assert isinstance(spec, DnsUpstream)
    assert (spec.name, spec.port, spec.scheme, spec.refresh_s) == ("vllm.default.svc.cluster.local", 8000,
                                                                     "https", 2.0)
    backend = spec.backend_at("fd00::7", 8000)
    assert backend.base_url == "https://[fd00::7]:8000" and backend.id == "https://[fd00::7]:8000"
    assert backend.kind is BackendKind.SGLANG and backend.capacity == 32 and not backend.models_configured


@pytest.mark.parametrize("text,message", [
    ("", "needs a URL"),
    ("http://h:8000,model", "is not key=value"),
    ("http://h:8000,modle=x", "unknown option 'modle'"),
    ("http://h:8000,weight=heavy", "weight must be a number"),
    ("http://h:8000,weight=0", "weight must be a finite number > 0"),
    ("http://h:8000,weight=nan", "weight must be a finite number > 0"),
    ("http://h:8000,capacity=1.5", "capacity must be an integer"),
    ("http://h:8000,capacity=-1", "capacity must be an integer >= 0"),
    ("http://h:8000,kind=triton", "unknown backend kind 'triton'"),
    ("http://h:8000,kind=vllm,kind=sglang", "'kind' given twice"),
    ("http://h:8000,alias=llama3", "is not CLIENT_NAME=SERVER_NAME"),
    ("http://h:8000,chat_prefill=maybe", "'maybe' is not a valid ChatPrefill"),
    ("http://h:8000,refresh=5", r"\['refresh'\] apply to dns:// upstreams only"),
    ("http://h:8000,model=", "a model name is a non-empty printable string"),
    ("ftp://h:8000", "must start with http:// or https://"),
    ("dns://name", "needs a port"),
    ("dns://name:8000/path", "dns://NAME:PORT"),
    ("dns://name:8000,id=x", "cannot take an id"),
    ("dns://name:8000,refresh=0", "refresh must be a number of seconds > 0"),
    ("dns://name:8000,scheme=ftp", "scheme must be http or https"),
])
def test_bad_upstream_strings_are_explained(text, message):
    with pytest.raises(UpstreamConfigError, match=message):
        parse_upstream_arg(text)


def test_the_same_upstream_twice_is_refused():
    with pytest.raises(UpstreamConfigError, match="http://h:8000 is listed twice"):
        parse_upstream_args(["http://h:8000", "http://H:8000/v1/"])


CONFIG = """
[[upstream]]
url = "http://10.0.0.5:8000"
kind = "vllm"
models = ["meta-llama/Llama-3.1-8B-Instruct"]
aliases = { llama3 = "meta-llama/Llama-3.1-8B-Instruct" }
weight = 2
capacity = 64

[[upstream]]
url = "http://10.0.0.6:8001"

[[upstream]]
url = "dns://vllm-headless.default.svc.cluster.local:8000"
kind = "vllm"
refresh = 10
"""


def test_config_file_tables():
    first, second, third = parse_upstream_tables(tomllib.loads(CONFIG)["upstream"])
    assert first == Backend("http://10.0.0.5:8000", BackendKind.VLLM, models=("meta-llama/Llama-3.1-8B-Instruct",),
                            aliases=(("llama3", "meta-llama/Llama-3.1-8B-Instruct"),), weight=2.0, capacity=64,
                            models_configured=True)
    assert first.server_model("llama3") == "meta-llama/Llama-3.1-8B-Instruct"
    assert first.client_models() == ("llama3", "meta-llama/Llama-3.1-8B-Instruct")
    assert second == Backend("http://10.0.0.6:8001")
    assert isinstance(third, DnsUpstream) and third.refresh_s == 10 and third.template.kind is BackendKind.VLLM


@pytest.mark.parametrize("entry,message", [
    ({}, r"entry 1: `url` is required"),
    ({"url": "http://h:1", "model": ["x"]}, r"entry 1 \(url = 'http://h:1'\): unknown key\(s\) \['model'\]"),
    ({"url": "http://h:1", "models": "x"}, r"entry 1 \(url = 'http://h:1'\): models must be a list"),
    ({"url": "http://h:1", "models": []}, "models is empty"),
    ({"url": "http://h:1", "models": [1]}, "a model name is a non-empty printable string"),
    ({"url": "http://h:1", "models": ["a"], "aliases": {"x": "b"}}, r"alias target\(s\) \['b'\]"),
    ({"url": "http://h:1", "aliases": "x"}, "aliases must map client names"),
    ({"url": "http://h:1", "weight": "2"}, "weight must be a finite number"),
    ({"url": "http://h:1", "capacity": True}, "capacity must be an integer"),
    ({"url": "http://h:1", "kind": 3}, "unknown backend kind 3"),
    ({"url": "http://h:1", "id": ""}, "id must be a non-empty string"),
    ({"url": 5}, "`url` is required"),
])
def test_config_errors_name_the_entry(entry, message):
    with pytest.raises(UpstreamConfigError, match=message):
        parse_upstream_tables([entry])


def test_config_must_be_an_array_of_tables():
    with pytest.raises(UpstreamConfigError, match="array of tables"):
        parse_upstream_tables({"url": "http://h:1"})
    with pytest.raises(UpstreamConfigError, match="entry 2: must be a table"):
        parse_upstream_tables([{"url": "http://h:1"}, "http://h:2"])
    with pytest.raises(UpstreamConfigError, match="listed twice"):
        parse_upstream_tables([{"url": "dns://a:1"}, {"url": "dns://a:1", "kind": "vllm"}])


def test_model_lookup_with_aliases():
    backend = Backend("http://h:1", models=("a", "b"), aliases=(("x", "a"), ("y", "gone")))
    assert backend.server_model("a") == "a" and backend.server_model("x") == "a"
    assert backend.server_model("y") is None  # an alias of a model the server does not (or no longer) serve
    assert backend.server_model("c") is None
    assert backend.client_models() == ("a", "b", "x")
    with pytest.raises(ValueError, match="points at both"):
        Backend("http://h:1", aliases=(("x", "a"), ("x", "b")))


def test_server_load_is_checked():
    with pytest.raises(ValueError, match="running"):
        ServerLoad(running=-1, waiting=0)
    with pytest.raises(ValueError, match="kv_cache_usage"):
        ServerLoad(running=0, waiting=0, kv_cache_usage=1.5)


# --- the gossip advertisement ---------------------------------------------------------------------------

TYPICAL = Backend("http://10.12.34.56:8000", BackendKind.VLLM, models=("meta-llama/Llama-3.1-8B-Instruct",),
                  aliases=(("llama3", "meta-llama/Llama-3.1-8B-Instruct"),), capacity=256,
                  health=HealthState.HEALTHY, load=ServerLoad(running=17, waiting=3, kv_cache_usage=0.4321))


def test_advertisement_round_trip_and_typical_size():
    data = encode_backend(TYPICAL)
    assert len(data) <= 200
    decoded = decode_backend(data)
    assert decoded.id == TYPICAL.id == "http://10.12.34.56:8000"
    assert decoded.load == ServerLoad(17, 3, 0.43)  # KV usage rounded to two decimals
    assert decoded == TYPICAL.with_load(ServerLoad(17, 3, 0.43))
    assert json.loads(data)["v"] == 1
    minimal = Backend("http://h:1")
    assert decode_backend(encode_backend(minimal)) == minimal
    assert json.loads(encode_backend(minimal)) == {"v": 1, "u": "http://h:1", "k": "openai", "m": [], "h": "?"}
    odd = Backend("http://h:1", weight=0.5, chat_prefill=ChatPrefill.NONE, health=HealthState.UNHEALTHY,
                  load=ServerLoad(0, 0, None), models=("ü-模型",))
    assert decode_backend(encode_backend(odd)) == odd


def test_advertisements_are_bounded():
    many = Backend("http://h:1", models=tuple(f"model-{i:03d}-with-a-long-name" for i in range(20)))
    with pytest.raises(MetadataTooLarge, match=r"more than 512 \(20 models"):
        encode_backend(many)
    with pytest.raises(MetadataTooLarge):
        decode_backend(b" " * (MAX_METADATA_BYTES + 1))


def test_a_later_format_is_refused_and_unknown_keys_are_ignored():
    record = json.loads(encode_backend(TYPICAL))
    with pytest.raises(UnsupportedVersion, match="version 2"):
        decode_backend(json.dumps({**record, "v": 2}).encode())
    assert decode_backend(json.dumps({**record, "zz": [1, 2]}).encode()) == decode_backend(encode_backend(TYPICAL))


@pytest.mark.parametrize("data,message", [
    (b"\xff\xfe", "not a JSON advertisement"),
    (b"[1]", "is a JSON object"),
    (b'{"u":"http://h:1"}', "`v` must be"),
    (b'{"v":true,"u":"http://h:1"}', "`v` must be"),
    (b'{"v":1,"k":"vllm","m":[],"h":"h"}', "`u` is missing"),
    (b'{"v":1,"u":"ftp://h","k":"vllm","m":[],"h":"h"}', "http:// or https://"),
    (b'{"v":1,"u":"http://h:1","k":"nope","m":[],"h":"h"}', "unknown backend kind|not a valid BackendKind"),
    (b'{"v":1,"u":"http://h:1","k":"vllm","m":"x","h":"h"}', "`m` must be a list"),
    (b'{"v":1,"u":"http://h:1","k":"vllm","m":[3],"h":"h"}', "model name"),
    (b'{"v":1,"u":"http://h:1","k":"vllm","m":[],"h":"ok"}', "`h` must be one of"),
    (b'{"v":1,"u":"http://h:1","k":"vllm","m":[],"h":"h","l":[1,2]}', "`l` must be"),
    (b'{"v":1,"u":"http://h:1","k":"vllm","m":[],"h":"h","l":[-1,2,null]}', "running"),
    (b'{"v":1,"u":"http://h:1","k":"vllm","m":[],"h":"h","l":[1,2,"x"]}', "kv_cache_usage"),
    (b'{"v":1,"u":"http://h:1","k":"vllm","m":[],"h":"h","w":-1}', "weight"),
    (b'{"v":1,"u":"http://h:1","k":"vllm","m":[],"h":"h","c":"many"}', "capacity"),
    (b'{"v":1,"u":"http://h:1","k":"vllm","m":[],"h":"h","a":[["x"]]}', "pair"),
    (b'{"v":1,"u":"http://h:1","k":"vllm","m":[],"h":"h","p":"sometimes"}', "ChatPrefill"),
])
def test_unreadable_advertisements_are_refused_with_a_reason(data, message):
    with pytest.raises(MetadataError, match=message):
        decode_backend(data)


names = st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "S")), min_size=1, max_size=8)


@settings(max_examples=examples(200), deadline=None)
@given(models=st.lists(names, max_size=3, unique=True), kind=st.sampled_from(BackendKind),
       health=st.sampled_from(HealthState), weight=st.floats(0.01, 100), capacity=st.integers(0, 10_000),
       load=st.none() | st.builds(ServerLoad, st.integers(0, 10_000), st.integers(0, 10_000),
                                  st.none() | st.floats(0, 1)),
       prefill=st.none() | st.sampled_from(ChatPrefill), port=st.integers(1, 65535))
def test_every_advertisement_reads_back_as_it_was_written(models, kind, health, weight, capacity, load, prefill,
                                                          port):
    aliases = tuple((f"alias-{name}", name) for name in models[:2])
    backend = Backend(f"http://10.0.0.1:{port}", kind, models=tuple(models), aliases=aliases, weight=weight,
                      capacity=capacity, chat_prefill=prefill, health=health, load=load)
    decoded = decode_backend(encode_backend(backend))
    expected_load = None if load is None else ServerLoad(
        load.running, load.waiting, None if load.kv_cache_usage is None else round(load.kv_cache_usage, 2))
    assert decoded == backend.with_load(expected_load)


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=600) | st.builds(lambda v: json.dumps(v).encode(), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from("vukmahlwcp"), inner, max_size=8),
    max_leaves=20)))
def test_any_bytes_decode_to_a_backend_or_a_metadata_error(data):
    try:
        backend = decode_backend(data)
    except MetadataError:
        return
    assert isinstance(backend, Backend) and decode_backend(encode_backend(backend)) == backend


# --- diffing and the sources -------------------------------------------------------------------------------

def test_diff():
    a, b, c = Backend("http://a:1"), Backend("http://b:1"), Backend("http://c:1")
    b2 = b.with_health(HealthState.HEALTHY)
    events = diff({a.id: a, b.id: b}, {b.id: b2, c.id: c})
    assert events == [UpstreamEvent(Change.REMOVED, a), UpstreamEvent(Change.UPDATED, b2),
                      UpstreamEvent(Change.ADDED, c)]
    assert diff({a.id: a}, {a.id: a}) == []


def test_sources_for_the_written_upstreams():
    async def scenario():
        async with UpstreamClient() as client:
            specs = parse_upstream_args(["http://a:1", "dns://svc:8000", "http://b:1,model=x", "dns://other:9"])
            sources = sources_for(specs, client)
            assert [type(s) for s in sources] == [StaticSource, DnsSource, DnsSource]
            assert [b.id for b in sources[0].backends] == ["http://a:1", "http://b:1"]
            assert [s.target.name for s in sources[1:]] == ["svc", "other"]
            assert sources_for([], client) == []
    run(scenario())


def test_static_source_configured_models_at_once_url_alone_when_it_answers():
    async def scenario():
        late_port = free_port()
        async with MockOpenAIServer(models=("m",)) as mock, UpstreamClient() as client:
            configured = Backend(mock.base_url, BackendKind.VLLM, models=("m",), models_configured=True)
            late = Backend(f"http://127.0.0.1:{late_port}", BackendKind.LLAMACPP)
            source = StaticSource([configured, late], client, FAST)
            events = []
            async with running(source, events):
                await wait_for(lambda: events)
                assert events[0] == UpstreamEvent(Change.ADDED, configured)  # before any probe: health unknown
                await wait_for(lambda: source.snapshot().get(configured.id, configured).health
                                 is HealthState.HEALTHY)
                await asyncio.sleep(0.3)
                assert late.id not in source.snapshot()  # nothing answered there yet
                late_mock = MockOpenAIServer(models=("late-model",), port=late_port)
                await late_mock.start()
                try:
                    await wait_for(lambda: late.id in source.snapshot())
                    joined = source.snapshot()[late.id]
                    assert joined.models == ("late-model",) and joined.health is HealthState.HEALTHY
                    assert next(e.change for e in events if e.backend.id == late.id) is Change.ADDED
                finally:
                    await late_mock.stop()
                await wait_for(lambda: source.snapshot()[late.id].health is HealthState.UNHEALTHY)
                assert source.snapshot()[late.id].models == ("late-model",)  # learnt models are kept
    run(scenario())


def test_dns_source_follows_the_answers_of_an_injected_resolver():
    async def scenario():
        answers = []
        hang = asyncio.Event()

        async def resolver(name, port):
            assert (name, port) == ("svc.test", 8000)
            answer = answers[0] if answers else []
            if isinstance(answer, Exception):
                raise answer
            if answer == "hang":
                await hang.wait()
            return list(answer)

        async with MockOpenAIServer(models=("a",)) as one, MockOpenAIServer(models=("b",)) as two, \
                UpstreamClient() as client:
            target = DnsUpstream("svc.test", 8000, Backend("http://template.invalid", BackendKind.VLLM),
                                 refresh_s=0.05)
            # The resolved port is the server's own: a headless Service answers with the pods' addresses.
            answers.append([("127.0.0.1", one.port), ("127.0.0.1", two.port), ("127.0.0.1", one.port)])
            source = DnsSource(target, client, FAST, resolver=resolver)
            events = []
            async with running(source, events):
                await wait_for(lambda: len(source.snapshot()) == 2)
                assert sorted(b.models for b in source.snapshot().values()) == [("a",), ("b",)]
                assert all(b.kind is BackendKind.VLLM for b in source.snapshot().values())
                answers[0] = [("127.0.0.1", one.port)]
                await wait_for(lambda: list(source.snapshot()) == [one.base_url])
                removed = [e for e in events if e.change is Change.REMOVED]
                assert [e.backend.base_url for e in removed] == [two.base_url]
                # A failed lookup or one that never answers keeps the last set.
                failed = source.failed_lookups
                answers[0] = OSError("Name or service not known")
                await wait_for(lambda: source.failed_lookups >= failed + 2)
                answers[0] = UnicodeError("encoding with 'idna' codec failed")  # what a bad name raises
                await wait_for(lambda: source.failed_lookups >= failed + 3)
                answers[0] = "hang"
                await wait_for(lambda: source.failed_lookups >= failed + 4)
                hang.set()
                assert list(source.snapshot()) == [one.base_url]
                # An empty successful answer is a real one: no servers.
                answers[0] = []
                await wait_for(lambda: source.snapshot() == {})
    run(scenario())


def test_dns_source_resolves_localhost_with_the_loop():
    async def scenario():
        async with MockOpenAIServer() as mock, UpstreamClient() as client:
            assert ("127.0.0.1", mock.port) in await resolve_with_loop("localhost", mock.port)
            target = DnsUpstream("localhost", mock.port, Backend("http://template.invalid"), refresh_s=0.2)
            source = DnsSource(target, client, FAST)
            events = []
            async with running(source, events):
                await wait_for(lambda: mock.base_url in source.snapshot())
            assert source.snapshot()[mock.base_url].models == ("mock-model",)
            assert ("127.0.0.1", mock.port) in source.addresses
    run(scenario())


def test_gossip_source_maps_advertisements_to_backends():
    async def scenario():
        source = GossipSource()
        source.member_changed("agent-9", encode_backend(Backend("http://h:9")))  # before it runs: told at start
        events = []
        async with running(source, events):
            assert events == [UpstreamEvent(Change.ADDED, Backend("http://h:9"))]
            source.member_changed("agent-9", None)
            events.clear()
            source.member_changed("agent-1", encode_backend(TYPICAL))
            assert events == [UpstreamEvent(Change.ADDED, decode_backend(encode_backend(TYPICAL)))]
            down = TYPICAL.with_health(HealthState.UNHEALTHY).with_load(None)
            source.member_changed("agent-1", encode_backend(down))
            assert events[-1] == UpstreamEvent(Change.UPDATED, down)
            source.member_changed("agent-1", encode_backend(down))  # the same again: no event
            assert len(events) == 2
            # A second agent for the same server does not make a second backend.
            source.member_changed("agent-0", encode_backend(TYPICAL))
            assert len(source.snapshot()) == 1 and events[-1].change is Change.UPDATED
            source.member_changed("agent-0", None)
            source.member_changed("gateway-7", b"")  # a member that advertises no server
            source.member_changed("agent-1", b"garbage")
            assert source.rejected == 1
            assert source.snapshot() == {} and events[-1] == UpstreamEvent(Change.REMOVED, down)
    run(scenario())


def test_registry_merges_sources_first_added_wins():
    async def scenario():
        async with MockOpenAIServer(models=("m",)) as mock, UpstreamClient() as client:
            configured = Backend(mock.base_url, BackendKind.VLLM, models=("m",), aliases=(("alias", "m"),),
                                 models_configured=True, weight=3.0)
            gossip = GossipSource()
            other = Backend("http://10.9.9.9:8000", BackendKind.SGLANG, models=("m", "other"),
                            health=HealthState.HEALTHY)
            events = []
            registry = UpstreamRegistry(events.extend)
            static = StaticSource([configured], client, FAST)
            registry.add(static)
            registry.add(gossip)
            async with registry:
                with pytest.raises(RuntimeError):
                    registry.add(GossipSource())
                await wait_for(lambda: configured.id in registry.backends())
                gossip.member_changed("agent-a", encode_backend(Backend(mock.base_url, models=("x",),
                                                                        health=HealthState.HEALTHY)))
                gossip.member_changed("agent-b", encode_backend(other))
                await wait_for(lambda: len(registry.backends()) == 2)
                assert registry.backends()[configured.id].weight == 3.0  # the static entry wins for its id
                assert [b.id for b in registry.serving("m")] == sorted([configured.id, other.id])
                assert [b.id for b in registry.serving("alias")] == [configured.id]
                assert registry.serving("x") == []
                assert registry.models() == ["alias", "m", "other"]
                gossip.member_changed("agent-b", encode_backend(other.with_health(HealthState.UNHEALTHY)))
                assert [b.id for b in registry.serving("m")] == [configured.id]
                assert registry.models() == ["alias", "m"]
            # Stopped sources vouch for nothing: the registry ends empty, and said so.
            assert registry.backends() == {}
            assert {e.backend.id for e in events if e.change is Change.REMOVED} == {configured.id, other.id}
    run(scenario())
