"""The Starforge scenario (seed 002, #11): messy hero_snapshots JSON normalized into three tables
by the shipped plan's upserts, checked against an independent reading of the JSON in Python, and
undone exactly; the few snapshots malformed beyond what the plan reads quarantined (#12), exactly
those the Python reading cannot read; and `backfill demo --scenario starforge` end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from runner.db import PINNED_SETTINGS, EmbeddedServer
from runner.demo import starforge
from runner.plan import load_plan
from tests.conftest import ROOT, run, sql, val
from tests.helpers import env_for, rollback_file, run_id_of, run_psql

PLAN = ROOT / "plans" / "starforge_hero_snapshots.toml"
_DIGITS = re.compile(r"[0-9]+")
_SIGNED = re.compile(r"\s*[+-]?[0-9]+\s*")
INT_MAX = 2**31 - 1


# -- the plan's rules, read independently of its SQL ----------------------------------------------


class Unreadable(Exception):
    """A value the plan does not guess at: its apply fails on it, with this SQLSTATE."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def _int(text: str) -> int:
    n = int(text)
    if not -INT_MAX - 1 <= n <= INT_MAX:
        raise Unreadable("22003")  # numeric_value_out_of_range
    return n


def _as_int(entry: dict[str, Any], field: str, default: int | None) -> int | None:
    """An integer field: a whole number or a string of digits; missing or null is the default.
    A fractional number, an object or true skips the entry (None), and so does an Amount that is
    a word ("lots"); a TroopId or Level that is any other string, or an integer beyond int,
    cannot be read (`Unreadable`)."""
    v = entry.get(field)
    if v is None:
        return default
    if isinstance(v, str) and field != "Amount" and not _DIGITS.fullmatch(v):
        if not _SIGNED.fullmatch(v):
            raise Unreadable("22P02")  # invalid_text_representation
        return _int(v)
    if isinstance(v, bool) or not isinstance(v, int | str):
        return None
    text = str(v)
    return _int(text) if _DIGITS.fullmatch(text) else None


def unreadable(raw: Any) -> str | None:
    """The SQLSTATE the plan's apply fails with on a snapshot, or None if it reads it."""
    try:
        troops_of(raw)
    except Unreadable as e:
        return e.sqlstate
    return None


def _as_pet_int(entry: dict[str, Any], field: str, default: int | None) -> int | None:
    """A pet's integer field: a number or a string of up to 9 digits; missing or null is the
    default; any other value skips the entry (None). Pets are never quarantined."""
    v = entry.get(field)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | str):
        return None
    text = str(v)
    return int(text) if re.fullmatch(r"[0-9]{1,9}", text) else None


def _entries(raw: Any, field: str) -> list[dict[str, Any]]:
    profile = raw.get("ProfileData") if isinstance(raw, dict) else None
    items = profile.get(field) if isinstance(profile, dict) else None
    return [e for e in items if isinstance(e, dict)] if isinstance(items, list) else []


def troops_of(raw: Any) -> dict[int, tuple[int, int]]:
    """troop_id → (amount, level) of one snapshot: duplicates keep their largest values.
    Raises `Unreadable` for a snapshot the plan's apply fails on."""
    found: dict[int, tuple[int, int]] = {}
    for e in _entries(raw, "Troops"):
        tid = _as_int(e, "TroopId", None)
        amount, level = _as_int(e, "Amount", 0), _as_int(e, "Level", 1)
        if tid is None or amount is None or level is None or not 1 <= tid <= starforge.TROOPS:
            continue
        was = found.get(tid, (amount, level))
        found[tid] = (max(was[0], amount), max(was[1], level))
    return found


def pets_of(raw: Any) -> dict[int, int]:
    found: dict[int, int] = {}
    for e in _entries(raw, "Pets"):
        pid, level = _as_pet_int(e, "PetId", None), _as_pet_int(e, "Level", 1)
        if pid is None or level is None or not 1 <= pid <= starforge.PETS:
            continue
        found[pid] = max(found.get(pid, level), level)
    return found


