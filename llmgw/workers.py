"""One gateway as several worker processes (``gateway --workers N``): one /metrics, admin actions on all workers.

The workers share the HTTP and gRPC ports (SO_REUSEPORT), so a scrape or an admin call reaches whichever worker
the kernel picks. Two things make that worker answer for the whole group:

- **Metrics**: prometheus-client's multiprocess mode. The supervisor (:class:`WorkerGroup`) creates a private
  directory and sets ``PROMETHEUS_MULTIPROC_DIR`` in every worker's environment before it starts; each worker's
  values live in files there and any worker's /metrics aggregates all of them (llmgw.metrics: merge rule per
  gauge in ``GAUGE_MERGE_RULES``). What a single process would read at scrape time is copied into the files by
  :class:`MetricsPublisher` every ``interval_s`` (default 1 s) in every worker. When a worker dies the supervisor
  calls :meth:`WorkerGroup.worker_exited`, which drops its live gauges (its counters stay: totals never go back).
- **Admin**: every worker listens on its own Unix socket in the same directory (:class:`WorkerBus`, one JSON line
  per request and per reply). The drain set lives in a shared file, the one truth (:class:`SharedDrains`): the
  worker receiving a drain/undrain writes the file under a lock, applies it, and pokes its siblings, which
  reload the file and answer with the version they applied, so the HTTP answer can say which workers have it.
  A worker (re)started later loads the file, and every worker re-reads it every ``resync_s`` in case a poke was
  lost. A rolling update runs in exactly one worker (:class:`WorkerRollouts`: a lock file held while it runs;
  its drains go through the shared drain set), and its status and abort are relayed from any worker.

Why sockets and a file rather than one of them: a poke alone loses state for a worker that restarts, a watched
file alone cannot confirm that every worker applied a change; a per-worker loopback TCP port would need port
allocation and authentication, while the directory (mode 0700) limits the sockets to the gateway's own user.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

__all__ = [
    "WORKER_COUNT_ENV",
    "WORKER_DIR_ENV",
    "WORKER_INDEX_ENV",
    "FanOut",
    "MetricsPublisher",
    "RolloutElsewhere",
    "SharedDrains",
    "WorkerBus",
    "WorkerCallError",
    "WorkerGroup",
    "WorkerInfo",
    "WorkerRollouts",
    "child_environment",
]

log = logging.getLogger("llmgw.workers")

WORKER_DIR_ENV = "LLMGW_WORKER_DIR"
WORKER_INDEX_ENV = "LLMGW_WORKER_INDEX"
WORKER_COUNT_ENV = "LLMGW_WORKERS"
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # = llmgw.metrics.MULTIPROC_DIR_ENV (no prometheus import here)
MAX_MESSAGE = 1 << 20  # one admin request or reply; a rollout status is a few KiB
DEFAULT_TIMEOUT_S = 5.0
# How long a relayed rollout abort may take: the controller's own bound (15 s) and some margin.
ROLLOUT_ABORT_WAIT_S = 20.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a process a worker starts (a restart hook, say): without the worker variables, so
    that it neither writes its metrics into the gateway's files nor believes it is a worker."""
    env = dict(os.environ if environ is None else environ)
    for name in (MULTIPROC_DIR_ENV, WORKER_DIR_ENV, WORKER_INDEX_ENV, WORKER_COUNT_ENV):
        env.pop(name, None)
    return env


# --------------------------------------------------------------------------------------------------------------
# Supervisor side


