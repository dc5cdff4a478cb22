"""Where the database's time goes, statement by statement: the server's own durations
(`log_min_duration_statement = 0` on the benchmark database, read back from the embedded
server's log), summed by kind and divided by the batches. Used by `apply_throughput.py
--statements`: the profile behind its ratios."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_support import sql

# (kind, a substring that marks it), the first that matches; order matters
KINDS: list[tuple[str, str]] = [
    ("hand loop: its one statement (update + images)", "hand_images"),
    ("batch statement: update, images, ledger row, scope", "WITH applied AS"),
    # the capture path (before PostgreSQL 18): three statements where 18 runs one (the compare
    # reads the before-images table too: it comes first)
    ("capture path: the plan's UPDATE as written", "SET version = 'v2' WHERE id = ANY($1)"),
    (
        "capture path: compare, images, ledger row, scope",
        "WITH me AS (SELECT (pg_current_xact_id()",
    ),
    ("capture path: before-images (REPEATABLE READ)", "pg_temp.backfill_before"),
    ("scope guard: write counters (before, after)", "pg_stat_get_xact_tuples"),
    ("rollback file: the batch's images (follower)", "format('(%s, %L"),
    ("manifest: the batch's rows (follower)", "manifest"),
    ("guards + pause/cancel request", "pg_stat_activity"),
    ("convergence check of the batch's span", "count(*)::bigint FROM ("),
    ("discovery: the next page", "AS first_key"),
    ("count before the first batch", "SELECT count(*) FROM ("),
]
COMMIT = "COMMIT (the batch's WAL flush)"
TX = "BEGIN, SET CONSTRAINTS, settings"
TX_WORDS = ("BEGIN", "ROLLBACK", "SET ", "SAVEPOINT", "RELEASE", "SELECT set_config")
OTHER = "other (ledger reads and writes, start-up)"
# the table's rows: the capture path's statements in the order a batch runs them
ORDER = [k for k, _ in KINDS] + [COMMIT, TX, OTHER]
ORDER.insert(2, ORDER.pop(ORDER.index("capture path: before-images (REPEATABLE READ)")))

_ENTRY = re.compile(r"duration: ([0-9.]+) ms\s+(?:parse|bind|execute|statement)[^:]*: (.*)")


def _entries(text: str) -> Iterator[tuple[float, str]]:
    """(milliseconds, statement) per duration line; a statement's continuation lines (those
    not starting with a log line's timestamp) are joined to it."""
    current: list[Any] | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            if current is not None:
                yield current[0], " ".join(current[1])
            current = [float(m.group(1)), [m.group(2)]]
        elif current is not None and not re.match(r"\d{4}-\d\d-\d\d ", line):
            current[1].append(line.strip())
        elif current is not None:
            yield current[0], " ".join(current[1])
            current = None
    if current is not None:
        yield current[0], " ".join(current[1])


def kind_of(statement: str) -> str:
    text = statement.strip()
    for kind, mark in KINDS:
        if mark in text:
            return kind
    if text.upper().startswith("COMMIT"):
        return COMMIT
    if text.startswith(TX_WORDS):
        return TX
    return OTHER


@contextmanager
def logged(dsn: str, database: str, log: Path) -> Iterator[Callable[[], dict[str, float]]]:
    """Every statement of new sessions on `database` logged with its duration while inside;
    yields a function that returns the milliseconds by kind logged since it was entered."""
    sql(dsn, f"ALTER DATABASE {database} SET log_min_duration_statement = 0")
    start = log.stat().st_size if log.exists() else 0

    def read() -> dict[str, float]:
        with log.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        out: dict[str, float] = {}
        for ms, statement in _entries(text):
            kind = kind_of(statement)
            out[kind] = out.get(kind, 0.0) + ms
        return out

    try:
        yield read
    finally:
        sql(dsn, f"ALTER DATABASE {database} RESET log_min_duration_statement")


def table(columns: dict[str, tuple[dict[str, float], int]]) -> list[str]:
    """Lines of a table: ms per batch by kind, one column per method (its kinds, its batches)."""
    names = list(columns)
    lines = [f"  {'statement kind (server ms per batch)':<52}" + "".join(f"{n:>14}" for n in names)]
    totals = dict.fromkeys(names, 0.0)
    for kind in ORDER:
        cells = []
        for n in names:
            by_kind, batches = columns[n]
            ms = by_kind.get(kind, 0.0) / batches
            totals[n] += ms
            cells.append(f"{ms:14.1f}" if ms else f"{'':>14}")
        if any(c.strip() for c in cells):
            lines.append(f"  {kind:<52}" + "".join(cells))
    lines.append(f"  {'total':<52}" + "".join(f"{totals[n]:14.1f}" for n in names))
    return lines
