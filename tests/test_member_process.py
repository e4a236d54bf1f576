"""llmgw.cluster.MemberProcess, the one launcher under `llmgw cluster` and tests/harness.py, driven with small Python
children: READY of this life only, clear errors, bounded stops that end with SIGKILL of the whole group."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmgw.cluster import ClusterError, MemberProcess, free_port, kill_leftover_members


def child(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


SERVE = child("""
    import time
    print("starting up")
    print("READY member-x grpc=127.0.0.1:1", flush=True)
    time.sleep(60)
""")


def gone_or_zombie(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_ready_line_then_a_graceful_stop(tmp_path):
    member = MemberProcess(SERVE, tmp_path / "m.log", name="member-x")
    try:
        assert member.wait_ready(20) == "READY member-x grpc=127.0.0.1:1"
        assert member.alive() and member.ready() == member.ready_line
        assert "starting up" in member.log_tail()
    finally:
        rc = member.stop(10)
    assert rc == -signal.SIGTERM and not member.alive()


def test_exit_before_ready_is_a_clear_error_with_the_log(tmp_path):
    member = MemberProcess(child("import sys; print('bad flag --x'); sys.exit(3)"), tmp_path / "m.log",
                           name="member-y")
    with pytest.raises(ClusterError, match=r"member-y exited with status 3 before it was ready") as error:
        member.wait_ready(20)
    assert "bad flag --x" in str(error.value)


def test_no_ready_within_the_timeout_is_an_error_and_the_member_keeps_running(tmp_path):
    member = MemberProcess(child("import time; time.sleep(60)"), tmp_path / "m.log", name="slow")
    try:
        started = time.monotonic()
        with pytest.raises(ClusterError, match=r"slow did not print READY within 0\.3 s"):
            member.wait_ready(0.3)
        assert time.monotonic() - started < 5
        assert member.alive()
    finally:
        assert member.kill() == -signal.SIGKILL


def test_stop_kills_a_member_that_ignores_sigterm_within_the_bound(tmp_path):
    stubborn = child("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("READY stubborn", flush=True)
        time.sleep(60)
    """)
    member = MemberProcess(stubborn, tmp_path / "m.log")
    member.wait_ready(20)
    started = time.monotonic()
    assert member.stop(0.5) == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 5


def test_stop_and_kill_reach_the_members_own_children(tmp_path):
    parent = child("""
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(f"READY pid={grandchild.pid}", flush=True)
        time.sleep(60)
    """)
    for end in ("stop", "kill"):
        member = MemberProcess(parent, tmp_path / f"{end}.log")
        grandchild = int(member.wait_ready(20).split("pid=")[1])
        assert not gone_or_zombie(grandchild)
        getattr(member, end)()
        wait_for(lambda pid=grandchild: gone_or_zombie(pid))


def test_a_new_life_ignores_the_previous_lifes_ready_line_and_keeps_the_argv(tmp_path):
    counter = tmp_path / "lives"
    code = child(f"""
        import pathlib, sys
        path = pathlib.Path({str(counter)!r})
        lives = int(path.read_text()) + 1 if path.exists() else 1
        path.write_text(str(lives))
        if lives == 1:
            print("READY first life", flush=True)
        else:
            print("second life cannot start", flush=True)
            sys.exit(4)
    """)
    first = MemberProcess(code, tmp_path / "m.log", name="m")
    assert first.wait_ready(20) == "READY first life"
    wait_for(lambda: not first.alive())
    second = first.restarted()
    assert second.argv == first.argv and second.log_path == first.log_path
    assert second.log_offset > first.log_offset and second.pid != first.pid
    with pytest.raises(ClusterError, match="m exited with status 4 before it was ready"):
        second.wait_ready(20)


def test_restarting_a_running_member_is_refused(tmp_path):
    member = MemberProcess(SERVE, tmp_path / "m.log", name="busy")
    try:
        member.wait_ready(20)
        with pytest.raises(ClusterError, match=r"busy .* is still running"):
            member.restarted()
    finally:
        member.kill()


def test_pause_stops_the_group_and_resume_continues_it(tmp_path):
    member = MemberProcess(SERVE, tmp_path / "m.log")
    state = Path(f"/proc/{member.pid}/status")
    try:
        member.wait_ready(20)
        member.pause()
        wait_for(lambda: "\nState:\tT" in state.read_text())
        member.resume()
        wait_for(lambda: "\nState:\tT" not in state.read_text())
        member.pause()  # a paused member still stops: SIGCONT comes with the SIGTERM
    finally:
        assert member.stop(10) == -signal.SIGTERM


def test_the_async_waits_for_an_event_loop(tmp_path):
    async def scenario() -> int | None:
        member = MemberProcess(SERVE, tmp_path / "m.log")
        try:
            assert (await member.wait_ready_async(20)).startswith("READY member-x")
            assert await member.wait_exit(0.1) is None  # still running: the bounded wait gives up
        finally:
            rc = await member.stop_async(10)
        return rc

    assert asyncio.run(scenario()) == -signal.SIGTERM


def test_a_command_that_cannot_start_is_a_cluster_error(tmp_path):
    with pytest.raises(ClusterError, match="cannot start"):
        MemberProcess([str(tmp_path / "no-such-program")], tmp_path / "m.log")


def test_leftover_members_are_killed(tmp_path):
    member = MemberProcess(SERVE, tmp_path / "m.log")
    member.wait_ready(20)
    kill_leftover_members()  # what the atexit hook and a second Ctrl-C of `llmgw cluster` do
    wait_for(lambda: not member.alive())
    assert member.returncode == -signal.SIGKILL


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_free_port_is_bindable(kind):
    port = free_port("127.0.0.1", kind)
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", port))
    assert 0 < port < 65536
