"""Health, readiness, admin auth, member table, drain/undrain and rolling updates over the HTTP front."""

import asyncio
import shlex
import sys

import pytest
from aiohttp.test_utils import make_mocked_request
from test_http_server import FakeMember, run_stack, wait_for

from inprocess import ComposedStack, run_with
from llmgw._proto import llmgateway_pb2 as pb
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc
from llmgw.gateway import GatewayConfig
from llmgw.http import start_http
from llmgw.http.admin import AdminApi, is_loopback_host
from llmgw.http.openai_api import ApiError
from llmgw.policy.breaker import BreakerBoard

TOKEN = "s3cret-token"


def bearer(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


async def complete(s, prompt, n=2, **kw):
    async with s.session.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": n},
                              **kw) as resp:
        return resp.status, resp.headers.get("X-LLMGW-Replica"), await resp.json()


def test_loopback_detection():
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "::", "10.1.2.3", "example.com", ""))


def test_admin_without_token_is_refused_unless_bound_to_loopback():
    from llmgw.gateway.operations import RolloutController, RoutingDrains

    class Gw:
        pass

    def admin_api(bound_host, admin_token):
        gw = Gw()
        return AdminApi(gw, bound_host=bound_host, admin_token=admin_token, metrics=None,
                        rollouts=RolloutController(gw, RoutingDrains()))

    request = make_mocked_request("GET", "/admin/members")
    admin_api("127.0.0.1", None)._authorize(request)
    with pytest.raises(ApiError) as err:
        admin_api("0.0.0.0", None)._authorize(request)
    assert err.value.status == 403 and err.value.code == "admin_disabled"
    remote = admin_api("0.0.0.0", TOKEN)
    remote._authorize(make_mocked_request("GET", "/admin/members", headers=bearer()))
    for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {TOKEN}"}):
        with pytest.raises(ApiError) as err:
            remote._authorize(make_mocked_request("GET", "/admin/members", headers=headers))
        assert err.value.status == 401 and "Bearer" in err.value.headers["WWW-Authenticate"]


def test_health_and_readiness_follow_routable_replicas():
    async def scenario(s):
        r1 = await s.add_replica("r1", token_delay_ms=1)
        await s.start()
        async with s.session.get("/healthz") as resp:
            assert resp.status == 200
        async with s.session.get("/readyz") as resp:
            assert resp.status == 200 and (await resp.json()) == {"ready": True, "routable_replicas": ["r1"]}
        s.membership.set(FakeMember("r1", r1.grpc_address, state="dead"), "dead")
        await wait_for(lambda: not s.gateway.view.routable(), what="r1 to leave routing")
        async with s.session.get("/readyz") as resp:
            assert resp.status == 503 and (await resp.json())["ready"] is False
        async with s.session.get("/healthz") as resp:  # alive, just not ready
            assert resp.status == 200

    run_stack(scenario)


def test_admin_token_is_enforced_over_http_and_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLMGW_ADMIN_TOKEN", TOKEN)

    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start()
        async with s.session.get("/admin/members") as resp:
            assert resp.status == 401 and (await resp.json())["error"]["type"] == "authentication_error"
        async with s.session.post("/admin/replicas/r1/drain", headers=bearer("nope")) as resp:
            assert resp.status == 401
        assert s.front.drains.drained == set()
        async with s.session.get("/admin/members", headers=bearer()) as resp:
            assert resp.status == 200
        async with s.session.get("/healthz") as resp:  # probes never need the token
            assert resp.status == 200

    run_stack(scenario)


def test_members_table_shows_state_load_version_drain_and_breaker():
    async def scenario(s):
        r1 = await s.add_replica("r1", token_delay_ms=1, capacity=3, version="v7", incarnation=4)
        await s.add_replica("r2", token_delay_ms=1)
        s.membership.set(FakeMember("gateway-2", "127.0.0.1:1", role="gateway"))
        s.membership.set(FakeMember("r1", r1.grpc_address, max_capacity=3, model_version="v7", incarnation=4,
                                    active_requests=2))
        breakers = BreakerBoard()
        breakers.set_replicas(["r1", "r2"])
        for _ in range(5):
            breakers.record_failure("r2")
        await s.start(admin_token=TOKEN, breakers=breakers)
        async with s.session.post("/admin/replicas/r1/drain", headers=bearer()) as resp:
            assert resp.status == 200 and (await resp.json())["drained_in_routing"] is True
        async with s.session.get("/admin/members", headers=bearer()) as resp:
            body = await resp.json()
        assert body["gateway_id"] == "gateway-1" and body["queued"] == 0 and body["in_flight"] == 0
        rows = {m["member_id"]: m for m in body["members"]}
        assert [m["member_id"] for m in body["members"]] == ["r1", "r2", "gateway-2"]
        r1_row = rows["r1"]
        assert (r1_row["state"], r1_row["incarnation"], r1_row["load"], r1_row["capacity"],
                r1_row["model_version"], r1_row["drained_in_routing"], r1_row["routable"]) == (
            "alive", 4, 2, 3, "v7", True, False)
        assert r1_row["breaker"]["state"] == "closed"
        assert rows["r2"]["breaker"]["state"] == "open" and rows["r2"]["breaker"]["failures"] == 5
        assert "breaker" not in rows["gateway-2"] and rows["gateway-2"]["role"] == "gateway"

    run_stack(scenario)


