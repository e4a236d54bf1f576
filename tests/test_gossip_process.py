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

import pytest

from llmgw._core.codec import ACK, SUSPECT, Message, Update, encode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_udp_port() -> int:
    """A port that is free now and >= 10000 (peers derive gRPC port = gossip port - 10000)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 10000:
            return port
    raise RuntimeError("no free UDP port >= 10000")


class NodeProcess:
    """One gossip node process; a reader thread folds its JSON event lines into a member -> state view."""

    def __init__(self, member_id: str, port: int, seeds: list[str]) -> None:
        self.member_id = member_id
        self.address = f"127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "llmgw.gossip", "--id", member_id, "--bind", self.address,
               "--seeds", ",".join(seeds), "--config", "lan"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONPATH": ROOT})
        self.lock = threading.Lock()
        self.states: dict[str, str] = {}
        self.incarnations: dict[str, int] = {}
        self.history: list[tuple[float, str, str]] = []  # (time, kind, member)
        self.table: list[dict] | None = None
        self.started = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
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
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.table is not None:
                    return self.table
            time.sleep(0.02)
        raise AssertionError(f"{self.member_id} printed no table")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def wait_until(predicate, timeout: float, interval: float = 0.05) -> float | None:
    """Seconds it took, or None on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    return None


@pytest.fixture
def spawn():
    procs: list[NodeProcess] = []

    def make(member_id: str, port: int, seeds: list[str]) -> NodeProcess:
        p = NodeProcess(member_id, port, seeds)
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