class WorkerGroup:
    """The supervisor's part: the shared directory, each worker's environment, bookkeeping of dead workers.

    ``WorkerGroup(n)`` creates a fresh private directory (under ``base_dir`` or the system temp dir) with
    ``metrics/`` (PROMETHEUS_MULTIPROC_DIR, which must start empty) and the admin sockets and state files;
    :meth:`close` removes it. Use as a context manager around the workers' lifetime."""

    def __init__(self, workers: int, base_dir: str | None = None) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be a positive integer, not {workers!r}")
        self.workers = workers
        self.directory = tempfile.mkdtemp(prefix="llmgw-workers-", dir=base_dir)  # mode 0700
        self.metrics_dir = os.path.join(self.directory, "metrics")
        os.mkdir(self.metrics_dir, 0o700)

    def env(self, index: int) -> dict[str, str]:
        """Variables to add to worker ``index``'s environment (before it imports anything)."""
        if not 0 <= index < self.workers:
            raise ValueError(f"worker index {index} out of range 0..{self.workers - 1}")
        return {MULTIPROC_DIR_ENV: self.metrics_dir, WORKER_DIR_ENV: self.directory,
                WORKER_INDEX_ENV: str(index), WORKER_COUNT_ENV: str(self.workers)}

    def worker_exited(self, pid: int) -> None:
        """A worker process ended: drop its live gauges (in-flight, queue depth, breaker and gossip states) from
        the aggregate. Counters and histograms keep its contribution. Call before starting a replacement."""
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, self.metrics_dir)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------
# Worker side


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """Which worker this process is, and where the group's directory is."""

    index: int
    count: int
    directory: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerInfo | None:
        """This worker's info from the variables WorkerGroup.env set, or None in a single-process gateway.
        Inconsistent values are a ValueError naming the variable."""
        env = os.environ if environ is None else environ
        directory = env.get(WORKER_DIR_ENV)
        if not directory:
            return None
        try:
            index, count = int(env.get(WORKER_INDEX_ENV, "")), int(env.get(WORKER_COUNT_ENV, ""))
        except ValueError:
            raise ValueError(f"{WORKER_INDEX_ENV} and {WORKER_COUNT_ENV} must be integers when {WORKER_DIR_ENV} "
                             "is set") from None
        if not 0 <= index < count:
            raise ValueError(f"{WORKER_INDEX_ENV}={index} is not within 0..{WORKER_COUNT_ENV}-1 ({count - 1})")
        if not os.path.isdir(directory):
            raise ValueError(f"{WORKER_DIR_ENV}={directory!r} is not a directory")
        return cls(index, count, directory)

    def socket_path(self, index: int) -> str:
        return os.path.join(self.directory, f"worker-{index}.sock")

    @property
    def siblings(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]