@dataclass
class Expected:
    troops: dict[int, tuple[int, int, int | None, datetime]]  # amount, level, snapshot, at
    pets: dict[int, tuple[int, int | None, datetime]]


def expected_for(before: Expected, snapshots: list[asyncpg.Record]) -> Expected:
    """A user's rows once every snapshot the plan reads is processed (the others are quarantined
    and change nothing): per troop (pet), the newest of the row it had and the snapshots that
    list it, by (snapshot_at, snapshot_id)."""
    troops, pets = dict(before.troops), dict(before.pets)
    for s in snapshots:
        raw = json.loads(s["raw"])
        if unreadable(raw):
            continue
        for tid, (amount, level) in troops_of(raw).items():
            had = troops.get(tid)
            if had is None or (had[3], had[2] or 0) < (s["created_at"], s["id"]):
                troops[tid] = (amount, level, s["id"], s["created_at"])
        for pid, level in pets_of(raw).items():
            had_pet = pets.get(pid)
            if had_pet is None or (had_pet[2], had_pet[1] or 0) < (s["created_at"], s["id"]):
                pets[pid] = (level, s["id"], s["created_at"])
    return Expected(troops, pets)


async def _rows(conn: asyncpg.Connection, schema: str, user: int) -> Expected:
    troops = {
        r["troop_id"]: (r["amount"], r["level"], r["snapshot_id"], r["snapshot_at"])
        for r in await conn.fetch(f"SELECT * FROM {schema}.user_troops WHERE user_id = $1", user)
    }
    pets = {
        r["pet_id"]: (r["level"], r["snapshot_id"], r["snapshot_at"])
        for r in await conn.fetch(f"SELECT * FROM {schema}.user_pets WHERE user_id = $1", user)
    }
    return Expected(troops, pets)


async def check_sampled_users(conn: asyncpg.Connection, every: int = 7) -> tuple[int, int]:
    """Compare the normalized rows of sampled users (those of every `every`-th snapshot) with
    the Python reading of all their snapshots; returns how many users and troop rows."""
    users = [
        r["user_id"]
        for r in await conn.fetch(
            "SELECT DISTINCT user_id FROM public.hero_snapshots WHERE id % $1 = 0 ORDER BY 1",
            every,
        )
    ]
    rows = 0
    for user in users:
        snaps = await conn.fetch(
            "SELECT id, created_at, raw::text AS raw FROM public.hero_snapshots "
            "WHERE user_id = $1 ORDER BY id",
            user,
        )
        before = await _rows(conn, starforge.BEFORE_SCHEMA, user)
        want = expected_for(before, snaps)
        got = await _rows(conn, "public", user)
        rows += len(got.troops)
        assert got.troops == want.troops, user
        assert got.pets == want.pets, user
        readable = [s for s in snaps if not unreadable(json.loads(s["raw"]))]
        summary = await conn.fetchrow(
            "SELECT * FROM public.user_hero_summary WHERE user_id = $1", user
        )
        if not readable:  # every snapshot of the user was quarantined: the summary is as it was
            was = await conn.fetchrow(
                f"SELECT * FROM {starforge.BEFORE_SCHEMA}.user_hero_summary WHERE user_id = $1",
                user,
            )
            assert summary == was, user
            continue
        assert summary is not None, user
        assert summary["troop_count"] == len(want.troops), user
        assert summary["troop_power"] == sum(a * lv for a, lv, _, _ in want.troops.values()), user
        assert summary["pet_count"] == len(want.pets), user
        assert summary["last_snapshot_at"] == max(s["created_at"] for s in readable), user
    return len(users), rows