def test_drain_and_undrain_steer_traffic_and_readiness():
    async def scenario(s):
        r1 = await s.add_replica("r1", token_delay_ms=1, capacity=1)
        await s.add_replica("r2", token_delay_ms=1)
        await s.start()
        async with s.session.post("/admin/replicas/nobody/drain") as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_replica"
        async with s.session.post("/admin/replicas/r2/drain") as resp:
            assert resp.status == 200
        results = await asyncio.gather(*(complete(s, f"p{i}") for i in range(6)))
        assert {(status, replica) for status, replica, _ in results} == {(200, "r1")}
        async with s.session.post("/admin/replicas/r1/drain") as resp:
            assert resp.status == 200
        async with s.session.get("/readyz") as resp:
            assert resp.status == 503
        status, _, body = await complete(s, "nowhere")
        assert status == 503 and body["error"]["code"] == "unavailable"
        # r1 back but full (a hog holds its only slot): a new request queues; undraining r2 admits it there.
        async with s.session.post("/admin/replicas/r1/undrain") as resp:
            assert resp.status == 200 and (await resp.json())["drained_in_routing"] is False
        hog = await s.session.post("/v1/completions", json={"model": "m", "prompt": "hog", "max_tokens": 4000,
                                                            "stream": True})
        await wait_for(lambda: r1.active == 1, what="the hog")
        waiter = asyncio.create_task(complete(s, "waiting"))
        await wait_for(lambda: s.gateway.queued == 1, what="the waiter to queue")
        async with s.session.post("/admin/replicas/r2/undrain") as resp:
            assert resp.status == 200
        status, replica, _ = await asyncio.wait_for(waiter, 5.0)
        assert (status, replica) == (200, "r2") and r1.active == 1
        hog.close()

    run_stack(scenario)


