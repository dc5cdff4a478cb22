"""Keep going past bad rows (#12): a batch that fails on its data is halved, and each half tried,
down to single keys; a key that still fails alone is quarantined and left out of the rest of the
run; a failure budget stops the phase when too many are.

How it stays exact (invariants 1-3):
- every part is an ordinary batch (its own number, transaction, images and ledger row);
- a split batch's ledger row (status 'split', listing its parts) is written only after every
  part committed or was quarantined; a kill before that leaves the batch unrecorded, so a
  resumed run rediscovers its keys: the committed ones no longer need the backfill, the
  quarantined ones are left out, the rest are tried again;
- a key is quarantined once per run (`ledger.quarantine_key`), whatever the retries.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from runner import ledger
from runner.engine.batch_run import KeysetSource, Recorder, Settled
from runner.engine.discovery import ConvergenceCheck, Page, read_only
from runner.engine.executor import Batch, BatchExecutor, BatchOutcome
from runner.engine.session import MainSession
from runner.engine.target import TargetInfo
from runner.errors import WorkFailed

log = structlog.get_logger("backfill.apply")

DATA_CLASSES = ("22", "23")  # data exception, integrity constraint violation
CLASS_WIDTH = 2  # a SQLSTATE's class: its first two characters


def is_data_error(sqlstate: str | None, listed: Iterable[str] = ()) -> bool:
    """Whether an error is about a row's data (so splitting can isolate it): SQLSTATE classes
    22 and 23, and the codes or two-character classes a plan lists."""
    if not sqlstate:
        return False
    return sqlstate[:2] in DATA_CLASSES or any(
        sqlstate == s or (len(s) == CLASS_WIDTH and sqlstate.startswith(s)) for s in listed
    )


KeyTuple = tuple[Any, ...]


def _arrays(keys: Sequence[KeyTuple], width: int) -> tuple[list[Any], ...]:
    return tuple([k[i] for k in keys] for i in range(width))


@dataclass
class Budget:
    """The failure budget: keys quarantined over rows attempted, judged after `min_sample` rows."""

    max_rate: float | None
    min_sample: int
    attempted: int = 0
    quarantined: int = 0
    by_sqlstate: Counter[str] = field(default_factory=Counter)
    example: dict[str, str] = field(default_factory=dict)  # sqlstate → its first message

    @property
    def rate(self) -> float:
        return self.quarantined / self.attempted if self.attempted else 0.0

    def exceeded(self) -> bool:
        return (
            self.max_rate is not None
            and self.attempted >= self.min_sample
            and self.rate > self.max_rate
        )

    def error(self, resume: str) -> WorkFailed:
        common = ""
        if self.by_sqlstate:
            state, n = self.by_sqlstate.most_common(1)[0]
            common = f"; most common error: SQLSTATE {state} ({n} key(s)): {self.example[state]}"
        return WorkFailed(
            f"the failure budget is spent: {self.quarantined:,} of {self.attempted:,} row(s) "
            f"attempted were quarantined ({self.rate:.2%}), over batching.max_failure_rate = "
            f"{self.max_rate:.2%}{common}; every committed batch is kept",
            hint="list the keys with `backfill quarantine RUN --env ENV`, fix the data (or the "
            "plan), re-try them with `--retry`, then continue: " + resume,
        )


class ExcludingSource:
    """A batch source that leaves out the run's quarantined keys: pages are filtered (in memory,
    so a run with nothing quarantined pays one empty-set test), counts and convergence checks
    subtract the quarantined keys discovery still returns."""

    def __init__(self, inner: KeysetSource, keys: Iterable[KeyTuple] = ()) -> None:
        self.inner = inner
        self.target: TargetInfo = inner.target
        self.keys: set[KeyTuple] = set(keys)

    def exclude(self, key: KeyTuple) -> None:
        self.keys.add(key)

    def arrays(self) -> tuple[list[Any], ...]:
        return _arrays(sorted(self.keys), len(self.target.key))

    async def next_page(
        self,
        conn: asyncpg.Connection,
        after: list[str] | None,
        size: int | None = None,
        *,
        until: list[str] | None = None,
    ) -> Page | None:
        while True:
            page = await self.inner.next_page(conn, after, size, until=until)
            if page is None or not self.keys:
                return page
            rows = list(zip(*page.key_arrays, strict=True))
            kept = [r for r in rows if r not in self.keys]
            if len(kept) == len(rows):
                return page
            if kept:  # the page's bounds stay: they are where discovery has been
                width = len(self.target.key)
                return Page(_arrays(kept, width), page.first_key, page.last_key)
            after = page.last_key

    async def count(self, conn: asyncpg.Connection) -> int:
        n = await self.inner.count(conn)
        if n and self.keys:
            sql = self.target.range_count_sql(
                self.inner.discovery_sql, lower=False, upper=False, among=True
            )
            async with read_only(conn):
                n -= int(await conn.fetchval(sql, *self.arrays()))
        return n

    def convergence(self, conn: asyncpg.Connection, run_id: str) -> ConvergenceCheck:
        return self.inner.convergence(conn, run_id)


class RetrySource:
    """The run's quarantined keys (`backfill quarantine --retry`), in key order, as pages."""

    def __init__(
        self, inner: KeysetSource, keys: list[tuple[list[str], KeyTuple]], page_size: int
    ) -> None:
        self.inner = inner
        self.keys = keys  # (text form, typed)
        self.page_size = page_size
        self.at = 0
        self.gone: list[list[str]] = []  # keys discovery no longer returns: nothing to re-try

    async def next_page(
        self, conn: asyncpg.Connection, after: list[str] | None, size: int | None = None
    ) -> Page | None:
        """The next quarantined keys that discovery still returns (as a batch of the main path
        would only hold): a row the application moved out of scope, or deleted, or that was
        fixed by hand, is not written; it is noted in `gone` and released."""
        if after is None:
            self.at = 0
        width = len(self.inner.target.key)
        while True:
            chunk = self.keys[self.at : self.at + (size or self.page_size)]
            if not chunk:
                return None
            self.at += len(chunk)
            arrays = _arrays([k for _, k in chunk], width)
            async with read_only(conn):
                still = {
                    tuple(r[0])
                    for r in await conn.fetch(
                        self.inner.target.discovered_sql(self.inner.discovery_sql), *arrays
                    )
                }
            kept = [c for c in chunk if tuple(c[0]) in still]
            self.gone += [c[0] for c in chunk if tuple(c[0]) not in still]
            if kept:
                return Page(_arrays([k for _, k in kept], width), kept[0][0], kept[-1][0])

    async def count(self, conn: asyncpg.Connection) -> int:
        return len(self.keys) - self.at

    def convergence(self, conn: asyncpg.Connection, run_id: str) -> ConvergenceCheck:
        return self.inner.convergence(conn, run_id)


