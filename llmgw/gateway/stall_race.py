"""Stalls caught by adaptive deadlines, and raced instead of failed (issue 14, part 2; docs/resilience.md).

The attempt (attempt.py) bounds every wait for a replica's next message by the configured timeout: that stays the
hard failure. With a `StallGuard` it also asks the guard to do the wait: the guard arms a second, earlier timer at
the replica's adaptive deadline (llmgw.policy.deadlines.StallDeadlines: a high percentile of what this replica has
recently been doing, times a safety factor, with a floor) and records what every wait took, so the deadlines keep
following each replica.

When the adaptive deadline passes, nothing is thrown away: the replica is marked stalled (new requests avoid it
for a while), and a continuation is started on another replica from the next index the client lacks while the
quiet stream keeps racing (llmgw.policy.deadlines.StallRace decides). The first of the two to deliver that index
wins: if the continuation wins, the quiet stream is cancelled, its capacity given back, its breaker told
"timeout", and the attempt goes on with the continuation's stream; if the quiet stream wins, the continuation is
cancelled and its capacity given back, and the hiccup cost nothing. Only the winner's messages are ever relayed and
both legs start at the same index, so delivery stays exactly-once and in order.

How the quiet read is interrupted when the continuation wins: a pending `ReplicaStream.read()` cannot be given a
time limit and resumed later (cancelling a gRPC read cancels its call), so the read is left running until a
decision, and a win of the continuation cancels the waiting task, as asyncio.timeout does; the guard takes that
cancellation back (Task.uncancel) and hands the continuation's first message to the attempt. A cancellation of
the task by anyone else (the client left, a hedge race, the hard watchdog) is never taken back.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from llmgw.gateway.admission import Admission
from llmgw.gateway.capacity import Capacity, Ticket
from llmgw.gateway.events import AttemptOutcome, Listeners
from llmgw.gateway.replica_stream import AttemptError, AttemptErrorKind, ReplicaChunk, Transport
from llmgw.policy.breaker import FAILURE_ERROR, FAILURE_TIMEOUT, FAILURE_UNAVAILABLE
from llmgw.policy.deadlines import FORWARD, START_CONTINUATION, StallDeadlines, StallRace

if TYPE_CHECKING:
    from llmgw.gateway.attempt import Attempt, Limits

log = logging.getLogger("llmgw.gateway.stall")

# A replica suspected of a stall is kept off new requests for this long after its latest suspicion (or until it
# delivers a message). Bounded, so a replica that nothing is sent to any more can be tried again; a replica still
# frozen then costs the request that tried it one first-token deadline and a race, and is suspected again.
STALL_PROBATION_S = 5.0

# A deadline timer that fires this much later than asked says the gateway's own event loop was not running (a busy
# host, a long callback): the silence it measured is partly the gateway's, and a reply may be waiting unread. The
# suspicion is then re-checked once, as much later again (bounded by the deadline itself).
LOOP_LAG_GRACE_S = 0.05

# A silence every replica shares is not one replica's stall: when the replicas that were delivering in the last
# SHARED_SILENCE_ACTIVE_S have all been silent too for the last half of the quiet replica's deadline, the cause is
# on the gateway's side (its host starved of CPU, its network) and a continuation elsewhere would not help; the
# suspicion is re-checked after another half-deadline (the configured timeout still bounds the wait).
SHARED_SILENCE_ACTIVE_S = 5.0

# Counters, as the status and /metrics report them.
SUSPECTED = "suspected"  # an adaptive deadline passed (a stall suspicion)
CONTINUATION_STARTED = "continuation_started"  # a stall failover: the continuation was sent to another replica
CONTINUATION_WON = "continuation_won"  # ... and delivered first: the client's stream moved there
ORIGINAL_WON = "original_won"  # the suspected replica delivered first: a hiccup, nothing failed
NO_REPLICA = "no_replica"  # suspected, but no other replica had a free slot: the stream kept waiting
CONTINUATION_FAILED = "continuation_failed"  # the continuation failed before its first message
STALL_EVENTS = (SUSPECTED, CONTINUATION_STARTED, CONTINUATION_WON, ORIGINAL_WON, NO_REPLICA, CONTINUATION_FAILED)


class StallGuard:
    """One gateway's adaptive stall deadlines and stall races. `deadlines` learns per replica; `capacity` gives
    continuations their slots (never through the admission queue: a continuation replaces a slot the request
    already holds) and `admission` takes them back (Admission.give_back: the head waiter gets a freed slot);
    `listeners` are the request path's (events.Listeners), told of every attempt step; `limits` are the hard
    limits the attempts enforce (the configured timeouts, also the deadlines' ceilings)."""

    def __init__(self, deadlines: StallDeadlines, capacity: Capacity, transport: Transport, limits: Limits, *,
                 admission: Admission[Ticket], listeners: Listeners) -> None:
        self.deadlines = deadlines
        self.capacity = capacity
        self.transport = transport
        self.limits = limits
        self._give_back = admission.give_back
        self._attempt_event = listeners.attempt_event
        self.counts = dict.fromkeys(STALL_EVENTS, 0)
        self._suspected_at: dict[str, float] = {}  # replica -> event-loop time of its latest suspicion
        self._last_message: dict[str, float] = {}  # replica -> event-loop time its latest message was read
        self.shared_silences = 0  # suspicions put off because every active replica was silent
        self._known: frozenset[str] = frozenset()

    # ---- routing: keep new requests off a frozen replica ----------------------------------------------------
    def excluded(self) -> list[str]:
        """An exclusion source (Capacity.exclusion_sources): replicas suspected within STALL_PROBATION_S that
        have not delivered since -- unless that would leave no replica at all (a suspicion is not a failure)."""
        marks = self._suspected_at
        if not marks:
            return []  # the hot path: nothing suspected
        now = asyncio.get_running_loop().time()
        out = []
        for rid, at in list(marks.items()):
            if now - at >= STALL_PROBATION_S or not self.deadlines.stalled(rid):
                del marks[rid]
            else:
                out.append(rid)
        if out and not (self.capacity.view.routable() - set(out)):
            return []
        return out

    def replicas_changed(self, replica_ids: frozenset[str]) -> None:
        """Membership changed: forget the deadlines of replicas that left (one that rejoins starts afresh)."""
        if replica_ids != self._known:
            self._known = replica_ids
            self.deadlines.set_replicas(replica_ids)
            for marks in (self._suspected_at, self._last_message):
                for rid in list(marks):
                    if rid not in replica_ids:
                        del marks[rid]

    def snapshot(self) -> dict[str, Any]:
        """StallDeadlines.snapshot() plus the counters (`events`). Every replica of the membership is listed: one
        the deadlines have no evidence about yet (new, or back after leaving) at the ceilings."""
        deadlines = self.deadlines
        snap = deadlines.snapshot()
        replicas = snap["replicas"]
        for rid in sorted(self._known - replicas.keys()):
            replicas[rid] = {"inter_token_deadline_s": deadlines.inter_token_deadline(rid), "gap_quantile_s": None,
                             "gap_samples": 0.0, "first_token_deadline_s": deadlines.first_token_deadline(rid, 0),
                             "first_token_deadline_by_chars_s": {}, "ttft_quantile_s": None, "ttft_samples": 0.0,
                             "stalled_for_s": None, "histogram_buckets": 0}
        snap["events"] = dict(self.counts)
        return snap

    # ---- one wait -------------------------------------------------------------------------------------------
    async def read(self, attempt: Attempt, watchdog: asyncio.Timeout, *, first: bool) -> ReplicaChunk | None:
        """The attempt's next message (the first one when `first`), racing a continuation if the replica's
        adaptive deadline passes. For an inter-token wait `watchdog` is unarmed and is armed here at the hard
        limit; a first-token wait's watchdog is already armed at it. The attempt's stream, ticket and replica may
        have moved to the continuation's when this returns."""
        loop = asyncio.get_running_loop()
        deadlines = self.deadlines
        job = attempt.job
        rid = attempt.replica_id
        armed = loop.time()
        if first:
            chars = len(job.prompt) + sum(len(token) for token in job.forwarded)
            soft = deadlines.first_token_deadline(rid, chars)
            hard = self.limits.first_token_s(rid)
        else:
            chars = 0
            soft = deadlines.inter_token_deadline(rid)
            hard = self.limits.inter_token_s(rid)
        stream = attempt.stream
        assert stream is not None
        if soft >= hard:  # no evidence yet (or adaptive limits as loose as the configured ones): the plain wait
            if not first:
                watchdog.reschedule(min(job.deadline, armed + hard))
            chunk = await stream.read()
            if not first:
                watchdog.reschedule(None)  # never fire while the caller holds the event
        else:
            # The race's state is only built if the deadline passes (rarely): the hot path pays at most one timer
            # per wait -- and an inter-token wait usually none: its attempt's one timer (WaitTimer) is re-armed
            # only when it would fire too late.
            waiting: list[_Race | None]
            due = min(job.deadline, armed + soft)
            timer: WaitTimer | None = None
            handle: asyncio.TimerHandle | None = None
            if first:
                waiting = [None]
                handle = loop.call_at(due, self._deadline_passed, waiting, attempt, watchdog, armed, soft, None,
                                      due, asyncio.current_task())
            else:
                timer = attempt.wait_timer
                if timer is None or timer.watchdog is not watchdog:  # the watchdog's task is the waiting one
                    if timer is not None:
                        timer.close()
                    timer = attempt.wait_timer = WaitTimer(self, attempt, watchdog, asyncio.current_task())
                waiting = timer.start(loop, armed, soft, armed + hard, due)
            try:
                chunk = await stream.read()
            except BaseException as exc:
                if handle is not None:
                    handle.cancel()
                if timer is not None:
                    timer.close()  # the attempt fails over, or the race goes on with the continuation's stream
                race = waiting[0]
                if race is None:
                    raise
                race.disarm()
                switched = race.interrupted(exc)
                if switched is None:
                    raise
                return switched
            if handle is not None:
                handle.cancel()
            if timer is not None:
                if chunk is None or chunk.is_final:
                    timer.close()  # no wait follows
                else:
                    timer.stop()
            race = waiting[0]
            if race is not None:
                race.disarm()
                if race.hard_armed:
                    watchdog.reschedule(None)  # never fire while the caller holds the event
                if race.race is not None:
                    race.delivered(chunk)
        now = loop.time()
        if chunk is not None:
            if first:
                deadlines.record_first_token(rid, now - armed, chars)
            else:
                deadlines.record_gap(rid, now - attempt.message_at)
            self._last_message[rid] = now
        attempt.message_at = now
        return chunk

    def _deadline_passed(self, waiting: list[_Race | None], attempt: Attempt, watchdog: asyncio.Timeout,
                         armed: float, soft: float, hard_at: float | None, due: float,
                         waiter: asyncio.Task | None) -> None:
        race = waiting[0] = _Race(self, attempt, watchdog, armed, soft, hard_at, waiter)
        race.due = due
        race.suspect()

    def shared_silence(self, replica_id: str, now: float, window_s: float) -> bool:
        """Whether the replicas other than `replica_id` that delivered within SHARED_SILENCE_ACTIVE_S have all
        been silent for the last `window_s` too (False when no other replica was active: nothing to compare)."""
        active = False
        for other, at in self._last_message.items():
            if other == replica_id or now - at > SHARED_SILENCE_ACTIVE_S:
                continue
            if now - at <= window_s:
                return False
            active = True
        return active

    # ---- continuations --------------------------------------------------------------------------------------
    def _start_continuation(self, attempt: Attempt) -> tuple[Attempt, asyncio.Task] | None:
        """A continuation of `attempt`'s job on another replica, opening; None when no replica has a free slot."""
        from llmgw.gateway.attempt import Attempt

        own = attempt.ticket
        ticket = Ticket(own.prompt, own.exclude | {attempt.replica_id})
        if not self.capacity.try_acquire(ticket):
            return None
        leg = Attempt(attempt.job, ticket, self.transport, self.limits)
        task = asyncio.get_running_loop().create_task(leg.open())
        return leg, task

    def _suspected(self, replica_id: str, now: float) -> None:
        self.counts[SUSPECTED] += 1
        self.deadlines.mark_stalled(replica_id)
        self._suspected_at[replica_id] = now


class WaitTimer:
    """The adaptive-deadline timer of one attempt's inter-token waits. Scheduling and cancelling a timer per
    streamed message was a visible share of the gateway's CPU per chunk, so one timer serves every wait: a wait
    sets its due time (`start`) and re-arms the timer only when it would fire too late; a timer firing before the
    pending wait's due time (it was armed for an earlier wait) re-arms for that due time; one firing with no wait
    pending does nothing. Past the due time the wait becomes a possible stall race (StallGuard._deadline_passed),
    exactly as with a timer of its own."""

    __slots__ = ("armed", "attempt", "due", "guard", "handle", "hard_at", "soft", "waiter", "waiting", "watchdog")

    def __init__(self, guard: StallGuard, attempt: Attempt, watchdog: asyncio.Timeout,
                 waiter: asyncio.Task | None) -> None:
        self.guard = guard
        self.attempt = attempt
        self.watchdog = watchdog
        self.waiter = waiter  # the task the watchdog belongs to: the one waiting for the reads
        self.handle: asyncio.TimerHandle | None = None
        self.waiting: list[_Race | None] | None = None  # the pending wait's race, if it becomes one; None: no wait
        self.armed = self.soft = self.hard_at = self.due = 0.0

    def start(self, loop: asyncio.AbstractEventLoop, armed: float, soft: float, hard_at: float,
              due: float) -> list[_Race | None]:
        """A wait begins: the returned holder gets its _Race if `due` passes before stop() or close()."""
        waiting: list[_Race | None] = [None]
        self.waiting = waiting
        self.armed, self.soft, self.hard_at, self.due = armed, soft, hard_at, due
        handle = self.handle
        if handle is None or handle.when() > due:
            if handle is not None:
                handle.cancel()
            self.handle = loop.call_at(due, self._fired)
        return waiting

    def stop(self) -> None:
        """The wait ended; the timer stays armed for the next one."""
        self.waiting = None

    def close(self) -> None:
        """No wait follows (the stream ended or failed, or the attempt is dropped). The attempt lets go of its
        timer (a later wait gets a new one): the two refer to each other, and that cycle would leave every finished
        attempt and all it holds for the cyclic garbage collector to find -- collections that cost the gateway more
        CPU than most of its request path."""
        self.waiting = None
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.cancel()
        if self.attempt.wait_timer is self:
            self.attempt.wait_timer = None

    def _fired(self) -> None:
        self.handle = None
        waiting = self.waiting
        if waiting is None:
            return  # no wait pending: the next one arms the timer again
        loop = asyncio.get_running_loop()
        if loop.time() < self.due:
            self.handle = loop.call_at(self.due, self._fired)
            return
        self.waiting = None  # from here on the wait's _Race keeps its own timers
        self.guard._deadline_passed(waiting, self.attempt, self.watchdog, self.armed, self.soft, self.hard_at,
                                    self.due, self.waiter)


class _Race:
    """One wait that may become a stall race: leg 0 is the attempt's own stream, leg 1 the continuation."""

    __slots__ = (
        "armed",
        "attempt",
        "closed",
        "due",
        "guard",
        "handle",
        "hard_armed",
        "hard_at",
        "leg",
        "race",
        "regraced",
        "soft",
        "task",
        "waiter",
        "watchdog",
        "won_by_leg",
    )

    def __init__(self, guard: StallGuard, attempt: Attempt, watchdog: asyncio.Timeout, armed: float, soft: float,
                 hard_at: float | None, waiter: asyncio.Task | None) -> None:
        self.guard = guard
        self.attempt = attempt
        self.watchdog = watchdog
        self.armed = armed
        self.soft = soft  # the adaptive deadline, seconds after `armed`
        self.hard_at = hard_at  # None: a first-token wait, whose watchdog is armed already
        self.race: StallRace | None = None
        self.leg: Attempt | None = None
        self.task: asyncio.Task | None = None
        self.waiter = waiter  # the task waiting for the quiet stream's read
        self.won_by_leg = False
        self.closed = False  # the wait is over: a continuation finishing now is only cleaned up
        self.due = 0.0
        self.handle: asyncio.TimerHandle | None = None
        self.regraced = False
        self.hard_armed = False

    def arm(self, due: float) -> None:
        self.due = due
        self.handle = asyncio.get_running_loop().call_at(due, self.suspect)

    def disarm(self) -> None:
        if self.handle is not None:
            self.handle.cancel()

    def suspect(self) -> None:
        """The adaptive deadline passed (a timer callback)."""
        attempt, guard = self.attempt, self.guard
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = attempt.job.deadline
        if self.hard_at is not None and not self.hard_armed:
            # From the first firing on, the configured timeout is the hard limit of this wait, whatever follows.
            self.hard_armed = True
            self.watchdog.reschedule(min(deadline, self.hard_at))
        late = now - self.due
        if late > LOOP_LAG_GRACE_S and not self.regraced and now < deadline:
            self.regraced = True
            self.arm(min(deadline, now + min(late, self.soft)))
            return
        half = max(0.05, self.soft / 2)
        if now < deadline and guard.shared_silence(attempt.replica_id, now, half):
            guard.shared_silences += 1
            self.arm(min(deadline, now + half))
            return
        if now >= deadline:
            return  # the request's own deadline: the watchdog ends it
        guard._suspected(attempt.replica_id, now)
        race = self.race = StallRace(len(attempt.job.forwarded))
        if race.suspect(0).action != START_CONTINUATION:
            return
        started = guard._start_continuation(attempt)
        if started is None:
            race.continuation_not_started()
            guard.counts[NO_REPLICA] += 1
            return
        race.continuation_started()
        guard.counts[CONTINUATION_STARTED] += 1
        self.leg, self.task = started
        log.info("request %s: %s silent for %.3f s at token %d, continuation started on %s",
                 attempt.job.request_id, attempt.replica_id, now - self.armed, race.next_index,
                 started[0].replica_id)
        self.task.add_done_callback(self._leg_done)

    def _leg_done(self, task: asyncio.Task) -> None:
        race, leg, guard = self.race, self.leg, self.guard
        assert race is not None and leg is not None
        if task.cancelled():  # lost (cancelled by delivered()) or abandoned with the attempt
            guard._give_back(leg.ticket)
            return
        exc = task.exception()
        if exc is not None:
            race.failed(1)
            guard.counts[CONTINUATION_FAILED] += 1
            replica = leg.replica_id
            if isinstance(exc, AttemptError):
                failure = _BREAKER_FAILURE.get(exc.kind, FAILURE_ERROR)
                if failure is not None:
                    guard.capacity.report_failure(leg.ticket, failure)
                guard._attempt_event(replica, AttemptOutcome.STALL if exc.kind is AttemptErrorKind.STALL
                                     else AttemptOutcome.ERROR, None)
            else:  # the request itself is at fault (invalid, out of time): the quiet stream will say so too
                log.info("stall continuation on %s ended: %r", replica, exc)
            guard._give_back(leg.ticket)
            return
        first = leg.first
        assert first is not None
        if self.closed:  # the wait ended meanwhile (the quiet stream delivered or failed): too late
            leg.cancel()
            guard._give_back(leg.ticket)
            return
        decision = race.message(1, first.index or race.next_index)
        if decision.action == FORWARD and decision.winner == 1:
            self.won_by_leg = True
            waiter = self.waiter
            if waiter is not None and not waiter.done():
                waiter.cancel()  # wakes the quiet read; interrupted() takes this cancellation back
            return
        leg.cancel()  # the quiet stream delivered in the same instant: the continuation lost
        guard._give_back(leg.ticket)

    def delivered(self, chunk: ReplicaChunk | None) -> None:
        """The quiet stream's read returned before the continuation delivered: it won (or ended: the attempt
        fails it and the request path fails over as usual); the continuation is cancelled."""
        race = self.race
        assert race is not None
        self.closed = True
        if chunk is not None:
            decision = race.message(0, chunk.index or race.next_index)
            if decision.action == FORWARD and decision.winner == 0:
                self.guard.counts[ORIGINAL_WON] += 1
        self._drop_leg()

    def interrupted(self, exc: BaseException) -> ReplicaChunk | None:
        """The quiet read raised. The continuation's first message when that was its win (the attempt now
        streams from it); None otherwise (the exception goes on, the continuation is dropped)."""
        self.closed = True
        waiter = self.waiter
        if not (self.won_by_leg and isinstance(exc, asyncio.CancelledError) and waiter is not None
                and waiter.uncancel() == 0):
            self._drop_leg()
            return None
        if self.hard_armed:
            self.watchdog.reschedule(None)
        self._switch()
        leg = self.leg
        assert leg is not None and leg.first is not None
        return leg.first

    def _drop_leg(self) -> None:
        task, leg = self.task, self.leg
        if task is None or leg is None:
            return
        if not task.done():
            task.cancel()  # _leg_done gives its capacity back once it has unwound
        elif self.won_by_leg:  # it won but the quiet read is not switching to it (the task was cancelled)
            leg.cancel()
            self.guard._give_back(leg.ticket)

    def _switch(self) -> None:
        """The continuation won: the quiet replica's stream is cancelled and its slot given back, the breaker hears
        "timeout", and the attempt continues on the continuation's stream, ticket and replica."""
        attempt, guard, leg = self.attempt, self.guard, self.leg
        assert leg is not None
        loop = asyncio.get_running_loop()
        now = loop.time()
        quiet = attempt.replica_id
        stream = attempt.stream
        if stream is not None and not stream.done():
            stream.cancel()
        guard.counts[CONTINUATION_WON] += 1
        if self.hard_at is not None:
            guard.deadlines.record_abandoned_wait(quiet, now - self.armed)
        ticket = attempt.ticket
        guard.capacity.report_failure(ticket, FAILURE_TIMEOUT)
        guard._attempt_event(quiet, AttemptOutcome.STALL, None)
        ticket.exclude.add(quiet)  # the request's own exclusion set: a later failover avoids it too
        guard._give_back(ticket)
        ticket.take_over(leg.ticket)
        leg.ticket = ticket
        attempt.stream = leg.stream
        attempt.replica_id = leg.replica_id
        attempt.message_at = now
        job = attempt.job
        guard.deadlines.record_first_token(leg.replica_id, leg.ttft_s,
                                           len(job.prompt) + sum(len(token) for token in job.forwarded))
        guard._attempt_event(leg.replica_id, AttemptOutcome.FIRST_TOKEN, leg.ttft_s)
        log.info("request %s: continued on %s from token %d (%s was silent %.3f s)", job.request_id,
                 leg.replica_id, len(job.forwarded), quiet, now - self.armed)


# A failed continuation as its replica's breaker hears it (as request_path.py reports failed attempts): refusals
# (busy, draining) and the request's own faults are no verdict on the replica.
_BREAKER_FAILURE: dict[AttemptErrorKind, str | None] = {
    AttemptErrorKind.STALL: FAILURE_TIMEOUT, AttemptErrorKind.UNAVAILABLE: FAILURE_UNAVAILABLE,
    AttemptErrorKind.BUSY: None, AttemptErrorKind.DRAINING: None, AttemptErrorKind.INVALID: None,
    AttemptErrorKind.DEADLINE: None}
