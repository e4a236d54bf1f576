"""llmgw.workers with real processes: one aggregated /metrics and admin actions that reach every worker.

Two worker processes (multiprocessing, spawn) share an HTTP port as ``gateway --workers 2`` does, each with a
GatewayMetrics in prometheus-client's multiprocess mode, a WorkerBus, a SharedDrains and a WorkerRollouts; each
also serves a private port so the test can ask a given worker. The bus, drain-state and rollout-lease units are
then tested in-process.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
import urllib.error
import urllib.request
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmgw import workers
from llmgw.workers import (
    FanOut,
    RolloutElsewhere,
    SharedDrains,
    WorkerBus,
    WorkerCallError,
    WorkerGroup,
    WorkerInfo,
    WorkerRollouts,
)

STARTUP_S = 60.0


class LocalDrains:
    """The drain-set surface of llmgw.gateway.capacity.RoutingDrains."""

    def __init__(self) -> None:
        self.drained: set[str] = set()
        self.undrained_calls = 0

    def excluded(self) -> set[str]:
        return self.drained

    def drain(self, replica_id: str) -> None:
        self.drained.add(replica_id)

    def undrain(self, replica_id: str) -> None:
        self.drained.discard(replica_id)
        self.undrained_calls += 1


class FakeRollout:
    def __init__(self, version: str) -> None:
        self.status = SimpleNamespace(to_dict=lambda: {"new_version": version, "state": self.state})
        self.state = "running"
        self.stop = asyncio.Event()


class FakeController:
    """RolloutController's surface: the update drains replica r9 (through the drain set it was given) until
    aborted, like a real one would drain each replica in turn."""

    def __init__(self, drains: Any) -> None:
        self.drains = drains
        self.rollout: FakeRollout | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, version: str, **options: Any) -> FakeRollout:
        if self.running:
            raise RuntimeError("already running here")
        rollout = self.rollout = FakeRollout(version)
        self._task = asyncio.get_running_loop().create_task(self._run(rollout))
        return rollout

    async def _run(self, rollout: FakeRollout) -> None:
        self.drains.drain("r9")
        try:
            await asyncio.wait_for(rollout.stop.wait(), 60)
            rollout.state = "aborted"
        finally:
            self.drains.undrain("r9")

    async def abort(self, timeout_s: float = 15.0) -> None:
        if self.running:
            assert self.rollout is not None and self._task is not None
            self.rollout.stop.set()
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)


# --------------------------------------------------------------------------------------------------------------
# The worker process


def _worker_main(ready: Any, shared_port: int) -> None:
    asyncio.run(_serve_worker(ready, shared_port))


async def _serve_worker(ready: Any, shared_port: int) -> None:
    from aiohttp import web

    from llmgw.metrics import GatewayMetrics

    info = WorkerInfo.from_env()
    assert info is not None
    i = info.index
    metrics = GatewayMetrics(gateway_id=f"gw-w{i}", models=["m1"])
    assert metrics.multiprocess
    for _ in range(3 + 2 * i):  # worker 0 serves 3 requests, worker 1 serves 5
        metrics.request_done(front="http", model="m1", outcome="ok", finish_reason="stop", prompt_tokens=10,
                             completion_tokens=5, e2e_s=0.5, ttft_s=0.01)
    metrics.request_done(front="grpc", model=None, outcome="unavailable", e2e_s=1.0)
    queued = 2 + i
    metrics.gauge_from(metrics.queue_depth, lambda: queued)
    metrics.on_scrape(lambda: metrics.inflight_gauge("r1").set(1 + i))  # read at scrape time, as the gateway does
    metrics.set_breaker_state("r1", "open" if i == 1 else "closed")
    gossip = {"messages_in": 10 * (i + 1), "messages_out": 1, "incarnation": 3 + i}
    metrics.watch_gossip(lambda: gossip, lambda: [SimpleNamespace(state="alive")] * (2 + i))

    bus = WorkerBus(info, timeout_s=5.0)
    local = LocalDrains()
    drains = SharedDrains(local, bus, resync_s=0.5)
    rollouts = WorkerRollouts(FakeController(drains), bus, poll_s=0.05)
    rollouts.register()
    await drains.start()
    await bus.start()
    publisher = workers.MetricsPublisher(metrics, interval_s=0.1)
    publisher.start()
    stop = asyncio.Event()

    async def scrape(request: web.Request) -> web.Response:
        body, content_type = metrics.render(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def state(request: web.Request) -> web.Response:
        return web.json_response({"worker": i, "pid": os.getpid(), "drained": sorted(local.drained)})

    async def drain(request: web.Request) -> web.Response:
        rid = request.match_info["rid"]
        action = request.match_info["action"]
        if action == "drain":
            return web.json_response((await drains.drain_everywhere(rid)).to_dict())
        if action == "undrain":
            return web.json_response((await drains.undrain_everywhere(rid)).to_dict())
        drains.drain(rid)  # "poke": the plain drain-set call a rollout makes
        return web.json_response({"worker": i})

    async def start_rollout(request: web.Request) -> web.Response:
        try:
            rollouts.start("v2")
        except RolloutElsewhere as exc:
            return web.json_response({"error": exc.message}, status=409)
        return web.json_response({"worker": i}, status=202)

    async def rollout_status(request: web.Request) -> web.Response:
        status = await rollouts.status()
        return web.json_response(status, status=200 if status is not None else 404)

    async def abort_rollout(request: web.Request) -> web.Response:
        status = await rollouts.abort()
        return web.json_response(status, status=200 if status is not None else 404)

    async def stop_worker(request: web.Request) -> web.Response:
        stop.set()
        return web.json_response({"stopping": i})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/state", state)
    app.router.add_post("/{action}/{rid}", drain)
    app.router.add_post("/rollout", start_rollout)
    app.router.add_get("/rollout", rollout_status)
    app.router.add_delete("/rollout", abort_rollout)
    app.router.add_post("/stop", stop_worker)
    runner = web.AppRunner(app)
    await runner.setup()
    private = web.TCPSite(runner, "127.0.0.1", 0)
    shared = web.TCPSite(runner, "127.0.0.1", shared_port, reuse_port=True)
    await private.start()
    await shared.start()
    ports = [s.getsockname()[1] for s in runner.server_sockets()] if hasattr(runner, "server_sockets") else \
        [a[1] for a in runner.addresses]
    ready.put((i, os.getpid(), ports[0], ports[1]))
    try:
        await asyncio.wait_for(stop.wait(), 120)
    finally:
        await asyncio.sleep(0.05)  # let the /stop answer go out
        await publisher.close()
        await rollouts.close()
        await drains.close()
        await bus.close()
        await runner.cleanup()


# --------------------------------------------------------------------------------------------------------------
# The parent: scrape and administer through either worker


def http(method: str, port: int, path: str) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=20) as resp:
            body = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as err:
        body, status = err.read().decode(), err.code
    if path == "/metrics":
        return status, body
    return status, json.loads(body)


def samples(port: int) -> dict[tuple[str, tuple], float]:
    status, text = http("GET", port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def value(s: dict, name: str, **labels: str) -> float:
    return s[(name, tuple(sorted(labels.items())))]


def wait_for(check, what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Workers:
    def __init__(self, group: WorkerGroup, monkeypatch: pytest.MonkeyPatch) -> None:
        self.group = group
        self.monkeypatch = monkeypatch
        self.ctx = multiprocessing.get_context("spawn")
        self.ready = self.ctx.Queue()
        self.procs: dict[int, Any] = {}
        self.ports: dict[int, int] = {}
        self.shared_port = 0

    def start(self, index: int) -> int:
        with self.monkeypatch.context() as env:
            # The worker's environment at spawn: prometheus-client is imported in it after these are set.
            for key, val in self.group.env(index).items():
                env.setenv(key, val)
            proc = self.ctx.Process(target=_worker_main, args=(self.ready, self.shared_port), daemon=True)
            proc.start()
        got, pid, private, shared = self.ready.get(timeout=STARTUP_S)
        assert (got, pid) == (index, proc.pid)
        self.procs[index], self.ports[index], self.shared_port = proc, private, shared
        return private

    def stop_all(self) -> None:
        for index, proc in self.procs.items():
            if proc.is_alive():
                try:
                    http("POST", self.ports[index], "/stop")
                except OSError:
                    pass
        for proc in self.procs.values():
            proc.join(15)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


@pytest.fixture
def group(tmp_path, monkeypatch):
    with WorkerGroup(2, base_dir=str(tmp_path)) as g:
        running = Workers(g, monkeypatch)
        try:
            yield running
        finally:
            running.stop_all()
    assert not os.path.exists(g.directory)


@pytest.mark.slow
def test_two_workers_serve_one_aggregate_and_share_admin_actions(group):
    w0, w1 = group.start(0), group.start(1)

    # ---- metrics: either worker (and the shared port) answers for both -----------------------------------
    wait_for(lambda: value(samples(w0), "llmgw_gateway_inflight", replica="r1") == 3, "both workers' gauges")
    s0, s1 = samples(w0), samples(w1)
    assert s0 == s1
    m1 = dict(front="http", model="m1")
    assert value(s0, "llmgw_gateway_request_success_total", finished_reason="stop", **m1) == 8
    assert value(s0, "llmgw_gateway_prompt_tokens_total", **m1) == 80
    assert value(s0, "llmgw_gateway_generation_tokens_total", **m1) == 40
    assert value(s0, "llmgw_gateway_e2e_request_latency_seconds_count", **m1) == 8
    assert value(s0, "llmgw_gateway_request_failure_total", front="grpc", model="unspecified",
                 outcome="unavailable") == 2
    assert value(s0, "llmgw_gateway_requests_total", outcome="ok") == 8
    assert value(s0, "llmgw_gateway_tokens_streamed_total") == 40
    assert value(s0, "llmgw_gateway_queue_depth") == 5  # livesum: 2 + 3
    assert value(s0, "llmgw_gateway_breaker_state", replica="r1") == 2  # livemax: open in one worker
    assert value(s0, "llmgw_gossip_messages_total", direction="in") == 30  # 10 + 20, mirrored counters
    assert value(s0, "llmgw_gossip_incarnation") == 4 and value(s0, "llmgw_gossip_members", state="alive") == 3
    version = __import__("llmgw").__version__
    for wid in ("gw-w0", "gw-w1"):
        assert value(s0, "llmgw_build_info", component="gateway", id=wid, version=version) == 1
    for _ in range(6):  # whichever worker the kernel picks on the shared port
        assert value(samples(group.shared_port), "llmgw_gateway_requests_total", outcome="ok") == 8

    # ---- drains: received by one worker, applied by both -------------------------------------------------
    status, fan_out = http("POST", w0, "/drain/r1")
    assert status == 200 and fan_out["complete"] and fan_out["workers"] == {"0": "applied", "1": "applied"}
    assert http("GET", w1, "/state")[1]["drained"] == ["r1"]
    status, fan_out = http("POST", w1, "/undrain/r1")
    assert fan_out["complete"] and fan_out["version"] == 2
    assert http("GET", w0, "/state")[1]["drained"] == []
    http("POST", w1, "/poke/r2")  # the plain drain() call: siblings follow within a poke
    wait_for(lambda: http("GET", w0, "/state")[1]["drained"] == ["r2"], "the poked drain on worker 0", 5)

    # ---- rolling update: runs in one worker, seen and aborted from the other ----------------------------
    assert http("POST", w1, "/rollout")[0] == 202
    status, refusal = http("POST", w0, "/rollout")
    assert status == 409 and "another worker" in refusal["error"]
    status, seen = http("GET", w0, "/rollout")
    assert status == 200 and seen["running"] and seen["worker"] == 1 and seen["new_version"] == "v2"
    wait_for(lambda: "r9" in http("GET", w0, "/state")[1]["drained"], "the update's drain on worker 0", 5)
    status, aborted = http("DELETE", w0, "/rollout")
    assert status == 200 and aborted["worker"] == 1 and aborted["state"] == "aborted" and not aborted["running"]
    wait_for(lambda: http("GET", w0, "/state")[1]["drained"] == ["r2"], "the update's undrain on worker 0", 5)
    assert http("GET", w0, "/rollout")[1]["worker"] == 1  # the last one, from the worker that ran it
    wait_for(lambda: http("POST", w0, "/rollout")[0] == 202, "the lease to be released", 5)
    assert http("DELETE", w1, "/rollout")[1]["worker"] == 0

    # ---- a worker dies: its live gauges leave the aggregate, its counts stay ------------------------------
    dead = group.procs[1]
    dead.kill()
    dead.join(10)
    assert value(samples(w0), "llmgw_gateway_inflight", replica="r1") == 3  # its files are still there
    group.group.worker_exited(dead.pid)
    s = samples(w0)
    assert value(s, "llmgw_gateway_inflight", replica="r1") == 1
    assert value(s, "llmgw_gateway_queue_depth") == 2
    assert value(s, "llmgw_gateway_breaker_state", replica="r1") == 0
    assert value(s, "llmgw_gateway_requests_total", outcome="ok") == 8

    # ---- its replacement picks up the group's drains and adds to the totals -------------------------------
    w1 = group.start(1)
    assert http("GET", w1, "/state")[1]["drained"] == ["r2"]
    wait_for(lambda: value(samples(w0), "llmgw_gateway_inflight", replica="r1") == 3, "the new worker's gauges")
    assert value(samples(w1), "llmgw_gateway_requests_total", outcome="ok") == 13


# --------------------------------------------------------------------------------------------------------------
# Units, in one process


def two_infos(tmp_path) -> tuple[WorkerInfo, WorkerInfo]:
    return WorkerInfo(0, 2, str(tmp_path)), WorkerInfo(1, 2, str(tmp_path))


def run(coro) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_bus_calls_siblings_and_reports_every_failure_clearly(tmp_path):
    a_info, b_info = two_infos(tmp_path)

    async def main() -> None:
        a, b = WorkerBus(a_info, timeout_s=2.0), WorkerBus(b_info, timeout_s=2.0)

        async def echo(payload: dict) -> dict:
            return {"echo": payload, "by": 1}

        async def broken(payload: dict) -> dict:
            raise RuntimeError("no such replica")

        async def slow(payload: dict) -> dict:
            await asyncio.sleep(5)
            return {}

        b.handle("echo", echo)
        b.handle("broken", broken)
        b.handle("slow", slow, timeout_s=0.2)
        with pytest.raises(WorkerCallError, match="worker 1: unreachable"):
            await a.call(1, "echo")  # not started yet
        await b.start()
        try:
            assert oct(os.stat(b_info.socket_path(1)).st_mode & 0o777) == "0o600"
            assert await a.call(1, "echo", {"x": 1}) == {"echo": {"x": 1}, "by": 1}
            assert await a.broadcast("echo", {"y": 2}) == {1: {"echo": {"y": 2}, "by": 1}}
            with pytest.raises(WorkerCallError, match="unknown command 'nope'"):
                await a.call(1, "nope")
            with pytest.raises(WorkerCallError, match="RuntimeError: no such replica"):
                await a.call(1, "broken")
            with pytest.raises(WorkerCallError, match="TimeoutError"):
                await a.call(1, "slow")
            with pytest.raises(WorkerCallError, match=r"no answer to slow within 0\.1 s"):
                b.handle("slow", slow)
                await a.call(1, "slow", timeout_s=0.1)
            for garbage in (b"not json\n", b'{"payload": {}}\n', b'{"command": 5}\n', b"x" * (2 << 20) + b"\n"):
                reader, writer = await asyncio.open_unix_connection(b_info.socket_path(1), limit=4 << 20)
                writer.write(garbage)
                reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
                writer.close()
                assert reply["ok"] is False and reply["error"].startswith("bad request"), garbage[:20]
            assert await a.call(1, "echo") == {"echo": {}, "by": 1}  # still serving
        finally:
            await b.close()

    run(main())
    assert not os.path.exists(b_info.socket_path(1))


def test_drains_fan_out_reports_a_worker_that_did_not_apply(tmp_path):
    a_info, b_info = two_infos(tmp_path)

    async def main() -> None:
        a_local, b_local = LocalDrains(), LocalDrains()
        a = SharedDrains(a_local, WorkerBus(a_info, timeout_s=1.0))
        await a.start()
        fan_out = await a.drain_everywhere("r1")  # worker 1 is not running
        assert not fan_out.complete and fan_out.workers[0] == "applied"
        assert fan_out.workers[1].startswith("unreachable")
        assert a_local.drained == {"r1"} and a.drained == {"r1"} and a.excluded() == {"r1"}
        b_bus = WorkerBus(b_info, timeout_s=1.0)
        b = SharedDrains(b_local, b_bus, resync_s=0.05)
        await b.start()
        await b_bus.start()
        try:
            assert b_local.drained == {"r1"}  # loaded at start
            a.undrain("r1")  # no waiting: a poke, and the resync as a backstop
            await asyncio.wait_for(_until(lambda: not b_local.drained), 5)
            fan_out = await a.undrain_everywhere("r1")  # undraining what is not drained is harmless
            assert fan_out.complete and fan_out.to_dict()["workers"] == {"0": "applied", "1": "applied"}
            assert a.version == b.version == 3
        finally:
            await a.close()
            await b.close()
            await b_bus.close()
        with pytest.raises(ValueError, match="non-empty string"):
            a.drain("")

    run(main())


async def _until(check) -> None:
    while not check():
        await asyncio.sleep(0.02)


def test_a_corrupt_drain_state_is_a_clear_error(tmp_path):
    info = WorkerInfo(0, 1, str(tmp_path))
    drains = SharedDrains(LocalDrains(), WorkerBus(info))
    (tmp_path / "drains.json").write_text('{"version": "x", "drained": 3}')
    with pytest.raises(ValueError, match="not a drain state"):
        drains.drain("r1")
    (tmp_path / "drains.json").write_text("{broken")
    with pytest.raises(ValueError):
        drains.sync()


def test_one_rollout_lease_per_group(tmp_path):
    a_info, b_info = two_infos(tmp_path)

    async def main() -> None:
        a_bus, b_bus = WorkerBus(a_info), WorkerBus(b_info)
        a = WorkerRollouts(FakeController(LocalDrains()), a_bus, poll_s=0.02)
        b = WorkerRollouts(FakeController(LocalDrains()), b_bus, poll_s=0.02)
        a.register()
        b.register()
        await a_bus.start()
        await b_bus.start()
        try:
            assert await a.status() is None and await a.abort() is None
            a.start("v2")
            with pytest.raises(RolloutElsewhere):
                b.start("v3")
            assert b.controller.rollout is None  # refused before its controller was asked
            assert (await b.status())["worker"] == 0
            assert (await b.abort())["state"] == "aborted"
            await asyncio.wait_for(_until(lambda: a._lease is None), 5)
            b.start("v3")  # the lease is free again
            assert (await a.status())["new_version"] == "v3"
        finally:
            await a.close()
            await b.close()
            await a_bus.close()
            await b_bus.close()

    run(main())


def test_worker_info_and_group_environment(tmp_path):
    assert WorkerInfo.from_env({}) is None
    with WorkerGroup(3, base_dir=str(tmp_path)) as g:
        env = g.env(2)
        assert env["PROMETHEUS_MULTIPROC_DIR"] == g.metrics_dir and os.listdir(g.metrics_dir) == []
        assert oct(os.stat(g.directory).st_mode & 0o777) == "0o700"
        info = WorkerInfo.from_env(env)
        assert info == WorkerInfo(2, 3, g.directory) and info.siblings == [0, 1]
        with pytest.raises(ValueError, match=r"out of range 0\.\.2"):
            g.env(3)
        with pytest.raises(ValueError, match="LLMGW_WORKER_INDEX=3 is not within"):
            WorkerInfo.from_env({**env, "LLMGW_WORKER_INDEX": "3"})
        with pytest.raises(ValueError, match="must be integers"):
            WorkerInfo.from_env({**env, "LLMGW_WORKERS": "two"})
        with pytest.raises(ValueError, match="is not a directory"):
            WorkerInfo.from_env({**env, "LLMGW_WORKER_DIR": str(tmp_path / "missing")})
        child = workers.child_environment({**env, "PATH": "/bin"})
        assert child == {"PATH": "/bin"}
    assert not os.path.exists(g.directory)
    for bad in (0, -1, True, "2"):
        with pytest.raises(ValueError, match="positive integer"):
            WorkerGroup(bad)  # type: ignore[arg-type]


def test_fan_out_summary():
    assert FanOut(4, {0: "applied", 1: "applied"}).to_dict() == {
        "version": 4, "complete": True, "workers": {"0": "applied", "1": "applied"}}
    assert not FanOut(4, {0: "applied", 1: "timed out"}).complete
