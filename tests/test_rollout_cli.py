"""The rollout progress view (ui.progress_bar, ui.render_rollout) and `python -m llmgw rollout` as a client of
the gateway's /admin/rollout API.

The server side here is a small aiohttp app running a real llmgw.rollout.Rollout over an in-memory RolloutTarget
(the test double rollout.py's Protocol is meant for), with the status codes and error shapes of llmgw.http.admin.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading

import pytest
from aiohttp import web

from llmgw import ui
from llmgw.__main__ import build_parser, main
from llmgw.cli import rollout as rollout_cli
from llmgw.rollout import Rollout


# ---- the renderer --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("done, total, expected", [
    (0, 4, "[----------]   0%"),
    (1, 4, "[##--------]  25%"),
    (2.5, 4, "[######----]  62%"),
    (4, 4, "[##########] 100%"),
    (9, 4, "[##########] 100%"),  # clamped
    (-1, 4, "[----------]   0%"),
    (0, 0, "[##########] 100%"),  # nothing to do is done
    (float("nan"), 3, "[----------]   0%"),
    (0.999, 1, "[#########-]  99%"),  # only full when the work is
])
def test_progress_bar(done, total, expected):
    assert ui.progress_bar(done, total, width=10) == expected


def test_progress_bar_rejects_zero_width():
    with pytest.raises(ValueError, match="width must be >= 1"):
        ui.progress_bar(1, 2, width=0)


def status_dict(state="running", replicas=(), **extra) -> dict:
    return {"new_version": "v2", "state": state, "replicas": list(replicas), **extra}


def test_rollout_fraction_counts_finished_and_partial_steps():
    replicas = [{"replica_id": "r1", "step": "done"}, {"replica_id": "r2", "step": "skipped"},
                {"replica_id": "r3", "step": "restart"}, {"replica_id": "r4", "step": "pending"}]
    assert ui.rollout_fraction(status_dict(replicas=replicas)) == (2 + 2 / 5, 4)
    assert ui.rollout_fraction(status_dict()) == (0.0, 0)


def test_render_rollout_running_and_failed():
    running = status_dict(replicas=[
        {"replica_id": "replica-1", "step": "done", "started_at": 10.0, "finished_at": 22.0, "old_incarnation": 5,
         "new_incarnation": 9},
        {"replica_id": "replica-2", "step": "restart", "started_at": 22.0, "finished_at": None},
        {"replica_id": "replica-10", "step": "pending", "started_at": None},
    ])
    assert ui.render_rollout(running, width=10, now=24.1) == (
        "rolling update to v2: running  [####------]  46%  1/3 replicas\n"
        "  replica-1   done           12.0s  incarnation 5 -> 9\n"
        "  replica-2   restart         2.1s\n"
        "  replica-10  pending"
    )
    failed = status_dict("failed", replicas=[
        {"replica_id": "r1", "step": "failed", "started_at": 1.0, "finished_at": 3.5, "error": "restart timed out"},
    ], error="restart timed out", restored=True)
    assert ui.render_rollout(failed, width=4) == (
        "rolling update to v2: failed  [----]   0%  0/1 replicas\n"
        "  r1  failed          2.5s  error: restart timed out\n"
        "  failed: restart timed out (routing restored)"
    )


# ---- argument parsing ----------------------------------------------------------------------------------------
def parse(*argv):
    return build_parser().parse_args(["rollout", *argv])


def test_request_body_from_arguments():
    args = parse("--to-version", " v2 ", "--replicas", "replica-2, replica-1", "--drain-timeout-s", "5",
                 "--rejoin-timeout-s", "12.5", "--force")
    assert rollout_cli.request_body(args) == {"version": "v2", "replicas": ["replica-2", "replica-1"],
                                              "drain_timeout_s": 5.0, "rejoin_timeout_s": 12.5,
                                              "skip_up_to_date": False}
    assert rollout_cli.request_body(parse("--to-version", "v3")) == {"version": "v3"}


@pytest.mark.parametrize("argv, message", [
    (["--to-version", " "], "--to-version must not be empty"),
    (["--to-version", "v2", "--replicas", "a,b,a"], "lists a replica twice"),
    (["--to-version", "v2", "--drain-timeout-s", "0"], "--drain-timeout-s must be within"),
    (["--to-version", "v2", "--poll-s", "0"], "--poll-s must be within"),
    (["--to-version", "v2", "--http", "127.0.0.1:8080"], "--http must be an http(s):// URL"),
])
def test_bad_arguments(argv, message, capsys):
    assert main(["rollout", *argv]) == 2
    assert message in capsys.readouterr().err


def test_exactly_one_action_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["rollout", "--watch", "--abort"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["rollout"])
    assert "one of the arguments --to-version --watch --abort is required" in capsys.readouterr().err


# ---- against an /admin/rollout server ------------------------------------------------------------------------
class MemoryTarget:
    """Replicas as a dict; a restart bumps version and incarnation; `fail_restart` makes one replica's fail."""

    def __init__(self, ids, fail_restart: str | None = None) -> None:
        self.info = {rid: ["alive", "v1", 1] for rid in ids}
        self.drained: set[str] = set()
        self.fail_restart = fail_restart

    def replicas(self):
        return sorted(self.info)

    async def drain_in_routing(self, rid):
        self.drained.add(rid)

    async def undrain_in_routing(self, rid):
        self.drained.discard(rid)

    async def drain_rpc(self, rid, timeout_s):
        await asyncio.sleep(0.02)
        return True

    async def restart(self, rid, version):
        await asyncio.sleep(0.05)
        if rid == self.fail_restart:
            raise RuntimeError(f"{rid} refused to start")
        self.info[rid] = ["alive", version, self.info[rid][2] + 1]

    def member_info(self, rid):
        info = self.info.get(rid)
        return tuple(info) if info else None


