"""`quarantine.json` and `quarantine.csv` beside the apply summary: every key the run left out,
with its SQLSTATE, message (redacted when recorded), attempts and whether a retry released it."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import asyncpg

from runner import ledger
from runner.artifacts import write_json, write_text

FIELDS = (
    "key",
    "stage",
    "batch_no",
    "sqlstate",
    "message",
    "attempts",
    "first_seen",
    "last_seen",
    "released_batch",
    "released_at",
)


def _row(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "key": list(r["key"]),
        "stage": r["stage"],
        "batch_no": r["batch_no"],
        "sqlstate": r["sqlstate"],
        "message": r["message"],
        "attempts": r["attempts"],
        "first_seen": r["first_seen"].isoformat(),
        "last_seen": r["last_seen"].isoformat(),
        "released_batch": r["released_batch"],
        "released_at": r["released_at"].isoformat() if r["released_at"] else None,
    }


async def quarantine_rows(conn: asyncpg.Connection, run_id: str) -> list[dict[str, Any]]:
    return [_row(r) for r in await ledger.quarantined(conn, run_id)]


async def write_quarantine_files(
    conn: asyncpg.Connection, run_id: str, directory: Path
) -> list[Path]:
    """Both files, from the ledger (nothing quarantined: none are written)."""
    rows = await quarantine_rows(conn, run_id)
    if not rows:
        return []
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(FIELDS)
    for r in rows:
        w.writerow([", ".join(r["key"]) if f == "key" else r[f] for f in FIELDS])
    return [
        write_json(
            directory / "quarantine.json",
            {
                "run_id": run_id,
                "open": sum(1 for r in rows if r["released_at"] is None),
                "keys": rows,
            },
        ),
        write_text(directory / "quarantine.csv", out.getvalue()),
    ]