@dataclass(frozen=True)
class Policy:
    """What the plan says about data errors (`batching.on_error`, the budget, listed SQLSTATEs)."""

    split: bool
    listed: tuple[str, ...] = ()
    max_rate: float | None = 0.01
    min_sample: int = 1000

    def splits(self, outcome: BatchOutcome) -> bool:
        return (
            self.split
            and outcome.status == "failed"
            and outcome.error_category != "scope_violation"
            and is_data_error(outcome.sqlstate, self.listed)
        )


class _Stop(Exception):
    """A part failed for good (not on its data) or the budget is spent: the split ends here."""


class _LeaseLost(Exception):
    """Another process took the batch's page over (engine.claims): the split ends here and
    records nothing more; that process applies, and records, what is left of the page."""


class Quarantine:
    """Splits a batch that failed on its data, quarantines the keys that fail alone, keeps the
    budget; `BatchRun` asks it about each failed batch (`settle`)."""

    def __init__(
        self,
        policy: Policy,
        source: ExcludingSource | None,
        session: MainSession,
        target: TargetInfo,
        budget: Budget,
        resume: str,
    ) -> None:
        self.policy = policy
        self.source = source
        self.session = session
        self.target = target
        self.budget = budget
        self.resume = resume
        # (the ledger's session, the run) when several processes share the run (share)
        self.shared: tuple[MainSession, str] | None = None

    def attempted(self, rows: int) -> None:
        self.budget.attempted += rows

    async def share(self, ledger_session: MainSession, run_id: str) -> None:
        """Other processes work on the run too (engine.claims): take in the keys they
        quarantined (so no page of this process holds them) and their share of the budget
        (one budget per run: rows they committed and quarantined count here too)."""
        self.shared = (ledger_session, run_id)
        types = [k.type for k in self.target.key]
        rows = await ledger_session.run(lambda c: ledger.open_quarantine(c, run_id, types))
        if self.source is not None:
            for r in rows:
                self.source.exclude(tuple(r[f"k{i}"] for i in range(len(types))))
        done, quarantined = await ledger_session.run(lambda c: ledger.failure_base(c, run_id))
        self.budget.attempted = max(self.budget.attempted, done + quarantined)
        self.budget.quarantined = max(self.budget.quarantined, quarantined)

    def excluded(self) -> tuple[list[Any], ...] | None:
        return self.source.arrays() if self.source is not None and self.source.keys else None

    async def _texts(self, batch: Batch) -> list[list[str]]:
        sql = self.target.key_texts_sql()
        row = await self.session.run(lambda c: c.fetchrow(sql, *batch.key_arrays))
        assert row is not None
        columns = [row[f"k{i}"] for i in range(len(batch.key_arrays))]
        return [list(t) for t in zip(*columns, strict=True)]

    async def settle(
        self,
        executor: BatchExecutor,
        batch: Batch,
        failed: BatchOutcome,
        record: Recorder,
        allocate: Callable[[], Awaitable[int]],
    ) -> Settled | None:
        """Split `batch` (it failed with `failed`) down to single keys; None if the failure is
        not about its data (the phase stops on it as before)."""
        if not self.policy.splits(failed):
            return None
        if self.shared is not None:
            await self.share(*self.shared)
        keys = list(zip(*batch.key_arrays, strict=True))
        texts = await self._texts(batch)
        run = _Split(self, executor, batch.stage, record, allocate)
        try:
            await run.node(batch, failed, keys, texts, top=True)
        except _Stop:  # what was recorded stays; the rest is rediscovered when the run goes on
            for node, parts, size in reversed(run.open):
                await record(_settled(node, "stopped", size, parts))
        except _LeaseLost:
            log.warning("apply.split_lease_lost", batch=batch.batch_no)
        width = len(batch.key_arrays)
        return Settled(
            complete=run.top is not None,
            failure=run.failure,
            applied=_arrays(run.applied, width),
            excluded=_arrays(run.quarantined, width),
            halt=run.budget_spent,
        )


