"""Invariant 8: DSN passwords and values from ${VAR}s never reach logs, reports or artifacts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from runner.db import redact_all, redact_dsn
from tests.conftest import make_items, sql, val, write_plan
from tests.helpers import run_id_of


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
        batching__on_error="stop",  # the error path, not a split (#12)
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


SECRET_VALUE = "canary-7f3a9c"
ENCODED_PASSWORD = "Pa%40ss%2F%3A%23w0rd-canary"  # Pa@ss/:#w0rd-canary
DECODED_PASSWORD = "Pa@ss/:#w0rd-canary"


def _ledger_text(dsn: str) -> str:
    tables = [
        r["t"]
        for r in sql(
            dsn,
            "SELECT format('%I.%I', schemaname, tablename) AS t FROM pg_tables"
            " WHERE schemaname = 'backfill'",
        )
    ]
    return "\n".join(
        str(val(dsn, f"SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM {t} AS t"))
        for t in tables
    )


@pytest.mark.slow
def test_no_secret_reaches_any_output_of_a_whole_rollout_failures_included(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    staging, prod = make_db(), make_db()
    make_items(staging, 300)
    make_items(prod, 300)
    env = {
        "STAGING_DSN": _with_password(staging, ENCODED_PASSWORD)[0],
        "PROD_DSN": _with_password(prod, ENCODED_PASSWORD)[0],
        "SECRET_NUM": SECRET_VALUE,
    }
    # the check quotes the secret where PostgreSQL's error will repeat it
    failing_check = [
        {
            "name": "quotes_secret",
            "sql": "SELECT count(*) FROM items WHERE grp = '${SECRET_NUM}'::int",
            "pass_if": "== 0",
            "consecutive_error_limit": 10,
        }
    ]
    plan = write_plan(workdir / "p.json", soak__checks=failing_check, soak__duration="1s")
    outputs: list[str] = []

    def run(*args: str, code: int | None = None) -> str:
        result = cli(*args, env=env)
        outputs.append(result.output)
        if code is not None:
            assert result.exit_code == code, (args, result.output)
        return str(result.output)

    run("-v", "validate", str(plan), "-e", "staging", code=2)  # the check's FAIL line
    run_id = run_id_of(run("apply", str(plan), "-e", "staging", "-q", code=3))
    run("approve", run_id, "--gate", "apply-staging", "--as", "alice", code=0)
    run("-v", "soak", str(plan), "-e", "staging", "--run", run_id, code=3)  # errors: inconclusive
    run("approve", run_id, "--gate", "soak-staging", "--as", "alice", "--note", "ok", code=0)
    run("health", str(plan), "-e", "prod", "--run", run_id, code=3)
    run("approve", run_id, "--gate", "health-prod", "--as", "alice", code=0)
    run("pipeline", str(plan), "--run", run_id, "-q", code=3)  # the canary
    run("status", run_id, code=0)
    run("report", run_id, code=0)
    run("rollback", run_id, "-e", "prod", code=0)

    broken = write_plan(
        workdir / "broken.json",
        apply__sql="UPDATE items SET val = 'new' WHERE id = ANY($1) AND grp <> length('${SECRET_NUM}'::int::text)",
    )
    run("-v", "validate", str(broken), "-e", "staging", code=2)
    run("-v", "apply", str(broken), "-e", "staging", "-q")
    bad_size = write_plan(workdir / "bad_size.json", batching__size="${SECRET_NUM}")
    size_error = run("-v", "validate", str(bad_size), code=2)
    assert "batching.size" in size_error
    assert "(got '***')" in size_error

    assert any("invalid input syntax for type integer" in o for o in outputs)  # errors did show
    files = [p for p in (workdir / "backfill_logs").rglob("*") if p.is_file()]
    assert any(p.name.startswith("batch_") for p in files)
    assert any(p.name == "soak_samples.jsonl" for p in files)
    written = [(str(p), p.read_text(errors="replace")) for p in files]
    written += [(f"output {i}", o) for i, o in enumerate(outputs)]
    written += [("staging ledger", _ledger_text(staging)), ("prod ledger", _ledger_text(prod))]
    for where, text in written:
        for secret in (SECRET_VALUE, ENCODED_PASSWORD, DECODED_PASSWORD):
            assert secret not in text, (where, secret)
    details = val(staging, "SELECT string_agg(detail, ' ') FROM backfill.soak_samples")
    assert 'invalid input syntax for type integer: "***"' in details


def test_a_dsn_password_with_at_slash_colon_and_hash_is_masked_whole() -> None:
    dsn = "postgresql://app:p@ss/:#w0rd@db.example.com:5432/app"
    shown = redact_dsn(dsn)
    assert shown == "postgresql://app:***@db.example.com:5432/app"
    assert "w0rd" not in redact_all(f"could not connect to {dsn} (timeout)", [])
    assert redact_dsn("host=db password='it''s s3cret' dbname=app").count("s3cret") == 0