def test_rolling_update_restarts_each_replica_on_the_new_version_while_serving():
    async def scenario(s):
        for rid in ("r1", "r2"):
            await s.add_replica(rid, token_delay_ms=1)
        restarted = []
        served = []  # HTTP statuses of the requests sent while the rollout runs

        async def restart(replica_id, version):
            # What a process supervisor does: stop the old process, start the new version, it rejoins gossip
            # with a higher incarnation. The restart lasts until 3 more requests were served meanwhile.
            old = s.replicas[replica_id]
            await old.stop(0.1)
            before = len(served)
            await wait_for(lambda: len(served) >= before + 3, 10.0, "traffic during the restart")
            incarnation = s.membership.get(replica_id).incarnation + 1
            await s.add_replica(replica_id, token_delay_ms=1, version=version, incarnation=incarnation)
            restarted.append((replica_id, version))

        await s.start(restart=restart)
        async with s.session.get("/admin/rollout") as resp:
            assert resp.status == 404
        for bad in ({}, {"version": ""}, {"version": "v2", "poll_s": -1}, {"version": "v2", "replicas": ["zz"]},
                    {"version": "v2", "skip_up_to_date": "yes"}):
            async with s.session.post("/admin/rollout", json=bad) as resp:
                assert resp.status == 400, bad
        async with s.session.post("/admin/rollout", json={"version": "v2", "poll_s": 0.02,
                                                          "drain_timeout_s": 5}) as resp:
            assert resp.status == 202 and (await resp.json())["new_version"] == "v2"
        async with s.session.post("/admin/rollout", json={"version": "v3"}) as resp:
            assert resp.status == 409  # the first restart waits for traffic, so the rollout is still running
            assert (await resp.json())["error"]["code"] == "rollout_running"
        for _ in range(200):
            async with s.session.get("/admin/rollout") as resp:
                status = await resp.json()
            if status["state"] in ("succeeded", "failed", "aborted"):
                break
            code, _, _ = await complete(s, f"during {len(served)}", 1)
            served.append(code)
            await asyncio.sleep(0.02)
        assert status["state"] == "succeeded", status
        assert [r["step"] for r in status["replicas"]] == ["done", "done"]
        assert restarted == [("r1", "v2"), ("r2", "v2")]
        assert len(served) >= 6 and set(served) == {200}
        assert s.front.drains.drained == set()
        async with s.session.get("/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["v2"]

    run_stack(scenario)


def test_rollout_needs_a_restart_hook_and_can_be_aborted():
    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.add_replica("r2", token_delay_ms=1)
        await s.start()
        async with s.session.post("/admin/rollout", json={"version": "v2"}) as resp:
            assert resp.status == 501 and (await resp.json())["error"]["code"] == "no_restart_hook"
        await s.front.close()

        never = asyncio.Event()

        async def restart_that_hangs(replica_id, version):
            await never.wait()

        s.front = front = await start_http(s.gateway, host="127.0.0.1", port=0, restart=restart_that_hangs)
        url = front.url
        async with s.session.post(url + "/admin/rollout", json={"version": "v2", "poll_s": 0.02}) as resp:
            assert resp.status == 202
        await wait_for(lambda: front.admin.rollout.status.current_replica == "r1"
                       and front.admin.rollout.status.replicas[0].step == "restart", what="the restart step")
        assert front.drains.drained == {"r1"}
        async with s.session.delete(url + "/admin/rollout") as resp:
            body = await resp.json()
        assert body["state"] == "aborted" and body["restored"] is True
        assert front.drains.drained == set()

    run_stack(scenario)


# ---- one rollout and one drain set per gateway, whichever front is used -------------------------------------
class BothFronts(ComposedStack):
    """Replicas + the gateway exactly as `python -m llmgw gateway` wires it (gateway.app.build_server and
    start_gateway: gRPC server, Gateway with its metrics listener, HTTP front), over a test-driven membership."""

    async def start(self, **config):
        self.build(GatewayConfig(port=0, gossip_port=None, **config))
        await self.start_fronts(host="", session_timeout_s=20)
        return pb_grpc.GatewayAdminStub(self.channel)

    async def grpc_draining(self, stub) -> dict[str, bool]:
        members = (await stub.Members(pb.MembersRequest(), timeout=5)).members
        return {m.member_id: m.draining for m in members}


def test_grpc_and_http_admin_share_one_rollout_and_one_drain_set():
    async def scenario(s: BothFronts):
        import grpc

        await s.add_replica("r1", token_delay_ms=1)
        await s.add_replica("r2", token_delay_ms=1)
        # The restart "hangs" (a sleep the abort kills), so the update sits in r1's restart step.
        hang = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(30)' {{replica_id}} {{version}}"
        stub = await s.start(restart_command=hang)

        # Started over gRPC ...
        events = []

        async def watch():
            async for event in stub.StartRollout(pb.RolloutRequest(version="v2"), timeout=30):
                events.append(event)

        watcher = asyncio.ensure_future(watch())
        try:
            await wait_for(lambda: s.server.rollouts.rollout is not None
                           and s.server.rollouts.rollout.status.replicas[0].step == "restart", 10,
                           "the gRPC-started update to reach r1's restart")
            # ... it is the one HTTP shows, and HTTP refuses to start another.
            async with s.session.get("/admin/rollout") as resp:
                body = await resp.json()
            assert resp.status == 200 and body["new_version"] == "v2" and body["state"] == "running"
            assert body["current_replica"] == "r1"
            async with s.session.post("/admin/rollout", json={"version": "v3"}) as resp:
                assert resp.status == 409 and (await resp.json())["error"]["code"] == "rollout_running"
            # The rollout's drain of r1 is in the one drain set: HTTP and gRPC both show it.
            async with s.session.get("/admin/members") as resp:
                rows = {m["member_id"]: m for m in (await resp.json())["members"]}
            assert rows["r1"]["drained_in_routing"] and not rows["r2"]["drained_in_routing"]
            assert await s.grpc_draining(stub) == {"r1": True, "r2": False}
            # Aborted over HTTP: the gRPC stream ends with the abort, and gRPC's GetRollout agrees.
            async with s.session.delete("/admin/rollout") as resp:
                assert resp.status == 200 and (await resp.json())["state"] == "aborted"
            await asyncio.wait_for(watcher, 10)
        finally:
            watcher.cancel()
        assert events[-1].kind == "finished" and events[-1].state == "aborted"
        state = await stub.GetRollout(pb.GetRolloutRequest(), timeout=5)
        assert state.state == "aborted" and state.version == "v2" and state.restored
        assert await s.grpc_draining(stub) == {"r1": False, "r2": False}

        # Started over HTTP: gRPC refuses a second one and can abort it.
        async with s.session.post("/admin/rollout", json={"version": "v4"}) as resp:
            assert resp.status == 202
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.StartRollout(pb.RolloutRequest(version="v5"), timeout=5):
                pass
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "v4" in err.value.details()
        state = await stub.AbortRollout(pb.GetRolloutRequest(), timeout=20)
        assert state.state == "aborted" and state.version == "v4"
        async with s.session.get("/admin/rollout") as resp:
            assert (await resp.json())["state"] == "aborted"

        # An operator's drain over HTTP is what GatewayAdmin.Members reports, and routing honours it. (r1 itself
        # still drains after the aborted updates' Drain RPCs: only r2 serves, and the gossip-fed table the test
        # drives does not say so, so a "draining" below comes from the gateway's drain set alone.)
        async with s.session.post("/admin/replicas/r2/drain") as resp:
            assert resp.status == 200
        assert await s.grpc_draining(stub) == {"r1": False, "r2": True}
        status, _, body = await complete(s, "nobody left")
        assert status == 503, body
        async with s.session.post("/admin/replicas/r2/undrain") as resp:
            assert resp.status == 200
        assert await s.grpc_draining(stub) == {"r1": False, "r2": False}
        status, replica, _ = await complete(s, "r2 is back")
        assert status == 200 and replica == "r2"

    run_with(BothFronts, scenario, timeout=60)