class WorkerCallError(Exception):
    """A sibling did not answer (not running, timed out) or answered with an error."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"worker {index}: {message}")
        self.index = index
        self.message = message


class WorkerBus:
    """Requests between the workers of a group over Unix sockets: ``handle(command, handler)`` serves a
    command (``await handler(payload) -> dict``), ``call``/``broadcast`` ask the siblings. Each call is one
    connection, one JSON line each way, bounded in size and time."""

    def __init__(self, info: WorkerInfo, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0")
        self.info = info
        self.timeout_s = timeout_s
        self._handlers: dict[str, tuple[Handler, float]] = {}
        self._server: asyncio.AbstractServer | None = None

    def handle(self, command: str, handler: Handler, *, timeout_s: float | None = None) -> None:
        """Serve ``command``; the handler gets ``timeout_s`` (default: the bus's) before the caller gets an
        error."""
        self._handlers[command] = (handler, self.timeout_s if timeout_s is None else timeout_s)

    async def start(self) -> None:
        path = self.info.socket_path(self.info.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a previous worker with this index that died
        self._server = await asyncio.start_unix_server(self._serve, path, limit=MAX_MESSAGE)
        os.chmod(path, 0o600)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), self.timeout_s)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.info.socket_path(self.info.index))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), self.timeout_s)
                request = json.loads(line)
                command, payload = request["command"], request.get("payload") or {}
                if not isinstance(command, str) or not isinstance(payload, dict):
                    raise TypeError("command must be a string and payload an object")
            except (ValueError, KeyError, TypeError, TimeoutError) as exc:  # ValueError: bad JSON or overlong line
                reply: dict[str, Any] = {"ok": False, "error": f"bad request: {exc or type(exc).__name__}"}
            else:
                entry = self._handlers.get(command)
                if entry is None:
                    reply = {"ok": False, "error": f"unknown command {command!r}"}
                else:
                    handler, limit = entry
                    try:
                        reply = {"ok": True, "result": await asyncio.wait_for(handler(payload), limit)}
                    except Exception as exc:  # the caller gets the error; this worker goes on serving
                        log.warning("worker command %s failed", command, exc_info=True)
                        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), self.timeout_s)
        except (ConnectionError, TimeoutError):
            pass  # the caller went away; it has its own timeout
        finally:
            writer.close()

    async def call(self, index: int, command: str, payload: Mapping[str, Any] | None = None,
                   timeout_s: float | None = None) -> dict[str, Any]:
        """Worker ``index``'s result for ``command``; WorkerCallError when it cannot be had in time."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(self.info.socket_path(index),
                                                                    limit=MAX_MESSAGE)
                writer.write(json.dumps({"command": command, "payload": dict(payload or {}),
                                         "from": self.info.index}).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
        except TimeoutError:
            raise WorkerCallError(index, f"no answer to {command} within {timeout:g} s") from None
        except (OSError, ValueError) as exc:  # not listening (not started, gone), or an overlong reply
            raise WorkerCallError(index, f"unreachable: {exc}") from None
        finally:
            if writer is not None:
                writer.close()
        try:
            reply = json.loads(line)
        except ValueError:
            raise WorkerCallError(index, "answered with something that is not JSON") from None
        if not isinstance(reply, dict):
            raise WorkerCallError(index, "answered with something that is not a JSON object")
        if not reply.get("ok"):
            raise WorkerCallError(index, str(reply.get("error", "failed")))
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    async def broadcast(self, command: str, payload: Mapping[str, Any] | None = None,
                        timeout_s: float | None = None) -> dict[int, dict[str, Any] | WorkerCallError]:
        """Every sibling's result (or its WorkerCallError), asked concurrently."""
        siblings = self.info.siblings

        async def one(index: int) -> dict[str, Any] | WorkerCallError:
            try:
                return await self.call(index, command, payload, timeout_s)
            except WorkerCallError as exc:
                return exc

        results = await asyncio.gather(*(one(i) for i in siblings))
        return dict(zip(siblings, results, strict=True))


# --------------------------------------------------------------------------------------------------------------
# Metrics


class MetricsPublisher:
    """Runs ``metrics.refresh()`` (llmgw.metrics: the on_scrape refreshers) every ``interval_s`` on the event
    loop, so that in multiprocess mode this worker's scrape-time values reach the shared files even when the
    scrape lands on another worker. ``start()`` on the running loop, ``await close()`` at shutdown."""

    def __init__(self, metrics: Any, interval_s: float = 1.0) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        self.metrics = metrics
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="llmgw-metrics-publisher")

    async def _run(self) -> None:
        while True:
            self.metrics.refresh()  # logs and skips a failing refresher itself
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --------------------------------------------------------------------------------------------------------------
# Drains


@dataclasses.dataclass(frozen=True)
class FanOut:
    """How a change reached the group: the state version it made, and per worker "applied" or the error."""

    version: int
    workers: dict[int, str]

    @property
    def complete(self) -> bool:
        return all(state == "applied" for state in self.workers.values())

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "complete": self.complete,
                "workers": {str(i): state for i, state in sorted(self.workers.items())}}


