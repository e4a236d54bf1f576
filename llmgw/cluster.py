"""LocalCluster: a gateway and N simulated replicas on this machine, as supervised subprocesses.

    async with LocalCluster(ClusterConfig(replicas=3)) as cluster:
        print(cluster.grpc_address, cluster.http_url)
        await cluster.restart_replica("replica-2", "v2")   # same ports, new --model-version

Each member is `python -m llmgw gateway|replica ...` in its own session (process group), so a Ctrl-C in the
terminal reaches only the supervisor, which then stops the members in order, and so a member's own children
(gateway --workers) are stopped with it. stop() runs on every exit path: SIGTERM to each group, a bounded wait,
then SIGKILL; an atexit hook kills whatever is left if the event loop never got to stop() (a crash, a second
Ctrl-C). A member that dies unexpectedly is restarted on the same ports with exponential backoff unless
restart is off.

Members print one `READY ...` line once they serve; the supervisor reads their output (copied to one log file per
member in the log directory) to know when. The cluster is ready when the gateway's member table
(GatewayAdmin.Members) shows every replica ALIVE.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

from llmgw.topology import DEFAULT_PORTS, GOSSIP_PORT_OFFSET, gossip_port_for

log = logging.getLogger("llmgw.cluster")

# Members import the same llmgw as the supervisor, even when it is not installed (a source checkout).
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)

GATEWAY_ID = "gateway-1"
GOSSIP_CONFIGS = ("local", "lan", "wan")


class ClusterError(Exception):
    """The cluster could not be started, a member could not be (re)started, or it never became ready."""


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
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0  # unexpected deaths the supervisor restarted it after
    started_at: float = 0.0
    ready_line: str = ""
    log_path: Path | None = None
    # Set while the supervisor itself stops this member (restart_replica, stop): its exit is not a crash.
    expected_exit: bool = False
    _ready: asyncio.Future | None = None
    _reader: asyncio.Task | None = None
    _watcher: asyncio.Task | None = None
    _lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None:
            return ""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# pids of member process groups still running, across every LocalCluster in this process: the atexit hook kills
# them if the supervisor exits without stop() (an exception inside asyncio.run, a second Ctrl-C, sys.exit).
_LIVE_GROUPS: set[int] = set()


def _kill_leftover_groups() -> None:
    for pgid in list(_LIVE_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        _LIVE_GROUPS.discard(pgid)


atexit.register(_kill_leftover_groups)


def _open_log(path: Path) -> BinaryIO:
    return open(path, "ab")  # the caller closes it (a `with` on the returned file)


def free_port(host: str, kind: int = socket.SOCK_STREAM) -> int:
    """A port the OS calls free right now on `host` (TCP or UDP). Another process may take it before ours binds;
    the start path retries a member whose bind failed with fresh ports."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        argv = self._argv(member)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
            )
        except OSError as exc:
            raise ClusterError(f"cannot start {member.member_id} ({' '.join(argv)}): {exc}") from exc
        _LIVE_GROUPS.add(proc.pid)
        member.proc = proc
        member.started_at = time.monotonic()
        member.expected_exit = False
        member.ready_line = ""
        loop = asyncio.get_running_loop()
        member._ready = loop.create_future()
        # Mark its outcome retrieved: when start() is cancelled nobody awaits it, and asyncio would log the
        # "exited before it was ready" error as never retrieved.
        member._ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        member._reader = loop.create_task(self._read_output(member, proc, member._ready),
                                          name=f"llmgw-cluster-out-{member.member_id}")
        log.info("started %s pid %d: %s", member.member_id, proc.pid, " ".join(argv[1:]))
        try:
            async with asyncio.timeout(self.config.ready_timeout_s):
                member.ready_line = await asyncio.shield(member._ready)
        except (TimeoutError, ClusterError) as exc:
            await self._terminate(member)
            if isinstance(exc, ClusterError):
                raise
            raise ClusterError(f"{member.member_id} did not print READY within {self.config.ready_timeout_s:g} s; "
                               f"log {member.log_path}:\n{member.log_tail()}") from None
        member._watcher = loop.create_task(self._watch(member, proc), name=f"llmgw-cluster-watch-{member.member_id}")

    async def _read_output(self, member: Member, proc: asyncio.subprocess.Process, ready: asyncio.Future) -> None:
        """Copy the member's output to its log file (forever: a full pipe would block the child) and resolve
        `ready` on its READY line, or fail it when the process ends first."""
        # Line-sized writes to a local log file: not worth a thread hop each (they never block for long).
        out = await asyncio.to_thread(_open_log, self._log_dir() / f"{member.member_id}.log")
        stdout = proc.stdout
        if stdout is None:
            raise ClusterError(f"{member.member_id}: no output pipe")  # _spawn always asks for one
        with out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {proc.pid}\n".encode())
            out.flush()
            while True:
                try:
                    line = await stdout.readline()
                except (ValueError, asyncio.LimitOverrunError):  # a line over the stream limit: keep going
                    continue
                if not line:
                    break
                out.write(line)
                out.flush()
                if not ready.done() and line.startswith(b"READY "):
                    ready.set_result(line.decode(errors="replace").strip())
        rc = await proc.wait()
        if not ready.done():
            ready.set_exception(ClusterError(
                f"{member.member_id} exited with status {rc} before it was ready; log {member.log_path}:\n"
                f"{member.log_tail()}"))

    async def _watch(self, member: Member, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        _LIVE_GROUPS.discard(proc.pid)
        # The process group may still hold the member's own children; they go with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if self._stopping or member.expected_exit or member.proc is not proc:
            return
        ran = time.monotonic() - member.started_at
        log.warning("%s (pid %d) exited unexpectedly with status %s after %.1f s; log %s", member.member_id,
                    proc.pid, rc, ran, member.log_path)
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
        """SIGTERM the member's process group, wait (bounded), SIGKILL the group; always reaps the process."""
        proc = member.proc
        if proc is None:
            return
        member.expected_exit = True
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(self.config.stop_timeout_s):
                    await proc.wait()
            except TimeoutError:
                log.warning("%s (pid %d) ignored SIGTERM for %.1f s; killing it", member.member_id, proc.pid,
                            self.config.stop_timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers in its group, and the member if it ignored SIGTERM
        try:
            async with asyncio.timeout(5.0):
                await proc.wait()
        except TimeoutError:
            log.error("%s (pid %d) did not exit after SIGKILL", member.member_id, proc.pid)
            return
        _LIVE_GROUPS.discard(proc.pid)
        if member._reader is not None:
            try:  # the reader ends at EOF, which follows the exit of every holder of the pipe
                async with asyncio.timeout(2.0):
                    await member._reader
            except (TimeoutError, asyncio.CancelledError):
                member._reader.cancel()
            except ClusterError:
                pass

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
