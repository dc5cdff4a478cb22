"""Invariant 8: DSN passwords and values from ${VAR}s never reach logs, reports or artifacts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tests.conftest import make_items, write_plan
from tests.integration.test_apply import run_id_of


def _with_password(dsn: str, password: str) -> tuple[str, str]:
    parts = urlsplit(dsn)
    if (
        parts.password
    ):  # a server that needs one (BACKFILL_TEST_DSN): its real password is the secret
        return dsn, parts.password
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(
        parts._replace(netloc=f"{parts.username or 'postgres'}:{password}@{host}")
    ), password


def test_passwords_never_leave_the_process(cli: Callable[..., Any], workdir: Path, db: str) -> None:
    make_items(db, 300)
    dsn, secret = _with_password(db, "Sup3r-Secret-Passw0rd")
    env = {"STAGING_DSN": dsn, "PROD_DSN": dsn}
    plan = write_plan(workdir / "p.json")
    outputs = []
    applied = cli("apply", str(plan), "-e", "staging", "-q", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    outputs.append(applied.output)
    outputs.append(cli("-v", "validate", str(plan), "-e", "staging", env=env).output)
    outputs.append(
        cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env).output
    )
    outputs.append(
        cli("soak", str(plan), "-e", "staging", "--run", run_id, "--duration", "1s", env=env).output
    )
    outputs.append(cli("rollback", run_id, "-e", "staging", "--dry-run", env=env).output)
    outputs.append(cli("status", run_id, env=env).output)
    broken = write_plan(
        workdir / "broken.json",
        discovery__sql="SELECT id FROM items",
        apply__sql="UPDATE items SET val = (1 / 0)::text WHERE id = ANY($1)",
    )
    failed = cli("-v", "apply", str(broken), "-e", "staging", "-q", env=env)
    assert failed.exit_code == 1
    outputs.append(failed.output)
    for text in outputs:
        assert secret not in text
    files = [p for p in (workdir / "backfill_logs").rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        assert secret not in path.read_text(errors="replace"), path
    results = next((workdir / "backfill_logs").rglob("execution_results.json")).read_text()
    assert "***" in results  # the DSN is there, redacted