class _Split:
    """One batch's split, depth first (key order), its parts numbered as they start."""

    def __init__(
        self,
        q: Quarantine,
        executor: BatchExecutor,
        stage: str,
        record: Recorder,
        allocate: Callable[[], Awaitable[int]],
    ) -> None:
        self.q = q
        self.executor = executor
        self.stage = stage
        self.record = record
        self.allocate = allocate
        self.applied: list[KeyTuple] = []
        self.quarantined: list[KeyTuple] = []
        self.failure: BatchOutcome | None = None  # a part that failed not on its data
        self.top: BatchOutcome | None = None  # the batch's own 'split' row, once recorded
        # the budget's error as it stood when it was spent (other workers' batches count on)
        self.budget_spent: WorkFailed | None = None
        self.open: list[
            tuple[BatchOutcome, list[int], int]
        ] = []  # splits under way, outermost first

    async def node(
        self,
        batch: Batch,
        failed: BatchOutcome,
        keys: list[KeyTuple],
        texts: list[list[str]],
        *,
        top: bool = False,
    ) -> None:
        """`batch` failed on its data: quarantine its key, or run its halves, then record it."""
        if len(keys) == 1:  # the recorder writes its batch row and its quarantine row together
            # the key itself: a page filtered of quarantined keys keeps discovery's bounds, so
            # its first key need not be this one
            outcome = _settled(failed, "quarantined", 1)
            outcome.first_key = outcome.last_key = texts[0]
            await self.record(outcome)
            self.top = outcome if top else self.top
            await self._quarantined(keys[0], failed)
            return
        mid = len(keys) // 2
        parts: list[int] = []
        self.open.append((failed, parts, len(keys)))
        for lo, hi in ((0, mid), (mid, len(keys))):
            part = Batch(
                await self.allocate(),
                self.stage,
                _arrays(keys[lo:hi], len(batch.key_arrays)),
                texts[lo],
                texts[hi - 1],
                lease=batch.lease,
                fenced=batch.lease is not None,
            )
            parts.append(part.batch_no)
            outcome = await self.executor.run(part)
            if outcome.error_category == "lease_lost":
                raise _LeaseLost  # the process that took the page over applies the rest
            if outcome.status in ("done", "skipped"):
                await self.record(outcome)
                self.applied += keys[lo:hi]
            elif self.q.policy.splits(outcome):
                await self.node(part, outcome, keys[lo:hi], texts[lo:hi])
            else:
                self.failure = outcome
                await self.record(outcome)
                raise _Stop
        self.open.pop()
        outcome = _settled(failed, "split", len(keys), parts)
        await self.record(outcome)
        if top:
            self.top = outcome

    async def _quarantined(self, key: KeyTuple, failed: BatchOutcome) -> None:
        budget = self.q.budget
        self.quarantined.append(key)
        if self.q.source is not None:
            self.q.source.exclude(key)
        budget.quarantined += 1
        state = failed.sqlstate or "?"
        budget.by_sqlstate[state] += 1
        budget.example.setdefault(state, failed.error or "")
        if budget.exceeded():
            self.budget_spent = budget.error(self.q.resume)
            raise _Stop


def _settled(
    failed: BatchOutcome, status: str, size: int, parts: list[int] | None = None
) -> BatchOutcome:
    """The outcome recorded for a batch whose keys are accounted for without committing it."""
    return BatchOutcome(
        failed.batch_no,
        failed.stage,
        status,
        failed.first_key,
        failed.last_key,
        selected=size,
        attempts=failed.attempts,
        errors=failed.errors,
        started_at=failed.started_at,
        duration_ms=failed.duration_ms,
        error_category=failed.error_category,
        error=failed.error,
        sqlstate=failed.sqlstate,
        split_into=parts,
    )
