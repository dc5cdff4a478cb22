"""Invariant 6: an approval binds what was reviewed — plan text, variable values, the sealed phase
result — a reject is final, and decisions edited or inserted behind backfill's back open nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import make_items, sql, val, write_plan
from tests.helpers import run_id_of
from tests.integration.test_input_edges import _with

TAGGED = {
    "discovery__sql": "SELECT id FROM items WHERE val IS DISTINCT FROM '${TAG:-v2}'",
    "apply__sql": "UPDATE items SET val = '${TAG:-v2}' /* ${SECRET_NOTE:-quiet-note} */ "
    "WHERE id = ANY($1) AND val IS DISTINCT FROM '${TAG:-v2}'",
    "soak__checks": [
        {
            "name": "all_tagged",
            "sql": "SELECT count(*) FROM items WHERE val IS DISTINCT FROM '${TAG:-v2}'",
            "pass_if": "== 0",
        }
    ],
}


def _applied(cli: Callable[..., Any], plan: Path, env: dict[str, str]) -> str:
    applied = cli("apply", str(plan), "-e", "staging", "-q", env=env)
    assert applied.exit_code == 3, applied.output
    return run_id_of(applied.output)


def test_a_variable_changed_after_approval_closes_the_gate_naming_it(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 200)
    env = {"STAGING_DSN": db, "PROD_DSN": db, "SECRET_NOTE": "hush-hush-9731"}
    plan = write_plan(workdir / "p.json", **TAGGED)
    run_id = _applied(cli, plan, env)
    summary = next((workdir / "backfill_logs").rglob("backfill_summary.md")).read_text()
    assert "`TAG` = v2" in summary  # the reviewer sees the value that ran
    assert "secret: `SECRET_NOTE`" in summary
    assert "hush-hush-9731" not in summary
    assert (
        cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env).exit_code == 0
    )
    status = cli("status", run_id, env={**env, "TAG": "EVIL"})
    assert "variables now: TAG='EVIL', SECRET_NOTE=(secret)" in status.output, status.output
    assert "gate apply-staging: closed — variable TAG is 'EVIL'" in status.output
    assert "next: run with the values apply-staging approved" in status.output
    assert "hush-hush-9731" not in status.output

    evil = cli("pipeline", str(plan), "--run", run_id, "-q", env={**env, "TAG": "EVIL"})
    assert evil.exit_code == 3, evil.output
    assert "variable TAG is 'EVIL', but 'v2' was approved" in evil.output
    assert val(db, "SELECT count(*) FROM items WHERE val = 'EVIL'") == 0

    other_secret = cli(
        "soak",
        str(plan),
        "-e",
        "staging",
        "--run",
        run_id,
        env={**env, "SECRET_NOTE": "other-value-5512"},
    )
    assert other_secret.exit_code == 3, other_secret.output
    assert "secret variable SECRET_NOTE has a different value" in other_secret.output
    assert "other-value-5512" not in other_secret.output
    assert "hush-hush-9731" not in other_secret.output

    same = cli("soak", str(plan), "-e", "staging", "--run", run_id, "--duration", "1s", env=env)
    assert same.exit_code == 3, same.output
    assert "verdict PASS" in same.output


def test_an_approver_with_other_variable_values_is_told_which(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 100)
    env = {"STAGING_DSN": db, "PROD_DSN": db}
    plan = write_plan(workdir / "p.json", **TAGGED)
    run_id = _applied(cli, plan, env)
    refused = cli(
        "approve", run_id, "--gate", "apply-staging", "--as", "alice", env={**env, "TAG": "v3"}
    )
    assert refused.exit_code == 2, refused.output
    assert "variable TAG is 'v3', but 'v2' ran" in refused.output
    assert val(db, "SELECT count(*) FROM backfill.gate_decisions") == 0


def test_a_reject_is_final_for_the_run(cli: Callable[..., Any], workdir: Path, db: str) -> None:
    make_items(db, 100)
    env = {"STAGING_DSN": db, "PROD_DSN": db}
    plan = write_plan(workdir / "p.json")
    run_id = _applied(cli, plan, env)
    gate = ("--gate", "apply-staging")
    assert cli("reject", run_id, *gate, "--as", "bob", "--note", "no", env=env).exit_code == 0
    again = cli("approve", run_id, *gate, "--as", "alice", env=env)
    assert again.exit_code == 4, again.output
    assert "a reject is final for the run" in again.output
    soak = cli("soak", str(plan), "-e", "staging", "--run", run_id, env=env)
    assert soak.exit_code == 4, soak.output
    assert "gate apply-staging is rejected" in soak.output
    assert "start a new run" in soak.output
    assert val(db, "SELECT count(*) FROM backfill.gate_decisions WHERE decision = 'approve'") == 0


def test_an_approve_racing_a_reject_leaves_the_gate_rejected(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 100)
    env = {"STAGING_DSN": db, "PROD_DSN": db}
    plan = write_plan(workdir / "p.json")
    run_id = _applied(cli, plan, env)
    full = {
        **os.environ,
        **env,
        "BACKFILL_LOGS": str(workdir / "backfill_logs"),
        "BACKFILL_ACTOR": "operator",
    }
    base = [sys.executable, "-m", "runner"]
    procs = [
        subprocess.Popen(
            [*base, verb, run_id, "--gate", "apply-staging", "--as", who, "--note", "race"],
            cwd=workdir,
            env=full,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for verb, who in (("approve", "alice"), ("reject", "bob"))
    ]
    for p in procs:
        p.communicate(timeout=120)
    status = cli("status", run_id, env=env)
    assert "gate apply-staging: rejected" in status.output, status.output
    assert cli("soak", str(plan), "-e", "staging", "--run", run_id, env=env).exit_code == 4


def test_decisions_inserted_or_edited_in_the_ledger_open_nothing(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 100)
    env = {"STAGING_DSN": db, "PROD_DSN": db}
    plan = write_plan(workdir / "p.json")
    run_id = _applied(cli, plan, env)
    soak = ("soak", str(plan), "-e", "staging", "--run", run_id, "--duration", "1s")

    # a hand-inserted approval, copying the digests of the phase
    sql(
        db,
        """INSERT INTO backfill.gate_decisions (run_id, gate, decision, actor, plan_digest,
                                                report_digest, criteria)
           SELECT run_id, 'apply-staging', 'approve', 'alice', result->'plan'->>'digest',
                  report_digest, criteria FROM backfill.phases WHERE run_id = $1""",
        run_id,
    )
    forged = cli(*soak, env=env)
    assert forged.exit_code == 4, forged.output
    assert "changed outside backfill" in forged.output
    assert val(db, "SELECT count(*) FROM backfill.phases WHERE phase = 'soak'") == 0


def test_a_reject_edited_into_an_approval_opens_nothing(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 100)
    env = {"STAGING_DSN": db, "PROD_DSN": db}
    plan = write_plan(workdir / "p.json")
    run_id = _applied(cli, plan, env)
    assert (
        cli("reject", run_id, "--gate", "apply-staging", "--as", "bob", "--note", "no", env=env)
    ).exit_code == 0
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        sql(db, "UPDATE backfill.gate_decisions SET decision = 'approve', actor = 'alice'")
    # the table's owner can switch the guard off; the chain still tells
    sql(
        db,
        "ALTER TABLE backfill.gate_decisions DISABLE TRIGGER decision_identity;"
        " UPDATE backfill.gate_decisions SET decision = 'approve', actor = 'alice'",
    )
    refused = cli("soak", str(plan), "-e", "staging", "--run", run_id, env=env)
    assert refused.exit_code == 4, refused.output
    assert "decision #1 (approve of apply-staging by alice) does not verify" in refused.output


def test_failed_criteria_edited_to_pass_need_the_override_anyway(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 100)
    env = {"STAGING_DSN": db, "PROD_DSN": db}
    plan = write_plan(
        workdir / "p.json",
        soak__checks=[{"name": "never", "sql": "SELECT 1", "pass_if": "== 0"}],
    )
    run_id = _applied(cli, plan, env)
    assert (
        cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env).exit_code == 0
    )
    soaked = cli("soak", str(plan), "-e", "staging", "--run", run_id, "--duration", "1s", env=env)
    assert soaked.exit_code == 4, soaked.output
    sql(db, "UPDATE backfill.phases SET criteria = 'pass' WHERE phase = 'soak'")
    approve = cli("approve", run_id, "--gate", "soak-staging", "--as", "alice", env=env)
    assert approve.exit_code == 4, approve.output
    assert "the ledger's record of the soak phase was changed outside backfill" in approve.output
    health = cli("health", str(plan), "-e", "prod", "--run", run_id, env=env)
    assert health.exit_code == 4, health.output


def test_a_rolled_back_run_does_not_go_forward_and_every_report_says_so(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 200)
    env = {"STAGING_DSN": db, "PROD_DSN": db}
    plan = write_plan(workdir / "p.json")
    run_id = _applied(cli, plan, env)
    assert (
        cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env).exit_code == 0
    )
    soaked = cli("soak", str(plan), "-e", "staging", "--run", run_id, "--duration", "1s", env=env)
    assert soaked.exit_code == 3, soaked.output

    undone = cli("rollback", run_id, "-e", "staging", env=env)
    assert undone.exit_code == 0, undone.output
    assert "recorded as rolled back in staging" in undone.output
    assert val(db, "SELECT count(*) FROM items WHERE val = 'new'") == 40  # the original 'new's

    approve = cli("approve", run_id, "--gate", "soak-staging", "--as", "alice", env=env)
    assert approve.exit_code == 4, approve.output
    assert "was rolled back in staging" in approve.output
    for args in (
        ("health", str(plan), "-e", "prod", "--run", run_id),
        ("pipeline", str(plan), "--run", run_id, "-q"),
        ("apply", str(plan), "-e", "staging", "--run", run_id, "-q"),
    ):
        refused = cli(*args, env=env)
        assert refused.exit_code == 4, (args, refused.output)
        assert "rolled back" in refused.output
    assert val(db, "SELECT count(*) FROM items WHERE val = 'new'") == 40
    assert val(db, "SELECT count(*) FROM backfill.gate_decisions") == 1

    status = cli("status", run_id, env=env)
    assert "ROLLED BACK in staging" in status.output, status.output
    assert "gate soak-staging: rolled-back" in status.output
    rendered = cli("report", run_id, env=env)
    assert rendered.exit_code == 0, rendered.output
    logs = workdir / "backfill_logs"
    for name in ("backfill_summary.md", "staging_observability.md"):
        assert "**Rolled back**: in `staging`" in next(logs.rglob(name)).read_text(), name


def test_with_database_identity_only_an_approvers_own_login_can_open_a_gate(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 100)
    tag = str(val(db, "SELECT current_database()"))[-8:]  # the DSN may carry a socket path
    runner, alice, bob, approvers = (f"{n}_{tag}" for n in ("runner", "alice", "bob", "approvers"))
    sql(
        db,
        f"CREATE ROLE {runner} LOGIN; CREATE ROLE {approvers} NOLOGIN;"
        f" CREATE ROLE {alice} LOGIN IN ROLE {approvers}; CREATE ROLE {bob} LOGIN IN ROLE {approvers};"
        f" GRANT SELECT, UPDATE ON items TO {runner}",
    )
    admin_env = {"STAGING_DSN": db, "PROD_DSN": db}
    env = {"STAGING_DSN": _with(db, user=runner), "PROD_DSN": _with(db, user=runner)}
    plan = write_plan(workdir / "p.json", gates={"approvers": [alice, bob], "identity": "database"})
    try:
        assert cli("init", str(plan), "-e", "staging", env=admin_env).exit_code == 0
        sql(
            db,
            f"GRANT USAGE ON SCHEMA backfill TO {runner}, {approvers};"
            f" GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA backfill TO {runner};"
            f" REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON backfill.gate_decisions FROM {runner};"
            f" GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA backfill TO {runner};"
            f" GRANT SELECT ON ALL TABLES IN SCHEMA backfill TO {approvers};"
            f" GRANT INSERT ON backfill.gate_decisions TO {approvers};"
            f" GRANT USAGE ON SEQUENCE backfill.gate_decisions_id_seq TO {approvers}",
        )
        run_id = _applied(cli, plan, env)
        gate = ("--gate", "apply-staging")

        # the runner's login cannot record a decision, through backfill or by hand
        as_runner = cli(
            "approve", run_id, *gate, env={**env, "BACKFILL_APPROVER_DSN": env["STAGING_DSN"]}
        )
        assert as_runner.exit_code != 0, as_runner.output
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            sql(
                env["STAGING_DSN"],
                "INSERT INTO backfill.gate_decisions (run_id, gate, decision, actor, plan_digest,"
                " report_digest, criteria) VALUES ($1, 'apply-staging', 'approve', $2, '', '', 'pass')",
                run_id,
                alice,
            )
        # an approver's login cannot decide in another's name
        alice_env = {**env, "BACKFILL_APPROVER_DSN": _with(db, user=alice)}
        posing = cli("approve", run_id, *gate, "--as", bob, env=alice_env)
        assert posing.exit_code == 2, posing.output
        assert f"but you are logged in as {alice}" in posing.output
        sql(
            _with(db, user=alice),
            "INSERT INTO backfill.gate_decisions (run_id, gate, decision, actor, plan_digest,"
            " report_digest, criteria, db_user) VALUES ($1, 'apply-staging', 'approve', $2, '', '', 'pass', $2)",
            run_id,
            bob,
        )
        assert val(db, "SELECT db_user FROM backfill.gate_decisions") == alice  # PostgreSQL's word
        waiting = cli("soak", str(plan), "-e", "staging", "--run", run_id, env=env)
        assert waiting.exit_code in (3, 4), (
            waiting.output
        )  # bob's name on alice's row opens nothing
        sql(
            db,
            "ALTER TABLE backfill.gate_decisions DISABLE TRIGGER decision_identity;"
            " DELETE FROM backfill.gate_decisions;"
            " ALTER TABLE backfill.gate_decisions ENABLE TRIGGER decision_identity",
        )

        approved = cli("approve", run_id, *gate, env=alice_env)
        assert approved.exit_code == 0, approved.output
        soaked = cli(
            "soak", str(plan), "-e", "staging", "--run", run_id, "--duration", "1s", env=env
        )
        assert soaked.exit_code == 3, soaked.output
        assert "verdict PASS" in soaked.output

        # a runner login that could write decisions is refused: it could forge them
        sql(db, f"GRANT INSERT ON backfill.gate_decisions TO {runner}")
        forgeable = cli("pipeline", str(plan), "--run", run_id, "-q", env=env)
        assert forgeable.exit_code == 2, forgeable.output
        assert "could forge an approval" in forgeable.output
    finally:
        sql(
            db,
            f"DROP OWNED BY {runner}, {alice}, {bob}, {approvers};"
            f" DROP ROLE {alice}; DROP ROLE {bob}; DROP ROLE {approvers}; DROP ROLE {runner}",
        )


def test_an_approved_rollout_cannot_reach_the_prod_canary_with_another_variable_value(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    staging, prod = make_db(), make_db()
    make_items(staging, 200)
    make_items(prod, 300)
    env = {"STAGING_DSN": staging, "PROD_DSN": prod}
    plan = write_plan(workdir / "p.json", soak__duration="1s", **TAGGED)
    run_id = _applied(cli, plan, env)
    for gate, phase in (
        ("apply-staging", ("soak", str(plan), "-e", "staging", "--run", run_id)),
        ("soak-staging", ("health", str(plan), "-e", "prod", "--run", run_id)),
    ):
        assert cli("approve", run_id, "--gate", gate, "--as", "alice", env=env).exit_code == 0
        assert cli(*phase, env=env).exit_code == 3
    assert cli("approve", run_id, "--gate", "health-prod", "--as", "alice", env=env).exit_code == 0
    health_md = next((workdir / "backfill_logs").rglob("prod_health_check.md")).read_text()
    assert "`TAG` = v2" in health_md

    evil = {**env, "TAG": "EVIL"}
    piped = cli("pipeline", str(plan), "--run", run_id, "-q", env=evil)
    assert piped.exit_code == 3, piped.output
    assert "variable TAG is 'EVIL', but 'v2' was approved" in piped.output
    mini = next((workdir / "backfill_logs").rglob("prod_mini_backfill_plan.json"))
    direct = cli("apply", str(mini), "-e", "prod", "--run", run_id, "-q", env=evil)
    assert direct.exit_code == 3, direct.output
    assert "variable TAG is 'EVIL'" in direct.output
    assert val(prod, "SELECT count(*) FROM items WHERE val = 'EVIL'") == 0

    canary = cli("pipeline", str(plan), "--run", run_id, "-q", env=env)
    assert canary.exit_code == 3, canary.output
    assert val(prod, "SELECT count(*) FROM items WHERE val = 'v2'") > 0


def test_a_staging_rollback_stops_the_prod_apply_of_the_run_too(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    staging, prod = make_db(), make_db()
    make_items(staging, 200)
    make_items(prod, 300)
    env = {"STAGING_DSN": staging, "PROD_DSN": prod}
    plan = write_plan(workdir / "p.json", soak__duration="1s")
    run_id = _applied(cli, plan, env)
    for gate, phase in (
        ("apply-staging", ("soak", str(plan), "-e", "staging", "--run", run_id)),
        ("soak-staging", ("health", str(plan), "-e", "prod", "--run", run_id)),
    ):
        assert cli("approve", run_id, "--gate", gate, "--as", "alice", env=env).exit_code == 0
        assert cli(*phase, env=env).exit_code == 3
    assert cli("approve", run_id, "--gate", "health-prod", "--as", "alice", env=env).exit_code == 0
    prod_before = val(prod, "SELECT count(*) FROM items WHERE val = 'new'")

    assert cli("rollback", run_id, "-e", "staging", env=env).exit_code == 0
    mini = next((workdir / "backfill_logs").rglob("prod_mini_backfill_plan.json"))
    direct = cli("apply", str(mini), "-e", "prod", "--run", run_id, "-q", env=env)
    assert direct.exit_code == 4, direct.output
    assert "was rolled back in staging" in direct.output
    assert cli("pipeline", str(plan), "--run", run_id, "-q", env=env).exit_code == 4
    assert val(prod, "SELECT count(*) FROM items WHERE val = 'new'") == prod_before