class SharedDrains:
    """A worker's drain set (``local``: drain(id), undrain(id), drained, excluded(), e.g. a RoutingDrains)
    kept equal in every worker of the group, through the state file ``drains.json`` in the group directory.

    It stands in for ``local`` wherever a drain set is used (the rollout controller, the admin API): drain()
    and undrain() apply here at once and reach the siblings within a poke; the ``*_everywhere`` forms wait
    for every sibling and say which applied. ``await start()`` before serving: it loads the current state."""

    def __init__(self, local: Any, bus: WorkerBus, *, resync_s: float = 2.0) -> None:
        if not resync_s > 0:
            raise ValueError("resync_s must be > 0")
        self.local = local
        self.bus = bus
        self.resync_s = resync_s
        self.path = os.path.join(bus.info.directory, "drains.json")
        self._lock_path = os.path.join(bus.info.directory, "drains.lock")
        self.version = 0  # of the state applied here
        self._task: asyncio.Task[None] | None = None
        self._pokes: set[asyncio.Task[Any]] = set()

    # ---- the drain-set interface ---------------------------------------------------------------------------
    @property
    def drained(self) -> set[str]:
        drained: set[str] = self.local.drained
        return drained

    def excluded(self) -> set[str]:
        excluded: set[str] = self.local.excluded()
        return excluded

    def drain(self, replica_id: str) -> None:
        self._poke(self._change(replica_id, True))

    def undrain(self, replica_id: str) -> None:
        self._poke(self._change(replica_id, False))

    async def drain_everywhere(self, replica_id: str, timeout_s: float | None = None) -> FanOut:
        return await self.propagate(self._change(replica_id, True), timeout_s)

    async def undrain_everywhere(self, replica_id: str, timeout_s: float | None = None) -> FanOut:
        return await self.propagate(self._change(replica_id, False), timeout_s)

    # ---- the shared state ----------------------------------------------------------------------------------
    def _read(self) -> tuple[int, set[str]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                state = json.load(f)
        except FileNotFoundError:
            return 0, set()
        version, drained = state.get("version"), state.get("drained")
        if not isinstance(version, int) or not isinstance(drained, list) or \
                not all(isinstance(r, str) for r in drained):
            raise ValueError(f"{self.path}: not a drain state ({{'version': int, 'drained': [str]}})")
        return version, set(drained)

    def _change(self, replica_id: str, drained: bool) -> int:
        """Write the new state (under the group's lock, atomically), apply it here, return its version."""
        if not isinstance(replica_id, str) or not replica_id:
            raise ValueError("replica_id must be a non-empty string")
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held for a read and a small write: microseconds
            version, current = self._read()
            if drained:
                current.add(replica_id)
            else:
                current.discard(replica_id)
            version += 1
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"version": version, "drained": sorted(current)}, f)
            os.replace(tmp, self.path)
        self._apply(version, current)
        return version

    def _apply(self, version: int, drained: set[str]) -> None:
        local = self.local
        for replica_id in drained - set(local.drained):
            local.drain(replica_id)
        for replica_id in set(local.drained) - drained:
            local.undrain(replica_id)
        self.version = version

    def sync(self) -> int:
        """Apply the state file if it is newer than what this worker applied; returns the applied version."""
        version, drained = self._read()
        if version != self.version:
            self._apply(version, drained)
        return self.version

    async def propagate(self, version: int, timeout_s: float | None = None) -> FanOut:
        """Poke the siblings and wait until each applied ``version`` (or later), failed or timed out."""
        workers = {self.bus.info.index: "applied"}
        replies = await self.bus.broadcast("drains.sync", {"version": version}, timeout_s)
        for index, reply in replies.items():
            if isinstance(reply, WorkerCallError):
                workers[index] = reply.message
            elif isinstance(reply.get("version"), int) and reply["version"] >= version:
                workers[index] = "applied"
            else:
                workers[index] = f"still at version {reply.get('version')}"
        fan_out = FanOut(version, workers)
        if not fan_out.complete:
            log.warning("drain state %d not applied by every worker: %s", version, fan_out.workers)
        return fan_out

    def _poke(self, version: int) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a sync caller): the siblings' resync picks it up
        task = loop.create_task(self.propagate(version))
        self._pokes.add(task)
        task.add_done_callback(self._pokes.discard)

    async def _on_sync(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"version": self.sync(), "drained": sorted(self.drained)}

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_s)
            try:
                self.sync()
            except (OSError, ValueError):
                log.warning("cannot read the shared drain state", exc_info=True)

    async def start(self) -> None:
        """Register with the bus, apply the current state, resync every ``resync_s`` (a missed poke)."""
        self.bus.handle("drains.sync", self._on_sync)
        self.sync()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._resync(), name="llmgw-drains-resync")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._pokes) if t is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --------------------------------------------------------------------------------------------------------------
# Rolling updates


