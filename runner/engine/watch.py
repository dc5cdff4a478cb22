"""What a running apply looks at before each batch: the run's control requests (pause, resume,
cancel) and its guards. While paused or held, no new batch starts (in-flight ones finish) and it
looks again every `guards.interval`; a cancel, a critical threshold or a hold longer than
`guards.max_hold` stops the phase, after the batches in flight.

Holds are recorded in the ledger (`guard_holds`) as they happen, so `status` can say why a run
waits and the summary how long it waited, by signal. Between holds, while other sessions are
busy, the watch also yields (guards.yield_to_busy, `Yielding`): it waits a multiple of the batch
time before the next batch starts; each command's yielded time is kept in `yields`.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from runner import ledger
from runner.engine import metrics
from runner.engine.batch_run import RunState
from runner.engine.guards import GuardSet, Reading, Yielding, verdict
from runner.engine.session import MainSession
from runner.errors import NoGo, WorkFailed
from runner.plan import Guards

log = structlog.get_logger("backfill.apply")

PAUSED = "paused"
YIELD_TOLD_STEP = 0.5  # the progress hears of the yield's factor when it moves this much


@dataclass
class _Hold:
    signal: str
    hold_id: int
    since: float
    last: float


class RunWatch:
    """`clear_to_dispatch` returns when a batch may start; raises when the phase must stop."""

    def __init__(
        self,
        main: MainSession,
        reader: MainSession,
        guards: Guards,
        target_oid: int,
        *,
        stage: str,
        state: RunState,
        resume: str,
        workers: int = 1,
        progress: Callable[[str, dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.main = main
        self.reader = reader
        self.guards = GuardSet(guards, target_oid)
        self.settings = guards
        self.run_id = main.run_id
        self.stage = stage
        self.state = state
        self.resume = resume
        self.progress = progress
        self.clock = clock
        self._hold: _Hold | None = None
        self._stale_closed = False
        y = guards.yield_to_busy
        self.yielding = Yielding(y.per_session, y.max_factor, workers)
        self._outcomes_seen = 0
        self._command = uuid.uuid4().hex  # this command's row in `yields`
        self.yielded_seconds = 0.0
        self._yielded_batches = 0
        self._most_factor = 0.0
        self._saved = (0.0, 0)
        self._told_factor = 0.0
        self._hidden_told = False

    async def clear_to_dispatch(self) -> None:
        if not self._stale_closed:  # holds a killed process left open are over
            await self.main.run(lambda c: ledger.close_holds(c, self.run_id))
            self._stale_closed = True
        try:
            while True:
                reading = await self._blocking_reading()
                if reading is None:
                    break
                await self._held(reading)
                await anyio.sleep(self.settings.interval)
        except BaseException:  # stopping (a cancel, a critical reading, max_hold, Ctrl-C)
            with anyio.CancelScope(shield=True):
                await self._end_hold(resumed=False)
            raise
        await self._end_hold()

    async def pace(self, stop: anyio.Event) -> bool:
        """Wait while the busy sessions are owed time (guards.yield_to_busy), until the next
        batch may start; whether it waited. `stop` (a batch failed) ends the wait at once. A
        wait longer than guards.interval is cut there and the request and the signals are read
        again: a cancel or a critical reading raises, a hold or a pause ends the wait (for
        `clear_to_dispatch` to hold)."""
        waited = 0.0
        try:
            while not stop.is_set() and (wait := self._yield_due()) > 0:
                step = min(wait, self.settings.interval)
                since = self.clock()
                with anyio.move_on_after(step):
                    await stop.wait()
                waited += self.clock() - since
                if stop.is_set() or wait <= step or await self._blocking_reading() is not None:
                    break
        finally:  # counted however it ended (a cancel read between steps, Ctrl-C)
            if waited > 0:
                self._yielded(waited)
        if waited > 0:  # saved while the server is left to the busy sessions anyway
            await self._save_yields()
        return waited > 0

    def dispatched(self) -> None:
        """A batch was handed to a worker: the next one is spaced from now."""
        self.yielding.started(self.clock())

    def _yield_due(self) -> float:
        """The batches committed since the last look feed the yield's batch time."""
        outcomes = self.state.outcomes
        for outcome in outcomes[self._outcomes_seen :]:
            if outcome.status == "done":
                self.yielding.batch(outcome.duration_ms / 1000)
        self._outcomes_seen = len(outcomes)
        factor = self.yielding.factor
        if abs(factor - self._told_factor) >= YIELD_TOLD_STEP or (factor == 0) != (
            self._told_factor == 0
        ):
            self._told_factor = factor
            self._tell("yield", {"factor": factor, "busy": self.yielding.busy or 0.0})
        return self.yielding.due(self.clock())

    def _yielded(self, seconds: float) -> None:
        """A wait of `seconds` before one batch, for the summary and the metrics."""
        factor = self.yielding.factor
        self._most_factor = max(self._most_factor, factor)
        self.yielded_seconds += seconds
        self._yielded_batches += 1
        if (m := metrics.current()) is not None:
            m.yield_factor.set(factor)
            m.yielded.inc(seconds)

    async def _save_yields(self) -> None:
        """This command's yield so far, to the ledger (never raises: a yield not saved costs
        the summary some seconds, nothing else; the next save or `finish` writes it)."""
        totals = (self.yielded_seconds, self._yielded_batches)
        if totals == self._saved:
            return
        try:
            await self.main.run(
                lambda c: ledger.record_yield(
                    c, self.run_id, self.stage, self._command, *totals, self._most_factor
                )
            )
        except Exception as exc:
            log.warning("guard.yields_not_saved", error=str(exc))
            return
        self._saved = totals

    async def finish(self) -> None:
        """The stage's dispatching is over (however it ended): its yielded time is saved."""
        await self._save_yields()

    async def _blocking_reading(self) -> Reading | None:
        """What keeps the next batch from starting now (None: nothing); raises to stop."""
        readings: list[Reading] = []
        if self.guards.enabled:  # the request and the built-in signals: one round trip
            request, readings = await self.main.run(
                lambda c: self.guards.with_control(c, self.run_id)
            )
        else:
            request = await self.main.run(lambda c: ledger.control_state(c, self.run_id))
        if request is not None and request.action == "cancel":
            note = f" ({request.note})" if request.note else ""
            log.warning("apply.cancelled", actor=request.actor, note=request.note)
            raise NoGo(
                f"run {self.run_id} was cancelled by {request.actor} at "
                f"{request.requested_at:%Y-%m-%d %H:%M:%S}{note}: the {self.stage} stopped after "
                "the batches in flight; every committed batch is kept",
                hint=f"undo it: backfill rollback {self.run_id} --env ENV; or start a new run",
            )
        if request is not None and request.action == "pause":
            note = f": {request.note}" if request.note else ""
            return Reading(PAUSED, None, "hold", "", f"paused by {request.actor}{note}")
        if not self.guards.enabled:
            return None
        self.yielding.seen(next((r.value for r in readings if r.signal == "busy_sessions"), None))
        if self.guards.hidden_sessions and not self._hidden_told:
            self._hidden_told = True
            log.warning("guard.hidden_sessions", sessions=self.guards.hidden_sessions)
            self._tell(
                "notice",
                {
                    "text": f"{self.guards.hidden_sessions} of the server's sessions are "
                    "hidden from this login (it lacks pg_monitor or pg_read_all_stats): the "
                    "guards and the yield to busy sessions cannot see other logins' sessions; "
                    "grant it pg_monitor"
                },
            )
        if self.settings.custom:
            readings += await self.reader.run(self.guards.custom)
        found = verdict(readings)
        if (m := metrics.current()) is not None:
            m.readings(readings)
        worst = found.worst
        if worst is not None and worst.state == "stop":
            log.warning("guard.stop", signal=worst.signal, value=worst.value, reason=worst.reason)
            raise WorkFailed(
                f"the {self.stage} of run {self.run_id} stopped: {worst.reason}; every "
                "committed batch is kept",
                hint=f"when {worst.signal} is back below its threshold, continue: {self.resume}",
            )
        return worst

    async def _held(self, reading: Reading) -> None:
        now = self.clock()
        hold = self._hold
        if hold is not None and hold.signal != reading.signal:
            await self._end_hold()
            hold = None
        if hold is None:
            hold_id = await self.main.run(
                lambda c: ledger.start_hold(
                    c,
                    self.run_id,
                    self.stage,
                    reading.signal,
                    reading.reason,
                    reading.value,
                    reading.threshold,
                )
            )
            hold = self._hold = _Hold(reading.signal, hold_id, now, now)
            log.warning(
                "guard.hold", signal=reading.signal, value=reading.value, reason=reading.reason
            )
            self._tell("hold", {"reason": reading.reason, "signal": reading.signal})
            if (m := metrics.current()) is not None:
                m.held.set(1)
        else:
            self._count(hold, now)
            await self.main.run(
                lambda c: ledger.hold_seen(
                    c, hold.hold_id, reading.reason, reading.value, ended=False
                )
            )
        self.state.holding = reading.reason
        if reading.signal != PAUSED and now - hold.since > self.settings.max_hold:
            log.warning("guard.max_hold", signal=reading.signal, seconds=now - hold.since)
            raise WorkFailed(
                f"the {self.stage} of run {self.run_id} stopped: held for {now - hold.since:,.0f} s, "
                f"longer than guards.max_hold ({self.settings.max_hold:,.0f} s): {reading.reason}; "
                "every committed batch is kept",
                hint=f"when {reading.signal} is back below its threshold, continue: {self.resume}",
            )

    def _count(self, hold: _Hold, now: float) -> None:
        held = self.state.held_seconds
        held[hold.signal] = held.get(hold.signal, 0.0) + (now - hold.last)
        hold.last = now

    async def _end_hold(self, *, resumed: bool = True) -> None:
        """The hold is over: the run goes on (`resumed`), or stops while held (then nothing
        says it resumed)."""
        hold, self._hold = self._hold, None
        if hold is None:
            return
        self._count(hold, self.clock())
        self.state.holding = ""
        held_seconds = round(hold.last - hold.since, 3)
        if resumed:
            log.info("guard.resumed", signal=hold.signal, held_seconds=held_seconds)
            self._tell("resume", {"signal": hold.signal})
        else:
            log.info("guard.stopped_while_held", signal=hold.signal, held_seconds=held_seconds)
        if (m := metrics.current()) is not None:
            m.held.set(0)
        with contextlib.suppress(Exception):  # the hold's last sighting stays as recorded
            await self.main.run(lambda c: ledger.hold_seen(c, hold.hold_id, "", None, ended=True))

    def _tell(self, kind: str, data: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress(kind, data)
