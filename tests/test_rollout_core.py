"""Rolling-update orchestrator against an in-memory target with injectable failures, plus the command restart hook."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from llmgw.rollout import (
    ABORTED,
    FAILED,
    STEP_DONE,
    STEP_DRAIN_ROUTING,
    STEP_DRAIN_RPC,
    STEP_FAILED,
    STEP_PENDING,
    STEP_REJOIN,
    STEP_RESTART,
    STEP_SKIPPED,
    STEP_UNDRAIN,
    SUCCEEDED,
    CommandTemplateRestart,
    RestartCommandError,
    Rollout,
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t

    async def sleep(self, dt: float) -> None:
        self.t += dt
        await asyncio.sleep(0)


class FakeTarget:
    """Membership + routing of a small cluster. A restarted replica comes back after `rejoin_polls` polls.

    fail = (replica_id, step, mode) injects one failure: mode "raise" or "hang" for any step, "false" for the Drain
    RPC, and for the rejoin "never" (stays gone), "old_version", "same_incarnation".
    """

    def __init__(self, ids=("r0", "r1", "r2"), version="v1", *, fail=None, rejoin_polls=3) -> None:
        self.ids = list(ids)
        self.members = dict.fromkeys(ids, ("alive", version, 7))
        self.drained: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.fail = fail
        self.rejoin_polls = rejoin_polls
        self._pending: dict[str, tuple[int, tuple[str, str, int]]] = {}

    async def _maybe_fail(self, rid: str, step: str) -> None:
        if self.fail and self.fail[0] == rid and self.fail[1] == step:
            if self.fail[2] == "raise":
                raise ConnectionError(f"injected failure in {step}")
            if self.fail[2] == "hang":
                await asyncio.Event().wait()

    def replicas(self):
        return list(self.ids)

    async def drain_in_routing(self, rid):
        self.calls.append(("drain", rid))
        await self._maybe_fail(rid, STEP_DRAIN_ROUTING)
        self.drained.add(rid)

    async def undrain_in_routing(self, rid):
        self.calls.append(("undrain", rid))
        await self._maybe_fail(rid, STEP_UNDRAIN)
        self.drained.discard(rid)

    async def drain_rpc(self, rid, timeout_s):
        self.calls.append(("drain_rpc", rid))
        await self._maybe_fail(rid, STEP_DRAIN_RPC)
        return self.fail != (rid, STEP_DRAIN_RPC, "false")

    async def restart(self, rid, new_version):
        self.calls.append(("restart", rid))
        await self._maybe_fail(rid, STEP_RESTART)
        _state, version, inc = self.members.pop(rid)
        mode = self.fail[2] if self.fail and self.fail[:2] == (rid, STEP_REJOIN) else None
        if mode == "never":
            return
        comeback = {
            "old_version": ("alive", version, inc + 1),
            "same_incarnation": ("alive", new_version, inc),
        }.get(mode, ("alive", new_version, inc + 1))
        self._pending[rid] = (self.rejoin_polls, comeback)

    def member_info(self, rid):
        if rid in self._pending:
            polls, comeback = self._pending[rid]
            if polls <= 0:
                del self._pending[rid]
                self.members[rid] = comeback
            else:
                self._pending[rid] = (polls - 1, comeback)
        return self.members.get(rid)


def make_rollout(target, clock=None, **kwargs) -> Rollout:
    clock = clock or FakeClock()
    kwargs.setdefault("rejoin_timeout_s", 10.0)
    kwargs.setdefault("poll_s", 0.2)
    return Rollout(target, "v2", clock=clock, sleep=clock.sleep, **kwargs)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


# ---- happy path ----------------------------------------------------------------------------------------------------
def test_updates_every_replica_in_order():
    target = FakeTarget()
    events = []
    rollout = make_rollout(target, on_event=events.append)
    status = run(rollout.run())
    assert status.state == SUCCEEDED and status.error is None
    assert target.members == dict.fromkeys(("r0", "r1", "r2"), ("alive", "v2", 8))
    assert target.drained == set()
    expected_calls = []
    for rid in ("r0", "r1", "r2"):
        expected_calls += [("drain", rid), ("drain_rpc", rid), ("restart", rid), ("undrain", rid)]
    assert target.calls == expected_calls
    for progress in status.replicas:
        assert progress.step == STEP_DONE
        assert (progress.old_incarnation, progress.new_incarnation) == (7, 8)
        steps = {STEP_DRAIN_ROUTING, STEP_DRAIN_RPC, STEP_RESTART, STEP_REJOIN, STEP_UNDRAIN}
        assert set(progress.step_seconds) == steps
        assert progress.step_seconds[STEP_REJOIN] == pytest.approx(0.6)  # 3 polls of 0.2 s on the fake clock
    assert (status.index, status.total, status.current_replica) == (2, 3, None)
    kinds = [e.kind for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and events[-1].state == SUCCEEDED
    assert [e.replica_id for e in events if e.kind == "replica_done"] == ["r0", "r1", "r2"]
    assert [e.step for e in events if e.kind == "step" and e.replica_id == "r1"] == [
        STEP_DRAIN_ROUTING, STEP_DRAIN_RPC, STEP_RESTART, STEP_REJOIN, STEP_UNDRAIN,
    ]


def test_replicas_already_on_the_new_version_are_skipped():
    target = FakeTarget()
    target.members["r1"] = ("alive", "v2", 3)
    status = run(make_rollout(target).run())
    assert status.state == SUCCEEDED
    assert [p.step for p in status.replicas] == [STEP_DONE, STEP_SKIPPED, STEP_DONE]
    assert ("drain", "r1") not in target.calls


def test_event_stream_delivers_until_finished():
    async def scenario():
        rollout = make_rollout(FakeTarget(("a", "b")))
        seen = []

        async def consume():
            async for event in rollout.events():
                seen.append(event)

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0)  # let the consumer subscribe
        status = await rollout.run()
        await asyncio.wait_for(consumer, 2)
        return status, seen

    status, seen = run(scenario())
    assert status.state == SUCCEEDED
    assert seen[0].kind == "started" and seen[-1].kind == "finished"
    assert sum(e.kind == "replica_done" for e in seen) == 2


def test_faulty_event_callback_does_not_stop_the_rollout(caplog):
    def boom(_event):
        raise RuntimeError("observer bug")

    target = FakeTarget()
    status = run(make_rollout(target, on_event=boom).run())
    assert status.state == SUCCEEDED
    assert "event callback failed" in caplog.text


# ---- aborts restore routing ----------------------------------------------------------------------------------------
def test_replica_that_never_comes_back_aborts_and_restores_routing():
    target = FakeTarget(fail=("r1", STEP_REJOIN, "never"))
    status = run(make_rollout(target, rejoin_timeout_s=5.0).run())
    assert status.state == FAILED
    assert status.failed_replica == "r1"
    assert "r1 did not come back ALIVE on v2" in status.error and "not a member" in status.error
    assert target.drained == set() and status.restored is True
    assert [p.step for p in status.replicas] == [STEP_DONE, STEP_FAILED, STEP_PENDING]
    assert not any(rid == "r2" for _, rid in target.calls)  # the rest is left untouched
    assert target.calls[-1] == ("undrain", "r1")


@pytest.mark.parametrize("mode", ["old_version", "same_incarnation"])
def test_comeback_must_have_new_version_and_newer_incarnation(mode):
    target = FakeTarget(fail=("r0", STEP_REJOIN, mode))
    status = run(make_rollout(target, rejoin_timeout_s=2.0).run())
    assert status.state == FAILED and status.failed_replica == "r0"
    assert "last seen: state=alive" in status.error
    assert target.drained == set()


def test_drain_rpc_that_does_not_finish_aborts_before_restart():
    target = FakeTarget(fail=("r0", STEP_DRAIN_RPC, "false"))
    status = run(make_rollout(target).run())
    assert status.state == FAILED and "Drain RPC of r0" in status.error
    assert ("restart", "r0") not in target.calls
    assert target.drained == set()


def test_restart_hook_error_is_reported():
    target = FakeTarget(fail=("r2", STEP_RESTART, "raise"))
    status = run(make_rollout(target).run())
    assert status.state == FAILED and status.failed_replica == "r2"
    assert status.error == "restart of r2 failed: ConnectionError: injected failure in restart"
    assert target.drained == set()
    assert [p.step for p in status.replicas] == [STEP_DONE, STEP_DONE, STEP_FAILED]


def test_hung_target_call_times_out():
    target = FakeTarget(fail=("r0", STEP_DRAIN_ROUTING, "hang"))
    status = run(make_rollout(target, routing_timeout_s=0.05).run())
    assert status.state == FAILED and "drain_routing of r0 timed out" in status.error
    # The hung drain may have taken effect, so the abort undrains anyway.
    assert target.calls == [("drain", "r0"), ("undrain", "r0")] and status.restored is True


def test_undrain_failure_during_restore_is_reported():
    # The restart fails, and so does the undrain that would restore routing.
    target = FakeTarget(fail=("r0", STEP_RESTART, "raise"))

    async def broken_undrain(rid):
        raise ConnectionError("gateway gone")

    target.undrain_in_routing = broken_undrain
    status = run(make_rollout(target).run())
    assert status.state == FAILED and status.restored is False


def test_refuses_to_drain_the_only_live_replica():
    target = FakeTarget()
    target.members["r1"] = ("dead", "v1", 7)
    target.members["r2"] = ("suspect", "v1", 7)
    status = run(make_rollout(target).run())
    assert status.state == FAILED and "no other replica is alive" in status.error
    assert target.calls == []
    status = run(make_rollout(FakeTarget(("solo",)), require_another_alive=False).run())
    assert status.state == SUCCEEDED


def test_bad_member_info_and_duplicate_replicas_fail_cleanly():
    target = FakeTarget()
    target.member_info = lambda rid: ("alive", "v1")
    status = run(make_rollout(target).run())
    assert status.state == FAILED and "not (state, version, incarnation)" in status.error
    status = run(make_rollout(FakeTarget(("a", "b", "a"))).run())
    assert status.state == FAILED and "duplicate" in status.error


# ---- cancel --------------------------------------------------------------------------------------------------------
def test_cancel_during_rejoin_aborts_and_restores():
    async def scenario():
        target = FakeTarget(rejoin_polls=10_000)
        rollout = make_rollout(target, rejoin_timeout_s=1e6)
        task = asyncio.create_task(rollout.run())
        for _ in range(1000):
            if rollout.status.replicas and rollout.status.replicas[0].step == STEP_REJOIN:
                break
            await asyncio.sleep(0)
        rollout.cancel()
        status = await asyncio.wait_for(task, 2)
        return target, status

    target, status = run(scenario())
    assert status.state == ABORTED and status.error == "cancelled by operator"
    assert status.restored is True and target.drained == set()
    assert [p.step for p in status.replicas] == [STEP_FAILED, STEP_PENDING, STEP_PENDING]


def test_cancel_before_start_touches_nothing():
    target = FakeTarget()
    rollout = make_rollout(target)
    rollout.cancel()
    status = run(rollout.run())
    assert status.state == ABORTED and target.calls == []


def test_external_task_cancel_restores_and_propagates():
    async def scenario():
        target = FakeTarget(fail=("r0", STEP_DRAIN_RPC, "hang"))
        rollout = make_rollout(target)
        task = asyncio.create_task(rollout.run())
        for _ in range(1000):
            if "r0" in target.drained:
                break
            await asyncio.sleep(0)
        task.cancel()
        # Bounded well below the target's 35 s drain bound: the cancel must not be lost, even when it lands just
        # as an inner call completes.
        done, _ = await asyncio.wait({task}, timeout=2)
        assert task in done
        with pytest.raises(asyncio.CancelledError):
            task.result()
        return target, rollout.status

    target, status = run(scenario())
    assert status.state == ABORTED and status.error == "cancelled"
    assert target.drained == set() and ("restart", "r0") not in target.calls


def test_runs_once_and_validates_arguments():
    rollout = make_rollout(FakeTarget())
    run(rollout.run())
    with pytest.raises(RuntimeError):
        run(rollout.run())
    with pytest.raises(ValueError):
        Rollout(FakeTarget(), "")
    with pytest.raises(ValueError):
        Rollout(FakeTarget(), "v2", poll_s=0)
    with pytest.raises(ValueError):
        Rollout(FakeTarget(), "v2", drain_timeout_s=float("nan"))


# ---- property: any failure point leaves routing restored -----------------------------------------------------------
FAILURE_MODES = [
    (STEP_DRAIN_ROUTING, "raise"),
    (STEP_DRAIN_RPC, "raise"),
    (STEP_DRAIN_RPC, "false"),
    (STEP_RESTART, "raise"),
    (STEP_REJOIN, "never"),
    (STEP_REJOIN, "old_version"),
    (STEP_REJOIN, "same_incarnation"),
    (STEP_UNDRAIN, "raise"),
]


@settings(max_examples=examples(60), deadline=None)
@given(n=st.integers(1, 5), where=st.integers(0, 4), failure=st.sampled_from(FAILURE_MODES + [None]))
def test_any_failure_point_restores_routing(n, where, failure):
    ids = [f"r{i}" for i in range(n)]
    failing = ids[where % n]
    fail = None if failure is None else (failing, *failure)
    target = FakeTarget(ids, fail=fail)
    status = run(make_rollout(target, rejoin_timeout_s=2.0, require_another_alive=False).run())
    if fail is None:
        assert status.state == SUCCEEDED
        assert all(m == ("alive", "v2", 8) for m in target.members.values())
        assert target.drained == set()
        return
    assert status.state == FAILED and status.failed_replica == failing
    failed_at = ids.index(failing)
    # Every replica before the failure was updated, none after it was touched.
    assert [p.step for p in status.replicas[:failed_at]] == [STEP_DONE] * failed_at
    assert [p.step for p in status.replicas[failed_at + 1:]] == [STEP_PENDING] * (n - failed_at - 1)
    assert all(rid in ids[: failed_at + 1] for _, rid in target.calls)
    if failure[0] == STEP_UNDRAIN:
        # The undrain itself is what fails, so the retry on restore fails too: reported, not hidden.
        assert status.restored is False and target.drained == {failing}
    else:
        assert status.restored is True and target.drained == set()


# ---- CommandTemplateRestart ----------------------------------------------------------------------------------------
def test_command_template_runs_with_each_value_as_one_argument(tmp_path):
    out = tmp_path / "out.txt"
    hook = CommandTemplateRestart(
        f"{sys.executable} -c 'import sys; open(sys.argv[1], \"w\").write(repr(sys.argv[2:]))' {out} "
        "{replica_id} --version {version}",
        timeout_s=20,
    )
    nasty = f"r 1; touch {tmp_path}/pwned"
    run(hook(nasty, "v2"))
    assert out.read_text() == repr([nasty, "--version", "v2"])
    assert not (tmp_path / "pwned").exists()


def test_command_template_with_shell_quotes_values(tmp_path):
    out = tmp_path / "out.txt"
    hook = CommandTemplateRestart("printf %s {replica_id} > " + str(out), shell=True, timeout_s=20)
    nasty = f"a b; touch {tmp_path}/pwned"
    run(hook(nasty, "v2"))
    assert out.read_text() == nasty
    assert not (tmp_path / "pwned").exists()


def test_command_nonzero_exit_is_a_clear_error():
    hook = CommandTemplateRestart("sh -c 'echo cannot restart {replica_id} >&2; exit 3'", timeout_s=20)
    with pytest.raises(RestartCommandError, match=r"exited with status 3: cannot restart r7"):
        run(hook("r7", "v2"))


def test_command_timeout_kills_it(tmp_path):
    pid_file = tmp_path / "pid"
    hook = CommandTemplateRestart(f"sh -c 'echo $$ > {pid_file}; exec sleep 30' {{replica_id}}", timeout_s=0.5)
    with pytest.raises(RestartCommandError, match=r"timed out after 0\.5 s"):
        run(hook("1", "v2"))
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(pid, 0)


def test_command_that_cannot_start():
    hook = CommandTemplateRestart("/nonexistent/restart-tool {replica_id}")
    with pytest.raises(RestartCommandError, match="could not start"):
        run(hook("r1", "v2"))


@pytest.mark.parametrize(
    "template", ["", "   ", "restart {replica}", "restart {0}", "restart 'unbalanced {replica_id}"]
)
def test_bad_command_templates_are_rejected(template):
    with pytest.raises(ValueError):
        CommandTemplateRestart(template)


def test_command_hook_plugs_into_a_rollout(tmp_path):
    log_file = tmp_path / "restarts.log"
    hook = CommandTemplateRestart(f"sh -c 'echo \"$0 $1\" >> {log_file}' {{replica_id}} {{version}}", timeout_s=20)
    target = FakeTarget(("r0", "r1"))
    fake_restart = target.restart

    async def restart(rid, version):
        await hook(rid, version)
        await fake_restart(rid, version)

    target.restart = restart
    status = run(make_rollout(target).run())
    assert status.state == SUCCEEDED
    assert log_file.read_text().splitlines() == ["r0 v2", "r1 v2"]


def test_targets_own_timeout_is_reported_as_its_error_not_ours():
    target = FakeTarget()

    async def restart(rid, version):
        raise TimeoutError("deadline exceeded")

    target.restart = restart
    status = run(make_rollout(target).run())
    assert status.state == FAILED
    assert status.error == "restart of r0 failed: TimeoutError: deadline exceeded"