class RolloutElsewhere(Exception):
    """A rolling update is already running in another worker of this gateway."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class WorkerRollouts:
    """One worker's RolloutController (start, start_watched, running, rollout, abort) made group-wide: at most
    one rolling update runs in the whole group (the worker running it holds ``rollout.lock``; the kernel
    releases it if the worker dies), and status and abort work from any worker. The controller must be built
    on the worker's SharedDrains so that the update's drains reach every worker."""

    def __init__(self, controller: Any, bus: WorkerBus, *, poll_s: float = 0.2) -> None:
        self.controller = controller
        self.bus = bus
        self.poll_s = poll_s
        self._lock_path = os.path.join(bus.info.directory, "rollout.lock")
        self._lease: Any = None
        self._watcher: asyncio.Task[None] | None = None

    def _acquire(self) -> None:
        lease = open(self._lock_path, "a")  # noqa: SIM115 - held open for as long as the update runs
        try:
            fcntl.flock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lease.close()
            raise RolloutElsewhere("a rolling update is already running in another worker of this gateway"
                                   ) from None
        self._lease = lease

    def _release(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.close()  # closing the file drops the lock

    async def _release_when_done(self) -> None:
        try:
            while self.controller.running:
                await asyncio.sleep(self.poll_s)
        finally:
            self._release()

    def _launched(self, start: Callable[[], Any]) -> Any:
        if self._lease is None:
            self._acquire()
        try:
            result = start()
        except BaseException:
            if not self.controller.running:
                self._release()
            raise
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._release_when_done())
        return result

    def start(self, version: str, **options: Any) -> Any:
        """Like RolloutController.start; RolloutElsewhere when another worker runs one (and the controller's own
        refusals as they are)."""
        return self._launched(lambda: self.controller.start(version, **options))

    def start_watched(self, version: str, **options: Any) -> Any:
        return self._launched(lambda: self.controller.start_watched(version, **options))

    def _local_status(self) -> dict[str, Any] | None:
        rollout = self.controller.rollout
        if rollout is None:
            return None
        status: dict[str, Any] = rollout.status.to_dict()
        return {**status, "worker": self.bus.info.index, "running": bool(self.controller.running)}

    async def status(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The running update wherever it runs, else this worker's last one, else a sibling's last; None if no
        worker ever ran one. The dict is the rollout status plus ``worker`` and ``running``."""
        local = self._local_status()
        if local is not None and local["running"]:
            return local
        found = [r for r in (await self.bus.broadcast("rollout.status", None, timeout_s)).values()
                 if not isinstance(r, WorkerCallError) and r.get("status")]
        running = [r["status"] for r in found if r["status"].get("running")]
        if running:
            status: dict[str, Any] = running[0]
            return status
        if local is not None:
            return local
        return found[0]["status"] if found else None

    async def abort(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """Abort the running update wherever it runs (RolloutController.abort there); its status after, or
        None when none runs. TimeoutError if it did not stop in time."""
        if self.controller.running:
            if timeout_s is None:
                await self.controller.abort()
            else:
                await self.controller.abort(timeout_s)
            return self._local_status()
        wait = (ROLLOUT_ABORT_WAIT_S if timeout_s is None else timeout_s) + 1.0
        for reply in (await self.bus.broadcast("rollout.abort", {"timeout_s": timeout_s}, wait)).values():
            if isinstance(reply, WorkerCallError):
                if "TimeoutError" in reply.message:
                    raise TimeoutError(reply.message)
                continue
            if reply.get("aborted"):
                status: dict[str, Any] = reply["status"]
                return status
        return None

    async def _on_status(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"status": self._local_status()}

    async def _on_abort(self, payload: dict[str, Any]) -> dict[str, Any]:
        if not self.controller.running:
            return {"aborted": False}
        timeout_s = payload.get("timeout_s")
        if isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and timeout_s > 0:
            await self.controller.abort(float(timeout_s))
        else:
            await self.controller.abort()
        return {"aborted": True, "status": self._local_status()}

    def register(self) -> None:
        """Serve status and abort requests from the siblings (before the bus starts serving)."""
        self.bus.handle("rollout.status", self._on_status)
        self.bus.handle("rollout.abort", self._on_abort, timeout_s=ROLLOUT_ABORT_WAIT_S)

    async def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        self._release()
