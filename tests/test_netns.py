"""Multi-host on one machine (issue 7): replicas, two gateways and a client, each in its own network namespace
with its own address (10.231.0.x/24 on a veth pair into a bridge that lives in a namespace of its own, so nothing
touches the host's network and no traffic leaves the machine). One host's link is cut (`ip link set eth0 down`) and
restored: membership converges again and no request is lost while a route exists.

Needs root and iproute2; skipped with the reason otherwise. Every namespace is deleted in a finalizer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from llmgw.cluster import MemberProcess

ROOT = Path(__file__).resolve().parent.parent
AGENT = str(ROOT / "tests" / "reliability_helpers.py")
SUBNET = "10.231.0"
GRPC_PORT, GOSSIP_PORT = 50051, 60051

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="network namespaces are Linux-only"),
    pytest.mark.skipif(os.geteuid() != 0, reason="creating network namespaces needs root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 ('ip') is not installed"),
]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


class Hosts:
    """Namespaces named h11-<run>-<host>, each with eth0 = SUBNET.<n>/24, all on one bridge in h11-<run>-br."""

    def __init__(self, workdir: Path) -> None:
        self.run = uuid.uuid4().hex[:6]
        self.workdir = workdir
        self.bridge_ns = f"h11-{self.run}-br"
        self.namespaces: list[str] = []
        self.addresses: dict[str, str] = {}
        self.procs: dict[str, MemberProcess] = {}
        self._next = 1

    def ns(self, host: str) -> str:
        return f"h11-{self.run}-{host}"

    def setup_bridge(self) -> None:
        ip("netns", "add", self.bridge_ns)
        self.namespaces.append(self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        ip("-n", self.bridge_ns, "link", "set", "lo", "up")

    def add_host(self, host: str) -> str:
        ns, n = self.ns(host), self._next
        self._next += 1
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        peer = f"v{n}"
        # Both ends are created inside namespaces we own: nothing appears in the host's namespace.
        ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "set", peer, "master", "br0")
        ip("-n", self.bridge_ns, "link", "set", peer, "up")
        address = f"{SUBNET}.{n}"
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        self.addresses[host] = address
        return address

    def link(self, host: str, up: bool) -> None:
        ip("-n", self.ns(host), "link", "set", "eth0", "up" if up else "down")

    def spawn(self, host: str, argv: list[str], *, name: str | None = None) -> MemberProcess:
        """`python argv` inside `host`'s namespace (llmgw.cluster.MemberProcess with an `ip netns exec` prefix),
        logging to <name or host>.log; killed with its process group in close()."""
        name = name or host
        proc = MemberProcess(["ip", "netns", "exec", self.ns(host), sys.executable, *argv],
                             self.workdir / f"{name}.log", name=name, cwd=ROOT)
        self.procs[name] = proc
        return proc

    def start_node(self, role: str, host: str, seeds: list[str]) -> None:
        addr = self.addresses[host]
        args = ["-m", "llmgw", role, "--id", host, "--host", addr, "--port", str(GRPC_PORT), "--gossip-port",
                str(GOSSIP_PORT), "--gossip-config", "local", "--log-level", "INFO"]
        if role == "replica":
            args += ["--token-delay-ms", "20", "--max-capacity", "64"]
        else:
            args += ["--http-port", "0", "--first-token-timeout-s", "1", "--inter-token-timeout-s", "1"]
        if seeds:
            args += ["--seeds", ",".join(f"{self.addresses[s]}:{GOSSIP_PORT}" for s in seeds)]
        self.spawn(host, args)

    def agent(self, *args: str, timeout: float = 60.0) -> dict:
        out = subprocess.run(["ip", "netns", "exec", self.ns("client"), sys.executable, AGENT, *args],
                             capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if out.returncode != 0:
            raise AssertionError(f"agent {args} failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def agent_async(self, name: str, *args: str) -> MemberProcess:
        """The agent running in the background on the client host, logging to <name>.log; see agent_result."""
        return self.spawn("client", [AGENT, *args], name=name)

    @staticmethod
    def agent_result(proc: MemberProcess, timeout: float) -> dict:
        """The JSON line a background agent printed last, once it exited 0 within `timeout` seconds."""
        try:
            returncode = proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{proc.name} still running after {timeout:g} s:\n{proc.log_tail()}") from None
        assert returncode == 0, f"{proc.name} exited with {returncode}:\n{proc.log_tail()}"
        with open(proc.log_path, "rb") as log:
            log.seek(proc.log_offset)
            lines = log.read().decode(errors="replace").splitlines()
        # Its stdout and stderr share the log: the result is the last line that is a JSON object.
        for line in reversed(lines):
            if line.startswith("{"):
                return json.loads(line)
        raise AssertionError(f"{proc.name} printed no JSON result:\n{proc.log_tail()}")

    def members(self, gateway: str) -> dict:
        return self.agent("members", f"{self.addresses[gateway]}:{GRPC_PORT}", timeout=20)

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()  # SIGKILL of its process group, then reaped (bounded)
        for ns in reversed(self.namespaces):
            ip("netns", "del", ns, check=False)


REPLICAS = ["replica-1", "replica-2", "replica-3"]
GATEWAYS = ["gateway-1", "gateway-2"]


@pytest.fixture
def hosts(tmp_path):
    h = Hosts(tmp_path)
    try:
        h.setup_bridge()
        for name in REPLICAS + GATEWAYS + ["client"]:
            h.add_host(name)
        h.start_node("replica", "replica-1", [])
        for name in REPLICAS[1:] + GATEWAYS:
            h.start_node("replica" if name.startswith("replica") else "gateway", name, ["replica-1"])
        yield h
    finally:
        h.close()
        leftover = ip("netns", "list").stdout
        assert h.run not in leftover, f"namespaces left behind: {leftover}"


def wait_converged(h: Hosts, expected: dict[str, str], timeout: float, observers=tuple(GATEWAYS)) -> float:
    t0 = time.monotonic()
    last = {}
    while time.monotonic() - t0 < timeout:
        views = {g: h.members(g) for g in observers}
        if all(all(v.get(m) == s for m, s in expected.items()) for v in views.values()):
            return time.monotonic() - t0
        last = views
        time.sleep(0.3)
    raise AssertionError(f"no convergence to {expected} within {timeout} s: {last}")


def cut_link_under_load(hosts, victim: str, observers=tuple(GATEWAYS), cut_s: float = 4.0):
    """Load both gateways from the client host, cut `victim`'s link for `cut_s` seconds in the middle (waiting until
    `observers` -- default both gateways -- see it DEAD), restore it, collect each gateway's load report and wait until
    everyone is ALIVE again. Returns (results by gateway, cut_at, restored_at, seconds the re-convergence took)."""
    everyone_alive = dict.fromkeys(REPLICAS + GATEWAYS, "alive")
    wait_converged(hosts, everyone_alive, 40.0)
    loads = {g: hosts.agent_async(f"load-{g}", "load", f"{hosts.addresses[g]}:{GRPC_PORT}", "12", "8", "10", g)
             for g in GATEWAYS}
    time.sleep(3.0)
    cut_at = time.monotonic()
    hosts.link(victim, up=False)
    wait_converged(hosts, {victim: "dead"}, 15.0, observers=observers)
    time.sleep(max(0.0, cut_at + cut_s - time.monotonic()))
    restored_at = time.monotonic()
    hosts.link(victim, up=True)
    results = {}
    for g, proc in loads.items():
        results[g] = hosts.agent_result(proc, timeout=60)
    converge_s = wait_converged(hosts, everyone_alive, 30.0)
    return results, cut_at, restored_at, converge_s


def test_link_cut_and_restore_between_namespaces(hosts):
    # Both gateways under load from the client host; gateway-2's host loses its link for 4 s in the middle, and
    # gateway-1 sees gateway-2 fail (a real partition, not a crash).
    results, cut_at, restored_at, converge_s = cut_link_under_load(hosts, "gateway-2", observers=["gateway-1"])
    print("netns:", {g: r["summary"] for g, r in results.items()},
          f"re-converged {converge_s:.1f} s after the checks began ({time.monotonic() - restored_at:.1f} s "
          "after restore)")

    # gateway-1 always had a route to the client and to every replica: nothing lost there.
    g1 = results["gateway-1"]
    assert g1["problems"] == 0 and set(g1["summary"]["by_code"]) == {"OK"}, g1["summary"]
    # gateway-2's clients lost their route while the link was down; requests sent before the cut or well after
    # the restore (once TCP reconnects) succeed. None ends with a partial answer reported as OK.
    g2 = results["gateway-2"]
    assert g2["problems"] == 0
    before_cut = [code for sent, total, code in g2["outcomes"] if sent + total < cut_at]
    after_restore = [code for sent, total, code in g2["outcomes"] if sent > restored_at + 3.0]
    assert before_cut and set(before_cut) == {"OK"}, before_cut
    assert after_restore and set(after_restore) == {"OK"}, after_restore


def test_replica_link_cut_under_load_loses_no_request(hosts):
    """A replica's host loses its link for 4 s while both gateways carry load: streams on it stall and fail over
    (inter-token / first-token timeouts of 1 s), new requests go to the two reachable replicas, so no request is
    lost; the gateways see the replica DEAD meanwhile and ALIVE again after the restore."""
    results, cut_at, restored_at, converge_s = cut_link_under_load(hosts, "replica-2")
    print("netns replica cut:", {g: r["summary"] for g, r in results.items()},
          f"re-converged {time.monotonic() - restored_at:.1f} s after restore (checks took {converge_s:.1f} s)")
    for g, r in results.items():
        assert r["problems"] == 0 and set(r["summary"]["by_code"]) == {"OK"}, (g, r["summary"])
        during = [o for o in r["outcomes"] if o[0] < restored_at and o[0] + o[1] > cut_at]
        assert during, f"{g}: no request overlapped the cut"
    # Streams that were on replica-2 at the cut stalled until the 1 s inter-token timeout, then failed over.
    assert max(r["summary"]["max_total_s"] for r in results.values()) >= 0.9
