"""Rolling update orchestration: one replica at a time, routing restored on any failure.

Per replica, in the target's order:
  1. note its incarnation (skip it if it is already ALIVE on the new version),
  2. drain it in routing (no new requests go to it),
  3. Drain RPC (the replica finishes its in-flight streams),
  4. restart hook,
  5. wait until membership shows it ALIVE with the new model version and an incarnation newer than noted,
  6. undrain it in routing.
Any error, timeout or cancel aborts: the replica drained in routing is undrained (replicas already done were
undrained in their own step 6), the failure is reported, replicas after it are left untouched. Every await on the
target is bounded by a timeout, so a hung target cannot hang the rollout. (asyncio.timeout, not wait_for: on
Python 3.11 wait_for swallows a cancel that lands as the inner call completes, and a cancel must never be lost.)

This module only orchestrates; the gateway implements RolloutTarget (routing, RPCs, membership) and
CommandTemplateRestart is a ready-made restart hook that runs a shell command template.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import string
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol, TypeVar

log = logging.getLogger("llmgw.rollout")
_T = TypeVar("_T")

# Rollout states.
PENDING = "pending"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
ABORTED = "aborted"  # cancelled by the operator
FINAL_STATES = (SUCCEEDED, FAILED, ABORTED)

# Per-replica steps, in order; a replica ends in STEP_DONE, STEP_SKIPPED or STEP_FAILED (or stays STEP_PENDING).
STEP_PENDING = "pending"
STEP_DRAIN_ROUTING = "drain_routing"
STEP_DRAIN_RPC = "drain_rpc"
STEP_RESTART = "restart"
STEP_REJOIN = "rejoin"
STEP_UNDRAIN = "undrain"
STEP_DONE = "done"
STEP_SKIPPED = "skipped"
STEP_FAILED = "failed"


class RolloutTarget(Protocol):
    """What the orchestrator needs from a running gateway (or a local cluster, or a test double)."""

    def replicas(self) -> list[str]:
        """Replica ids in update order."""

    async def drain_in_routing(self, replica_id: str) -> None:
        """Stop routing new requests to the replica."""

    async def undrain_in_routing(self, replica_id: str) -> None:
        """Route to the replica again."""

    async def drain_rpc(self, replica_id: str, timeout_s: float) -> bool:
        """The replica's Drain RPC: True once its in-flight streams finished."""

    async def restart(self, replica_id: str, new_version: str) -> None:
        """Restart the replica on the new model version (raise on failure)."""

    def member_info(self, replica_id: str) -> tuple[str, str, int] | None:
        """(membership state, model version, incarnation) as gossip sees it now, or None if unknown."""


class RolloutError(Exception):
    """A step of the rollout failed; the message says which replica, which step and why."""


@dataclass
class ReplicaProgress:
    replica_id: str
    step: str = STEP_PENDING
    old_incarnation: int | None = None
    new_incarnation: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    step_seconds: dict[str, float] = field(default_factory=dict)  # step -> how long it took
    error: str | None = None


@dataclass
class RolloutStatus:
    new_version: str
    state: str = PENDING
    total: int = 0
    index: int = -1  # position of the current (or last handled) replica; -1 before the first
    current_replica: str | None = None
    failed_replica: str | None = None
    error: str | None = None
    restored: bool | None = None  # after an abort: was routing restored (the drained replica undrained)?
    started_at: float | None = None
    finished_at: float | None = None
    replicas: list[ReplicaProgress] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RolloutEvent:
    """One progress event. kind: started | step | replica_done | replica_skipped | restore | finished."""

    kind: str
    at: float
    replica_id: str | None = None
    step: str | None = None
    detail: str = ""
    state: str = RUNNING


EventCallback = Callable[[RolloutEvent], None]
_END = object()  # sentinel closing subscriber queues


