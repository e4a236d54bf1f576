"""Local clusters: the one launcher of llmgw member processes, and LocalCluster, a supervised gateway + N replicas.

    async with LocalCluster(ClusterConfig(replicas=3)) as cluster:
        print(cluster.grpc_address, cluster.http_url)
        await cluster.restart_replica("replica-2", "v2")   # same ports, new --model-version

MemberProcess is the process layer that `llmgw cluster` (through LocalCluster) and the tests' multi-process
Cluster (tests/harness.py) share: each member is `python -m llmgw gateway|replica ...` in its own session (process
group), so a Ctrl-C in the terminal reaches only the supervisor, and a member's own children (gateway --workers)
are signalled with it. Its output goes straight to its log file; the one `READY ...` line it prints once it serves
is read from there. Stopping is SIGTERM to the group, a bounded wait, then SIGKILL of the group; an atexit hook
kills whatever is left if the supervisor never got to stop it (a crash, a second Ctrl-C).

LocalCluster starts the members on free or fixed ports, restarts a member that dies unexpectedly on the same
ports with exponential backoff (unless restart is off), and is ready when the gateway's member table
(GatewayAdmin.Members) shows every replica ALIVE.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmgw.topology import DEFAULT_PORTS, GOSSIP_PORT_OFFSET, gossip_port_for

log = logging.getLogger("llmgw.cluster")

# Members import the same llmgw as the supervisor, even when it is not installed (a source checkout).
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)

GATEWAY_ID = "gateway-1"
GOSSIP_CONFIGS = ("local", "lan", "wan")


class ClusterError(Exception):
    """The cluster could not be started, a member could not be (re)started, or it never became ready."""


# ---- the process layer: one member as a child process ---------------------------------------------------------------
READY_PREFIX = b"READY "
_READY_SCAN_LIMIT = 4096  # bytes of an unfinished line kept while looking for READY (the line is short)
_POLL_S = 0.02

# pids of member process groups still running, across every MemberProcess in this process: the atexit hook kills
# them if the supervisor exits without stopping them (an exception inside asyncio.run, a second Ctrl-C, sys.exit).
_LIVE_GROUPS: set[int] = set()


def kill_leftover_members() -> None:
    """SIGKILL every member process group this process started and has not stopped yet."""
    for pgid in list(_LIVE_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        _LIVE_GROUPS.discard(pgid)


atexit.register(kill_leftover_members)


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port the OS calls free right now on `host` (TCP, or UDP with kind=SOCK_DGRAM). Another process may take it
    before ours binds; LocalCluster retries a member whose bind failed with fresh ports."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def member_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A member's environment: `base` (default: ours) with unbuffered output and this llmgw first on the path, so
    members run the same code as their supervisor even from a source checkout."""
    env = dict(os.environ if base is None else base, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


class MemberProcess:
    """One child process (normally `python -m llmgw gateway|replica ...`), started by the constructor in its own
    session with its output appended to `log_path`.

    One life: restarted() starts a new process with the same argv (so the same ports) and log file. Only a READY
    line past where this life's output starts counts. Every wait is bounded, and stop()/kill() end with SIGKILL of
    the process group, so nothing the member started outlives it.
    """

    def __init__(self, argv: Sequence[str], log_path: Path | str, *, name: str | None = None,
                 env: Mapping[str, str] | None = None, cwd: Path | str | None = None) -> None:
        self.argv = [str(arg) for arg in argv]
        self.log_path = Path(log_path)
        self.name = name or shlex.join(self.argv[:4])  # for messages: `python -m llmgw replica`
        self._env, self._cwd = env, cwd
        self.ready_line = ""
        with open(self.log_path, "ab") as log:
            # Not the argv: it may hold a secret (--admin-token).
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}\n".encode())
            log.flush()
            # Where this life's output starts: the log of a member restarted under the same name is appended to.
            self.log_offset = log.tell()
            try:
                self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, env=member_env(env), cwd=cwd,
                                              start_new_session=True)
            except OSError as exc:
                raise ClusterError(f"cannot start {self.name} ({shlex.join(self.argv)}): {exc}") from exc
        _LIVE_GROUPS.add(self.popen.pid)
        self.started_at = time.monotonic()
        self._scan_pos = self.log_offset
        self._unfinished_line = b""

    def restarted(self) -> MemberProcess:
        """A new life of this member: same argv (ports included), same log file. This one must have exited."""
        if self.alive():
            raise ClusterError(f"{self.name} (pid {self.pid}) is still running; stop it before restarting it")
        return MemberProcess(self.argv, self.log_path, name=self.name, env=self._env, cwd=self._cwd)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ---- readiness ------------------------------------------------------------------------------------------------
    def ready(self) -> str:
        """This life's READY line once the member printed it, else "" (reads only what was appended since)."""
        if self.ready_line:
            return self.ready_line
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._scan_pos)
                chunk = log.read()
        except OSError:
            return ""
        self._scan_pos += len(chunk)
        lines = (self._unfinished_line + chunk).split(b"\n")
        self._unfinished_line = lines.pop()[:_READY_SCAN_LIMIT]
        for line in lines:
            if line.startswith(READY_PREFIX):
                self.ready_line = line.decode(errors="replace").strip()
                break
        return self.ready_line

    def _not_ready(self, deadline: float, timeout_s: float) -> ClusterError | None:
        """The error to raise while READY is missing: the member exited, or the wait's deadline passed."""
        if not self.alive():
            if self.ready():  # printed READY, then exited before we looked
                return None
            return ClusterError(f"{self.name} exited with status {self.returncode} before it was ready; "
                                f"log {self.log_path}:\n{self.log_tail()}")
        if time.monotonic() >= deadline:
            return ClusterError(f"{self.name} did not print READY within {timeout_s:g} s; log {self.log_path}:\n"
                                f"{self.log_tail()}")
        return None

    def wait_ready(self, timeout_s: float) -> str:
        """Block until this life's READY line (returned); ClusterError if the member exits first or `timeout_s`
        passes. The member is left running either way."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            error = self._not_ready(deadline, timeout_s)
            if error is not None:
                raise error
            time.sleep(_POLL_S)
        return self.ready_line

    async def wait_ready_async(self, timeout_s: float) -> str:
        """wait_ready for an event loop."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            error = self._not_ready(deadline, timeout_s)
            if error is not None:
                raise error
            await asyncio.sleep(_POLL_S)
        return self.ready_line

    # ---- signals ----------------------------------------------------------------------------------------------
    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def pause(self) -> None:
        """SIGSTOP the member's group: it keeps its sockets but answers nothing (a gray failure)."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def _terminate(self) -> None:
        self._signal_group(signal.SIGCONT)  # a paused member cannot act on SIGTERM
        self._signal_group(signal.SIGTERM)

    def _reaped_after_kill(self, rc: int | None) -> int | None:
        if rc is None:
            log.error("%s (pid %d) did not exit after SIGKILL", self.name, self.pid)
        else:
            _LIVE_GROUPS.discard(self.popen.pid)
        return rc

    def kill(self) -> int | None:
        """SIGKILL the group (the member vanishes without a word: no gossip leave) and reap it; its exit status."""
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5.0)
        return self._reaped_after_kill(self.popen.poll())

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM to the group (graceful: the member leaves gossip), up to `timeout_s` for it to exit, then SIGKILL
        of the group (stragglers, or a member that ignored SIGTERM). Returns the member's exit status."""
        if self.alive():
            self._terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.1f s; killing it", self.name, self.pid, timeout_s)
        return self.kill()

    async def wait_exit(self, timeout_s: float | None = None) -> int | None:
        """The exit status once the member exits (None if `timeout_s` passes first), for an event loop."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (rc := self.popen.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            await asyncio.sleep(_POLL_S * 2.5)
        return rc

    async def stop_async(self, timeout_s: float = 10.0) -> int | None:
        """stop() for an event loop."""
        if self.alive():
            self._terminate()
            if await self.wait_exit(timeout_s) is None:
                log.warning("%s (pid %d) ignored SIGTERM for %.1f s; killing it", self.name, self.pid, timeout_s)
        self._signal_group(signal.SIGKILL)
        return self._reaped_after_kill(await self.wait_exit(5.0))


@dataclasses.dataclass
class ClusterConfig:
    replicas: int = 3
    host: str = "127.0.0.1"
    # None: the well-known default ports (gateway 50051, replicas 50061...); 0: free ports picked at start;
    # P > 0: gateway on P, replica i (1-based) on P + i. Gossip ports follow llmgw.topology.gossip_port_for
    # except with 0 (also free).
    base_port: int | None = 0
    # None: 8080 with fixed ports, a free port with base_port=0; 0: no HTTP front; P > 0: that port.
    http_port: int | None = None
    token_delay_ms: float | None = None  # None: the replica's own default
    max_capacity: int | None = None
    model_version: str = "v1"
    gossip_config: str = "local"
    restart: bool = True  # restart members that die unexpectedly
    log_dir: str | None = None  # None: a fresh temporary directory (kept, so logs survive the cluster)
    log_level: str = "WARNING"  # the members' --log-level
    ready_timeout_s: float = 30.0
    stop_timeout_s: float = 10.0
    restart_backoff_s: float = 0.5  # first restart delay; doubles per quick death up to restart_backoff_max_s
    restart_backoff_max_s: float = 10.0
    stable_after_s: float = 30.0  # a member that ran this long gets the initial backoff again on its next death
    admin_token: str | None = None  # passed to the gateway's --admin-token when it has that flag
    # A Unix socket through which other processes (the gateway's rollout restart command) ask the supervisor to
    # restart a replica on a new version: "auto" = <log_dir>/control.sock, None = no control socket.
    control_socket: str | None = "auto"
    gateway_args: tuple[str, ...] = ()
    replica_args: tuple[str, ...] = ()
    python: str = sys.executable

    def validate(self) -> None:
        if not isinstance(self.replicas, int) or not 1 <= self.replicas <= 64:
            raise ValueError(f"replicas must be within 1..64, got {self.replicas!r}")
        if self.gossip_config not in GOSSIP_CONFIGS:
            raise ValueError(f"gossip_config must be one of {GOSSIP_CONFIGS}, got {self.gossip_config!r}")
        if not isinstance(self.model_version, str) or not self.model_version.strip():
            raise ValueError("model_version must be a non-empty string")
        if self.base_port is not None:
            if self.base_port < 0:
                raise ValueError(f"base_port must be >= 0, got {self.base_port}")
            highest = 65535 - GOSSIP_PORT_OFFSET - self.replicas
            if self.base_port > 0 and not 1024 <= self.base_port <= highest:
                raise ValueError(f"base_port must be within 1024..{highest} so that base_port + {self.replicas} + "
                                 f"{GOSSIP_PORT_OFFSET} (the last gossip port) is a port")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be within 0..65535, got {self.http_port}")
        if self.token_delay_ms is not None and not 0 <= self.token_delay_ms < 3_600_000:
            raise ValueError(f"token_delay_ms must be >= 0, got {self.token_delay_ms}")
        if self.max_capacity is not None and self.max_capacity < 1:
            raise ValueError(f"max_capacity must be >= 1, got {self.max_capacity}")
        for name in ("ready_timeout_s", "stop_timeout_s", "restart_backoff_s", "restart_backoff_max_s",
                     "stable_after_s"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclasses.dataclass
class Member:
    """One supervised process slot: its identity and ports stay, the process behind it may be replaced."""

    member_id: str
    role: str  # "gateway" | "replica"
    grpc_port: int
    gossip_port: int
    model_version: str = ""
    http_port: int = 0
    process: MemberProcess | None = None
    restarts: int = 0  # unexpected deaths the supervisor restarted it after
    started_at: float = 0.0
    ready_line: str = ""
    log_path: Path | None = None
    # Set while the supervisor itself stops this member (restart_replica, stop): its exit is not a crash.
    expected_exit: bool = False
    _watcher: asyncio.Task | None = None
    _lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.alive()

    def log_tail(self, lines: int = 20) -> str:
        return self.process.log_tail(lines) if self.process is not None else ""


class LocalCluster:
    """A gateway plus `replicas` simulated replicas as supervised subprocesses; see the module docstring."""

    def __init__(self, config: ClusterConfig | None = None, **overrides) -> None:
        config = dataclasses.replace(config or ClusterConfig(), **overrides)
        config.validate()
        self.config = config
        self.gateway: Member | None = None
        self.replicas: dict[str, Member] = {}
        self.log_dir = Path(config.log_dir) if config.log_dir else None
        self.http_enabled = False
        self._ephemeral = config.base_port == 0
        self._stopping = False
        self._started = False
        self._restart_tasks: set[asyncio.Task] = set()
        self._channel: Any = None  # grpc.aio channel to the gateway, for readiness checks (grpc imported late)
        self.control_path: Path | None = None
        self._control_server: asyncio.AbstractServer | None = None
        self.on_member_event: Callable[[str, str], None] | None = None  # (member_id, message), for the CLI

    def _gateway_member(self) -> Member:
        if self.gateway is None:
            raise ClusterError("the cluster has no gateway yet (start() allocates it)")
        return self.gateway

    def _log_dir(self) -> Path:
        if self.log_dir is None:
            raise ClusterError("the cluster has no log directory yet (start() creates it)")
        return self.log_dir

    # ---- addresses ----------------------------------------------------------------------------------------
    @property
    def grpc_address(self) -> str:
        return f"{self._url_host}:{self.gateway.grpc_port}" if self.gateway else ""

    @property
    def http_url(self) -> str | None:
        if not self.gateway or not self.http_enabled:
            return None
        return f"http://{self._url_host}:{self.gateway.http_port}"

    @property
    def _url_host(self) -> str:
        host = self.config.host
        return f"[{host}]" if ":" in host else host

    def replica_ids(self) -> list[str]:
        return list(self.replicas)

    def members(self) -> list[Member]:
        return ([self.gateway] if self.gateway else []) + list(self.replicas.values())

    def pids(self) -> dict[str, int]:
        """member id -> pid of its running process."""
        return {m.member_id: m.pid for m in self.members() if m.running and m.pid is not None}

    def gossip_address(self, member: Member) -> str:
        return f"{self._url_host}:{member.gossip_port}"

    # ---- lifecycle ----------------------------------------------------------------------------------------
    async def __aenter__(self) -> LocalCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the gateway and the replicas, then wait until the gateway sees every replica ALIVE.

        Raises ClusterError (after stopping whatever did start) when a member cannot start or readiness times out.
        """
        if self._started:
            raise ClusterError("a LocalCluster starts once")
        self._started = True
        cfg = self.config
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="llmgw-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Members run this same llmgw (see _spawn's PYTHONPATH), so the gateway has every flag we pass it.
        self.http_enabled = cfg.http_port != 0
        self._allocate_ports()
        try:
            await self._open_control()
            async with asyncio.timeout(cfg.ready_timeout_s):
                await self._start_member(self._gateway_member())
                await asyncio.gather(*(self._start_member(m) for m in self.replicas.values()))
                await self.wait_ready()
        except TimeoutError:
            await self.stop()
            raise ClusterError(f"the cluster was not ready within {cfg.ready_timeout_s:g} s "
                               f"(logs in {self.log_dir})") from None
        except BaseException:
            await self.stop()
            raise

    def _allocate_ports(self) -> None:
        cfg = self.config
        host = cfg.host
        if cfg.base_port is None:
            gw_grpc = DEFAULT_PORTS["gateway"]["grpc"]
            replica_grpc = [DEFAULT_PORTS["replica"]["grpc"] + i for i in range(cfg.replicas)]
        elif cfg.base_port == 0:
            gw_grpc = 0
            replica_grpc = [0] * cfg.replicas
        else:
            gw_grpc = cfg.base_port
            replica_grpc = [cfg.base_port + 1 + i for i in range(cfg.replicas)]

        def ports(grpc_port: int) -> tuple[int, int]:
            if grpc_port == 0:
                return free_port(host), free_port(host, socket.SOCK_DGRAM)
            return grpc_port, gossip_port_for(grpc_port)

        if cfg.http_port is None:
            http = free_port(host) if self._ephemeral else DEFAULT_PORTS["gateway"]["http"]
        else:
            http = cfg.http_port
        g, gg = ports(gw_grpc)
        self.gateway = Member(GATEWAY_ID, "gateway", g, gg, http_port=http)
        for i, port in enumerate(replica_grpc, start=1):
            rg, rgg = ports(port)
            rid = f"replica-{i}"
            self.replicas[rid] = Member(rid, "replica", rg, rgg, model_version=cfg.model_version)

    def _reallocate(self, member: Member) -> None:
        """Fresh free ports for a member whose ephemeral ports were taken between our check and its bind."""
        member.grpc_port = free_port(self.config.host)
        member.gossip_port = free_port(self.config.host, socket.SOCK_DGRAM)
        if member.role == "gateway" and self.http_enabled and self.config.http_port is None:
            member.http_port = free_port(self.config.host)

    def _argv(self, member: Member) -> list[str]:
        cfg = self.config
        common = ["--id", member.member_id, "--host", cfg.host, "--port", str(member.grpc_port),
                  "--gossip-port", str(member.gossip_port), "--gossip-config", cfg.gossip_config,
                  "--log-level", cfg.log_level]
        if member.role == "gateway":
            seeds = ",".join(self.gossip_address(r) for r in self.replicas.values())
            argv = ["gateway", *common, "--seeds", seeds]
            if self.http_enabled:
                argv += ["--http-port", str(member.http_port)]
            if cfg.admin_token:
                argv += ["--admin-token", cfg.admin_token]
            if self.control_path is not None:
                argv += ["--restart-command", self.restart_command_template()]
            argv += list(cfg.gateway_args)
        else:
            argv = ["replica", *common, "--seeds", self.gossip_address(self._gateway_member()),
                    "--model-version", member.model_version]
            if cfg.token_delay_ms is not None:
                argv += ["--token-delay-ms", f"{cfg.token_delay_ms:g}"]
            if cfg.max_capacity is not None:
                argv += ["--max-capacity", str(cfg.max_capacity)]
            argv += list(cfg.replica_args)
        return [cfg.python, "-m", "llmgw", *argv]

    async def _start_member(self, member: Member, attempts: int | None = None) -> None:
        """Spawn the member and wait for its READY line; with free ports, retry a lost port race with new ones."""
        attempts = attempts if attempts is not None else (3 if self._ephemeral else 1)
        for attempt in range(1, attempts + 1):
            try:
                await self._spawn(member)
                return
            except ClusterError:
                if attempt == attempts or self._stopping:
                    raise
                log.info("%s did not start (attempt %d); retrying on fresh ports", member.member_id, attempt)
                self._reallocate(member)

    async def _spawn(self, member: Member) -> None:
        if self._stopping:
            raise ClusterError("the cluster is stopping")
        member.log_path = self._log_dir() / f"{member.member_id}.log"
        argv = self._argv(member)
        process = MemberProcess(argv, member.log_path, name=member.member_id)
        member.process = process
        member.started_at = process.started_at
        member.expected_exit = False
        member.ready_line = ""
        log.info("started %s pid %d: %s", member.member_id, process.pid, " ".join(argv[1:]))
        try:
            member.ready_line = await process.wait_ready_async(self.config.ready_timeout_s)
        except ClusterError:
            await self._terminate(member)
            raise
        member._watcher = asyncio.get_running_loop().create_task(
            self._watch(member, process), name=f"llmgw-cluster-watch-{member.member_id}")

    async def _watch(self, member: Member, process: MemberProcess) -> None:
        rc = await process.wait_exit()
        # The process group may still hold the member's own children; they go with it.
        process.kill()
        if self._stopping or member.expected_exit or member.process is not process:
            return
        ran = time.monotonic() - member.started_at
        log.warning("%s (pid %d) exited unexpectedly with status %s after %.1f s; log %s", member.member_id,
                    process.pid, rc, ran, member.log_path)
        self._notify(member.member_id, f"exited unexpectedly with status {rc}")
        if not self.config.restart:
            return
        task = asyncio.get_running_loop().create_task(self._restart_after_crash(member, ran),
                                                      name=f"llmgw-cluster-restart-{member.member_id}")
        self._restart_tasks.add(task)
        task.add_done_callback(self._restart_tasks.discard)

    async def _restart_after_crash(self, member: Member, ran_s: float) -> None:
        cfg = self.config
        quick_deaths = 0 if ran_s >= cfg.stable_after_s else member.restarts
        while not self._stopping:
            delay = min(cfg.restart_backoff_s * (2 ** quick_deaths), cfg.restart_backoff_max_s)
            await asyncio.sleep(delay)
            async with member._lock:
                if self._stopping or member.running:
                    return
                try:
                    await self._spawn(member)
                except ClusterError as exc:
                    quick_deaths += 1
                    log.warning("restart of %s failed (%s); next try in %.1f s", member.member_id,
                                str(exc).splitlines()[0],
                                min(cfg.restart_backoff_s * (2 ** quick_deaths), cfg.restart_backoff_max_s))
                    continue
                member.restarts += 1
                self._notify(member.member_id, f"restarted (pid {member.pid}, restart #{member.restarts})")
                return

    def _notify(self, member_id: str, message: str) -> None:
        if self.on_member_event is not None:
            try:
                self.on_member_event(member_id, message)
            except Exception:  # a display callback must not break supervision
                log.exception("cluster member event callback failed")

    async def _terminate(self, member: Member) -> None:
        """Stop the member's process (SIGTERM to its group, bounded wait, SIGKILL of the group); always reaps it."""
        if member.process is None:
            return
        member.expected_exit = True
        await member.process.stop_async(self.config.stop_timeout_s)

    async def stop(self) -> None:
        """Stop every member (replicas and gateway together: SIGTERM, bounded wait, SIGKILL). Idempotent."""
        self._stopping = True
        await self._close_control()
        for task in list(self._restart_tasks):
            task.cancel()
        if self._restart_tasks:
            await asyncio.gather(*self._restart_tasks, return_exceptions=True)
        await asyncio.gather(*(self._terminate(m) for m in self.members()), return_exceptions=True)
        for member in self.members():
            if member._watcher is not None and not member._watcher.done():
                member._watcher.cancel()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    # ---- readiness and the member table ----------------------------------------------------------------------
    async def members_table(self, timeout_s: float = 2.0):
        """The gateway's GatewayAdmin.Members answer (llmgateway.MembersResponse)."""
        import grpc

        from llmgw._proto import llmgateway_pb2 as pb
        from llmgw._proto import llmgateway_pb2_grpc as pb_grpc

        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.grpc_address)
        return await pb_grpc.GatewayAdminStub(self._channel).Members(pb.MembersRequest(), timeout=timeout_s)

    async def wait_ready(self, timeout_s: float | None = None, *, versions: dict[str, str] | None = None) -> None:
        """Wait until the gateway sees every replica ALIVE (and on `versions[id]` where given)."""
        import grpc

        timeout_s = self.config.ready_timeout_s if timeout_s is None else timeout_s
        last = "no answer from the gateway yet"
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    try:
                        table = await self.members_table()
                        seen = {m.member_id: m for m in table.members}
                        missing = []
                        for rid in self.replicas:
                            m = seen.get(rid)
                            want = (versions or {}).get(rid)
                            if m is None or m.state.lower() != "alive" or (want and m.model_version != want):
                                missing.append(rid if m is None else f"{rid}={m.state}/{m.model_version}")
                        if not missing:
                            return
                        last = "waiting for " + ", ".join(missing)
                    except grpc.aio.AioRpcError as exc:
                        last = f"gateway: {exc.code().name}: {exc.details()}"
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise ClusterError(f"the gateway did not see every replica alive within {timeout_s:g} s ({last})") \
                from None

    # ---- restarts -------------------------------------------------------------------------------------------
    async def restart_replica(self, replica_id: str, model_version: str | None = None) -> None:
        """Stop the replica gracefully and start it again on the same ports, on `model_version` if given.

        Returns once the new process serves (READY); the rollout then waits for the gateway to see it rejoin.
        Raises ClusterError for an unknown id or a replica that does not come back.
        """
        member = self.replicas.get(replica_id)
        if member is None:
            raise ClusterError(f"no replica {replica_id!r} in this cluster (replicas: {', '.join(self.replicas)})")
        if model_version is not None and (not isinstance(model_version, str) or not model_version.strip()):
            raise ClusterError(f"model version must be a non-empty string, got {model_version!r}")
        if self._stopping:
            raise ClusterError("the cluster is stopping")
        async with member._lock:
            await self._terminate(member)
            if model_version is not None:
                member.model_version = model_version
            await self._spawn(member)
        log.info("%s restarted on %s (pid %d)", replica_id, member.model_version, member.pid)

    @property
    def restart_hook(self) -> Callable[[str, str], Awaitable[None]]:
        """An async (replica_id, new_version) hook for llmgw.rollout (RolloutTarget.restart)."""
        return self.restart_replica

    # ---- control socket: restarts requested by other processes ------------------------------------------------
    def restart_command_template(self) -> str:
        """A llmgw.rollout.CommandTemplateRestart template that restarts a replica of this cluster through its
        control socket (for a gateway-side rolling update: `gateway --restart-command TEMPLATE`)."""
        import shlex

        if self.control_path is None:
            raise ClusterError("this cluster has no control socket")

        def literal(text: str) -> str:  # str.format runs over the template: braces in paths must stay literal
            return shlex.quote(text).replace("{", "{{").replace("}", "}}")

        return (f"{literal(self.config.python)} -m llmgw cluster --control {literal(str(self.control_path))} "
                f"--restart-replica {{replica_id}} --model-version {{version}}")

    async def _open_control(self) -> None:
        setting = self.config.control_socket
        if setting is None:
            return
        path = self._log_dir() / "control.sock" if setting == "auto" else Path(setting)
        if len(str(path).encode()) > 100:  # sun_path holds 108 bytes
            log.warning("control socket path %s is too long for a Unix socket; rollout restarts through the "
                        "gateway are unavailable", path)
            return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old_umask = os.umask(0o177)  # owner-only from the first moment: whoever can connect can restart replicas
        try:
            self._control_server = await asyncio.start_unix_server(self._serve_control, path=str(path),
                                                                   limit=CONTROL_LINE_LIMIT)
        finally:
            os.umask(old_umask)
        self.control_path = path

    async def _close_control(self) -> None:
        server, self._control_server = self._control_server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await server.wait_closed()
            if self.control_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.control_path.unlink()

    async def _serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import json

        reply: dict
        try:
            async with asyncio.timeout(5.0):
                line = await reader.readline()
            request = json.loads(line)
            if not isinstance(request, dict) or request.get("op") != "restart_replica":
                raise ClusterError(f"unknown control request {line[:200]!r}; expected op=restart_replica")
            replica_id, version = request.get("replica_id"), request.get("version")
            if not isinstance(replica_id, str) or not (version is None or isinstance(version, str)):
                raise ClusterError("restart_replica needs a string replica_id and an optional string version")
            await self.restart_replica(replica_id, version)
            reply = {"ok": True, "pid": self.replicas[replica_id].pid}
        except (ClusterError, ValueError, asyncio.LimitOverrunError) as exc:
            reply = {"ok": False, "error": str(exc)}
        except TimeoutError:
            reply = {"ok": False, "error": "no request line within 5 s"}
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            async with asyncio.timeout(5.0):
                await writer.drain()
        except (OSError, TimeoutError):
            pass  # the asker left; the restart (if any) happened regardless
        finally:
            writer.close()


CONTROL_LINE_LIMIT = 64 * 1024


async def request_restart(control_path: str, replica_id: str, version: str | None, timeout_s: float = 120.0) -> int:
    """Ask the supervisor listening on `control_path` to restart `replica_id` (on `version`); returns the new
    pid. Raises ClusterError when the supervisor is unreachable, refuses, or does not answer within timeout_s."""
    import json

    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_unix_connection(control_path, limit=CONTROL_LINE_LIMIT)
            try:
                request = {"op": "restart_replica", "replica_id": replica_id, "version": version}
                writer.write(json.dumps(request).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        raise ClusterError(f"the cluster supervisor did not restart {replica_id} within {timeout_s:g} s") from None
    except OSError as exc:
        raise ClusterError(f"cannot reach the cluster supervisor at {control_path}: {exc}") from None
    try:
        reply = json.loads(line)
    except ValueError:
        raise ClusterError(f"the cluster supervisor answered {line[:200]!r}, not JSON") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        error = reply.get("error") if isinstance(reply, dict) else reply
        raise ClusterError(f"the cluster supervisor could not restart {replica_id}: {error}")
    return int(reply.get("pid") or 0)
