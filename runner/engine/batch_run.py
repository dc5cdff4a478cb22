"""The batch machine: a producer pages a batch source, workers apply the batches, a verifier checks
each committed span behind them; passes until the source is dry; an optional stop after N batches
(the canary).

Ordering rules it keeps (and tests pin):
- a batch is dispatched only after the throttle allows it, and never after a failure;
- after a failure, in-flight batches finish and no new one starts; the first failure is the one
  reported;
- a span is checked only after its batch committed; a check that finds a key its batch was given
  means the source does not converge: the run stops after that batch, not after a pass;
- a pass whose spans could not all be checked ends with a whole count before deciding on another.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import anyio
import anyio.abc
import asyncpg
import structlog
from anyio.streams.memory import MemoryObjectSendStream

from runner.db import close_quietly
from runner.engine import metrics
from runner.engine.claims import Claim, Claims, PagedSource
from runner.engine.discovery import ConvergenceCheck, Discovery, Page, Span, read_only
from runner.engine.executor import Batch, BatchExecutor, BatchOutcome, Reconnect, failure_error
from runner.engine.session import MainSession
from runner.engine.sizing import BatchSizer
from runner.engine.target import TargetInfo, as_subquery
from runner.engine.throttle import Throttle
from runner.errors import BackfillError, WorkFailed

log = structlog.get_logger("backfill.apply")


class BatchSource(Protocol):
    """Where batches come from: pages of keys after a cursor, in key order, and the checks that
    tell whether a committed span still needs work."""

    async def next_page(
        self, conn: asyncpg.Connection, after: list[str] | None, size: int | None = None
    ) -> Page | None:
        """The next page strictly after `after` (None: from the start) of up to `size` keys
        (None: the source's own size), or None when dry."""

    async def count(self, conn: asyncpg.Connection) -> int:
        """How many rows still need the backfill, over the whole table."""

    def convergence(self, conn: asyncpg.Connection, run_id: str) -> ConvergenceCheck:
        """A checker, on its own read-only connection, for the spans of committed batches."""


class KeysetSource:
    """Today's batch source: keyset pages of the plan's discovery query."""

    def __init__(self, target: TargetInfo, discovery_sql: str, page_size: int) -> None:
        self.target = target
        self.discovery_sql = discovery_sql
        self._pages = Discovery(target, discovery_sql, page_size)

    def narrow(self, discovery_sql: str) -> None:
        """Page, count and check `discovery_sql` from now on (a window of the plan's discovery:
        phases.windows)."""
        self.discovery_sql = discovery_sql
        self._pages = Discovery(self.target, discovery_sql, self._pages.page_size)

    async def next_page(
        self,
        conn: asyncpg.Connection,
        after: list[str] | None,
        size: int | None = None,
        *,
        until: list[str] | None = None,
    ) -> Page | None:
        return await self._pages.page(conn, after, size, until=until)

    async def count(self, conn: asyncpg.Connection) -> int:
        """How many rows discovery returns, in a READ ONLY transaction (invariant 5)."""
        sql = f"SELECT count(*) FROM {as_subquery(self.discovery_sql)} AS d"
        async with read_only(conn):
            return int(await conn.fetchval(sql))

    def convergence(self, conn: asyncpg.Connection, run_id: str) -> ConvergenceCheck:
        return ConvergenceCheck(conn, self.target, self.discovery_sql, run_id)


@dataclass
class RunState:
    """What the machine did: read by the phase for its summary and results."""

    outcomes: list[BatchOutcome] = field(default_factory=list)
    failure: BatchOutcome | None = None
    started: float = field(default_factory=time.perf_counter)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    passes: int = 0
    interrupted_before: int = 0
    remaining_after: int = 0
    rows_needing_at_start: int = 0
    batch_mode: str = ""
    batch_mode_reason: str = ""
    counting_seconds: float = 0.0  # whole-table discovery counts: before the run (and see below)
    unverified_spans: int = 0  # spans whose convergence check failed: the pass ends with a count
    stuck: list[str] = field(default_factory=list)  # keys discovery returns after their batch
    dispatched: int = 0
    halt: BackfillError | None = None  # why dispatching stopped early (guard, cancel): raised
    held_seconds: dict[str, float] = field(default_factory=dict)  # by signal ("paused" too)
    holding: str = ""  # the reason no batch may start now ("" while batches may start)
    dispatched_rows: int = 0  # keys handed to workers by this command
    capped: bool = False  # stopped at RunSettings.max_rows: the run continues with --run


class DispatchCheck(Protocol):
    """Asked before each batch starts (engine/watch.RunWatch: pause, cancel, guards)."""

    async def clear_to_dispatch(self) -> None:
        """Return when a batch may start (waiting while held); raise when the phase must stop."""

    async def pace(self, stop: anyio.Event) -> bool:
        """Return when the next batch is due (the yield to busy sessions) or `stop` is set;
        whether it waited. Raise when the phase must stop."""

    def dispatched(self) -> None:
        """A batch was handed to a worker."""

    async def finish(self) -> None:
        """Dispatching is over, however it ended: save what the watch kept (never raises)."""


@dataclass(frozen=True)
class RunSettings:
    run_id: str
    stage: str
    workers: int
    max_passes: int
    stop_after: int | None  # batches still to dispatch (the canary), None: until dry
    resume: str  # the command that continues the run, for error messages
    max_rows: int | None = None  # keys this command may hand to workers (a cap), None: no cap
    page_size: int = 1000  # the source's page when no sizer sets it


Recorder = Callable[[BatchOutcome], Awaitable[None]]


@dataclass(frozen=True)
class Settled:
    """What became of a batch that failed on its data (engine.quarantine): `complete` when
    every key committed or was quarantined (its 'split' row recorded)."""

    complete: bool
    failure: BatchOutcome | None  # a part that failed for another reason: the phase stops
    applied: tuple[list[Any], ...]  # the keys that committed
    excluded: tuple[list[Any], ...]  # the keys quarantined
    halt: BackfillError | None = None  # the failure budget is spent


class OnDataError(Protocol):
    """Asked about each failed batch before the phase stops on it (engine.quarantine)."""

    def attempted(self, rows: int) -> None:
        """A batch of `rows` keys starts (the failure budget counts rows attempted)."""

    def excluded(self) -> tuple[list[Any], ...] | None:
        """The keys left out of the run so far (None: none)."""

    async def settle(
        self,
        executor: BatchExecutor,
        batch: Batch,
        failed: BatchOutcome,
        record: Recorder,
        allocate: Callable[[], Awaitable[int]],
    ) -> Settled | None:
        """Split the batch and account for its keys; None: not a failure it handles."""

    async def share(self, ledger_session: MainSession, run_id: str) -> None:
        """Other processes work on the run too: their quarantined keys and budget count."""


class BatchRun:
    """One apply's batches, from a resume point to a dry source (or the canary's last batch)."""

    def __init__(
        self,
        session: MainSession,
        source: BatchSource,
        throttle: Throttle,
        settings: RunSettings,
        *,
        new_executor: Callable[[], BatchExecutor],
        checker_connection: Reconnect,
        record: Recorder,
        state: RunState | None = None,
        watch: DispatchCheck | None = None,
        sizer: BatchSizer | None = None,
        on_data_error: OnDataError | None = None,
        claims: Claims | None = None,
    ) -> None:
        self.session = session
        self.source = source
        self.throttle = throttle
        self.settings = settings
        self.new_executor = new_executor
        self.checker_connection = checker_connection
        self.record = record
        self.state = state or RunState()
        self.watch = watch
        self.sizer = sizer
        self.on_data_error = on_data_error
        self.claims = claims  # pages claimed through the ledger: other processes may join
        self.next_no = 1
        self._checking = anyio.Event()  # the verifier is ready (or gave up opening)

    async def run(self, cursor: list[str] | None, next_no: int) -> RunState:
        """Passes until the source is dry (or `max_passes`); raises on a failed batch and on a
        source that does not converge. With claims, this process leads the stage: it starts the
        shared cursor at `cursor` (or joins the one live processes still work under), waits for
        every lease before a pass ends, decides the next pass and ends the stage."""
        try:
            return await self._run(cursor, next_no)
        finally:
            await self._finish_watch()

    async def _finish_watch(self) -> None:
        if self.watch is not None:
            with anyio.CancelScope(shield=True):
                await self.watch.finish()

    async def _run(self, cursor: list[str] | None, next_no: int) -> RunState:
        self.next_no = next_no
        state = self.state
        unchecked = False  # leases of another process were open: their spans are counted
        if self.claims is not None:
            cursor, open_leases = await self.claims.lead(cursor, next_no)
            unchecked = open_leases > 0
        for pass_no in range(1, self.settings.max_passes + 1):
            state.passes = pass_no
            state.remaining_after = state.unverified_spans = 0
            await self._share()
            await self._one_pass(None if unchecked or pass_no > 1 else cursor)
            await self._settle_pass()
            await self._share()  # keys another process quarantined are not "remaining"
            await self._raise_if_stopped()
            if self.settings.stop_after is not None or state.capped:
                break
            if unchecked or (self.claims is not None and await self.claims.shared()):
                state.unverified_spans += 1  # another process's spans: count the whole
                unchecked = False
            if state.unverified_spans:
                await self._count_whole()
            if state.remaining_after == 0:
                break
            log.info("apply.new_rows", remaining=state.remaining_after, next_pass=pass_no + 1)
            if self.claims is not None and pass_no < self.settings.max_passes:
                await self._once_settled(self.claims.next_pass)
        if self.claims is not None and not state.capped:
            await self._finish_watch()  # saved before the stage ends: then nothing is saved
            await self._once_settled(self.claims.finish)
        return state

    async def _once_settled(self, step: Callable[[], Awaitable[bool]]) -> None:
        """Open the next pass or end the stage (`step`), which refuses while a lease is open:
        a page another process claimed since this one last looked (rows that arrived after the
        cursor) is applied first, never paged again nor left out of the reports."""
        while not await step():
            await self._settle_pass()
            await self._raise_if_stopped()

    async def join(self) -> RunState:
        """Work on a stage another process leads (engine.claims): pages of its passes, until
        it is done, stopped or gone."""
        try:
            return await self._join()
        finally:
            await self._finish_watch()

    async def _join(self) -> RunState:
        assert self.claims is not None
        state = self.state
        work = await self.claims.work()
        if work is None:
            return state
        self.claims.follow(work.pass_no)
        while True:
            await self._share()
            state.passes += 1
            await self._one_pass(None)
            await self._settle_pass()
            await self._raise_if_stopped()
            if state.capped:
                return state
            if not await self._await_leader():
                return state

    async def _share(self) -> None:
        """Take in what other processes of the run quarantined (claims only)."""
        if self.claims is not None and self.on_data_error is not None:
            await self.on_data_error.share(self.claims.session, self.settings.run_id)

    async def _raise_if_stopped(self) -> None:
        """This process's failure, halt or non-converging source stops the stage for every
        process that works on it."""
        state = self.state
        error: BackfillError | None = None
        if state.failure is not None:
            error = failure_error(state.failure, resume=self.settings.resume)
        elif state.halt is not None:
            error = state.halt
        elif state.stuck:
            try:
                self._raise_if_stuck()
            except BackfillError as exc:
                error = exc
        if error is None:
            return
        if self.claims is not None and not getattr(error, "from_another_process", False):
            with anyio.CancelScope(shield=True):
                try:
                    await self.claims.stop(f"{self.claims.me}: {error.message}")
                except Exception as exc:  # the stop is also seen as this process's end
                    log.warning("apply.stop_not_shared", error=str(exc))
        raise error

    async def _settle_pass(self) -> None:
        """Before a pass ends: wait while other processes apply their leases, and apply those of
        processes that are gone (claims: each lease once)."""
        if self.claims is None:
            return
        state = self.state
        while state.failure is None and state.halt is None and not state.stuck and not state.capped:
            open_leases, gone = await self.claims.leases()
            if not open_leases:
                return
            work = await self.claims.work()
            if work is not None and work.stopped:
                state.halt = _stopped_elsewhere(work.stopped, self.settings.resume)
                return
            if work is not None and work.pass_no != self.claims.pass_no:
                return  # a joined process: the leader opened the next pass, follow it
            if gone:
                await self._one_pass(None)  # its producer takes them over
            # a lease whose batch is still committing (locked) is not taken: look again soon
            await anyio.sleep(0.5)

    async def _await_leader(self) -> bool:
        """A joined process between passes: True when the leader opened another pass (or a
        gone process left a lease to take over), False when the stage is done or the leader
        is gone."""
        assert self.claims is not None
        while True:
            work = await self.claims.work()
            if work is None or work.done:
                return False
            if work.stopped:
                self.state.halt = _stopped_elsewhere(work.stopped, self.settings.resume)
                await self._raise_if_stopped()
            if work.pass_no != self.claims.pass_no:
                self.claims.follow(work.pass_no)
                return True
            if (await self.claims.leases())[1]:
                return True
            if not work.leader_live:
                return False
            await anyio.sleep(0.5)

    async def _one_pass(self, start: list[str] | None) -> None:
        send, receive = anyio.create_memory_object_stream[Batch](0)
        span_send, span_receive = anyio.create_memory_object_stream[Span](math.inf)
        if start is not None:  # a continued run: what earlier commands committed is checked too
            excluded = self.on_data_error.excluded() if self.on_data_error else None
            span_send.send_nowait(Span(None, start, None, excluded))
        failed = anyio.Event()
        idle = anyio.Semaphore(self.settings.workers)  # a batch is handed only to a free worker
        produce = self._produce if self.claims is None else self._produce_claimed
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce, send, failed, start, idle)
            for _ in range(self.settings.workers):
                tg.start_soon(self._work, receive.clone(), span_send.clone(), failed, idle)
            tg.start_soon(self._verify, span_receive, failed)
            receive.close()
            span_send.close()

    async def _count_whole(self) -> None:
        """Some spans went unchecked: count the whole table, and look for applied keys in it."""
        state = self.state
        t0 = time.perf_counter()
        state.remaining_after = await self.session.run(self.source.count)
        state.counting_seconds += time.perf_counter() - t0
        if state.remaining_after:
            whole = Span(None, None, None)
            found = await self.session.run(
                lambda c: self.source.convergence(c, self.settings.run_id).check(whole)
            )
            state.stuck = found.stuck
            self._raise_if_stuck()

    def _raise_if_stuck(self) -> None:
        if self.state.stuck:
            raise WorkFailed(
                "discovery does not converge: it still returns rows this run already applied "
                f"(keys: {'; '.join(self.state.stuck)}); stopped instead of applying them again",
                hint="make the discovery query exclude rows the apply has done (e.g. "
                "`WHERE col IS DISTINCT FROM <new value>`), then continue: " + self.settings.resume,
            )

    def _may_dispatch(self, failed: anyio.Event) -> bool:
        # with claims, the canary's count is the stage's, kept in the ledger (Claims.limit)
        stop_after = self.settings.stop_after if self.claims is None else None
        return (
            not failed.is_set()
            and self.state.halt is None
            and not self.state.capped
            and (stop_after is None or self.state.dispatched < stop_after)
        )

    def _capped_size(self, size: int | None) -> int | None:
        """The page size within the cap: the last page before it is cut to fit, so the cap is
        exact (counted by the runner, in keys handed to workers)."""
        cap = self.settings.max_rows
        if cap is None:
            return size
        return min(size or self.settings.page_size, cap - self.state.dispatched_rows)

    async def _cleared(self, failed: anyio.Event) -> bool:
        """Whether the next batch may start now, after waiting out a pause or a hold; a stop
        is kept in `state.halt` (raised after the batches in flight finish)."""
        if self.watch is not None:
            try:
                await self.watch.clear_to_dispatch()
            except BackfillError as exc:
                self.state.halt = exc
        return self._may_dispatch(failed)

    async def _paced(self, failed: anyio.Event) -> bool:
        """Wait out the yield to busy sessions (a worker is free: the wait is time this
        process starts no batch); whether it waited. A stop is kept in `state.halt`."""
        if self.watch is None:
            return False
        try:
            return await self.watch.pace(failed)
        except BackfillError as exc:
            self.state.halt = exc
            return False

    async def _allocate(self) -> int:
        """The next batch number (the producer's batches and the parts of a split share them;
        with claims, every process of the run does)."""
        if self.claims is not None:
            return await self.claims.allocate()
        self.next_no += 1
        return self.next_no - 1

    def _page_size(self) -> int | None:
        if self.sizer is None:
            return None
        if (m := metrics.current()) is not None:
            m.next_size.set(self.sizer.size)
        return self.sizer.size

    async def _produce(
        self,
        send: anyio.abc.ObjectSendStream[Batch],
        failed: anyio.Event,
        start: list[str] | None,
        idle: anyio.Semaphore,
    ) -> None:
        position = start
        # the first batch waits for the verifier, so a source that does not converge is caught
        # right after that batch, however slow the checker's connection is to open
        with anyio.move_on_after(10):
            await self._checking.wait()
        async with send:
            while self._may_dispatch(failed):
                size = self._capped_size(self._page_size())
                page = await self.session.run(
                    lambda c, after=position, size=size: self.source.next_page(c, after, size)  # type: ignore[misc]
                )
                if page is None:
                    return
                # the page is read while the last batch runs; the checks wait for a free
                # worker, so a pause or a hold is obeyed within one batch
                await idle.acquire()
                await self._paced(failed)
                if not await self._cleared(failed):
                    return
                waited = time.monotonic()
                await self.throttle.wait(page.size)
                if time.monotonic() - waited > 1.0 and not await self._cleared(failed):
                    return  # a long wait for the pace: look again before starting
                batch = Batch(
                    await self._allocate(),
                    self.settings.stage,
                    page.key_arrays,
                    page.first_key,
                    page.last_key,
                    position,
                )
                try:
                    await send.send(batch)
                except anyio.BrokenResourceError:  # every worker stopped after a failure
                    if self.next_no == batch.batch_no + 1:  # no split took a number since
                        self.next_no = batch.batch_no
                    return
                self._dispatched(page)
                position = page.last_key

    async def _produce_claimed(
        self,
        send: anyio.abc.ObjectSendStream[Batch],
        failed: anyio.Event,
        start: list[str] | None,
        idle: anyio.Semaphore,
    ) -> None:
        """The producer when pages are claimed through the ledger (engine.claims): the page,
        its batch number and its slot under the run's rate come from the stage's shared cursor;
        a page claimed but not handed to a worker (a stop) stays open for the next process."""
        assert self.claims is not None
        with anyio.move_on_after(10):
            await self._checking.wait()
        async with send:
            while self._may_dispatch(failed):
                size = self._capped_size(self._page_size()) or self.settings.page_size
                # the page is read while the last batch runs; it is claimed (numbered, given
                # its slot) only once a worker is free and nothing holds the run
                candidate = await self.claims.candidate(
                    self.session, cast(PagedSource, self.source), size, time.monotonic()
                )
                if candidate.stopped is not None:
                    self.state.halt = _stopped_elsewhere(candidate.stopped, self.settings.resume)
                    return
                if candidate.page is None:
                    return
                await idle.acquire()
                if await self._paced(failed) and not candidate.batch_no:
                    # the page was read before the wait: read the next one again, so that the
                    # processes that share the run each read theirs after their own wait (one
                    # whose wait ended first claimed nearly every page). A lease taken over
                    # (numbered) is this process's already: it is kept, never dropped.
                    idle.release()
                    continue
                if not await self._cleared(failed):
                    await self._release(candidate)
                    return
                claim = await self.claims.claim(candidate)
                if claim is None:  # another process claimed that page first
                    idle.release()
                    continue
                if claim.stopped is not None:
                    self.state.halt = _stopped_elsewhere(claim.stopped, self.settings.resume)
                    return
                if claim.page is None:
                    return
                if not await self._dispatch(send, failed, claim, claim.page):
                    await self._release(claim)
                    return
                self._dispatched(claim.page)

    def _dispatched(self, page: Page) -> None:
        """A page was handed to a worker: counted toward the command's row cap."""
        self.state.dispatched += 1
        self.state.dispatched_rows += page.size
        if self.watch is not None:
            self.watch.dispatched()
        if self.settings.max_rows is not None:
            self.state.capped = self.state.dispatched_rows >= self.settings.max_rows

    async def _release(self, claim: Claim) -> None:
        assert self.claims is not None
        with anyio.CancelScope(shield=True):
            await self.claims.release(claim)

    async def _dispatch(
        self,
        send: anyio.abc.ObjectSendStream[Batch],
        failed: anyio.Event,
        claim: Claim,
        page: Page,
    ) -> bool:
        """Hand a claimed page to the free worker at its slot; False when the phase stops
        first."""
        if claim.wait > 0:
            await anyio.sleep(claim.wait)
            if claim.wait > 1.0 and not await self._cleared(failed):
                return False
        assert self.claims is not None
        batch = Batch(
            claim.batch_no,
            self.settings.stage,
            page.key_arrays,
            page.first_key,
            page.last_key,
            claim.after,
            lease=(self.settings.run_id, claim.batch_no, self.claims.me),
            fenced=True,
        )
        try:
            await send.send(batch)
        except anyio.BrokenResourceError:  # every worker stopped after a failure
            return False
        return True

    async def _work(
        self,
        batches: anyio.abc.ObjectReceiveStream[Batch],
        spans: MemoryObjectSendStream[Span],
        failed: anyio.Event,
        idle: anyio.Semaphore,
    ) -> None:
        executor = self.new_executor()
        try:
            async with batches, spans:
                async for batch in batches:
                    if failed.is_set():  # finish what runs, start nothing new
                        break
                    try:
                        span = await self._apply(executor, batch)
                    finally:
                        idle.release()
                    if span is None:
                        failed.set()
                    elif span.batch_keys is not None:
                        spans.send_nowait(span)
        finally:
            await executor.close()

    async def _record(self, outcome: BatchOutcome) -> None:
        self.state.outcomes.append(outcome)
        self._observe(outcome)
        await self.record(outcome)

    async def _apply(self, executor: BatchExecutor, batch: Batch) -> Span | None:
        """Apply one batch (splitting it if it fails on its data) and record what happened;
        returns the span to check (keys None: nothing to check), None when the phase must stop."""
        state = self.state
        if self.on_data_error is not None:
            self.on_data_error.attempted(batch.size)
        outcome = await executor.run(batch)
        state.batch_mode = executor.mode or state.batch_mode
        state.batch_mode_reason = executor.mode_reason or state.batch_mode_reason
        if outcome.status == "failed" and self.on_data_error is not None:
            settled = await self.on_data_error.settle(
                executor, batch, outcome, self._record, self._allocate
            )
            if settled is not None:
                if settled.halt is not None and state.halt is None:
                    state.halt = settled.halt
                if settled.failure is not None:
                    state.failure = state.failure or settled.failure
                    return None
                if not settled.complete:
                    return Span(None, None, None)  # stopped part-way: a resumed run redoes it
                excluded = self.on_data_error.excluded()
                return Span(batch.after_key, batch.last_key, settled.applied, excluded)
        if outcome.error_category == "lease_lost":
            # another process took the page over (this one looked gone): it applies and
            # records the batch; nothing is recorded here
            log.warning("apply.lease_lost", batch=batch.batch_no)
            return Span(None, None, None)
        await self._record(outcome)
        if outcome.status == "failed":
            state.failure = state.failure or outcome
            return None
        # quarantined keys in the span (e.g. of an earlier pass) still need the backfill
        excluded = self.on_data_error.excluded() if self.on_data_error is not None else None
        return Span(batch.after_key, batch.last_key, batch.key_arrays, excluded)

    def _observe(self, outcome: BatchOutcome) -> None:
        """The batch's time toward the next size; its counts to the metrics."""
        if self.sizer is not None and outcome.status == "done":
            self.sizer.observe(outcome.selected, outcome.duration_ms / 1000)
        if (m := metrics.current()) is not None:
            m.batch(outcome, needing_at_start=self.state.rows_needing_at_start)

    async def _open_checker(self) -> ConvergenceCheck:
        # its checks run in READ ONLY transactions (ConvergenceCheck.check)
        conn = await self.checker_connection()
        return self.source.convergence(conn, self.settings.run_id)

    async def _verify(
        self, spans: anyio.abc.ObjectReceiveStream[Span], failed: anyio.Event
    ) -> None:
        """Check each committed batch's span behind the workers (ConvergenceCheck)."""
        checker: ConvergenceCheck | None = None
        state = self.state
        async with spans:
            try:
                with anyio.move_on_after(30):
                    checker = await self._open_checker()
            except Exception as exc:
                log.warning("apply.check_failed", error=str(exc))
            finally:
                self._checking.set()
            try:
                async for span in spans:
                    if state.stuck:
                        continue
                    try:
                        checker = checker or await self._open_checker()
                        result = await checker.check(span)
                    except Exception as exc:  # unverified: the pass ends with a full count
                        state.unverified_spans += 1
                        log.warning(
                            "apply.check_failed", span=[span.after, span.last], error=str(exc)
                        )
                        if checker is not None:
                            await close_quietly(checker.conn)
                            checker = None
                        continue
                    state.remaining_after += result.remaining
                    if result.stuck:
                        state.stuck = result.stuck
                        failed.set()
            finally:
                if checker is not None:
                    await close_quietly(checker.conn)


class StoppedElsewhere(WorkFailed):
    """Another process of the run stopped the stage (a failed batch, a halt)."""

    from_another_process = True


def _stopped_elsewhere(reason: str, resume: str) -> StoppedElsewhere:
    return StoppedElsewhere(
        f"another process working on this run stopped it: {reason}; every committed batch is kept",
        hint=f"see `backfill status` for the processes; fix the cause, then continue: {resume}",
    )


def describe(outcome: BatchOutcome) -> dict[str, Any]:
    """The fields of a batch's log line."""
    return {
        "batch": outcome.batch_no,
        "size": outcome.selected,
        "changed": outcome.changed,
        "noop": outcome.noop,
        "attempts": outcome.attempts,
        "ms": round(outcome.duration_ms, 1),
        "error_category": outcome.error_category,
        "error": outcome.error,
    }
