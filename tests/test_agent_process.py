"""`llmgw agent` as a process: the acceptance of issue 12's gossip discovery, with real processes on loopback.

The model servers are the deterministic mock (`python -m llmgw.testing.mock_openai`), each agent and the gateway are
`python -m llmgw ...` processes (llmgw.cluster.MemberProcess: own session, READY line, killed whatever happens).

- A plain GossipNode in the test watches an agent's member: role "upstream", an advertisement that decodes to the
  mock's URL and models, healthy; the mock SIGKILLed -> unhealthy within 2 s; started again on the same port ->
  healthy again; the agent SIGTERMed -> it leaves the mesh and exits 0.
- A gateway (HTTP front) learns two mocks from their agents alone (no --upstream): requests reach both; one mock is
  killed and, 2 s later, a recording listener takes its port: requests keep succeeding, all on the other server,
  and the listener sees the agent's probes but not one request; the mock started again there is routed to again.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import wait_until
from llmgw.cluster import MemberProcess, free_port
from llmgw.gossip import GossipConfig, GossipNode
from llmgw.topology import ROLE_UPSTREAM
from llmgw.upstream.backends import Backend, HealthState, canonical_id
from llmgw.upstream.metadata import decode_backend

ROOT = Path(__file__).resolve().parent.parent
MODEL = "agent-test-model"
READY_TIMEOUT_S = 30.0
# The acceptance bound: a killed server is out of routing (advertised unhealthy, then not routed to) 2 s later.
OUT_OF_ROUTING_S = 2.0


class MockProcess:
    """`python -m llmgw.testing.mock_openai` in its own session; it prints its base URL once it serves."""

    def __init__(self, log_path: Path, port: int = 0) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "llmgw.testing.mock_openai", "--port", str(port), "--model", MODEL],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                text=True)
        self.url = self._read_url()
        self.port = int(self.url.rsplit(":", 1)[1])
        self.ready_at = time.monotonic()

    def _read_url(self) -> str:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.popen.stdout.readline()), daemon=True)
        reader.start()
        reader.join(READY_TIMEOUT_S)
        line = box[0].strip() if box else ""
        if not line.startswith("http://"):
            self.kill()
            raise AssertionError(f"the mock printed no URL within {READY_TIMEOUT_S} s: {line!r}; "
                                 f"{self.log_path.read_text(errors='replace')[-2000:]}")
        return line

    def recorded(self) -> list[dict]:
        """Every request this mock has answered or refused (GET /mock/requests)."""
        status, _, body = http_request(self.url, "GET", "/mock/requests")
        assert status == 200
        return json.loads(body)

    def generation_requests(self) -> list[dict]:
        return [r for r in self.recorded() if r["method"] == "POST" and r["path"].startswith("/v1/")]

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, 9)
        self.popen.wait(timeout=10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


class RecordingListener:
    """Takes a dead server's port: records the request line of every HTTP request that arrives and closes the
    connection without an answer (so the agent's probes keep failing and a routed request would fail over)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.lock = threading.Lock()
        self.request_lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                head = b""
                try:
                    while b"\r\n" not in head and len(head) < 8192:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                except OSError:
                    pass
                if head:
                    with self.lock:
                        self.request_lines.append(head.split(b"\r\n", 1)[0].decode(errors="replace"))

    def lines(self) -> list[str]:
        with self.lock:
            return list(self.request_lines)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def http_request(base_url: str, method: str, path: str, body: dict | None = None,
                 timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def complete(gateway_url: str, prompt: str) -> tuple[int, str]:
    """One non-streamed completion through the gateway: (status, id of the server that answered)."""
    status, headers, body = http_request(gateway_url, "POST", "/v1/completions",
                                         {"model": MODEL, "prompt": prompt, "max_tokens": 3})
    assert status != 200 or json.loads(body)["choices"][0]["text"], body
    return status, headers.get("X-LLMGW-Replica", "")


def ready_field(line: str, name: str) -> str:
    """The value of `name=` in a READY line."""
    for part in line.split():
        key, sep, value = part.partition("=")
        if sep and key == name:
            return value
    raise AssertionError(f"no {name}= in {line!r}")


@pytest.fixture
def processes(tmp_path) -> Iterator[Callable]:
    """start(kind, *args): a mock ("mock", port) or an llmgw member ("agent"/"gateway", argv...); all are killed at
    the end of the test whatever happened."""
    started: list[MockProcess | MemberProcess] = []

    def start(kind: str, *args, name: str = ""):
        if kind == "mock":
            process: MockProcess | MemberProcess = MockProcess(tmp_path / f"{name or 'mock'}.log", *args)
        else:
            process = MemberProcess([sys.executable, "-m", "llmgw", kind, *args], tmp_path / f"{name or kind}.log",
                                    name=name or kind, cwd=ROOT)
            started.append(process)
            process.wait_ready(READY_TIMEOUT_S)
        if process not in started:
            started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.kill()


def start_agent(start: Callable, mock: MockProcess, *extra: str) -> tuple[MemberProcess, str, str]:
    """An agent for `mock`; returns (process, member id, gossip address)."""
    agent = start("agent", "--upstream", mock.url, "--kind", "vllm", "--gossip-config", "local",
                  "--log-level", "INFO", *extra, name=f"agent-{mock.port}")
    line = agent.ready()
    return agent, line.split()[2], ready_field(line, "gossip")


# ---- the agent on the mesh --------------------------------------------------------------------------------------
def test_agent_advertises_its_server_and_its_health_on_the_mesh(processes):
    mock = processes("mock", name="mock")
    agent, agent_id, gossip_address = start_agent(processes, mock)
    assert agent_id == f"agent-127.0.0.1:{mock.port}"  # the default id: derived from the URL

    async def scenario() -> None:
        observer = GossipNode("observer", seeds=[gossip_address], role="gateway", config=GossipConfig.local())
        await observer.start()
        try:
            async def advertised(predicate: Callable[[Backend], bool], timeout: float, what: str) -> Backend:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout
                while True:
                    member = observer.member(agent_id)
                    if member is not None and member.app_meta:
                        backend = decode_backend(member.app_meta)
                        if predicate(backend):
                            return backend
                    assert loop.time() < deadline, f"no advertisement {what} within {timeout} s"
                    await asyncio.sleep(0.01)

            first = await advertised(lambda b: b.health is HealthState.HEALTHY, 10.0, "of a healthy server")
            member = observer.member(agent_id)
            assert member.role == ROLE_UPSTREAM and member.state == "alive"
            assert first.base_url == mock.url and first.id == canonical_id(mock.url)
            assert first.models == (MODEL,)  # learnt from the mock's /v1/models: no --model given
            assert first.load is not None and first.load.running == 0  # read from its /metrics (kind vllm)

            mock.kill()
            killed_at = time.monotonic()
            await advertised(lambda b: b.health is HealthState.UNHEALTHY, OUT_OF_ROUTING_S, "of an unhealthy server")
            assert time.monotonic() - killed_at <= OUT_OF_ROUTING_S
            assert observer.member(agent_id).state == "alive"  # the agent lives on: the server is what is down

            again = processes("mock", mock.port, name="mock-again")
            assert again.port == mock.port
            back = await advertised(lambda b: b.health is HealthState.HEALTHY, OUT_OF_ROUTING_S,
                                    "of the restarted server, healthy")
            assert back.base_url == mock.url and back.models == (MODEL,)

            # SIGTERM: the agent leaves the mesh (gateways drop its server at once) and exits 0.
            status = await asyncio.to_thread(agent.stop, 15.0)
            assert status == 0, agent.log_tail()
            await advertised_gone(observer, agent_id)
        finally:
            await observer.stop()

    asyncio.run(asyncio.wait_for(scenario(), 90))


async def advertised_gone(observer: GossipNode, agent_id: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (member := observer.member(agent_id)) is not None and member.state not in ("left", "dead"):
        assert loop.time() < deadline, f"{agent_id} still {member.state} {timeout} s after it was stopped"
        await asyncio.sleep(0.02)


def test_bad_flags_are_clear_errors():
    cases = [
        ([], "--upstream URL is required"),
        (["--upstream", "ftp://host:1"], "must start with http:// or https://"),
        (["--upstream", "http://host:1", "--alias", "no-equals"], "--alias takes CLIENT_NAME=SERVER_NAME"),
        (["--upstream", "http://host:1", "--probe-interval", "0"], "--probe-interval must be > 0"),
        (["--upstream", "http://host:1", "--kind", "mystery"], "invalid choice: 'mystery'"),
        (["--upstream", "http://host:1", "--seeds", "nowhere"], "nowhere"),
    ]
    for args, fragment in cases:
        proc = subprocess.run([sys.executable, "-m", "llmgw", "agent", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
        assert fragment in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:  # a gossip port in use: exit 2, nothing left
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "llmgw", "agent", "--upstream", "http://host:1",
                               "--gossip-port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"agent: cannot bind gossip on 127.0.0.1:{port}" in proc.stderr, proc.stderr


def test_settings_come_from_the_config_file_and_environment(tmp_path, processes):
    mock = processes("mock", name="mock")
    path = tmp_path / "llmgw.toml"
    path.write_text(f'[agent]\nupstream = "{mock.url}"\nkind = "vllm"\nmodel = ["{MODEL}"]\n'
                    f'alias = ["short={MODEL}"]\ngossip-config = "local"\n')
    agent = MemberProcess([sys.executable, "-m", "llmgw", "agent", "--config", str(path)], tmp_path / "agent.log",
                          name="agent", cwd=ROOT, env={**os.environ, "LLMGW_AGENT_ID": "agent-from-env",
                                                  "LLMGW_AGENT_CAPACITY": "7"})
    try:
        agent.wait_ready(READY_TIMEOUT_S)
        agent_id, gossip_address = agent.ready().split()[2], ready_field(agent.ready(), "gossip")
        assert agent_id == "agent-from-env"

        async def scenario() -> Backend:
            observer = GossipNode("observer", seeds=[gossip_address], role="gateway", config=GossipConfig.local())
            await observer.start()
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10.0
                while (member := observer.member(agent_id)) is None or not member.app_meta:
                    assert loop.time() < deadline, "no advertisement within 10 s"
                    await asyncio.sleep(0.02)
                return decode_backend(member.app_meta)
            finally:
                await observer.stop()

        backend = asyncio.run(asyncio.wait_for(scenario(), 30))
        assert backend.capacity == 7 and backend.models == (MODEL,) and backend.aliases == (("short", MODEL),)
        assert backend.client_models() == (MODEL, "short")
    finally:
        agent.kill()


# ---- through a gateway ------------------------------------------------------------------------------------------
def test_gateway_stops_routing_to_a_killed_server_within_2_s_and_routes_to_it_again(processes):
    mock_a = processes("mock", name="mock-a")
    mock_b = processes("mock", name="mock-b")
    _, _, gossip_a = start_agent(processes, mock_a)
    _, _, gossip_b = start_agent(processes, mock_b)
    id_a, id_b = canonical_id(mock_a.url), canonical_id(mock_b.url)
    http_port = free_port("127.0.0.1")
    gateway = processes("gateway", "--id", "gateway-1", "--port", str(free_port("127.0.0.1")),
                        "--gossip-port", str(free_port("127.0.0.1", socket.SOCK_DGRAM)), "--gossip-config", "local",
                        "--http-port", str(http_port),
                        "--seeds", f"{gossip_a},{gossip_b}", "--log-level", "INFO", name="gateway")
    gateway_url = f"http://127.0.0.1:{http_port}"
    prompts = (f"prompt number {i}" for i in range(1_000_000))

    def served_by(server_id: str, timeout: float, what: str) -> int:
        """Send distinct prompts until `server_id` answers one (every request must succeed); how many it took."""
        sent = 0

        def one() -> bool:
            nonlocal sent
            sent += 1
            status, replica = complete(gateway_url, next(prompts))
            assert status == 200, (status, replica)
            return replica == server_id
        wait_until(one, timeout, interval=0, what=what, retry_on=())
        return sent

    # Both servers are learnt from their agents (the gateway has no --upstream) and both serve.
    wait_until(lambda: complete(gateway_url, "warm up")[0] == 200, 20.0, interval=0.02,
               what="the gateway to route to an agent's server", retry_on=())
    served_by(id_a, 10.0, "a request served by A")
    served_by(id_b, 10.0, "a request served by B")
    answered_a = sum(1 for _ in range(40) if complete(gateway_url, next(prompts)) == (200, id_a))
    assert answered_a > 0  # 40 prompts spread over two servers
    status, _, body = http_request(gateway_url, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == [MODEL]

    # Kill A; 2 s later nothing is routed to it. A recording listener on A's port from then on shows it: it sees
    # the agent's probes (so it is reachable where the gateway would go) but not one request.
    mock_a.kill()
    killed_at = time.monotonic()
    time.sleep(max(0.0, killed_at + OUT_OF_ROUTING_S - time.monotonic()))
    trap = RecordingListener(mock_a.port)
    try:
        answers = [complete(gateway_url, next(prompts)) for _ in range(60)]
        assert answers == [(200, id_b)] * 60
        wait_until(lambda: any(line.startswith("GET /health ") for line in trap.lines()), 3.0, interval=0.02,
                   what="the agent's probe to reach the listener", retry_on=())
        assert not [line for line in trap.lines() if not line.startswith("GET ")], trap.lines()
    finally:
        trap.close()
    assert gateway.alive(), gateway.log_tail()

    # A again on the same port: routed to again, and the requests it answered are exactly the ones it recorded.
    mock_a2 = processes("mock", mock_a.port, name="mock-a-again")
    served_by(id_a, 10.0, "the restarted A to be routed to again")
    answered_a = 1 + sum(1 for _ in range(40) if complete(gateway_url, next(prompts)) == (200, id_a))
    assert len(mock_a2.generation_requests()) == answered_a
