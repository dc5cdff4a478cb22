"""The plan model: every bad plan is refused with exit 2 and a message naming file and field."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runner.errors import PlanError
from runner.plan import load_plan, parse_condition, parse_duration
from tests.conftest import plan_dict, write_plan

GOOD_ENV = {
    "STAGING_DSN": "postgresql://u:secret@localhost/s",
    "PROD_DSN": "postgresql://u@localhost/p",
}

# (what is wrong, plan overrides, text the error must contain)
BAD_PLANS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("unknown field", {"batching__sise": 10}, ["batching.sise", "unknown field"]),
    ("unknown guard", {"guards__conections": {"hold": 0.5}}, ["guards.conections", "unknown"]),
    (
        "critical below hold",
        {"guards__connections": {"hold": 0.9, "critical": 0.5}},
        ["guards.connections", "below hold"],
    ),
    (
        "custom guard without pass_if",
        {"guards__custom": [{"name": "q", "sql": "SELECT 1"}]},
        ["guards.custom.0.pass_if", "missing"],
    ),
    (
        "custom guard with a side effect",
        {"guards__custom": [{"name": "q", "sql": "SELECT pg_notify('a', 'b')", "pass_if": "== 0"}]},
        ["guards.custom.0.sql", "pg_notify"],
    ),
    (
        "adaptive bounds without a target",
        {"batching__max_size": 5000},
        ["batching", "target_batch_seconds"],
    ),
    (
        "start size outside the bounds",
        {"batching__target_batch_seconds": 1, "batching__max_size": 50},
        ["batching", "min_size..max_size"],
    ),
    ("wrong type", {"batching__size": "lots"}, ["batching.size", "integer"]),
    ("zero batch size", {"batching__size": 0}, ["batching.size", "greater than 0"]),
    (
        "negative rate",
        {"batching__batches_per_minute": -5},
        ["batching.batches_per_minute", "greater than 0"],
    ),
    ("too many workers", {"batching__workers": 64}, ["batching.workers", "32"]),
    ("bad duration", {"batching__lock_timeout": "soon"}, ["batching.lock_timeout", "duration"]),
    ("empty discovery", {"discovery__sql": "   "}, ["discovery.sql", "at least 1 character"]),
    (
        "discovery with OFFSET",
        {"discovery__sql": "SELECT id FROM items OFFSET 10"},
        ["discovery.sql", "OFFSET"],
    ),
    (
        "discovery with OFFSET 0.5",
        {"discovery__sql": "SELECT id FROM items OFFSET 0.5"},
        ["discovery.sql", "OFFSET"],
    ),
    (
        "discovery with OFFSET $1",
        {"discovery__sql": "SELECT id FROM items OFFSET $1"},
        ["discovery.sql", "OFFSET"],
    ),
    ("apply ignores keys", {"apply__sql": "UPDATE items SET val = 'new'"}, ["apply.sql", "$1"]),
    (
        "two statements",
        {"apply__sql": "UPDATE items SET val = 'x' WHERE id = ANY($1); DELETE FROM items"},
        ["apply.sql", "one statement"],
    ),
    ("key among columns", {"target__columns": ["id", "val"]}, ["target", "key columns"]),
    (
        "no columns",
        {"target__columns": []},
        ["target.columns", "list the columns the apply changes"],
    ),
    ("no key", {"target__key": []}, ["target.key", "at least 1"]),
    ("duplicate column", {"target__columns": ["val", "val"]}, ["target.columns", "twice"]),
    ("missing target", {"target": None}, ["target", "required field is missing"]),
    ("bad plan name", {"plan__name": "my plan!"}, ["plan.name", "pattern"]),
    (
        "bad pass_if",
        {"soak__checks": [{"name": "c", "sql": "SELECT 1", "pass_if": "about 3"}]},
        ["soak.checks.0.pass_if", "cannot read condition"],
    ),
    (
        "check without criterion",
        {"soak__checks": [{"name": "c", "sql": "SELECT 1"}]},
        ["soak.checks.0", "pass_if"],
    ),
    (
        "baseline without drop",
        {"soak__checks": [{"name": "c", "sql": "SELECT 1", "baseline": 3}]},
        ["soak.checks.0", "max_drop"],
    ),
    (
        "max_drop above 1",
        {"soak__checks": [{"name": "c", "sql": "SELECT 1", "baseline": 1, "max_drop": 2}]},
        ["soak.checks.0.max_drop", "less than or equal to 1"],
    ),
    (
        "pipeline env missing",
        {"pipeline": {"staging": "stage", "prod": "prod"}},
        ["pipeline.staging", "stage"],
    ),
    ("approver empty", {"gates__approvers": [""]}, ["gates.approvers.0", "at least 1"]),
    ("no environments", {"environments": {}}, ["environments", "at least 1"]),
    ("apply with neither form", {"apply": {}}, ["either `sql` (one statement) or `statements`"]),
    (
        "apply with both forms",
        {"apply": {"sql": "UPDATE items SET val = 1 WHERE id = ANY($1)", "statements": ["x $1"]}},
        ["either `sql`"],
    ),
    (
        "a statement without the keys",
        {"apply": {"statements": ["DELETE FROM items"]}},
        ["apply.statements: statement 0 must use the batch's keys"],
    ),
    (
        "an upsert without columns",
        {"writes": [{"table": "t", "key": ["id"], "operations": ["upsert"]}]},
        ["writes.0", "update (or upsert) may change"],
    ),
    (
        "the target declared again as a write",
        {"writes": [{"table": "items", "key": ["id"], "operations": ["insert"]}]},
        ["declared twice"],
    ),
    ("the target inserted into", {"target__operations": ["insert"]}, ["target.operations"]),
]


@pytest.mark.parametrize(("case", "over", "needles"), BAD_PLANS, ids=[c[0] for c in BAD_PLANS])
def test_validate_refuses_bad_plan_with_exit_2_naming_the_field(
    cli: Callable[..., Any], workdir: Path, case: str, over: dict[str, Any], needles: list[str]
) -> None:
    path = write_plan(workdir / "bad.json", **over)
    result = cli("validate", str(path), env=GOOD_ENV)
    assert result.exit_code == 2, result.output
    assert str(path.name) in result.output
    for needle in needles:
        assert needle in result.output, f"{case}: {needle!r} not in {result.output!r}"
    assert "Traceback" not in result.output


def test_unset_variable_without_default_is_named(cli: Callable[..., Any], workdir: Path) -> None:
    path = write_plan(workdir / "p.json")
    result = cli("validate", str(path), env={"STAGING_DSN": "x", "PROD_DSN": None})
    assert result.exit_code == 2
    assert "environments.prod.dsn" in result.output
    assert "${PROD_DSN}" in result.output
    assert "export PROD_DSN" in result.output


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("syntax.toml", "[plan\nname = 'x'", "TOML syntax error"),
        ("syntax.json", '{"plan": ', "JSON syntax error at line 1"),
        ("list.json", "[1, 2]", "must be an object"),
        ("plan.yaml", "plan: {}", "must end in .toml or .json"),
    ],
)
def test_unreadable_plan_files_are_refused(
    cli: Callable[..., Any], workdir: Path, name: str, text: str, needle: str
) -> None:
    (workdir / name).write_text(text)
    result = cli("validate", name)
    assert result.exit_code == 2
    assert needle in result.output
    assert name in result.output


def test_missing_plan_file(cli: Callable[..., Any], workdir: Path) -> None:
    result = cli("validate", "nowhere.toml")
    assert result.exit_code == 2
    assert "nowhere.toml: no such plan file" in result.output


def test_good_plan_prints_a_summary(cli: Callable[..., Any], workdir: Path) -> None:
    path = write_plan(workdir / "p.json")
    result = cli("validate", str(path), env=GOOD_ENV)
    assert result.exit_code == 0, result.output
    assert "plan 'items_new' is valid" in result.output
    assert "secret" not in result.output


def test_offset_0_in_a_discovery_subquery_is_allowed(tmp_path: Path) -> None:
    """OFFSET 0 skips no row: it keeps a NOT EXISTS a per-row probe (README, Performance)."""
    sql = (
        "SELECT s.id FROM items AS s WHERE NOT EXISTS "
        "(SELECT FROM copy AS c WHERE c.id = s.id OFFSET 0)"
    )
    path = write_plan(tmp_path / "p.json", discovery={"sql": sql})
    loaded = load_plan(path, {"STAGING_DSN": "embedded", "PROD_DSN": "embedded"})
    assert loaded.plan.discovery.sql == sql


def test_toml_and_json_of_the_same_plan_have_the_same_digest(tmp_path: Path) -> None:
    demo = Path(__file__).resolve().parents[2] / "plans" / "profiles_results_v1_2_1.toml"
    toml_plan = load_plan(demo, env={})
    as_json = tmp_path / "same.json"
    as_json.write_text(json.dumps(toml_plan.raw))
    assert load_plan(as_json, env={}).digest == toml_plan.digest


def test_digest_changes_with_the_plan_but_not_with_key_order(tmp_path: Path) -> None:
    a = tmp_path / "a.json"
    a.write_text(json.dumps(plan_dict()))
    b = tmp_path / "b.json"
    b.write_text(json.dumps(dict(reversed(list(plan_dict().items())))))
    c = write_plan(tmp_path / "c.json", batching__size=101)
    assert load_plan(a, env=GOOD_ENV).digest == load_plan(b, env=GOOD_ENV).digest
    assert load_plan(a, env=GOOD_ENV).digest != load_plan(c, env=GOOD_ENV).digest


def test_interpolation_with_default_and_secrets_collected(tmp_path: Path) -> None:
    path = write_plan(
        tmp_path / "p.json",
        environments={"staging": {"dsn": "${S:-embedded}"}, "prod": {"dsn": "${P}"}},
    )
    loaded = load_plan(path, env={"P": "postgresql://u:hunter22@h/db"})
    assert loaded.plan.environments["staging"].dsn == "embedded"
    assert "postgresql://u:hunter22@h/db" in loaded.secrets
    with pytest.raises(PlanError, match=r"\$\{P\} is not set"):
        load_plan(path, env={})


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("500ms", 0.5), ("5m", 300), ("6h", 21600), (30, 30)]
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("cond", "value", "holds"),
    [
        ("== 0", 0, True),
        ("== 0", 1, False),
        (">= 0.85", 0.85, True),
        (">= 0.85", 0.84, False),
        ("between 0.9 1.1", 1.0, True),
        ("between 0.9 1.1", 1.2, False),
        ("is true", 1.0, True),
        ("is true", 0.0, False),
        ("< 5", 4, True),
        ("!= 3", 3, False),
    ],
)
def test_conditions(cond: str, value: float, holds: bool) -> None:
    assert parse_condition(cond).holds(value) is holds


ABSURD: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "infinite pace",
        {"batching__batches_per_minute": float("inf")},
        ["batching.batches_per_minute", "finite number"],
    ),
    (
        "a pace that never finishes a batch",
        {"batching__rows_per_second": 1e-12},
        ["batching.rows_per_second = 1e-12", "one batch a day", "rows_per_second >= 0.00115741"],
    ),
    (
        "a batch a year",
        {"batching__batches_per_minute": 1e-6},
        ["batching.batches_per_minute = 1e-06", "one batch a day"],
    ),
    (
        "NaN baseline",
        {
            "soak__checks": [
                {"name": "c", "sql": "SELECT 1", "baseline": float("nan"), "max_drop": 0.1}
            ]
        },
        ["soak.checks.0.baseline", "finite number"],
    ),
    (
        "timeout beyond a day",
        {"batching__statement_timeout": "30d"},
        ["batching.statement_timeout", "at most 1d"],
    ),
    ("soak for a century", {"soak__duration": "36500d"}, ["soak.duration", "at most 30d"]),
    (
        "$1 only in a comment",
        {"apply__sql": "UPDATE items SET val = 'new' -- WHERE id = ANY($1)"},
        ["apply.sql", "a `$1` in a comment or a string does not count"],
    ),
    (
        "$1 only in a string",
        {"apply__sql": "UPDATE items SET val = '$1'"},
        ["apply.sql", "must use the batch's keys"],
    ),
    (
        "a check that notifies",
        {
            "soak__checks": [
                {"name": "c", "sql": "SELECT pg_notify('x', 'y') IS NULL", "pass_if": "is true"}
            ]
        },
        ["soak.checks.0.sql", "pg_notify()", "READ ONLY transaction does not block"],
    ),
    (
        "a discovery that terminates sessions",
        {"discovery__sql": 'SELECT id FROM items WHERE pg_catalog."pg_terminate_backend"(42)'},
        ["discovery.sql", "pg_terminate_backend()"],
    ),
    (
        "a mysql DSN",
        {"environments__staging__dsn": "mysql://u:pw@h/db"},
        ["environments.staging.dsn", "mysql:// URL"],
    ),
    (
        "a garbage DSN",
        {"environments__staging__dsn": "not a dsn"},
        ["environments.staging.dsn", "neither a URL nor key=value"],
    ),
]


@pytest.mark.parametrize(("case", "over", "needles"), ABSURD, ids=[c[0] for c in ABSURD])
def test_absurd_values_and_unsafe_sql_are_refused_with_exit_2(
    cli: Callable[..., Any], workdir: Path, case: str, over: dict[str, Any], needles: list[str]
) -> None:
    path = write_plan(workdir / "bad.json", **over)
    result = cli("validate", str(path), env=GOOD_ENV)
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output, f"{case}: {needle!r} not in {result.output!r}"
    assert "pw@" not in result.output


def test_an_unset_variable_names_the_plan_file(cli: Callable[..., Any], workdir: Path) -> None:
    path = write_plan(workdir / "p.json")
    result = cli("validate", str(path), env={"STAGING_DSN": "embedded", "PROD_DSN": None})
    assert result.exit_code == 2
    assert f"{path}: environments.prod.dsn: environment variable ${{PROD_DSN}} is not set" in (
        result.output.replace("\n", "")
    )


def test_a_byte_order_mark_is_named(cli: Callable[..., Any], workdir: Path) -> None:
    path = workdir / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b"[plan]\nname = 'x'\n")
    result = cli("validate", str(path))
    assert result.exit_code == 2
    assert "byte-order mark (BOM)" in result.output
    assert "without BOM" in result.output


def test_a_huge_plan_gets_a_short_error(cli: Callable[..., Any], workdir: Path) -> None:
    path = workdir / "huge.json"
    plan = plan_dict()
    plan["plan"]["description"] = "x" * 10_000_000
    path.write_text(json.dumps(plan))
    result = cli("validate", str(path))
    assert result.exit_code == 2
    assert "a plan may be at most 1,000,000 bytes" in result.output
    assert len(result.output) < 1000
    many = workdir / "many.json"
    bad = plan_dict()
    bad["gates"]["approvers"] = [""] * 5000
    bad["plan"]["owner"] = ["y" * 100_000]
    many.write_text(json.dumps(bad))
    result = cli("validate", str(many), env=GOOD_ENV)
    assert result.exit_code == 2
    assert "more" in result.output
    assert len(result.output) < 5000


def test_a_plan_read_from_a_device_stops_at_the_size_limit(cli: Callable[..., Any]) -> None:
    result = cli("validate", "/dev/zero")
    assert result.exit_code == 2
    assert "a plan may be at most 1,000,000 bytes" in result.output


def test_a_semicolon_in_a_quoted_name_is_not_a_second_statement_and_escaped_names_are_refused(
    tmp_path: Path,
) -> None:
    ok = write_plan(
        tmp_path / "ok.json",
        apply__sql='UPDATE items SET "c;ol" = 1 WHERE id = ANY($1)',
    )
    assert load_plan(ok, env=GOOD_ENV).plan
    hidden = write_plan(
        tmp_path / "hidden.json",
        discovery__sql='SELECT id FROM items WHERE U&"pg_\\0074erminate_backend"(1) IS NULL',
    )
    with pytest.raises(PlanError, match="Unicode-escaped"):
        load_plan(hidden, env=GOOD_ENV)


def test_embedded_is_the_runners_own_server_not_a_secret(tmp_path: Path) -> None:
    from runner import redact

    path = write_plan(tmp_path / "p.json")
    loaded = load_plan(
        path, env={"STAGING_DSN": "embedded", "PROD_DSN": "postgresql://u:pw1234@h/db"}
    )
    assert "embedded" not in loaded.secrets
    assert redact.redact_text("PostgreSQL under embedded") == "PostgreSQL under embedded"
    assert "pw1234" not in redact.redact_text("postgresql://u:pw1234@h/db failed")