class Rollout:
    """One rolling update of every replica the target lists to `new_version`. Run it once with run()."""

    def __init__(
        self,
        target: RolloutTarget,
        new_version: str,
        *,
        drain_timeout_s: float = 30.0,
        rejoin_timeout_s: float = 60.0,
        restart_timeout_s: float = 120.0,
        routing_timeout_s: float = 10.0,
        poll_s: float = 0.2,
        skip_up_to_date: bool = True,
        require_another_alive: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_event: EventCallback | None = None,
    ) -> None:
        if not isinstance(new_version, str) or not new_version.strip():
            raise ValueError(f"new_version must be a non-empty string, got {new_version!r}")
        for name, value in (
            ("drain_timeout_s", drain_timeout_s),
            ("rejoin_timeout_s", rejoin_timeout_s),
            ("restart_timeout_s", restart_timeout_s),
            ("routing_timeout_s", routing_timeout_s),
            ("poll_s", poll_s),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        self.target = target
        self.new_version = new_version
        self.drain_timeout_s = float(drain_timeout_s)
        self.rejoin_timeout_s = float(rejoin_timeout_s)
        self.restart_timeout_s = float(restart_timeout_s)
        self.routing_timeout_s = float(routing_timeout_s)
        self.poll_s = float(poll_s)
        self.skip_up_to_date = skip_up_to_date
        # Draining the only live replica would leave clients nothing to be served by; refuse unless told otherwise.
        self.require_another_alive = require_another_alive
        self._clock = clock
        self._sleep = sleep
        self._on_event = on_event
        self.status = RolloutStatus(new_version=new_version)
        self._subscribers: list[asyncio.Queue] = []
        self._task: asyncio.Task | None = None
        self._cancel_requested = False
        self._drained: str | None = None  # the replica currently drained in routing, to undrain on abort

    # ---- public API -------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.status.state in FINAL_STATES

    def cancel(self) -> None:
        """Abort the rollout: the current step is interrupted, routing restored, state becomes "aborted"."""
        if self.done or self._cancel_requested:
            return
        self._cancel_requested = True
        if self._task is not None:
            self._task.cancel()

    async def events(self) -> AsyncIterator[RolloutEvent]:
        """Progress events from now until the rollout ends (the final "finished" event included)."""
        queue: asyncio.Queue = asyncio.Queue()
        if self.done:
            return
        self._subscribers.append(queue)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                yield item
        finally:
            if queue in self._subscribers:
                self._subscribers.remove(queue)

    async def run(self) -> RolloutStatus:
        """Run the rolling update to its end and return the final status (never raises for a failed step).

        If the task running this is cancelled from outside (not through cancel()), routing is restored and the
        CancelledError propagates.
        """
        if self._task is not None or self.status.state != PENDING:
            raise RuntimeError("a Rollout runs once; create a new one")
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Rollout.run() must run in an asyncio task")
        self._task = task
        status = self.status
        status.state = RUNNING
        status.started_at = self._clock()
        try:
            replica_ids = list(self.target.replicas())
            if len(set(replica_ids)) != len(replica_ids):
                raise RolloutError(f"target listed duplicate replicas: {replica_ids}")
            status.replicas = [ReplicaProgress(rid) for rid in replica_ids]
            status.total = len(replica_ids)
            self._emit("started", detail=f"{len(replica_ids)} replicas to {self.new_version}")
            if self._cancel_requested:
                raise asyncio.CancelledError
            for index, progress in enumerate(status.replicas):
                status.index = index
                status.current_replica = progress.replica_id
                await self._update_one(progress)
            status.current_replica = None
            self._finish(SUCCEEDED)
        except asyncio.CancelledError:
            if self._cancel_requested:
                # Our own cancel(): absorb it so the restore below and the caller's await proceed normally.
                task.uncancel()
                await self._abort(None, ABORTED)
            else:
                await self._abort("cancelled", ABORTED)
                raise
        except Exception as exc:  # every failure mode ends as a reported, restored FAILED rollout
            if not isinstance(exc, RolloutError):
                log.exception("rollout: unexpected error")
            await self._abort(str(exc) or type(exc).__name__, FAILED)
        return status

    # ---- one replica ------------------------------------------------------------------------------------------
    async def _update_one(self, progress: ReplicaProgress) -> None:
        rid = progress.replica_id
        progress.started_at = self._clock()
        info = self._member_info(rid)
        if info is not None:
            progress.old_incarnation = info[2]
        if self.skip_up_to_date and info is not None and _is_alive(info[0]) and info[1] == self.new_version:
            progress.step = STEP_SKIPPED
            progress.finished_at = self._clock()
            self._emit("replica_skipped", rid, STEP_SKIPPED, f"already alive on {self.new_version}")
            return
        if self.require_another_alive and not self._another_alive(rid):
            raise self._fail(progress, f"no other replica is alive to serve while {rid} restarts")
        # None = it was not a member when we looked: any incarnation it rejoins with is "newer".
        baseline = progress.old_incarnation if progress.old_incarnation is not None else -1

        # Marked before the call: a drain that fails or times out may still have taken effect, and undraining a
        # replica that was not drained is harmless, so the abort path always undrains it.
        self._drained = rid
        await self._step(progress, STEP_DRAIN_ROUTING, self.target.drain_in_routing(rid), self.routing_timeout_s)

        # The RPC gets the drain deadline; our own bound adds slack so a well-behaved target answers False itself.
        drained = await self._step(
            progress, STEP_DRAIN_RPC, self.target.drain_rpc(rid, self.drain_timeout_s), self.drain_timeout_s + 5.0
        )
        if drained is not True:
            raise self._fail(progress, f"Drain RPC of {rid} did not finish its in-flight requests within "
                                       f"{self.drain_timeout_s:g} s (answered {drained!r})")

        await self._step(progress, STEP_RESTART, self.target.restart(rid, self.new_version), self.restart_timeout_s)
        await self._step(progress, STEP_REJOIN, self._wait_rejoined(progress, baseline), None)

        await self._step(progress, STEP_UNDRAIN, self.target.undrain_in_routing(rid), self.routing_timeout_s)
        self._drained = None
        progress.step = STEP_DONE
        progress.finished_at = self._clock()
        self._emit("replica_done", rid, STEP_DONE,
                   f"incarnation {progress.old_incarnation} -> {progress.new_incarnation}")

    async def _wait_rejoined(self, progress: ReplicaProgress, baseline: int) -> None:
        rid = progress.replica_id
        deadline = self._clock() + self.rejoin_timeout_s
        last = None
        while True:
            info = self._member_info(rid)
            last = info
            if info is not None and _is_alive(info[0]) and info[1] == self.new_version and info[2] > baseline:
                progress.new_incarnation = info[2]
                return
            if self._clock() >= deadline:
                seen = "not a member" if last is None else f"state={last[0]} version={last[1]} incarnation={last[2]}"
                raise RolloutError(
                    f"{rid} did not come back ALIVE on {self.new_version} with an incarnation newer than {baseline} "
                    f"within {self.rejoin_timeout_s:g} s (last seen: {seen})"
                )
            await self._sleep(self.poll_s)

    async def _step(self, progress: ReplicaProgress, step: str, awaitable: Awaitable[_T],
                    timeout_s: float | None) -> _T:
        rid = progress.replica_id
        progress.step = step
        self._emit("step", rid, step)
        t0 = self._clock()
        deadline = asyncio.timeout(timeout_s)  # None = no bound (the rejoin wait bounds itself on the clock)
        try:
            async with deadline:
                return await awaitable
        except TimeoutError as exc:
            if deadline.expired():
                raise self._fail(progress, f"{step} of {rid} timed out after {timeout_s:g} s") from None
            # The target's own timeout (e.g. an RPC deadline), not ours: report it as the target's error.
            raise self._fail(progress, f"{step} of {rid} failed: TimeoutError: {exc}") from exc
        except RolloutError as exc:
            raise self._fail(progress, str(exc)) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self._fail(progress, f"{step} of {rid} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            progress.step_seconds[step] = self._clock() - t0

    def _fail(self, progress: ReplicaProgress, message: str) -> RolloutError:
        progress.error = message
        self.status.failed_replica = progress.replica_id
        return RolloutError(message)

    # ---- abort / finish ---------------------------------------------------------------------------------------
    async def _abort(self, error: str | None, state: str) -> None:
        status = self.status
        if state == ABORTED:
            error = error or "cancelled by operator"
        status.error = error
        if status.failed_replica is None and state == FAILED:
            status.failed_replica = status.current_replica
        for progress in status.replicas:
            if progress.step not in (STEP_PENDING, STEP_DONE, STEP_SKIPPED):
                progress.step = STEP_FAILED
                progress.finished_at = self._clock()
                if progress.error is None:
                    progress.error = error
        status.restored = await self._restore()
        log.warning("rollout to %s %s at %s: %s (routing restored: %s)", self.new_version, state,
                    status.current_replica, error, status.restored)
        self._finish(state)

    async def _restore(self) -> bool:
        rid = self._drained
        if rid is None:
            return True
        self._emit("restore", rid, STEP_UNDRAIN, "undraining after abort")
        try:
            async with asyncio.timeout(self.routing_timeout_s):
                await self.target.undrain_in_routing(rid)
        except asyncio.CancelledError:
            # Cancelled again while restoring: give up restoring but keep the record honest.
            log.error("rollout: restoring routing of %s was cancelled", rid)
            return False
        except Exception as exc:  # noqa: BLE001 - logged; the abort must finish and report what it could not undo
            log.error("rollout: could not undrain %s after abort: %s: %s", rid, type(exc).__name__, exc)
            return False
        self._drained = None
        return True

    def _finish(self, state: str) -> None:
        self.status.state = state
        self.status.finished_at = self._clock()
        self._emit("finished", detail=self.status.error or "", state=state)
        for queue in self._subscribers:
            queue.put_nowait(_END)

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _member_info(self, replica_id: str) -> tuple[str, str, int] | None:
        info = self.target.member_info(replica_id)
        if info is None:
            return None
        try:
            state, version, incarnation = info
            return str(state), str(version), int(incarnation)
        except (TypeError, ValueError) as exc:
            raise RolloutError(
                f"member_info({replica_id!r}) returned {info!r}, not (state, version, incarnation)"
            ) from exc

    def _another_alive(self, replica_id: str) -> bool:
        for progress in self.status.replicas:
            other = progress.replica_id
            if other != replica_id:
                info = self._member_info(other)
                if info is not None and _is_alive(info[0]):
                    return True
        return False

    def _emit(self, kind: str, replica_id: str | None = None, step: str | None = None, detail: str = "",
              state: str = RUNNING) -> None:
        event = RolloutEvent(kind=kind, at=self._clock(), replica_id=replica_id, step=step, detail=detail, state=state)
        log.debug("rollout event %s", event)
        for queue in self._subscribers:
            queue.put_nowait(event)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # an observer's bug must not abort the rollout halfway
                log.exception("rollout event callback failed")


def _is_alive(state: str) -> bool:
    return state.lower() == "alive"


# ---- restart hook: a shell command template ---------------------------------------------------------------------
class RestartCommandError(Exception):
    """The restart command failed, timed out or could not be started."""


class CommandTemplateRestart:
    """A restart hook running a command template, e.g. "systemctl restart llm@{replica_id} --version {version}".

    Placeholders: {replica_id} and {version}. By default the template is split into arguments (shlex rules) and
    each argument formatted on its own, then run without a shell: a replica id or version containing spaces or
    shell metacharacters stays one argument and is never interpreted. shell=True runs the template through
    /bin/sh -c (for pipes, &&, redirections) with the values shlex-quoted.
    """

    FIELDS = frozenset({"replica_id", "version"})

    def __init__(self, template: str, *, timeout_s: float = 60.0, shell: bool = False,
                 env: dict[str, str] | None = None, output_limit: int = 2000) -> None:
        if not isinstance(template, str) or not template.strip():
            raise ValueError("restart command template must be a non-empty string")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
            argv_template = shlex.split(template)
        except ValueError as exc:
            raise ValueError(f"bad restart command template {template!r}: {exc}") from exc
        unknown = fields - self.FIELDS
        if unknown:
            raise ValueError(f"restart command template {template!r} uses unknown placeholders {sorted(unknown)}; "
                             f"allowed: {{replica_id}}, {{version}}")
        if not (0 < timeout_s < float("inf")):
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
        self.template = template
        self.timeout_s = float(timeout_s)
        self.shell = shell
        self.env = env
        self.output_limit = output_limit
        self._argv_template = argv_template

    def command(self, replica_id: str, version: str) -> list[str]:
        """The argv that would run (for shell=True: ["/bin/sh", "-c", formatted])."""
        if self.shell:
            return ["/bin/sh", "-c", self.template.format(replica_id=shlex.quote(replica_id),
                                                          version=shlex.quote(version))]
        return [arg.format(replica_id=replica_id, version=version) for arg in self._argv_template]

    async def __call__(self, replica_id: str, version: str) -> None:
        argv = self.command(replica_id, version)
        shown = shlex.join(argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=self.env, start_new_session=True,
            )
        except OSError as exc:
            raise RestartCommandError(f"could not start restart command {shown}: {exc}") from exc
        try:
            async with asyncio.timeout(self.timeout_s):
                output, _ = await proc.communicate()
        except (TimeoutError, asyncio.CancelledError) as exc:
            await self._kill(proc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise RestartCommandError(f"restart command {shown} timed out after {self.timeout_s:g} s") from None
        if proc.returncode != 0:
            tail = output.decode("utf-8", "replace").strip()[-self.output_limit:]
            raise RestartCommandError(f"restart command {shown} exited with status {proc.returncode}"
                                      + (f": {tail}" if tail else ""))
        log.info("restart command ok: %s", shown)

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            try:  # the whole session: a shell's children must not outlive a timed-out restart
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            async with asyncio.timeout(5.0):
                await proc.wait()
        except TimeoutError:
            log.error("restart command pid %s did not exit after SIGKILL", proc.pid)