class RolloutServer:
    """POST/GET/DELETE /admin/rollout on a thread's event loop, answering like llmgw.http.admin."""

    def __init__(self, target: MemoryTarget | None, token: str | None = None) -> None:
        self.target = target
        self.token = token
        self.rollout: Rollout | None = None
        self.task = None
        self.bodies: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = None
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    @staticmethod
    def error(status: int, message: str, code: str) -> web.Response:
        return web.json_response({"error": {"message": message, "type": "invalid_request_error", "code": code}},
                                 status=status)

    async def _start(self) -> int:
        app = web.Application()
        if self.target is not None:
            app.router.add_post("/admin/rollout", self.post)
            app.router.add_get("/admin/rollout", self.get)
            app.router.add_delete("/admin/rollout", self.delete)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return self.runner.addresses[0][1]

    def _auth(self, request):
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self.error(401, "missing or wrong bearer token", "invalid_token")
        return None

    async def post(self, request):
        if (denied := self._auth(request)) is not None:
            return denied
        if self.task is not None and not self.task.done():
            return self.error(409, f"a rolling update to {self.rollout.new_version} is already running",
                              "rollout_running")
        body = await request.json()
        self.bodies.append(body)
        options = {k: body[k] for k in ("drain_timeout_s", "rejoin_timeout_s", "skip_up_to_date") if k in body}
        self.rollout = Rollout(self.target, body["version"], poll_s=0.01, **options)
        self.task = asyncio.get_running_loop().create_task(self.rollout.run())
        await asyncio.sleep(0)
        return web.json_response(self.rollout.status.to_dict(), status=202)

    async def get(self, request):
        if (denied := self._auth(request)) is not None:
            return denied
        if self.rollout is None:
            return self.error(404, "no rolling update has been started", "no_rollout")
        return web.json_response(self.rollout.status.to_dict())

    async def delete(self, request):
        if self.rollout is None:
            return self.error(404, "no rolling update has been started", "no_rollout")
        self.rollout.cancel()
        async with asyncio.timeout(5):
            await asyncio.shield(self.task)
        return web.json_response(self.rollout.status.to_dict())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        async def stop():
            if self.task is not None and not self.task.done():
                self.task.cancel()
                await asyncio.gather(self.task, return_exceptions=True)
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def rollout_server():
    servers = []

    def start(target, token=None) -> RolloutServer:
        server = RolloutServer(target, token)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def test_rollout_runs_to_success_with_progress_lines(rollout_server, capsys):
    target = MemoryTarget(["replica-1", "replica-2", "replica-3"])
    server = rollout_server(target)
    code = main(["rollout", "--http", server.url, "--to-version", "v2", "--poll-s", "0.05",
                 "--drain-timeout-s", "5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert server.bodies == [{"version": "v2", "drain_timeout_s": 5.0}]
    assert {rid: info[1] for rid, info in target.info.items()} == {f"replica-{i}": "v2" for i in (1, 2, 3)}
    lines = out.splitlines()
    # Not a terminal: one line per change of the headline, then the per-replica view once.
    assert lines[-4] == "rolling update to v2: succeeded  [##############################] 100%  3/3 replicas"
    assert [line.split()[:2] for line in lines[-3:]] == [["replica-1", "done"], ["replica-2", "done"],
                                                         ["replica-3", "done"]]
    assert all(line.endswith("incarnation 1 -> 2") for line in lines[-3:])
    heads = [line for line in lines if line.startswith("rolling update to v2:")]
    assert len(heads) == len(set(heads)) >= 2  # progress was shown, and no headline repeated


def test_failed_rollout_exits_1_and_says_why(rollout_server, capsys):
    server = rollout_server(MemoryTarget(["r1", "r2", "r3"], fail_restart="r2"))
    assert main(["rollout", "--http", server.url, "--to-version", "v2", "--poll-s", "0.05", "--json"]) == 1
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "failed" and status["failed_replica"] == "r2" and status["restored"] is True
    assert "r2 refused to start" in status["error"]
    assert [r["step"] for r in status["replicas"]] == ["done", "failed", "pending"]


def test_watch_and_abort(rollout_server, capsys):
    target = MemoryTarget(["r1", "r2"])
    server = rollout_server(target)
    assert main(["rollout", "--http", server.url, "--watch"]) == 1
    assert "no rolling update has been started on this gateway" in capsys.readouterr().err

    async def slow_restart(rid, version):  # long enough to abort it mid-way
        await asyncio.sleep(30)

    target.restart = slow_restart
    assert main(["rollout", "--http", server.url, "--to-version", "v2", "--timeout-s", "0.2", "--poll-s", "0.05",
                 "--json"]) == 1
    assert "gave up watching after 0.2 s; the rolling update is still running" in capsys.readouterr().err
    assert main(["rollout", "--http", server.url, "--to-version", "v3"]) == 1
    assert "already running (follow it with --watch, stop it with --abort)" in capsys.readouterr().err
    assert main(["rollout", "--http", server.url, "--abort"]) == 1  # an aborted rollout is not a success
    out = capsys.readouterr().out
    assert out.startswith("rolling update to v2: aborted") and "cancelled by operator (routing restored)" in out
    assert target.drained == set()


def test_gateway_without_the_rollout_api(rollout_server, capsys):
    server = rollout_server(None)  # an HTTP server with no /admin/rollout route
    assert main(["rollout", "--http", server.url, "--to-version", "v2"]) == 1
    assert "has no rollout API (/admin/rollout answered 404): it lacks the rollout RPC" in capsys.readouterr().err


def test_unreachable_gateway_and_bad_token(rollout_server, capsys, monkeypatch):
    from tests.harness import free_tcp_port

    monkeypatch.delenv("LLMGW_ADMIN_TOKEN", raising=False)
    url = f"http://127.0.0.1:{free_tcp_port()}"
    assert main(["rollout", "--http", url, "--to-version", "v2"]) == 1
    assert f"cannot reach the gateway's HTTP front at {url}" in capsys.readouterr().err
    server = rollout_server(MemoryTarget(["r1", "r2"]), token="s3cret")
    assert main(["rollout", "--http", server.url, "--to-version", "v2", "--admin-token", "wrong"]) == 1
    assert "refused the admin token" in capsys.readouterr().err
    monkeypatch.setenv("LLMGW_ADMIN_TOKEN", "s3cret")
    assert main(["rollout", "--http", server.url, "--to-version", "v2", "--poll-s", "0.05", "--json"]) == 0


def test_progress_view_redraws_in_place_on_a_terminal():
    out = io.StringIO()
    view = rollout_cli.ProgressView(out, tty=True)
    first = status_dict(replicas=[{"replica_id": "r1", "step": "restart"}])
    second = status_dict("succeeded", replicas=[{"replica_id": "r1", "step": "done"}])
    view(first)
    view(second)
    text = out.getvalue()
    assert text == ui.render_rollout(first) + "\n" + ui.rewind(2) + ui.render_rollout(second) + "\n"
    assert ui.rewind(2) == "\x1b[2F\x1b[J" and ui.rewind(0) == ""
