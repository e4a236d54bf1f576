"""`python -m llmgw cluster` and the LocalCluster supervisor: start, readiness, requests, crash restarts,
restart on a new model version, clean stop with no process left behind, and clear errors for bad input."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from harness import wait_until
from llmgw import client
from llmgw.cluster import ClusterConfig, ClusterError, LocalCluster, request_restart
from llmgw.rollout import CommandTemplateRestart, RestartCommandError

ROOT = Path(__file__).resolve().parent.parent
READY_RE = re.compile(r"^llmgw cluster ready: grpc=(\S+) http=(\S+) replicas=(\d+)$")
MEMBER_RE = re.compile(r"^(replica-\d+): grpc=\S+ gossip=\S+ version=(\S+) pid=(\d+)$")
RESTARTED_RE = re.compile(r"^llmgw cluster: (replica-\d+) restarted \(pid (\d+), restart #(\d+)\)$")


def process_gone(pid: int) -> bool:
    """True once `pid` no longer runs (absent, or a zombie nobody reaped yet: it runs no code)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


class Supervisor:
    """The `cluster` command as a subprocess, its output lines collected by a thread (so every read is bounded)."""

    def __init__(self, args: list[str], log_dir: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmgw", "cluster", *args, "--log-dir", str(log_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        self.child_pids: set[int] = set()

    def _pump(self) -> None:
        for raw in self.proc.stdout:
            self._queue.put(raw.decode(errors="replace").rstrip("\n"))
        self._queue.put(None)

    def expect(self, pattern: re.Pattern, timeout: float) -> re.Match:
        """The next output line matching `pattern` (earlier lines are kept in self.lines)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern.pattern!r} within {timeout:g} s; output so far:\n"
                                     + "\n".join(self.lines))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"supervisor exited ({self.proc.wait()}) before {pattern.pattern!r}; output:\n"
                                     + "\n".join(self.lines))
            self.lines.append(line)
            member = MEMBER_RE.match(line) or RESTARTED_RE.match(line)
            if member:
                self.child_pids.add(int(member.group(2) if member.re is RESTARTED_RE else member.group(3)))
            match = pattern.match(line)
            if match:
                return match

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for pid in self.child_pids:  # only if the supervisor failed at its one job
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._thread.join(timeout=5)


def members(target: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "llmgw", "status", "--target", target, "--json"],
                         capture_output=True, text=True, timeout=20, cwd=str(ROOT),
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    import json

    return {m["member_id"]: m for m in json.loads(out.stdout)["members"]}


async def stream_one(target: str, prompt: str, max_tokens: int) -> client.StreamResult:
    async with grpc.aio.insecure_channel(target) as channel:
        return await client.collect(client.stream_infer(channel, prompt, max_tokens, timeout_s=20.0))


@pytest.fixture
def supervisor(tmp_path):
    started: list[Supervisor] = []

    def start(*args: str) -> Supervisor:
        sup = Supervisor(list(args), tmp_path / f"logs{len(started)}")
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.close()


def test_cluster_command_serves_restarts_and_stops_cleanly(supervisor):
    sup = supervisor("--replicas", "2", "--gossip-config", "local", "--base-port", "0", "--http-port", "0",
                     "--token-delay-ms", "10")
    ready = sup.expect(READY_RE, timeout=45)
    target = ready.group(1)
    assert ready.group(2) == "off" and ready.group(3) == "2"
    replica_pids = {m.group(1): int(m.group(3)) for m in map(MEMBER_RE.match, sup.lines) if m}
    assert sorted(replica_pids) == ["replica-1", "replica-2"]
    table = members(target)
    assert {mid: (m["role"], m["state"], m["model_version"]) for mid, m in table.items()} == {
        "gateway-1": ("gateway", "alive", ""),
        "replica-1": ("replica", "alive", "v1"),
        "replica-2": ("replica", "alive", "v1"),
    }

    result = asyncio.run(stream_one(target, "hello cluster", 6))
    assert result.ok, result.details
    assert [t.index for t in result.tokens] == list(range(6))
    assert result.tokens[-1].is_final and len(result.replicas) == 1

    # A replica killed behind the supervisor's back comes back (same id, new pid) and rejoins the gateway.
    victim = "replica-2"
    old_incarnation = members(target)[victim]["incarnation"]
    os.kill(replica_pids[victim], signal.SIGKILL)
    restarted = sup.expect(RESTARTED_RE, timeout=20)
    assert restarted.group(1) == victim and int(restarted.group(2)) != replica_pids[victim]

    def rejoined():
        m = members(target).get(victim)
        return m is not None and m["state"] == "alive" and m["incarnation"] > old_incarnation

    wait_until(rejoined, 20, interval=0.3, what=f"{victim} to rejoin with a newer incarnation", retry_on=())
    result = asyncio.run(stream_one(target, "after the restart", 3))
    assert result.ok and len(result.tokens) == 3

    # SIGTERM: the supervisor exits 0 and takes every member with it.
    status = asyncio.run(_gateway_pid(target))
    all_pids = sup.child_pids | {status}
    assert len(all_pids) == 4  # two first replicas, one restarted replica, the gateway
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(timeout=30) == 0
    sup.expect(re.compile(r"^llmgw cluster stopped$"), timeout=5)
    for pid in all_pids:
        wait_until(lambda pid=pid: process_gone(pid), 5, interval=0.05, what=f"pid {pid} to be gone", retry_on=())


async def _gateway_pid(target: str) -> int:
    from llmgw._proto import llmgateway_pb2 as pb
    from llmgw._proto import llmgateway_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        status = await pb_grpc.GatewayAdminStub(channel).GetStatus(pb.GatewayStatusRequest(), timeout=5)
    return status.pid


def test_no_restart_leaves_a_dead_replica_dead_and_sigint_stops(supervisor):
    sup = supervisor("--replicas", "1", "--base-port", "0", "--http-port", "0", "--no-restart")
    sup.expect(READY_RE, timeout=45)
    (pid,) = [int(m.group(3)) for m in map(MEMBER_RE.match, sup.lines) if m]
    os.kill(pid, signal.SIGKILL)
    sup.expect(re.compile(r"^llmgw cluster: replica-1 exited unexpectedly with status -9$"), timeout=10)
    time.sleep(1.5)  # longer than the first restart backoff (0.5 s): a restart would have happened by now
    pending = [line for line in list(sup._queue.queue) if line is not None]
    assert not any(RESTARTED_RE.match(line) for line in sup.lines + pending)
    sup.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert sup.proc.wait(timeout=30) == 0


def test_demo_streams_a_sample_and_exits(supervisor):
    sup = supervisor("--replicas", "2", "--base-port", "0", "--token-delay-ms", "5", "--demo",
                     "--demo-max-tokens", "4")
    sup.expect(READY_RE, timeout=45)
    sup.expect(re.compile(r"^  token_0 token_1 token_2 token_3$"), timeout=20)
    sup.expect(re.compile(r"^  4 tokens from replica-\d, TTFT [\d.]+ ms, total [\d.]+ ms$"), timeout=5)
    assert sup.proc.wait(timeout=30) == 0
    for pid in sup.child_pids:
        wait_until(lambda pid=pid: process_gone(pid), 5, interval=0.05, what=f"pid {pid} to be gone", retry_on=())


def test_bad_arguments_are_clear_errors():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args, message in ((["--replicas", "0"], "replicas must be within 1..64"),
                          (["--base-port", "65000"], "base_port must be within 1024.."),
                          (["--demo-max-tokens", "0"], "--demo-max-tokens must be within 1..4096")):
        out = subprocess.run([sys.executable, "-m", "llmgw", "cluster", *args], capture_output=True, text=True,
                             timeout=20, cwd=str(ROOT), env=env)
        assert out.returncode == 2, (args, out)
        assert message in out.stderr, (args, out.stderr)
    # Settings also come from LLMGW_CLUSTER_* variables (and a TOML [cluster] table), flags winning.
    out = subprocess.run([sys.executable, "-m", "llmgw", "cluster"], capture_output=True, text=True, timeout=20,
                         cwd=str(ROOT), env=dict(env, LLMGW_CLUSTER_REPLICAS="65"))
    assert out.returncode == 2 and "replicas must be within 1..64, got 65" in out.stderr, out.stderr


# ---- the library: LocalCluster ----------------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ValueError, match="gossip_config"):
        LocalCluster(gossip_config="fast")
    with pytest.raises(ValueError, match="model_version"):
        LocalCluster(model_version=" ")
    with pytest.raises(ValueError, match="http_port"):
        LocalCluster(http_port=70000)
    with pytest.raises(ValueError, match="ready_timeout_s"):
        LocalCluster(ready_timeout_s=0)


def test_restart_replica_on_a_new_version_keeps_ports_and_rejoins(tmp_path):
    async def scenario():
        cfg = ClusterConfig(replicas=2, base_port=0, http_port=0, token_delay_ms=5, log_dir=str(tmp_path))
        async with LocalCluster(cfg) as cluster:
            member = cluster.replicas["replica-1"]
            before = {m.member_id: m for m in (await cluster.members_table()).members}
            ports, old_pid = (member.grpc_port, member.gossip_port), member.pid
            await cluster.restart_hook("replica-1", "v2")
            assert (member.grpc_port, member.gossip_port) == ports and member.pid != old_pid
            assert member.restarts == 0  # a requested restart is not a crash
            await cluster.wait_ready(20, versions={"replica-1": "v2", "replica-2": "v1"})
            after = {m.member_id: m for m in (await cluster.members_table()).members}
            assert after["replica-1"].incarnation > before["replica-1"].incarnation
            assert after["replica-2"].incarnation == before["replica-2"].incarnation
            with pytest.raises(ClusterError, match="no replica 'replica-9'"):
                await cluster.restart_replica("replica-9", "v2")
            with pytest.raises(ClusterError, match="non-empty"):
                await cluster.restart_replica("replica-2", "")

            # The gateway-side rolling update's restart hook: a command template run by CommandTemplateRestart,
            # reaching this supervisor through its control socket.
            hook = CommandTemplateRestart(cluster.restart_command_template(), timeout_s=60)
            old_pid = cluster.replicas["replica-2"].pid
            await hook("replica-2", "v3")
            assert cluster.replicas["replica-2"].pid != old_pid
            assert cluster.replicas["replica-2"].model_version == "v3"
            await cluster.wait_ready(20, versions={"replica-1": "v2", "replica-2": "v3"})
            with pytest.raises(RestartCommandError, match="no replica 'replica-7'"):
                await hook("replica-7", "v3")
            with pytest.raises(ClusterError, match="could not restart replica-0: no replica 'replica-0'"):
                await request_restart(str(cluster.control_path), "replica-0", "v2", timeout_s=10)
            reader, writer = await asyncio.open_unix_connection(str(cluster.control_path))
            writer.write(b'{"op": "shutdown"}\n')
            reply = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            assert b"unknown control request" in reply and b'"ok": false' in reply
            assert oct(cluster.control_path.stat().st_mode & 0o777) == oct(0o600)
            pids = list(cluster.pids().values())
            assert len(pids) == 3
        assert not cluster.control_path.exists()
        with pytest.raises(ClusterError, match="cannot reach the cluster supervisor"):
            await request_restart(str(cluster.control_path), "replica-1", "v2", timeout_s=5)
        for pid in pids:
            wait_until(lambda pid=pid: process_gone(pid), 5, interval=0.05, what=f"pid {pid} to be gone", retry_on=())

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_a_member_that_cannot_start_is_a_clear_error_and_nothing_is_left(tmp_path):
    # Hold the port the gateway must bind (fixed ports: no retry on fresh ones).
    with socket.socket() as blocker:
        base = _bind_some_port(blocker, range(20000, 40000, 97))
        blocker.listen()
        cluster = LocalCluster(replicas=1, base_port=base, http_port=0, log_dir=str(tmp_path), ready_timeout_s=20)

        async def scenario():
            with pytest.raises(ClusterError, match="gateway-1"):
                await cluster.start()

        asyncio.run(scenario())
    assert cluster.pids() == {}
    assert (tmp_path / "gateway-1.log").exists()


def _bind_some_port(sock: socket.socket, candidates) -> int:
    """Bind `sock` to the first free port among `candidates` (a base port must leave room for +10000)."""
    for port in candidates:
        try:
            sock.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    raise AssertionError("no free port in 20000..40000 to block")


def test_http_demo_streams_through_the_openai_sdk():
    # The HTTP half of --demo, against the real HTTP front (in-process stack of the HTTP tests): it runs in the
    # cluster once the gateway command has --http-port.
    from test_http_server import run_stack

    from llmgw.cli.cluster import _demo_http

    lines: list[str] = []

    async def scenario(s):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start()
        assert await _demo_http(s.url, "hello demo", 4, lines.append)

    run_stack(scenario)
    assert lines[1:] == ["  token_0token_1token_2token_3", "  4 chunks via model 'v1'"]
    assert lines[0].startswith("demo (HTTP http://127.0.0.1:")
