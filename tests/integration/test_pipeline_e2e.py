"""The whole rollout on two databases, through every gate, driven by the CLI as an operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest

from tests.conftest import make_items, sql, val, write_plan
from tests.helpers import CHECKSUM, run_id_of


def _two_envs(make_db: Callable[[], str]) -> tuple[str, str, dict[str, str]]:
    staging, prod = make_db(), make_db()
    make_items(staging, 600)
    make_items(prod, 900)
    sql(prod, "UPDATE items SET val = 'new' WHERE id % 3 = 0")  # prod: some already backfilled
    return staging, prod, {"STAGING_DSN": staging, "PROD_DSN": prod}


@pytest.mark.slow
def test_cli_walks_staging_apply_soak_health_canary_rest_through_every_gate(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    staging, prod, env = _two_envs(make_db)
    prod_before = val(prod, CHECKSUM.format(table="items"))
    plan = write_plan(workdir / "plan.json", batching__size=50)
    logs = workdir / "backfill_logs" / "items_new"

    applied = cli("apply", str(plan), "-e", "staging", "-q", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    run_dir = logs / run_id
    soak_args = (
        "soak",
        str(plan),
        "-e",
        "staging",
        "--run",
        run_id,
        "--duration",
        "1s",
        "--interval",
        "1s",
    )
    assert cli(*soak_args, env=env).exit_code == 3  # refused: apply gate waits
    assert (
        cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env).exit_code == 0
    )

    health_args = ("health", str(plan), "-e", "prod", "--run", run_id)
    refused = cli(*health_args, env=env)
    assert refused.exit_code == 3
    assert "gate soak-staging is not-reached" in refused.output
    soaked = cli(*soak_args, env=env)
    assert soaked.exit_code == 3, soaked.output
    refused = cli(*health_args, env=env)
    assert refused.exit_code == 3
    assert "gate soak-staging is waiting" in refused.output
    assert cli("approve", run_id, "--gate", "soak-staging", "--as", "bob", env=env).exit_code == 0

    needing_prod = val(prod, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'")
    checked = cli(*health_args, env=env)
    assert checked.exit_code == 3, checked.output
    assert f"rows needing the backfill: {needing_prod:,}" in checked.output
    mini = run_dir / "prod" / "prod_mini_backfill_plan.json"
    health_md = (run_dir / "prod" / "prod_health_check.md").read_text()
    assert "**Verdict: GO**" in health_md
    assert f"| Rows needing the backfill (discovery count) | {needing_prod} |" in health_md
    assert (
        "None: columns, types, nullability, primary key and triggers of the target match."
        in health_md
    )
    assert cli("validate", str(mini), env=env).exit_code == 0
    mini_plan = json.loads(mini.read_text())
    assert list(mini_plan["environments"]) == ["prod"]
    assert mini_plan["environments"]["prod"]["dsn"] == "${PROD_DSN}"
    assert mini_plan["parent"]["name"] == "items_new"
    assert mini_plan["canary"]["batches"] >= 1
    assert (
        val(prod, "SELECT count(*) FROM items WHERE updated_at = '2030-01-01'") == 0
    )  # read-only so far

    prod_apply = ("apply", str(mini), "-e", "prod", "--run", run_id, "-q")
    refused = cli(*prod_apply, env=env)
    assert refused.exit_code == 3
    assert "gate health-prod is waiting" in refused.output
    assert cli("approve", run_id, "--gate", "health-prod", "--as", "alice", env=env).exit_code == 0

    canary = cli(*prod_apply, env=env)
    assert canary.exit_code == 3, canary.output
    assert "halted at gate canary-prod" in canary.output
    canary_rows = val(prod, "SELECT count(*) FROM items WHERE updated_at = '2030-01-01'")
    size = mini_plan["batching"]["size"]
    assert canary_rows == min(needing_prod, size * mini_plan["canary"]["batches"])
    assert (run_dir / "prod" / "canary_summary.md").exists()
    again = cli(*prod_apply, env=env)  # the canary gate is closed: nothing more runs
    assert again.exit_code == 3
    assert val(prod, "SELECT count(*) FROM items WHERE updated_at = '2030-01-01'") == canary_rows
    assert cli("approve", run_id, "--gate", "canary-prod", "--as", "bob", env=env).exit_code == 0

    rest = cli(*prod_apply, env=env)
    assert rest.exit_code == 0, rest.output
    assert val(prod, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    rest_results = json.loads((run_dir / "prod" / "rest_execution_results.json").read_text())
    assert rest_results["run_totals"]["changed"] == needing_prod
    assert cli(*prod_apply, env=env).exit_code == 0  # a finished run re-run is a no-op
    assert val(prod, "SELECT count(*) FROM backfill.row_images WHERE op = 'U'") == needing_prod

    staging_results = json.loads((run_dir / "staging" / "execution_results.json").read_text())
    assert staging_results["run_totals"]["changed"] == 480
    assert val(staging, "SELECT sum(changed) FROM backfill.batches") == 480
    for f in (
        "staging/backfill_summary.md",
        "staging/staging_observability.md",
        "staging/soak_samples.jsonl",
        "prod/prod_health_check.md",
        "prod/canary_summary.md",
        "prod/rest_summary.md",
        "run.json",
    ):
        assert (run_dir / f).exists(), f
    assert next((run_dir / "prod").glob("rollback_*.sql")).exists()
    status = cli("status", run_id, env=env)
    assert "the rollout is complete" in status.output
    assert "canary-prod approve by bob" in status.output

    # reports re-render byte for byte from the ledgers (invariant 9)
    before = {p: p.read_text() for p in run_dir.rglob("*.md")}
    assert cli("report", run_id, env=env).exit_code == 0
    assert {p: p.read_text() for p in run_dir.rglob("*.md")} == before

    # rolling back prod touches prod only
    staging_now = val(staging, CHECKSUM.format(table="items"))
    undone = cli("rollback", run_id, "-e", "prod", env=env)
    assert undone.exit_code == 0, undone.output
    assert val(prod, CHECKSUM.format(table="items")) == prod_before
    assert val(staging, CHECKSUM.format(table="items")) == staging_now


def test_a_plan_changed_after_approval_closes_the_gate(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    _, _, env = _two_envs(make_db)
    plan = write_plan(workdir / "plan.json")
    run_id = run_id_of(cli("apply", str(plan), "-e", "staging", "-q", env=env).output)
    assert (
        cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env).exit_code == 0
    )
    write_plan(workdir / "plan.json", soak__duration="3s")
    refused = cli("soak", str(plan), "-e", "staging", "--run", run_id, env=env)
    assert refused.exit_code == 3
    assert (
        "gate apply-staging is closed: the plan changed after alice approved it" in refused.output
    )


def test_health_blocks_on_schema_drift_of_a_declared_column(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    _, prod, env = _two_envs(make_db)
    sql(
        prod,
        "ALTER TABLE items ALTER COLUMN val TYPE varchar(40); ALTER TABLE items ADD COLUMN extra int",
    )
    plan = write_plan(workdir / "plan.json")
    run_id = run_id_of(cli("apply", str(plan), "-e", "staging", "-q", env=env).output)
    cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env)
    cli("soak", str(plan), "-e", "staging", "--run", run_id, "--duration", "1s", env=env)
    cli("approve", run_id, "--gate", "soak-staging", "--as", "alice", env=env)
    result = cli("health", str(plan), "-e", "prod", "--run", run_id, env=env)
    assert result.exit_code == 4, result.output
    assert (
        "blocker: schema drift: column val type differs (staging text, prod character varying(40))"
        in result.output
    )
    report = next((workdir / "backfill_logs").rglob("prod_health_check.md")).read_text()
    assert "| column val | text | character varying(40) | type differs | **yes** |" in report
    assert "| column extra | — | integer | missing in staging | no |" in report


@pytest.mark.slow
def test_pipeline_command_walks_the_rollout_one_gate_at_a_time(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    _, prod, env = _two_envs(make_db)
    plan = write_plan(workdir / "plan.json", soak__duration="1s")
    first = cli("pipeline", str(plan), "-q", env=env)
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    assert f"approve {run_id} --gate apply-staging" in first.output
    for gate in ("apply-staging", "soak-staging", "health-prod", "canary-prod"):
        assert cli("approve", run_id, "--gate", gate, "--as", "alice", env=env).exit_code == 0
        step = cli("pipeline", str(plan), "--run", run_id, "-q", env=env)
        expected = 0 if gate == "canary-prod" else 3
        assert step.exit_code == expected, (gate, step.output)
    assert "the rollout is complete" in step.output
    assert val(prod, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0


@pytest.mark.slow
def test_demo_auto_approve_walks_the_whole_rollout_on_the_embedded_server(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "BACKFILL_HOME": str(tmp_path / "home"),
        "BACKFILL_LOGS": str(tmp_path / "logs"),
        "BACKFILL_CMD": "backfill",
    }
    env.pop("STAGING_DSN", None)
    args = [
        sys.executable,
        "-m",
        "runner",
        "demo",
        "--scale",
        "0.1",
        "--auto-approve",
        "--soak-seconds",
        "1",
        "-q",
    ]
    done = subprocess.run(
        args, cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the rollout is complete" in done.stdout
    pidfile = tmp_path / "home" / "pgdata" / "postmaster.pid"
    assert not pidfile.exists() or not psutil.pid_exists(int(pidfile.read_text().split()[0])), (
        "the embedded server must be stopped when the command ends"
    )
    for name in (
        "backfill_summary.md",
        "staging_observability.md",
        "prod_health_check.md",
        "prod_mini_backfill_plan.json",
        "canary_summary.md",
        "rest_summary.md",
    ):
        assert name in done.stdout
    again = subprocess.run(
        [*args[:-3], "-q"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert again.returncode == 0, again.stdout + again.stderr  # re-running the demo is safe


@pytest.mark.slow
def test_an_override_is_shown_in_every_later_report_and_edits_after_approval_are_refused(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    _, _, env = _two_envs(make_db)
    checks = [{"name": "always_one", "sql": "SELECT 1", "pass_if": "== 0"}]
    plan = write_plan(workdir / "plan.json", soak__checks=checks)
    run_id = run_id_of(cli("apply", str(plan), "-e", "staging", "-q", env=env).output)
    cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env)
    soaked = cli("soak", str(plan), "-e", "staging", "--run", run_id, "--duration", "5s", env=env)
    assert soaked.exit_code == 4, soaked.output
    forced = cli(
        "approve",
        run_id,
        "--gate",
        "soak-staging",
        "--as",
        "bob",
        "--override",
        "--note",
        "known false alarm, INC-7",
        env=env,
    )
    assert forced.exit_code == 0, forced.output

    write_plan(workdir / "plan.json", soak__checks=checks, batching__size=99)
    refused = cli("health", str(plan), "-e", "prod", "--run", run_id, env=env)
    assert refused.exit_code == 3
    assert "gate soak-staging is closed: the plan changed after bob approved it" in refused.output
    write_plan(workdir / "plan.json", soak__checks=checks)

    assert cli("health", str(plan), "-e", "prod", "--run", run_id, env=env).exit_code == 3
    run_dir = workdir / "backfill_logs" / "items_new" / run_id
    note = "Gate `soak-staging` was opened by **bob** despite failed criteria: known false alarm, INC-7"
    assert note in (run_dir / "prod" / "prod_health_check.md").read_text()
    cli("approve", run_id, "--gate", "health-prod", "--as", "alice", env=env)

    mini = run_dir / "prod" / "prod_mini_backfill_plan.json"
    original = mini.read_text()
    mini.write_text(original.replace('"size": 100', '"size": 5000'))
    edited = cli("apply", str(mini), "-e", "prod", "--run", run_id, "-q", env=env)
    assert edited.exit_code == 2
    assert "is not the mini plan the approved health check wrote" in edited.output
    mini.write_text(original)

    assert cli("apply", str(mini), "-e", "prod", "--run", run_id, "-q", env=env).exit_code == 3
    assert note in (run_dir / "prod" / "canary_summary.md").read_text()
    cli("approve", run_id, "--gate", "canary-prod", "--as", "bob", env=env)
    assert cli("apply", str(mini), "-e", "prod", "--run", run_id, "-q", env=env).exit_code == 0
    assert note in (run_dir / "prod" / "rest_summary.md").read_text()
