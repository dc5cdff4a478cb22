"""Where a run's files live, and writing them so that a crash never leaves half a file."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from secrets import token_hex
from typing import Any

from runner.errors import InvalidInput
from runner.files import writing


def logs_root() -> Path:
    return Path(os.environ.get("BACKFILL_LOGS") or "backfill_logs")


def new_run_id(plan_name: str, now: datetime | None = None) -> str:
    """Sorts by time, names the plan: `20261122T101500Z-profiles_results_v1_2_1-3fa2`."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{plan_name}-{token_hex(2)}"


_RUN_ID = re.compile(r"^\d{8}T\d{6}Z-(?P<plan>[A-Za-z0-9][A-Za-z0-9_.-]*)-[0-9a-f]{4}$")


def plan_name_of(run_id: str) -> str:
    m = _RUN_ID.fullmatch(run_id)
    if not m:
        raise InvalidInput(
            f"{run_id!r} is not a run id",
            hint="run ids look like 20261122T101500Z-<plan>-3fa2; `backfill status` lists them",
        )
    return m.group("plan")


def check_run_id(run_id: str, plan_name: str) -> str:
    """Refuse a run id that is malformed or names another plan, before anything is written."""
    if plan_name_of(run_id) != plan_name:
        raise InvalidInput(
            f"run {run_id} belongs to plan {plan_name_of(run_id)!r}, not {plan_name!r}",
            hint="pass the plan the run was started with, or start a new run without --run",
        )
    return run_id


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def of(cls, run_id: str, base: Path | None = None) -> RunDir:
        return cls((base or logs_root()) / plan_name_of(run_id) / run_id)

    def env(self, env: str) -> Path:
        path = self.root / env
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def manifest(self) -> Path:
        return self.root / "run.json"

    def read_manifest(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.manifest.read_text()))
        except FileNotFoundError:
            return {}

    def record(self, **fields: Any) -> dict[str, Any]:
        """Merge fields into run.json (plan paths per environment, when each phase ran)."""
        data = self.read_manifest()
        for k, v in fields.items():
            if isinstance(v, dict) and isinstance(data.get(k), dict):
                data[k] = {**data[k], **v}
            else:
                data[k] = v
        write_json(self.manifest, data)
        return data


def write_text(path: Path, text: str) -> Path:
    """Write `path` whole or not at all (`files.writing`)."""
    with writing(path) as out:
        out.write(text)
    return path


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def list_runs(base: Path | None = None) -> list[Path]:
    root = base or logs_root()
    if not root.exists():
        return []
    return sorted((p for p in root.glob("*/*") if (p / "run.json").exists()), key=lambda p: p.name)