def check_value(db: str, name: str, *, unprocess: int | None = None) -> Any:
    """A soak check of the plan, evaluated directly (optionally with one more snapshot marked
    unprocessed, in a transaction rolled back)."""
    checks = {c.name: c.sql for c in load_plan(PLAN, env={}).plan.soak.checks}

    async def go() -> Any:
        conn = await _connect(db)
        try:
            tr = conn.transaction()
            await tr.start()
            if unprocess is not None:
                await conn.execute(
                    "UPDATE public.hero_snapshots SET processed_at = NULL WHERE id = $1", unprocess
                )
            value = await conn.fetchval(checks[name])
            await tr.rollback()
            return value
        finally:
            await conn.close()

    return run(go)


def poisoned(db: str) -> dict[int, str]:
    """Snapshot id → the SQLSTATE the plan's apply fails on it with, by the Python reading."""
    found = {
        int(r["id"]): unreadable(json.loads(r["raw"]))
        for r in sql(db, "SELECT id, raw::text AS raw FROM public.hero_snapshots")
    }
    return {k: v for k, v in found.items() if v is not None}


def quarantined(db: str, run_id: str | None = None) -> dict[int, str]:
    """Snapshot id → SQLSTATE of every key the ledger quarantined (in one run, or in the only
    one), each key once."""
    rows = sql(
        db,
        "SELECT key, sqlstate FROM backfill.quarantine WHERE run_id = coalesce($1, run_id) "
        "ORDER BY key",
        run_id,
    )
    keys = [int(r["key"][0]) for r in rows]
    assert len(keys) == len(set(keys)), keys  # each key once
    return {int(r["key"][0]): r["sqlstate"] for r in rows}


UNIQUENESS = [  # the runbook's uniqueness checks
    "SELECT count(*) FROM (SELECT 1 FROM public.user_troops GROUP BY user_id, troop_id "
    "HAVING count(*) > 1) AS d",
    "SELECT count(*) FROM (SELECT 1 FROM public.user_pets GROUP BY user_id, pet_id "
    "HAVING count(*) > 1) AS d",
    "SELECT count(*) FROM (SELECT 1 FROM public.user_hero_summary GROUP BY user_id "
    "HAVING count(*) > 1) AS d",
]


async def _connect(db: str) -> asyncpg.Connection:
    return await asyncpg.connect(db, server_settings=PINNED_SETTINGS)


def seed(db: str, snapshots: int, realtime_share: float = 0.05) -> dict[str, int]:
    statements = load_plan(PLAN, env={}).plan.apply.all

    async def go() -> dict[str, int]:
        conn = await _connect(db)
        try:
            return await starforge.seed(
                conn, snapshots=snapshots, realtime_share=realtime_share, statements=statements
            )
        finally:
            await conn.close()

    return dict(run(go))


def not_as_before(db: str) -> dict[str, int]:
    async def go() -> dict[str, int]:
        conn = await _connect(db)
        try:
            return await starforge.rows_not_as_before(conn)
        finally:
            await conn.close()

    return dict(run(go))


def sampled(db: str) -> tuple[int, int]:
    async def go() -> tuple[int, int]:
        conn = await _connect(db)
        try:
            return await check_sampled_users(conn)
        finally:
            await conn.close()

    users, rows = run(go)
    return int(users), int(rows)


# -- the plan on a test database: both batch paths through BACKFILL_TEST_DSN -----------------------


