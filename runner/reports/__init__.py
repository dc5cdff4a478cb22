"""The Markdown reports: each phase's context builder (`apply`, `soak`, `health`, `rollback`),
reading the ledger alone so `backfill report` re-renders a file byte for byte, and the Jinja2
rendering through the templates that ship in the wheel (`runner/templates`, or `templates/` in a
checkout)."""

from __future__ import annotations

from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import asyncpg
import jinja2

from runner import ledger
from runner.results import Override

MINUTE, HOUR = 60.0, 3600.0
CHART_IN_MINUTES_FROM_S = 600.0  # a chart over a longer span is labelled in minutes


def templates_dir() -> Path:
    package = Path(__file__).resolve().parent.parent  # runner/
    for candidate in (package / "templates", package.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the report templates are missing from this installation")


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "—"
    if isinstance(value, int) or digits == 0:
        return f"{round(float(value)):,}"
    return f"{float(value):,.{digits}f}"


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "—"
    s = float(seconds)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 2 * MINUTE:
        return f"{s:.1f} s"
    if s < 2 * HOUR:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _when(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    return "—"


def _metric(value: Any, kind: str) -> str:
    """A database-health value as a person reads it: 12.5%, 3.2 s, 15,787."""
    if value is None:
        return "—"
    if kind == "share":
        return f"{float(value) * 100:.1f}%"
    if kind == "seconds":
        return _duration(value)
    return _num(value)


def _cell(value: Any) -> str:
    """Safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


@cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML; table cells go through `cell`
    )
    env.filters.update(num=_num, duration=_duration, when=_when, cell=_cell, metric=_metric)
    return env


def render(template: str, context: dict[str, Any]) -> str:
    return _env().get_template(template).render(**context)


def overrides_note(decisions: list[ledger.Decision]) -> list[Override]:
    """Every override so far; each later report shows them."""
    return [
        Override(gate=d.gate, actor=d.actor, note=d.note, at=d.decided_at.isoformat())
        for d in decisions
        if d.override and d.decision == "approve"
    ]


async def rollbacks(conn: asyncpg.Connection, run_id: str) -> list[ledger.RunEvent]:
    """The run's rollbacks in this environment: every later report shows them."""
    return [e for e in await ledger.run_events(conn, run_id) if e.kind == "rollback"]
