"""Tenancy wired into a running gateway (in-process): API keys on both fronts, per-tenant limits with 429 /
RESOURCE_EXHAUSTED and the retry delay, reload without dropping streams, /admin/usage, per-tenant metrics, the
request log, hostile Authorization values, and fair sharing across tenants under overload.

The stack is the composition root's (llmgw.gateway.app.build_server + start_gateway: gRPC front, Gateway, metrics
listener, HTTP front) over real simulated replicas, with a membership the test drives instead of gossip.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import tracemalloc
from pathlib import Path

import grpc
import pytest

from harness import free_tcp_port
from inprocess import ComposedStack, run_with
from llmgw._proto import llmgateway_pb2 as pb
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc
from llmgw.gateway import GatewayConfig
from llmgw.gateway.app import HttpSettings, build_server, start_gateway
from llmgw.gateway.tenancy_gate import TenancyGate
from llmgw.tenancy.keys import hash_key

ADMIN = "admin-token-for-tests"
KEYS = {
    "search": "sk-llmgw-test-search-key-0001",
    "search2": "sk-llmgw-test-search-key-0002",
    "batch": "sk-llmgw-test-batch-key-00001",
    "llama": "sk-llmgw-test-llama-only-0001",
    "slow": "sk-llmgw-test-rate-limited-01",
    "tokens": "sk-llmgw-test-token-limited-1",
    "single": "sk-llmgw-test-one-at-a-time-1",
}


def entry(key: str, tenant: str, **fields) -> str:
    lines = ["[[key]]", f'sha256 = "{hash_key(key)}"', f'tenant = "{tenant}"']
    for name, value in fields.items():
        lines.append(f'{name} = {value!r}'.replace("'", '"'))
    return "\n".join(lines) + "\n\n"


def key_file() -> str:
    return (entry(KEYS["search"], "search", weight=3) + entry(KEYS["search2"], "search", weight=3)
            + entry(KEYS["batch"], "batch")
            + entry(KEYS["llama"], "llama-team", models=["llama-3-8b"])
            # 12/min: the 5 s pacing window holds 1 request
            + entry(KEYS["slow"], "slow", requests_per_minute=12)
            + entry(KEYS["tokens"], "tokens", tokens_per_minute=5)
            + entry(KEYS["single"], "single", max_concurrent=1))


class Stack(ComposedStack):
    """Replicas + the composed gateway (gRPC + HTTP fronts), optionally with a key file."""

    async def start(self, keys_path: Path | None, **config):
        gate = TenancyGate.from_key_file("gateway-1", str(keys_path)) if keys_path else None
        self.build(GatewayConfig(port=0, gossip_port=None, **config), tenancy=gate)
        await self.start_fronts(admin_token=ADMIN)

    @property
    def gate(self) -> TenancyGate:
        return self.server.gateway.tenancy

    async def complete(self, key: str | None, *, model: str = "m", max_tokens: int = 3, stream: bool = False,
                       headers: dict | None = None):
        hdrs = dict(headers or {})
        if key is not None:
            hdrs["Authorization"] = f"Bearer {key}"
        body = {"model": model, "prompt": "hello tenants", "max_tokens": max_tokens, "stream": stream}
        async with self.session.post("/v1/completions", json=body, headers=hdrs) as resp:
            text = await resp.text()
            return resp.status, resp.headers, text

    async def admin(self, method: str, path: str):
        async with self.session.request(method, path, headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
            return resp.status, await resp.json()

    async def infer_grpc(self, key: str | None, *, model: str | None = None, max_tokens: int = 3,
                         model_field: str = ""):
        """`model`: named in the `llmgw-model` metadata (clients of the reference's proto); `model_field`: in
        InferRequest.model."""
        metadata = []
        if key is not None:
            metadata.append(("authorization", f"Bearer {key}"))
        if model is not None:
            metadata.append(("llmgw-model", model))
        call = pb_grpc.InferenceGatewayStub(self.channel).Infer(
            pb.InferRequest(prompt="hello tenants", max_tokens=max_tokens, model=model_field), timeout=10.0,
            metadata=metadata or None)
        tokens = [msg async for msg in call]
        return tokens, call


@pytest.fixture
def keys_path(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(key_file())
    return path


def run(scenario, timeout: float = 60.0):
    return run_with(Stack, scenario, timeout)


async def grpc_error(coro) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value


# ---- open without a key file ----------------------------------------------------------------------------------
def test_without_a_key_file_both_fronts_stay_open(caplog):
    async def scenario(s: Stack):
        await s.add_replica("r1", token_delay_ms=1)
        with caplog.at_level(logging.WARNING, logger="llmgw.gateway"):
            await s.start(None)
        assert not s.gate.enabled
        status, _, _ = await s.complete(None)
        assert status == 200
        tokens, _ = await s.infer_grpc(None)
        assert tokens[-1].is_final
        status, body = await s.admin("GET", "/admin/usage")
        assert status == 200 and body["keys"]["enabled"] is False and body["tenants"] == {}
        status, body = await s.admin("POST", "/admin/keys/reload")
        assert status == 409 and body["error"]["code"] == "no_key_file"
        # Bound to loopback: no warning about being open.
        assert not [r for r in caplog.records if "without API keys" in r.getMessage()]

    run(scenario)


def test_an_open_gateway_on_a_non_loopback_address_warns_at_start(caplog):
    async def scenario(s: Stack):
        await s.add_replica("r1", token_delay_ms=1)
        cfg = GatewayConfig(port=0, gossip_port=None, host="0.0.0.0")
        s.server = build_server(cfg, membership=s.membership)
        with caplog.at_level(logging.WARNING, logger="llmgw.gateway"):
            s.front = await start_gateway(s.server, HttpSettings(port=free_tcp_port(), host="127.0.0.1"))
        warnings = [r.getMessage() for r in caplog.records if "without API keys" in r.getMessage()]
        assert len(warnings) == 1 and "0.0.0.0" in warnings[0]

    run(scenario)


# ---- keys on both fronts --------------------------------------------------------------------------------------
def test_http_front_refuses_missing_malformed_oversized_and_unknown_keys_in_openai_shape(keys_path, caplog):
    async def scenario(s: Stack):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start(keys_path)
        cases = [
            ({}, "missing API key"),
            ({"Authorization": "Basic dXNlcjpwYXNz"}, "malformed"),
            ({"Authorization": "Bearer two words"}, "malformed"),
            ({"Authorization": "Bearer " + "k" * 5000}, "too large"),
            ({"Authorization": "Bearer sk-llmgw-no-such-key-000000"}, "invalid API key"),
        ]
        for headers, message in cases:
            status, resp_headers, text = await s.complete(None, headers=headers)
            assert status == 401, (headers.keys(), text)
            assert resp_headers["WWW-Authenticate"].startswith("Bearer")
            body = __import__("json").loads(text)["error"]
            assert body["type"] == "invalid_request_error" and body["code"] == "unauthenticated"
            assert message in body["message"]
        # Larger than the HTTP server's header limit: its own clear 4xx, and the gateway goes on serving.
        status, _, _ = await s.complete(None, headers={"Authorization": "Bearer " + "k" * 20000})
        assert 400 <= status < 500
        status, _, text = await s.complete(KEYS["batch"])
        assert status == 200, text
        assert s.gate.auth_failures == {"missing": 1, "malformed": 2, "too_large": 1, "unknown": 1}
        # Listing models takes a key too.
        async with s.session.get("/v1/models") as resp:
            assert resp.status == 401
        async with s.session.get("/v1/models", headers={"Authorization": f"Bearer {KEYS['batch']}"}) as resp:
            assert resp.status == 200 and (await resp.json())["object"] == "list"

    with caplog.at_level(logging.DEBUG):
        run(scenario)
    logged = "\n".join(r.getMessage() + " " + str(r.__dict__) for r in caplog.records)
    assert "sk-llmgw-no-such-key" not in logged and KEYS["batch"] not in logged


def test_a_key_limited_to_some_models_gets_403_for_others_on_both_fronts(keys_path):
    async def scenario(s: Stack):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start(keys_path)
        status, _, text = await s.complete(KEYS["llama"], model="qwen-2-7b")
        assert status == 403
        error = __import__("json").loads(text)["error"]
        assert error["type"] == "permission_error" and "llama-team" in error["message"]
        status, _, _ = await s.complete(KEYS["llama"], model="llama-3-8b")
        assert status == 200
        # gRPC names the model in metadata; without it a model-limited key is refused, not let through.
        err = await grpc_error(s.infer_grpc(KEYS["llama"]))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "llmgw-model" in err.details()
        err = await grpc_error(s.infer_grpc(KEYS["llama"], model="qwen-2-7b"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        tokens, _ = await s.infer_grpc(KEYS["llama"], model="llama-3-8b")
        assert tokens[-1].is_final

    run(scenario)


def test_grpc_names_the_model_in_the_request_field_and_the_key_may_use_only_its_own(keys_path):
    async def scenario(s: Stack):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start(keys_path)
        err = await grpc_error(s.infer_grpc(KEYS["llama"], model_field="qwen-2-7b"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "llama-team" in err.details()
        assert "qwen-2-7b" in err.details()
        tokens, _ = await s.infer_grpc(KEYS["llama"], model_field="llama-3-8b")
        assert tokens[-1].is_final
        # The field wins over the metadata (kept for clients of the reference's proto, which has no field 8).
        err = await grpc_error(s.infer_grpc(KEYS["llama"], model_field="qwen-2-7b", model="llama-3-8b"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        tokens, _ = await s.infer_grpc(KEYS["llama"], model_field="llama-3-8b", model="qwen-2-7b")
        assert tokens[-1].is_final
        err = await grpc_error(s.infer_grpc(KEYS["llama"]))
        assert "InferRequest.model" in err.details()
        assert s.gate.forbidden == 3

    run(scenario)


def test_grpc_front_takes_the_key_from_authorization_metadata(keys_path):
    async def scenario(s: Stack):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start(keys_path)
        err = await grpc_error(s.infer_grpc(None))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in err.details()
        err = await grpc_error(s.infer_grpc("sk-llmgw-no-such-key-000000"))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details() == "invalid API key"
        err = await grpc_error(s.infer_grpc("k" * 5000))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "too large" in err.details()
        # Over gRPC's own metadata limit (8 KiB): refused by gRPC itself, with a status, and nothing breaks.
        err = await grpc_error(s.infer_grpc("k" * 20000))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size" in err.details(), err
        tokens, _ = await s.infer_grpc(KEYS["search2"], max_tokens=4)
        assert [t.index for t in tokens] == [0, 1, 2, 3]

    run(scenario)


# ---- limits ---------------------------------------------------------------------------------------------------
def test_requests_over_the_rate_get_429_with_retry_after_and_resource_exhausted_with_the_delay(keys_path):
    async def scenario(s: Stack):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start(keys_path)
        status, _, _ = await s.complete(KEYS["slow"])
        assert status == 200
        status, headers, text = await s.complete(KEYS["slow"])
        assert status == 429, text
        error = __import__("json").loads(text)["error"]
        assert error["type"] == "rate_limit_error" and "requests_per_minute" in error["message"]
        assert 1 <= int(headers["Retry-After"]) <= 6
        err = await grpc_error(s.infer_grpc(KEYS["slow"]))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        delay = float(dict(err.trailing_metadata())["retry-after-s"])
        assert 0 < delay <= 6
        # Another tenant is not affected.
        status, _, _ = await s.complete(KEYS["batch"])
        assert status == 200
        assert s.gate.refusals == {("slow", "requests_per_minute"): 2}

    run(scenario)


def test_a_running_stream_is_never_cut_for_tokens_the_next_request_is_refused(keys_path):
    async def scenario(s: Stack):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start(keys_path)
        status, _, text = await s.complete(KEYS["tokens"], max_tokens=20)  # budget: 5 tokens a minute
        assert status == 200 and __import__("json").loads(text)["usage"]["completion_tokens"] == 20
        status, headers, text = await s.complete(KEYS["tokens"])
        assert status == 429 and "tokens_per_minute" in text and int(headers["Retry-After"]) >= 1
        # Counted: the prompt's words + the tokens streamed.
        usage = s.gate.usage(asyncio.get_running_loop().time())["tenants"]["tokens"]["local"]
        assert usage["tokens"] == 2 + 20 and usage["requests"] == 1

    run(scenario)


def test_concurrent_streams_limit_frees_its_slot_when_a_stream_ends(keys_path):
    async def scenario(s: Stack):
        await s.add_replica("r1", token_delay_ms=20)
        await s.start(keys_path)
        first = asyncio.create_task(s.complete(KEYS["single"], max_tokens=15, stream=True))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while s.gate.usage(loop.time())["tenants"].get("single", {}).get("local", {}).get("in_flight") != 1:
            assert loop.time() < deadline, "the first stream never started"
            await asyncio.sleep(0.01)
        status, headers, text = await s.complete(KEYS["single"])
        assert status == 429 and "max_concurrent" in text and headers["Retry-After"] == "1"
        status, _, text = await first
        assert status == 200 and text.rstrip().endswith("data: [DONE]")
        status, _, _ = await s.complete(KEYS["single"])
        assert status == 200
        assert s.gate.limiter.report(loop.time())["tenants"]["single"]["local"]["in_flight"] == 0

    run(scenario)


# ---- reload ---------------------------------------------------------------------------------------------------
def test_reload_swaps_keys_keeps_running_streams_and_keeps_the_old_keys_on_a_bad_file(keys_path):
    async def scenario(s: Stack):
        await s.add_replica("r1", token_delay_ms=20)
        await s.start(keys_path)
        running = asyncio.create_task(s.complete(KEYS["batch"], max_tokens=25, stream=True))
        await asyncio.sleep(0.1)
        new_key = "sk-llmgw-test-new-batch-key-01"
        keys_path.write_text(entry(new_key, "batch") + entry(KEYS["search"], "search", weight=3))
        status, body = await s.admin("POST", "/admin/keys/reload")
        assert status == 200 and body == {"reloaded": True, "keys": 2, "tenants": 2}
        status, _, text = await running  # the stream that started under the old key finished in full
        assert status == 200 and text.count("data: ") == 26 and text.rstrip().endswith("[DONE]")
        assert (await s.complete(KEYS["batch"]))[0] == 401
        assert (await s.complete(new_key))[0] == 200
        # A bad file: 422 naming the line, and the keys in use stay in use.
        keys_path.write_text(entry(new_key, "batch") + "[[key]]\nsha256 = \"nothex\"\ntenant = \"x\"\n")
        status, body = await s.admin("POST", "/admin/keys/reload")
        assert status == 422 and "keys.toml:6:" in body["error"]["message"]
        assert "still using the 2 keys" in body["error"]["message"]
        assert (await s.complete(new_key))[0] == 200
        # Admin routes need the admin token, not an API key.
        async with s.session.post("/admin/keys/reload", headers={"Authorization": f"Bearer {new_key}"}) as resp:
            assert resp.status == 401

    run(scenario)


# ---- accounting -----------------------------------------------------------------------------------------------
def test_usage_metrics_and_the_request_log_name_the_tenant_never_the_key(keys_path, caplog):
    async def scenario(s: Stack):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start(keys_path)
        for _ in range(3):
            assert (await s.complete(KEYS["search"], max_tokens=4))[0] == 200
        await s.infer_grpc(KEYS["search2"], max_tokens=2)
        assert (await s.complete("sk-llmgw-no-such-key-000000"))[0] == 401
        status, usage = await s.admin("GET", "/admin/usage")
        assert status == 200 and usage["gateway"] == "gateway-1" and usage["keys"]["count"] == 7
        search = usage["tenants"]["search"]
        assert search["local"] == {"requests": 4, "tokens": 3 * (2 + 4) + (2 + 2), "in_flight": 0}
        assert search["cluster"]["requests"] == 4 and search["peers"] == {}
        assert search["limits"] == {"requests_per_minute": None, "tokens_per_minute": None, "max_concurrent": None}
        async with s.session.get("/metrics") as resp:
            metrics = await resp.text()
        assert 'llmgw_gateway_tenant_requests_total{outcome="ok",tenant="search"} 4.0' in metrics
        assert 'llmgw_gateway_tenant_tokens_total{tenant="search"} 14.0' in metrics
        assert 'llmgw_gateway_auth_failures_total{reason="unknown"} 1.0' in metrics
        # Only configured tenants are labels: one series set per key file tenant, nothing for strangers.
        tenants = {line.split('tenant="')[1].split('"')[0] for line in metrics.splitlines()
                   if line.startswith("llmgw_gateway_tenant_requests_total{")}
        assert tenants == set(s.gate.tenants())

    with caplog.at_level(logging.INFO):
        run(scenario)
    lines = [r for r in caplog.records if r.name == "llmgw.gateway.requests"]
    search_lines = [r for r in lines if getattr(r, "tenant", None) == "search"]
    assert len(search_lines) == 4
    assert {r.key_id for r in search_lines} == {hash_key(KEYS["search"])[:12], hash_key(KEYS["search2"])[:12]}
    everything = "\n".join(r.getMessage() + " " + str(r.__dict__) for r in caplog.records)
    for key in KEYS.values():
        assert key not in everything


# ---- hostile input --------------------------------------------------------------------------------------------
def test_ten_thousand_distinct_unknown_keys_leave_memory_flat_and_are_all_refused(keys_path):
    """Through the gate both fronts use: nothing is remembered about an unknown key."""
    gate = TenancyGate.from_key_file("gateway-1", str(keys_path))

    def hammer(start: int, count: int) -> None:
        for i in range(start, start + count):
            with pytest.raises(Exception) as info:
                gate.authenticate([("authorization", f"Bearer sk-unknown-{i:08d}-{'x' * 200}")])
            assert type(info.value).__name__ == "Unauthenticated"

    hammer(0, 1000)  # warm-up: caches, interned strings
    tracemalloc.start()
    try:
        # Each refusal leaves a short-lived cycle (the exception's traceback holds the frame that holds it); it is
        # garbage, not kept state, so it is collected before each reading rather than counted.
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        hammer(1000, 10_000)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # 10,000 keys of ~230 bytes would be >2 MB if any were kept.
    assert after - before < 64 * 1024, after - before
    assert gate.auth_failures["unknown"] == 11_000
    assert gate.limiter.report(0.0)["tenants"] == {}


def test_many_unknown_keys_over_http_are_refused_and_the_gateway_still_serves(keys_path):
    async def scenario(s: Stack):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start(keys_path)
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> int:
            async with sem:
                return (await s.complete(f"sk-unknown-{i:06d}-{'y' * 40}"))[0]

        statuses = await asyncio.gather(*(one(i) for i in range(300)))
        assert set(statuses) == {401}
        assert (await s.complete(KEYS["batch"]))[0] == 200

    run(scenario, timeout=120.0)


# ---- fair sharing ---------------------------------------------------------------------------------------------
def _fairness(loads, weights, duration_s):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.run_tenancy import fairness_run

    # Measured after 1.5 s, once the heavy tenant's backlog has built up (its queue waits are then over a second,
    # so a scheduling hiccup of this shared machine is not mistaken for a light tenant's wait).
    return asyncio.run(asyncio.wait_for(fairness_run(loads, weights, duration_s=duration_s, warmup_s=1.5), 60.0))


def test_fairness_a_light_tenant_is_not_queued_behind_a_heavy_one():
    """The issue's load, shortened: equal weights, A offers 10x B, 2x capacity in total. B asks for less than its
    half, so it gets everything it asks for (max-min fairness: 'B's share' is all of its demand), and its queue
    wait p99 is at most a fifth of A's; A's excess is refused when the queue is full, B's never."""
    out = _fairness({"a": 2.0 * 10 / 11, "b": 2.0 / 11}, {"a": 1, "b": 1}, 4.5)["tenants"]
    a, b = out["a"], out["b"]
    assert b["served"] >= 0.9 * b["offered"] and b["refused"] == 0, out  # (in flight at the end: not counted)
    assert a["served"] < 0.75 * a["offered"], out  # A was really over capacity
    assert b["wait_p99_s"] <= a["wait_p99_s"] / 5, out


def test_fairness_b_at_its_fair_share_gets_45_percent_and_weights_3_to_1_share_three_quarters():
    out = _fairness({"a": 4.8, "b": 0.48}, {"a": 1, "b": 1}, 4.5)["tenants"]
    assert out["b"]["share"] >= 0.45, out
    assert out["b"]["wait_p99_s"] <= out["a"]["wait_p99_s"] / 5, out
    out = _fairness({"a": 2.0, "b": 2.0}, {"a": 3, "b": 1}, 3.0)["tenants"]
    assert 0.70 <= out["a"]["share"] <= 0.80, out


# ---- usage gossip (its shell, over a fake gossip node) --------------------------------------------------------
class _FakeNode:
    """GossipNode's surface UsageGossip uses: members, send_user, subscribe_user, subscribe."""

    def __init__(self, member_id: str, members) -> None:
        self.member_id = member_id
        self._members = members
        self.sent: list[tuple[str, bytes]] = []
        self.user_callbacks: list = []
        self.member_callbacks: list = []

    def members(self):
        return self._members

    def max_user_payload(self, member_id: str) -> int:
        return 1300

    def send_user(self, member_id: str, payload: bytes) -> bool:
        self.sent.append((member_id, payload))
        return True

    def subscribe_user(self, callback):
        self.user_callbacks.append(callback)
        return lambda: self.user_callbacks.remove(callback)

    def subscribe(self, callback):
        self.member_callbacks.append(callback)
        return lambda: self.member_callbacks.remove(callback)


def test_usage_gossip_sends_to_live_gateways_takes_digests_drops_bad_ones_and_forgets_leavers(keys_path):
    from types import SimpleNamespace

    from llmgw.gateway.tenancy_gossip import USAGE_TAG, UsageGossip

    def member(member_id: str, role: str = "gateway", state: str = "alive"):
        return SimpleNamespace(member_id=member_id, role=role, state=state)

    async def scenario() -> None:
        members = [member("gw-1"), member("gw-2"), member("gw-3", state="suspect"), member("gw-4", state="dead"),
                   member("replica-1", role="replica")]
        mine, theirs = (TenancyGate.from_key_file(name, str(keys_path)) for name in ("gw-1", "gw-2"))
        node = _FakeNode("gw-1", members)
        gossip = UsageGossip(mine, node, interval_s=0.05)
        await gossip.start()
        try:
            await asyncio.sleep(0.12)  # a few rounds, even with nothing to report (heartbeats)
            assert {m for m, _ in node.sent} == {"gw-2", "gw-3"} and all(p.startswith(USAGE_TAG) for _, p in node.sent)
            loop = asyncio.get_running_loop()
            theirs.admit("search", loop.time())
            (deliver,) = node.user_callbacks
            deliver("gw-2", USAGE_TAG + theirs.limiter.build_digest(loop.time()))
            deliver("gw-2", USAGE_TAG + b"\xff\xff not a digest")
            deliver("gw-2", b"another application's message")
            assert gossip.stats()["received"] == 1 and gossip.stats()["bad"] == 1
            report = mine.usage(loop.time())
            assert report["tenants"]["search"]["peers"]["gw-2"]["requests"] == 1
            assert report["tenants"]["search"]["cluster"]["requests"] == 1
            (on_member,) = node.member_callbacks
            on_member(SimpleNamespace(kind="left", member=member("gw-2", state="left")))
            assert "gw-2" not in mine.usage(loop.time())["peers"]
        finally:
            await gossip.stop()
        assert node.user_callbacks == [] and node.member_callbacks == []

    asyncio.run(asyncio.wait_for(scenario(), 10.0))