def test_the_seed_is_as_messy_as_the_runbook_fears(db: str) -> None:
    counts = seed(db, 2000)
    assert counts["hero_snapshots"] == 2000
    assert counts["user_troops"] > 0  # rows exist before the backfill
    assert counts["user_hero_summary"] > 0
    kinds = dict(
        sql(
            db,
            """SELECT CASE WHEN jsonb_typeof(raw) <> 'object' THEN 'not a profile'
                           WHEN raw ? 'ProfileData' IS NOT TRUE THEN 'no ProfileData'
                           WHEN NOT raw -> 'ProfileData' ? 'Troops' THEN 'no Troops'
                           ELSE 'Troops ' || jsonb_typeof(raw -> 'ProfileData' -> 'Troops') END,
                      count(*)
               FROM hero_snapshots GROUP BY 1""",
        )
    )
    assert set(kinds) == {
        "not a profile",
        "no ProfileData",
        "no Troops",
        "Troops null",
        "Troops string",
        "Troops array",
        "Troops object",
    }, kinds
    assert 0.01 < kinds["not a profile"] / 2000 < 0.06
    amounts = val(
        db,
        """SELECT array_agg(DISTINCT coalesce(jsonb_typeof(e -> 'Amount'), 'missing'))
           FROM hero_snapshots, jsonb_array_elements(raw -> 'ProfileData' -> 'Troops') AS e
           WHERE jsonb_typeof(raw -> 'ProfileData' -> 'Troops') = 'array'
             AND jsonb_typeof(e) = 'object'""",
    )
    assert sorted(amounts) == ["missing", "number", "object", "string"]
    # a few snapshots the plan cannot read, well under the failure budget, of both kinds
    bad = poisoned(db)
    assert counts["poisoned"] == len(bad)
    assert 0.002 <= len(bad) / 2000 <= 0.005, len(bad)
    assert set(bad.values()) == {"22P02", "22003"}, bad
    # the real-time ETL processed the newest 5 %, but for the unreadable ones among them
    unprocessed = {
        r["id"] for r in sql(db, "SELECT id FROM hero_snapshots WHERE processed_at IS NULL")
    }
    assert unprocessed == set(range(1, 1901)) | {k for k in bad if k > 1900}


@pytest.mark.parametrize("undo", ["runner", "psql"])
def test_the_starforge_plan_normalizes_messy_json_and_is_undone_exactly(
    cli: Callable[..., Any], workdir: Path, db: str, undo: str
) -> None:
    seed(db, 800)
    env = env_for(db)
    bad = poisoned(db)
    assert len(bad) >= 2, bad
    applied = cli("apply", str(PLAN), "-e", "staging", "-q", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    # the unreadable snapshots, and only they, were quarantined (each once, with the SQLSTATE
    # the Python reading expects) and left unprocessed; every other one was applied
    assert quarantined(db, run_id) == bad
    unprocessed = {
        r["id"] for r in sql(db, "SELECT id FROM hero_snapshots WHERE processed_at IS NULL")
    }
    assert unprocessed == set(bad)
    assert val(db, "SELECT count(*) FROM backfill.batches WHERE status = 'quarantined'") == len(bad)
    assert val(db, "SELECT count(*) FROM backfill.batches WHERE status = 'failed'") == 0
    # the soak checks account for them: the quarantined snapshots are the unprocessed ones the
    # apply cannot read; one it can read left unprocessed is counted
    assert check_value(db, "unprocessed_snapshots") == 0
    assert (
        check_value(db, "unprocessed_snapshots", unprocess=min(set(range(1, 801)) - set(bad))) == 1
    )
    assert check_value(db, "quarantined_share") == pytest.approx(len(bad) / 800)
    assert check_value(db, "quarantined_wrote_nothing") == 0
    users, rows = sampled(db)
    assert (users >= 20, rows >= 100) == (True, True), (users, rows)
    for check in UNIQUENESS:
        assert val(db, check) == 0, check
    ops = dict(
        sql(
            db,
            "SELECT rel::text || op::text, count(*) FROM backfill.row_images WHERE run_id = $1 "
            "GROUP BY 1",
            run_id,
        )
    )
    # upserts inserted some rows and updated others (legacy rows and earlier batches' rows)
    assert min(ops["2I"], ops["2U"], ops["4I"], ops["4U"]) > 0, ops

    # a new run finds only the unreadable snapshots to do; it quarantines them again and
    # changes nothing (idempotent)
    again = cli("apply", str(PLAN), "-e", "staging", "-q", env=env)
    assert again.exit_code == 3, again.output
    assert f"{len(bad)} row(s) need the backfill" in " ".join(again.output.split())
    again_id = run_id_of(again.output)
    assert again_id != run_id
    assert val(db, "SELECT count(*) FROM backfill.row_images WHERE run_id = $1", again_id) == 0
    assert val(db, "SELECT count(*) FROM backfill.quarantine WHERE run_id = $1", again_id) == len(
        bad
    )

    soaked = cli(
        "soak", str(PLAN), "-e", "staging", "--run", run_id, "--duration", "1s",
        "--interval", "1s", env=env,
    )  # fmt: skip
    assert soaked.exit_code == 3, soaked.output  # refused: the apply gate waits
    # keys were quarantined (within the budget): the criteria are inconclusive, so approving
    # needs a note (no override)
    refused = cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env)
    assert refused.exit_code == 2, refused.output
    assert "inconclusive" in refused.output
    note = "the quarantined snapshots are malformed; the rest is applied"
    approved = cli(
        "approve", run_id, "--gate", "apply-staging", "--as", "alice", "--note", note, env=env
    )
    assert approved.exit_code == 0, approved.output
    soaked = cli(
        "soak", str(PLAN), "-e", "staging", "--run", run_id, "--duration", "1s",
        "--interval", "1s", env=env,
    )  # fmt: skip
    assert soaked.exit_code == 3, soaked.output
    assert "verdict PASS" in soaked.output, soaked.output

    if undo == "runner":
        undone = cli("rollback", run_id, "--env", "staging", env=env)
        assert undone.exit_code == 0, undone.output
        assert "checksum verified" in undone.output
    else:
        done = run_psql(db, rollback_file(workdir, run_id))
        assert done.returncode == 0, done.stdout + done.stderr
    assert not_as_before(db) == dict.fromkeys(starforge.TABLES, 0)


