"""Several processes on one stage of a run (#15): pages claimed through the ledger.

The stage's shared cursor (`backfill.work`) says which pass it is in, how far discovery has been
paged, the next batch number, how many batches were claimed (the canary stops at its count) and
when the next batch may start (the run's rate, whatever the number of processes). A process
claims the next page with a compare-and-set on the cursor, which records a lease: the page's
bounds, its batch number and its owner. A lease is open until a batch row of its number settles
it; one whose owner stopped beating (or ended) is taken over by another process, which pages
discovery again within its bounds and applies what is left under the same number — the batch
row's primary key lets only one of them commit it.

One process leads: it holds the run lock, starts the cursor, decides each new pass and finishes
the stage. The others join: they claim pages of the leader's pass and leave when it is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import asyncpg
import structlog

from runner import ledger
from runner.engine.discovery import Page
from runner.engine.session import MainSession

log = structlog.get_logger("backfill.apply")

TAKEOVER_EVERY = 1.0  # seconds between looks for gone processes' leases while pages remain


class PagedSource(Protocol):
    async def next_page(
        self,
        conn: asyncpg.Connection,
        after: list[str] | None,
        size: int | None = None,
        *,
        until: list[str] | None = None,
    ) -> Page | None: ...


@dataclass(frozen=True)
class Claim:
    """What a process may do next: apply `page` as `batch_no` after waiting `wait` seconds
    (its slot under the run's rate); or nothing (`page` None): the pass is dry here, or the
    stage was stopped (`stopped`: why)."""

    batch_no: int = 0
    page: Page | None = None
    after: list[str] | None = None
    wait: float = 0.0
    taken_from: str | None = None  # a lease taken over from this process
    stopped: str | None = None


@dataclass
class Claims:
    """One process's view of the stage's shared cursor."""

    session: MainSession  # the ledger's connection
    run_id: str
    stage: str
    me: str  # this process (backfill.processes)
    lease_timeout: float
    batches_per_minute: float | None
    rows_per_second: float | None
    limit: int | None = None  # the batches the stage claims in all (the canary's), None: no end
    claimed_before: int = 0  # batches of the stage committed before this command (a canary)
    pass_no: int = 1
    _looked: float = 0.0
    # the shared cursor as this process last saw it (None: read it again): one process alone
    # never has to read it before a page
    _position: tuple[list[str] | None] | None = None

    def interval(self, rows: int) -> float:
        """Seconds between two batch starts of the run at its rate (0: unlimited)."""
        gaps = [0.0]
        if self.batches_per_minute:
            gaps.append(60.0 / self.batches_per_minute)
        if self.rows_per_second:
            gaps.append(rows / self.rows_per_second)
        return max(gaps)

    async def lead(self, position: list[str] | None, next_no: int) -> tuple[list[str] | None, int]:
        """Take the stage's cursor as its leader: (where this process's pass starts, open
        leases — another process's pages still being applied, or a gone one's to take over)."""
        work, open_leases = await self.session.run(
            lambda c: ledger.lead_work(
                c,
                self.run_id,
                self.stage,
                self.me,
                self.lease_timeout,
                position=position,
                next_no=next_no,
                claimed=self.claimed_before,
            )
        )
        self.pass_no = work.pass_no
        self._position = (work.position,)
        return work.position, open_leases

    def follow(self, pass_no: int) -> None:
        """A joined process follows the leader into its pass (the cursor is read again)."""
        self.pass_no = pass_no
        self._position = None

    async def work(self) -> ledger.Work | None:
        return await self.session.run(
            lambda c: ledger.get_work(c, self.run_id, self.stage, self.lease_timeout)
        )

    async def candidate(
        self, reader: MainSession, source: PagedSource, size: int, now: float
    ) -> Claim:
        """The next page this process may apply: a gone process's lease, taken over (looked
        for at most every TAKEOVER_EVERY seconds while pages remain; already numbered), else the
        next page after the shared cursor (not claimed yet: `claim` it when a worker is free),
        else nothing (dry here, or stopped)."""
        if now - self._looked >= TAKEOVER_EVERY:
            self._looked = now
            if (taken := await self._take_over(reader, source, size)) is not None:
                return taken
        if self._position is None:
            work = await self.work()
            if (closed := self._closed(work)) is not None:
                return closed
            assert work is not None
            self._position = (work.position,)
        after = self._position[0]
        page = await reader.run(lambda c: source.next_page(c, after, size))
        if page is None:  # dry here: a gone process's lease is all that may be left
            self._looked = now
            taken = await self._take_over(reader, source, size)
            return taken if taken is not None else Claim()
        return Claim(0, page, after)

    async def claim(self, candidate: Claim) -> Claim | None:
        """Claim a candidate page for this process (compare-and-set on the shared cursor): the
        claim, numbered, with its slot under the run's rate; None when another process claimed
        that page first (ask for a candidate again); a claim without a page when the stage
        was stopped, is done, or reached its limit."""
        page = candidate.page
        if page is None or candidate.batch_no:
            return candidate  # nothing, or a lease taken over (already this process's)
        claimed = await self.session.run(
            lambda c: ledger.claim_page(
                c,
                self.run_id,
                self.stage,
                self.me,
                pass_no=self.pass_no,
                after=candidate.after,
                last=page.last_key,
                size=page.size,
                interval=self.interval(page.size),
                limit=self.limit,
            )
        )
        if claimed is not None:
            self._position = (page.last_key,)
            batch_no, wait = claimed
            return Claim(batch_no, page, candidate.after, wait)
        self._position = None  # read the cursor again
        return self._closed(await self.work())

    def _closed(self, work: ledger.Work | None) -> Claim | None:
        """Why this process may claim no page of its pass (an empty claim: done, another pass,
        the limit reached; or stopped), or None when it may."""
        if work is None or work.done or work.pass_no != self.pass_no:
            return Claim()
        if work.stopped:
            return Claim(stopped=work.stopped)
        if self.limit is not None and work.claimed >= self.limit:
            return Claim()
        return None

    async def _take_over(self, reader: MainSession, source: PagedSource, size: int) -> Claim | None:
        while True:
            lease = await self.session.run(
                lambda c: ledger.take_over(
                    c,
                    self.run_id,
                    self.stage,
                    self.me,
                    self.lease_timeout,
                    self.interval(size),
                )
            )
            if lease is None:
                return None
            page = await reader.run(
                lambda c, le=lease: source.next_page(  # type: ignore[misc]
                    c, le.after_key, max(le.size, size), until=le.last_key
                )
            )
            log.info(
                "apply.lease_taken_over",
                batch=lease.batch_no,
                was=lease.was,
                keys=page.size if page else 0,
            )
            if page is not None:
                return Claim(lease.batch_no, page, lease.after_key, lease.wait, lease.was)
            # everything in its range was done or is gone: nothing left to apply
            await self.session.run(lambda c, n=lease.batch_no: ledger.drop_lease(c, self.run_id, n))  # type: ignore[misc]

    async def release(self, claim: Claim) -> None:
        """A claimed page this process will not apply (it stops): given back if nothing was
        claimed after it, else left open for whoever continues."""
        if claim.page is None or claim.taken_from is not None or not claim.batch_no:
            return  # not claimed, or a taken-over lease: it stays open, as it was
        await self.session.run(
            lambda c: ledger.release_claim(
                c,
                self.run_id,
                self.stage,
                claim.batch_no,
                claim.after,
                claim.page.last_key,  # type: ignore[union-attr]
            )
        )

    async def leases(self) -> tuple[int, int]:
        """(open leases of the stage, of those whose owner is gone)."""
        return await self.session.run(
            lambda c: ledger.open_leases(c, self.run_id, self.stage, self.lease_timeout)
        )

    async def allocate(self) -> int:
        """A batch number no process of the run has used (a split's part)."""
        return await self.session.run(lambda c: ledger.next_batch_no(c, self.run_id, self.stage))

    async def shared(self) -> bool:
        """Whether another process claimed pages of this pass."""
        return await self.session.run(
            lambda c: ledger.shared_by(c, self.run_id, self.stage, self.me, self.pass_no)
        )

    async def next_pass(self) -> bool:
        """Open the next pass; False while a lease is open (settle it first)."""
        if not await self.session.run(
            lambda c: ledger.next_pass(c, self.run_id, self.stage, self.pass_no)
        ):
            return False
        self.pass_no += 1
        self._position = None  # the new pass starts from the beginning
        return True

    async def stop(self, reason: str) -> None:
        """No process claims another page of the stage until a leader starts it again."""
        await self.session.run(lambda c: ledger.stop_work(c, self.run_id, self.stage, reason))

    async def finish(self) -> bool:
        """End the stage: False while a lease is still open (settle it first)."""
        return await self.session.run(lambda c: ledger.finish_work(c, self.run_id, self.stage))
