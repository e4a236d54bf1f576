"""Acceptance on real UDP: separate `python -m llmgw.gossip` processes on loopback (LAN preset)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import free_udp_port
from llmgw._core.codec import ACK, SUSPECT, Message, Update, encode
from llmgw.cluster import MemberProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NodeProcess:
    """One gossip node process (llmgw.cluster.MemberProcess, output to tmp_path/<id>.log); a reader thread follows
    this life's part of the log and folds its JSON event lines into a member -> state view."""

    def __init__(self, member_id: str, port: int, seeds: list[str], log_dir: Path) -> None:
        self.member_id = member_id
        self.address = f"127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "llmgw.gossip", "--id", member_id, "--bind", self.address,
               "--seeds", ",".join(seeds), "--config", "lan"]
        self.process = MemberProcess(cmd, log_dir / f"{member_id}.log", name=member_id, cwd=ROOT)
        self.lock = threading.Lock()
        self.states: dict[str, str] = {}
        self.incarnations: dict[str, int] = {}
        self.history: list[tuple[float, str, str]] = []  # (time, kind, member)
        self.table: list[dict] | None = None
        self.started = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _lines(self) -> Iterator[str]:
        """This life's output lines as they are appended; ends once the process exited and all it wrote is read."""
        with open(self.process.log_path, "rb") as log:
            log.seek(self.process.log_offset)
            unfinished = b""
            while True:
                exited = not self.process.alive()  # checked before reading, so nothing written last is missed
                chunk = log.read()
                if chunk:
                    *lines, unfinished = (unfinished + chunk).split(b"\n")
                    yield from (line.decode(errors="replace") for line in lines)
                elif exited:
                    return
                else:
                    time.sleep(0.02)

    def _read(self) -> None:
        for line in self._lines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                if "started" in obj:
                    self.started.set()
                elif "event" in obj:
                    m = obj["member"]
                    self.history.append((time.monotonic(), obj["event"], m["member_id"]))
                    if obj["event"] == "removed":
                        self.states.pop(m["member_id"], None)
                    else:
                        self.states[m["member_id"]] = m["state"]
                        self.incarnations[m["member_id"]] = m["incarnation"]
                elif "table" in obj:
                    self.table = obj["table"]

    def state(self, member_id: str) -> str | None:
        with self.lock:
            return self.states.get(member_id)

    def kinds_about(self, member_id: str) -> list[str]:
        with self.lock:
            return [k for _, k, m in self.history if m == member_id]

    def request_table(self, timeout: float = 5.0) -> list[dict]:
        with self.lock:
            self.table = None
        self.process.popen.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.table is not None:
                    return self.table
            time.sleep(0.02)
        raise AssertionError(f"{self.member_id} printed no table")

    def kill(self) -> None:
        """SIGKILL: the node vanishes without a word (no gossip leave)."""
        self.process.kill()

    def terminate(self) -> None:
        """SIGTERM (graceful leave), a bounded wait, then SIGKILL."""
        self.process.stop(timeout_s=5.0)


def wait_until(predicate, timeout: float, interval: float = 0.05) -> float | None:
    """Seconds it took, or None on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    return None


@pytest.fixture
def spawn(tmp_path):
    procs: list[NodeProcess] = []

    def make(member_id: str, port: int, seeds: list[str]) -> NodeProcess:
        p = NodeProcess(member_id, port, seeds, tmp_path)
        procs.append(p)
        assert p.started.wait(20), f"{member_id} did not start"
        return p

    yield make
    for p in procs:
        p.terminate()


def test_three_processes_discover_detect_kill_and_readmit_restart(spawn):
    ports = [free_udp_port() for _ in range(3)]
    ids = ["n1", "n2", "n3"]
    n1 = spawn("n1", ports[0], [])
    n2 = spawn("n2", ports[1], [f"127.0.0.1:{ports[0]}"])
    n3 = spawn("n3", ports[2], [f"127.0.0.1:{ports[1]}"])  # a chain: n3 knows only n2, n2 only n1
    procs = [n1, n2, n3]

    def all_alive(nodes):
        return all(p.state(o) == "alive" for p in nodes for o in ids if o != p.member_id)

    # Discovery through the chain of seeds within 5 s of the last node being up.
    assert wait_until(lambda: all_alive(procs), 5.0) is not None, [p.states for p in procs]

    # SIGKILL n3: both survivors see it DEAD within 8 s, and never declare a live node dead.
    n3.kill()
    took = wait_until(lambda: n1.state("n3") == "dead" and n2.state("n3") == "dead", 8.0)
    assert took is not None, (n1.states, n2.states)

    # Restart on the same port (fresh time-based incarnation): ALIVE everywhere within 8 s.
    n3b = spawn("n3", ports[2], [f"127.0.0.1:{ports[0]}"])
    procs = [n1, n2, n3b]
    took = wait_until(lambda: all_alive(procs), 8.0)
    assert took is not None, (n1.states, n2.states, n3b.states)
    assert "dead" not in n1.kinds_about("n2") and "dead" not in n2.kinds_about("n1")
    assert "dead" not in n3b.kinds_about("n1") and "dead" not in n3b.kinds_about("n2")


def test_injected_suspicion_is_refuted_and_never_becomes_dead(spawn):
    p1, p2 = free_udp_port(), free_udp_port()
    n1 = spawn("s1", p1, [])
    n2 = spawn("s2", p2, [f"127.0.0.1:{p1}"])
    assert wait_until(lambda: n1.state("s2") == "alive" and n2.state("s1") == "alive", 5.0) is not None
    row = next(r for r in n1.request_table() if r["member_id"] == "s2")
    # A forged rumour: "s2 is SUSPECT" at s2's current incarnation, from a sender nobody knows.
    rumour = Update("s2", row["address"], SUSPECT, row["incarnation"], reporter_id="injector")
    data = encode(Message(ACK, "injector", "s1", 0, [rumour], "", "", 0))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(data, ("127.0.0.1", p1))
    assert wait_until(lambda: "suspect" in n1.kinds_about("s2"), 3.0) is not None
    assert wait_until(lambda: n1.state("s2") == "alive", 5.0) is not None
    refuted = next(r for r in n1.request_table() if r["member_id"] == "s2")
    assert refuted["incarnation"] > row["incarnation"]
    time.sleep(2.0)  # well past what a suspicion would need to turn DEAD in a 2-node cluster
    assert "dead" not in n1.kinds_about("s2") and n1.state("s2") == "alive"


def test_standalone_node_rejects_bad_arguments():
    r = subprocess.run([sys.executable, "-m", "llmgw.gossip", "--id", "x", "--bind", "nonsense"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2 and "host:port" in r.stderr