# -- the demo ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoRun:
    home: Path
    env: dict[str, str]
    output: str
    run_id: str


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """`backfill demo --scenario starforge --auto-approve` once, in its own process."""
    tmp = tmp_path_factory.mktemp("starforge")
    env = {
        **os.environ,
        "BACKFILL_HOME": str(tmp / "home"),
        "BACKFILL_LOGS": str(tmp / "logs"),
        "BACKFILL_CMD": "backfill",
    }
    args = ["demo", "--scenario", "starforge", "--scale", "0.05", "--auto-approve"]
    done = subprocess.run(
        [sys.executable, "-m", "runner", *args, "--soak-seconds", "1", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return DemoRun(tmp / "home", env, done.stdout, run_id_of(done.stdout))


@pytest.fixture
def demo_server(demo: DemoRun) -> Iterator[EmbeddedServer]:
    """The demo's embedded server again (the demo stops it when it ends)."""
    pg = EmbeddedServer(demo.home)
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()


def test_the_starforge_demo_walks_the_rollout_and_undoes_staging_exactly(
    demo: DemoRun, demo_server: EmbeddedServer
) -> None:
    out = demo.output
    assert "the rollout is complete" in out
    assert "soak verdict pass" in out
    assert "checksum verified" in out
    for table in starforge.TABLES:
        assert f"staging.{table}: bytewise as before the rollout" in out
    staging, prod = demo_server.uri("staging"), demo_server.uri("prod")
    # staging: exactly as seeded again, checked here too rather than trusting the demo's word
    assert not_as_before(staging) == dict.fromkeys(starforge.TABLES, 0)
    # prod keeps the backfill: every snapshot processed, rows right for the sampled users
    unprocessed = {
        r["id"] for r in sql(prod, "SELECT id FROM hero_snapshots WHERE processed_at IS NULL")
    }
    assert unprocessed == set(poisoned(prod))
    users, rows = sampled(prod)
    assert (users >= 10, rows >= 50) == (True, True), (users, rows)
    for check in UNIQUENESS:
        assert val(prod, check) == 0, check
    assert val(prod, "SELECT count(DISTINCT stage) FROM backfill.batches") == 2  # canary, rest


def test_the_starforge_demo_quarantines_exactly_the_unreadable_snapshots(
    demo: DemoRun, demo_server: EmbeddedServer
) -> None:
    """Seed 002: quarantine the bad rows, carry on with the rest (#12). In each environment the
    keys quarantined are exactly the snapshots the Python reading cannot read, each once, with
    a class-22 SQLSTATE (the one expected); the summaries and the output say so; the gates the
    quarantine made inconclusive were approved with a note, never overridden."""
    out = demo.output
    for env, stage_summaries in (
        ("staging", ["backfill_summary.md"]),
        ("prod", ["canary_summary.md", "rest_summary.md"]),
    ):
        db = demo_server.uri(env)
        bad = poisoned(db)
        assert len(bad) >= 2, (env, bad)
        got = quarantined(db, demo.run_id)
        assert got == bad, env
        assert all(state.startswith("22") for state in got.values()), got
        assert val(db, "SELECT count(*) FROM backfill.batches WHERE status = 'quarantined'") == len(
            bad
        )
        assert val(db, "SELECT count(*) FROM backfill.batches WHERE status = 'failed'") == 0
        assert f"the run has quarantined {len(bad)} key(s) in {env}" in out
        # the apply summaries list the quarantine (each stage its own keys): the counts by
        # SQLSTATE and the keys with theirs
        summary = Path(demo.env["BACKFILL_LOGS"]) / starforge_run(demo) / env
        counts: Counter[str] = Counter()
        listed: dict[int, str] = {}
        for name in stage_summaries:
            text = (summary / name).read_text()
            if not re.search(r"^## Quarantine$", text, re.M):
                continue
            for state, n in re.findall(r"^\| `(22\w{3})` \| (\d+) \|$", text, re.M):
                counts[state] += int(n)
            for key, state in re.findall(r"^\| \d+ \| (\d+) \| `(\w{5})` \|", text, re.M):
                assert int(key) not in listed, key
                listed[int(key)] = state
        assert counts == Counter(bad.values()), env
        assert listed == bad, env
        assert json.loads((summary / "quarantine.json").read_text())
    # the gates after an apply stage: inconclusive (within the budget), approved with a note
    # that says it was the demo, and the output says so; nothing overridden
    decisions = {
        r["gate"]: r
        for env in ("staging", "prod")
        for r in sql(demo_server.uri(env), "SELECT * FROM backfill.gate_decisions")
    }
    for gate in ("apply-staging", "canary-prod"):
        assert decisions[gate]["criteria"] == "inconclusive", gate
        assert "--auto-approve" in decisions[gate]["note"], gate
        assert f"gate {gate}: criteria inconclusive, so a person decides here" in out
    assert not any(d["override"] for d in decisions.values())


def starforge_run(demo: DemoRun) -> Path:
    return Path("starforge_hero_snapshots") / demo.run_id


def test_a_shaped_run_is_undone_exactly_in_prod_too(demo: DemoRun) -> None:
    """Runs after the test above (same module-scoped demo): it undoes what that one checks."""
    dry = re.search(
        r"on prod \(dry run.*\n\s*would restore ([\d,]+) row\(s\).*; (\d+) conflict", demo.output
    )
    assert dry is not None, demo.output
    assert int(dry.group(1).replace(",", "")) > 0
    assert dry.group(2) == "0"
    done = subprocess.run(
        [sys.executable, "-m", "runner", "rollback", demo.run_id, "--env", "prod"],
        cwd=ROOT,
        env=demo.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    pg = EmbeddedServer(demo.home)
    pg.start()
    try:
        assert not_as_before(pg.uri("prod")) == dict.fromkeys(starforge.TABLES, 0)
    finally:
        pg.stop()
