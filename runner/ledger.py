"""The ledger: the control schema in each environment's database and the queries on it.

The schema is versioned by `backfill.schema_version` and migrated forward only. Row images are kept
as text arrays (each value's text form, which casts back exactly for every type), so one table holds
update-, insert- and delete-style changes for any key shape; `backfill.row_images` shows one row
per image.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from runner import redact
from runner.db import qualified
from runner.errors import InvalidInput
from runner.results import PhaseResult

D = TypeVar("D", bound=PhaseResult)

LEDGER_SCHEMA = "backfill"
_LOCK_KEY = 0x6261636B66696C6C  # "backfill": serialises concurrent first-time installs

MIGRATIONS: list[str] = [
    # 1: the initial ledger
    """
    CREATE TABLE backfill.runs (
        run_id        text NOT NULL,
        env           text NOT NULL,
        plan_name     text NOT NULL,
        plan_digest   text NOT NULL,
        plan          jsonb NOT NULL,
        target_table  text NOT NULL,
        key_columns   text[] NOT NULL,
        columns       text[] NOT NULL,
        key_types     text[] NOT NULL,
        column_types  text[] NOT NULL,
        operator      text NOT NULL,
        status        text NOT NULL DEFAULT 'running',
        created_at    timestamptz NOT NULL DEFAULT now(),
        updated_at    timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (run_id)
    );
    CREATE TABLE backfill.batches (
        run_id        text NOT NULL REFERENCES backfill.runs,
        batch_no      integer NOT NULL,
        stage         text NOT NULL,
        status        text NOT NULL,
        first_key     text[],
        last_key      text[],
        selected      integer NOT NULL DEFAULT 0,
        changed       integer NOT NULL DEFAULT 0,
        noop          integer NOT NULL DEFAULT 0,
        attempts      integer NOT NULL DEFAULT 1,
        errors        jsonb NOT NULL DEFAULT '[]',
        started_at    timestamptz NOT NULL,
        committed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
        duration_ms   double precision NOT NULL,
        PRIMARY KEY (run_id, batch_no)
    );
    -- One row per committed batch: its row images as parallel arrays. A batch's images are
    -- written as one tuple, not one per changed row, which keeps the ledger's share of the
    -- apply's cost small; readers use the view below. An element of keys, befores or afters is
    -- the value's own text form when the key (key_width) or the image (image_width) has one
    -- column, else the text form of the text[] of its columns.
    CREATE TABLE backfill.batch_images (
        run_id       text NOT NULL,
        batch_no     integer NOT NULL,
        key_width    smallint NOT NULL,
        image_width  smallint NOT NULL,
        ops          text[] NOT NULL,
        keys         text[] NOT NULL,
        befores      text[] NOT NULL,
        afters       text[] NOT NULL,
        PRIMARY KEY (run_id, batch_no)
    );
    ALTER TABLE backfill.batch_images
        ALTER COLUMN keys SET STORAGE EXTERNAL, ALTER COLUMN befores SET STORAGE EXTERNAL,
        ALTER COLUMN afters SET STORAGE EXTERNAL, ALTER COLUMN ops SET STORAGE EXTERNAL;
    -- One row per image. op: U changed (before and after images), N no-op (after is NULL);
    -- I and D are reserved for insert- and delete-style backfills (before resp. after NULL).
    CREATE VIEW backfill.row_images AS
    SELECT i.run_id, i.batch_no, u.op::"char" AS op,
           CASE WHEN i.key_width = 1 THEN ARRAY[u.key] ELSE u.key::text[] END AS key,
           CASE WHEN u.op = 'I' THEN NULL
                WHEN i.image_width = 1 THEN ARRAY[u.before] ELSE u.before::text[] END AS before,
           CASE WHEN u.op IN ('N', 'D') THEN NULL
                WHEN i.image_width = 1 THEN ARRAY[u.after] ELSE u.after::text[] END AS after
    FROM backfill.batch_images AS i
    CROSS JOIN LATERAL unnest(i.ops, i.keys, i.befores, i.afters) AS u(op, key, before, after);
    CREATE TABLE backfill.rollback_batches (
        run_id       text NOT NULL REFERENCES backfill.runs,
        batch_no     integer NOT NULL,
        restored     integer NOT NULL,
        conflicts    integer NOT NULL,
        already      integer NOT NULL,
        committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (run_id, batch_no)
    );
    CREATE TABLE backfill.rollback_conflicts (
        run_id    text NOT NULL,
        batch_no  integer NOT NULL,
        key       text[] NOT NULL,
        expected  text[],
        current   text[]
    );
    CREATE TABLE backfill.phases (
        run_id        text NOT NULL REFERENCES backfill.runs,
        phase         text NOT NULL,
        status        text NOT NULL,
        criteria      text,
        result        jsonb NOT NULL DEFAULT '{}',
        report_digest text,
        started_at    timestamptz NOT NULL DEFAULT now(),
        finished_at   timestamptz,
        PRIMARY KEY (run_id, phase)
    );
    CREATE TABLE backfill.gate_decisions (
        id            bigserial PRIMARY KEY,
        run_id        text NOT NULL REFERENCES backfill.runs,
        gate          text NOT NULL,
        decision      text NOT NULL CHECK (decision IN ('approve', 'reject')),
        actor         text NOT NULL,
        note          text NOT NULL DEFAULT '',
        override      boolean NOT NULL DEFAULT false,
        plan_digest   text NOT NULL,
        report_digest text NOT NULL,
        criteria      text NOT NULL,
        decided_at    timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE backfill.soak_samples (
        run_id      text NOT NULL REFERENCES backfill.runs,
        sample_no   integer NOT NULL,
        check_name  text NOT NULL,
        sampled_at  timestamptz NOT NULL,
        value       double precision,
        outcome     text NOT NULL CHECK (outcome IN ('pass', 'fail', 'no-data', 'error', 'info')),
        detail      text NOT NULL DEFAULT '',
        PRIMARY KEY (run_id, sample_no, check_name)
    );
    """,
    # 2: the target as a quoted-identifier pair and its oid, never a display string to split
    # (a schema named "my.schema" would otherwise be read as schema "my"); and the schemas of
    # the target and of its user-defined key/column types, for the rollback file's search_path.
    # Runs recorded before: filled where exactly one table has that display name.
    """
    ALTER TABLE backfill.runs
        ADD COLUMN target_schema  text,
        ADD COLUMN target_name    text,
        ADD COLUMN target_oid     oid,
        ADD COLUMN search_schemas text[] NOT NULL DEFAULT '{}';
    UPDATE backfill.runs AS r
    SET target_schema = m.nspname, target_name = m.relname, target_oid = m.oid,
        search_schemas = ARRAY[m.nspname]
    FROM (SELECT n.nspname || '.' || c.relname AS display, min(n.nspname) AS nspname,
                 min(c.relname) AS relname, min(c.oid) AS oid
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind IN ('r', 'p')
          GROUP BY 1 HAVING count(*) = 1) AS m
    WHERE m.display = r.target_table;
    """,
    # 3: gates you can trust (issue #17). Independent of other migrations: it only adds columns
    # to gate_decisions and phases and adds tables.
    # - a decision names the plain variable values and the keyed hashes of the secret ones it
    #   approved, the database login that recorded it, and is chained (HMAC under this ledger's
    #   key) to the decision before it and to the seal of the phase result it decides on;
    # - a finished phase's result is sealed the same way, so an edit of criteria or result shows;
    # - run_events records what happened to a run besides its phases (a rollback);
    # - digest_key is this ledger's random key for those HMACs and for secret fingerprints.
    """
    CREATE TABLE backfill.digest_key (
        one  boolean PRIMARY KEY DEFAULT true CHECK (one),
        key  bytea NOT NULL
    );
    INSERT INTO backfill.digest_key (key) VALUES (decode(
        replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));
    ALTER TABLE backfill.gate_decisions
        ADD COLUMN variables     jsonb NOT NULL DEFAULT '{}',
        ADD COLUMN secret_hashes jsonb NOT NULL DEFAULT '{}',
        ADD COLUMN db_user       text NOT NULL DEFAULT session_user,
        ADD COLUMN phase_seal    text NOT NULL DEFAULT '',
        ADD COLUMN prev_hash     text NOT NULL DEFAULT '',
        ADD COLUMN chain_hash    text NOT NULL DEFAULT '';
    ALTER TABLE backfill.phases ADD COLUMN seal text NOT NULL DEFAULT '';
    -- who recorded a decision is the database's word, not the client's; decisions are
    -- append-only. The table's owner can still disable this: see SECURITY.md for the setup
    -- where the owner is neither the runner's nor an approver's login.
    CREATE FUNCTION backfill.decision_identity() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'INSERT' THEN
            RAISE EXCEPTION 'backfill.gate_decisions is append-only: % refused', TG_OP
                USING HINT = 'a decision is never changed or removed; a reject is final';
        END IF;
        NEW.db_user := session_user;
        NEW.decided_at := now();
        RETURN NEW;
    END $$;
    CREATE TRIGGER decision_identity BEFORE INSERT OR UPDATE OR DELETE
        ON backfill.gate_decisions FOR EACH ROW EXECUTE FUNCTION backfill.decision_identity();
    CREATE TRIGGER decision_no_truncate BEFORE TRUNCATE
        ON backfill.gate_decisions FOR EACH STATEMENT EXECUTE FUNCTION backfill.decision_identity();
    CREATE TABLE backfill.run_events (
        id      bigserial PRIMARY KEY,
        run_id  text NOT NULL REFERENCES backfill.runs,
        env     text NOT NULL,
        kind    text NOT NULL CHECK (kind IN ('rollback')),
        actor   text NOT NULL,
        db_user text NOT NULL DEFAULT session_user,
        detail  jsonb NOT NULL DEFAULT '{}',
        at      timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 4: a running backfill that obeys and watches (issue #13). Independent of other migrations:
    # it only adds tables.
    # - control_requests: pause / resume / cancel of a run, with who and when; a run's control
    #   state is derived from these facts (a cancel is final; else the latest pause or resume);
    # - guard_holds: each time a guard (or a pause) held a run's dispatching, and until when
    #   it was last seen held, for `status` and the summary's time held by signal.
    """
    CREATE TABLE backfill.control_requests (
        id           bigserial PRIMARY KEY,
        run_id       text NOT NULL REFERENCES backfill.runs,
        env          text NOT NULL,
        action       text NOT NULL CHECK (action IN ('pause', 'resume', 'cancel')),
        actor        text NOT NULL,
        db_user      text NOT NULL DEFAULT session_user,
        note         text NOT NULL DEFAULT '',
        requested_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX control_requests_run ON backfill.control_requests (run_id, id);
    CREATE TABLE backfill.guard_holds (
        id           bigserial PRIMARY KEY,
        run_id       text NOT NULL REFERENCES backfill.runs,
        stage        text NOT NULL,
        signal       text NOT NULL,
        reason       text NOT NULL,
        value        double precision,
        threshold    text NOT NULL DEFAULT '',
        started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
        last_seen_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        open         boolean NOT NULL DEFAULT true
    );
    CREATE INDEX guard_holds_run ON backfill.guard_holds (run_id, stage);
    """,
    # 5: shaped backfills (#11): the tables a run writes, and row images per table
    """
    ALTER TABLE backfill.runs ADD COLUMN tables jsonb;
    ALTER TABLE backfill.batch_images ADD COLUMN rel smallint NOT NULL DEFAULT 0;
    ALTER TABLE backfill.batch_images DROP CONSTRAINT batch_images_pkey;
    ALTER TABLE backfill.batch_images ADD PRIMARY KEY (run_id, batch_no, rel);
    ALTER TABLE backfill.rollback_conflicts ADD COLUMN rel smallint NOT NULL DEFAULT 0;
    -- rel: 0 the target of a plain run (images of its declared columns); 1… the tables of a
    -- shaped run, as runs.tables lists them (whole-row images). op: U changed, N unchanged,
    -- I inserted (no before), D deleted (no after).
    CREATE OR REPLACE VIEW backfill.row_images AS
    SELECT i.run_id, i.batch_no, u.op::"char" AS op,
           CASE WHEN i.key_width = 1 THEN ARRAY[u.key] ELSE u.key::text[] END AS key,
           CASE WHEN u.op = 'I' THEN NULL
                WHEN i.image_width = 1 THEN ARRAY[u.before] ELSE u.before::text[] END AS before,
           CASE WHEN u.op IN ('N', 'D') THEN NULL
                WHEN i.image_width = 1 THEN ARRAY[u.after] ELSE u.after::text[] END AS after,
           i.rel
    FROM backfill.batch_images AS i
    CROSS JOIN LATERAL unnest(i.ops, i.keys, i.befores, i.afters) AS u(op, key, before, after);
    """,
    # 6: quarantine (#12). A batch that failed on its data is split: its row (status 'split')
    # lists the batches its halves ran as, and is written after they all settled, so a 'split'
    # row means every key of it committed or was quarantined ('stopped': a split the failure
    # budget ended; its keys not yet done are rediscovered). A key that still fails alone gets
    # a row with status 'quarantined' and one row here per run and key; the keys with no
    # released_at are left out of the rest of the run. `released_*`: a later batch (a retry)
    # committed the key.
    """
    ALTER TABLE backfill.batches ADD COLUMN split_into integer[];
    CREATE TABLE backfill.quarantine (
        run_id          text NOT NULL REFERENCES backfill.runs,
        key             text[] NOT NULL,
        env             text NOT NULL,
        stage           text NOT NULL,
        batch_no        integer NOT NULL,
        sqlstate        text NOT NULL,
        message         text NOT NULL,
        attempts        integer NOT NULL,
        first_seen      timestamptz NOT NULL DEFAULT clock_timestamp(),
        last_seen       timestamptz NOT NULL DEFAULT clock_timestamp(),
        released_batch  integer,
        released_at     timestamptz,
        PRIMARY KEY (run_id, key)
    );
    """,
    # 7: windows (#14). A windowed run records its windows once, in the order it walks them;
    # a window's batches are the run's batches numbered from its first_batch on (windows run
    # one after another, so their batch numbers never interleave). `discovered`: discovery's
    # count in the window when it started; the counts of its batches are written when it ends,
    # in the transaction that runs after_each. batches.manifest: the rows of the plan's
    # [manifest] sql, in the batch's transaction.
    """
    CREATE TABLE backfill.windows (
        run_id       text NOT NULL REFERENCES backfill.runs,
        env          text NOT NULL,
        window_no    integer NOT NULL,
        label        text NOT NULL,
        lower_bound  text,
        upper_bound  text,
        status       text NOT NULL DEFAULT 'pending',
        first_batch  integer,
        discovered   bigint,
        keys         bigint,
        changed      bigint,
        noop         bigint,
        quarantined  bigint,
        started_at   timestamptz,
        finished_at  timestamptz,
        PRIMARY KEY (run_id, env, window_no)
    );
    ALTER TABLE backfill.batches ADD COLUMN manifest jsonb;
    """,
    # 8: the processes that work on a run (#15's first part): one row per command that ran a
    # phase, with a heartbeat while it runs; `finished_at` and `outcome` when it ended (a
    # killed process leaves neither: its heartbeat stops).
    """
    CREATE TABLE backfill.processes (
        run_id       text NOT NULL REFERENCES backfill.runs,
        process_id   text NOT NULL,
        env          text NOT NULL,
        phase        text NOT NULL,
        host         text NOT NULL,
        pid          integer NOT NULL,
        operator     text NOT NULL,
        started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
        heartbeat    timestamptz NOT NULL DEFAULT clock_timestamp(),
        finished_at  timestamptz,
        outcome      text,
        PRIMARY KEY (run_id, process_id)
    );
    """,
    # 9: leases (#15): several processes share one stage of a run. `work` is the stage's shared
    # cursor (pass, position, next batch number, claims, the rate's next slot, whether it was
    # stopped or is done); a lease is one claimed page of keys, (after_key, last_key], with its
    # batch number and owner: open until a batch row of that number settles it. A batch row
    # names the process that committed it (the batch connection's `backfill.process` setting).
    """
    CREATE TABLE backfill.work (
        run_id     text NOT NULL REFERENCES backfill.runs,
        stage      text NOT NULL,
        pass       integer NOT NULL DEFAULT 1,
        position   text[],
        next_no    integer NOT NULL,
        claimed    integer NOT NULL DEFAULT 0,
        next_slot  timestamptz,
        leader     text NOT NULL,
        stopped    text,
        done       boolean NOT NULL DEFAULT false,
        PRIMARY KEY (run_id, stage)
    );
    CREATE TABLE backfill.leases (
        run_id      text NOT NULL REFERENCES backfill.runs,
        batch_no    integer NOT NULL,
        stage       text NOT NULL,
        pass        integer NOT NULL,
        after_key   text[],
        last_key    text[] NOT NULL,
        size        integer NOT NULL,
        owner       text NOT NULL,
        claimed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
        takeovers   integer NOT NULL DEFAULT 0,
        PRIMARY KEY (run_id, batch_no)
    );
    ALTER TABLE backfill.batches
        ADD COLUMN process text DEFAULT nullif(current_setting('backfill.process', true), '');
    ALTER TABLE backfill.processes ADD COLUMN joined boolean NOT NULL DEFAULT false;
    """,
    # 10: yields (#13): the time an apply command waited after its batches while other sessions
    # were busy (guards.yield_to_busy), one row per command and stage, saved as it goes; the
    # summary adds them up. `batches`: the batches that waited; `max_factor`: the longest wait,
    # in batch times.
    """
    CREATE TABLE backfill.yields (
        run_id      text NOT NULL REFERENCES backfill.runs,
        stage       text NOT NULL,
        command     text NOT NULL,
        seconds     double precision NOT NULL,
        batches     integer NOT NULL,
        max_factor  double precision NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (run_id, stage, command)
    );
    """,
    # 11: digests of inserted rows (#11). A table a run only inserts into records each row it
    # inserted by a 64-bit digest of the row (`afters` holds it, as text) instead of the row
    # whole: `digests` says so. The view shows it as `after_digest` (and `after` NULL).
    """
    ALTER TABLE backfill.batch_images ADD COLUMN digests boolean NOT NULL DEFAULT false;
    CREATE OR REPLACE VIEW backfill.row_images AS
    SELECT i.run_id, i.batch_no, u.op::"char" AS op,
           CASE WHEN i.key_width = 1 THEN ARRAY[u.key] ELSE u.key::text[] END AS key,
           CASE WHEN u.op = 'I' THEN NULL
                WHEN i.image_width = 1 THEN ARRAY[u.before] ELSE u.before::text[] END AS before,
           CASE WHEN u.op IN ('N', 'D') OR (u.op = 'I' AND i.digests) THEN NULL
                WHEN i.image_width = 1 THEN ARRAY[u.after] ELSE u.after::text[] END AS after,
           i.rel,
           CASE WHEN u.op = 'I' AND i.digests THEN u.after END AS after_digest
    FROM backfill.batch_images AS i
    CROSS JOIN LATERAL unnest(i.ops, i.keys, i.befores, i.afters) AS u(op, key, before, after);
    """,
]


async def schema_version(conn: asyncpg.Connection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('backfill.schema_version') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM backfill.schema_version"))


async def ensure_ledger(conn: asyncpg.Connection) -> int:
    """Create or migrate the control schema; idempotent and safe under concurrency."""
    if await schema_version(conn) == len(MIGRATIONS):
        return len(MIGRATIONS)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute("CREATE SCHEMA IF NOT EXISTS backfill")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS backfill.schema_version ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = await schema_version(conn)
        if current > len(MIGRATIONS):
            raise InvalidInput(
                f"the ledger schema is at version {current}, newer than this backfill knows "
                f"({len(MIGRATIONS)})",
                hint="upgrade backfill before running it against this database",
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            await conn.execute(MIGRATIONS[version - 1])
            await conn.execute("INSERT INTO backfill.schema_version (version) VALUES ($1)", version)
    return len(MIGRATIONS)


@dataclass(frozen=True)
class RunRow:
    run_id: str
    env: str
    plan_name: str
    plan_digest: str
    plan: dict[str, Any]
    target_table: str
    key_columns: list[str]
    columns: list[str]
    key_types: list[str]
    column_types: list[str]
    operator: str
    status: str
    created_at: datetime
    updated_at: datetime
    target_schema: str | None = None
    target_name: str | None = None
    target_oid: int | None = None
    search_schemas: list[str] = field(default_factory=list)
    tables: list[dict[str, Any]] | None = None  # a shaped run's tables (engine.shapes.Table.doc)

    @property
    def quoted_table(self) -> str:
        """The target as SQL names it (runs recorded before migration 2: their display name)."""
        if self.target_schema is None or self.target_name is None:
            return self.target_table
        return qualified(self.target_schema, self.target_name)

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> RunRow:
        d = dict(row)
        d["plan"] = json.loads(d["plan"])
        if d.get("tables") is not None:
            d["tables"] = json.loads(d["tables"])
        return cls(**d)


async def get_run(conn: asyncpg.Connection, run_id: str) -> RunRow | None:
    if await schema_version(conn) == 0:
        return None
    row = await conn.fetchrow("SELECT * FROM backfill.runs WHERE run_id = $1", run_id)
    return RunRow.from_row(row) if row else None


async def set_run_status(conn: asyncpg.Connection, run_id: str, status: str) -> None:
    await conn.execute(
        "UPDATE backfill.runs SET status = $2, updated_at = now() WHERE run_id = $1", run_id, status
    )


@dataclass(frozen=True)
class PhaseRow:
    run_id: str
    phase: str
    status: str
    criteria: str | None
    result: dict[str, Any]
    report_digest: str | None
    started_at: datetime
    finished_at: datetime | None
    seal: str = ""

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> PhaseRow:
        d = dict(row)
        d["result"] = json.loads(d["result"])
        return cls(**{k: v for k, v in d.items() if k in _PHASE_FIELDS})

    @property
    def doc(self) -> PhaseResult:
        """The fields every phase records, as the rest of the rollout reads them."""
        return PhaseResult.model_validate(self.result)

    def doc_as(self, kind: type[D]) -> D:
        """The result as the document its phase wrote (`runner.results`)."""
        return kind.model_validate(self.result)

    def sealed_content(self) -> dict[str, Any]:
        """What the seal covers: everything a gate decides on."""
        return {
            "run_id": self.run_id,
            "phase": self.phase,
            "status": self.status,
            "criteria": self.criteria,
            "result": self.result,
            "report_digest": self.report_digest,
        }


_PHASE_FIELDS = frozenset(PhaseRow.__dataclass_fields__)


async def get_phase(conn: asyncpg.Connection, run_id: str, phase: str) -> PhaseRow | None:
    if await schema_version(conn) == 0:
        return None
    row = await conn.fetchrow(
        "SELECT * FROM backfill.phases WHERE run_id = $1 AND phase = $2", run_id, phase
    )
    return PhaseRow.from_row(row) if row else None


async def phases(conn: asyncpg.Connection, run_id: str) -> list[PhaseRow]:
    if await schema_version(conn) == 0:
        return []
    rows = await conn.fetch(
        "SELECT * FROM backfill.phases WHERE run_id = $1 ORDER BY started_at", run_id
    )
    return [PhaseRow.from_row(r) for r in rows]


async def save_phase(
    conn: asyncpg.Connection,
    run_id: str,
    phase: str,
    *,
    status: str,
    result: PhaseResult | None,
    criteria: str | None = None,
    report_digest: str | None = None,
    finished: bool = False,
) -> None:
    """Record a phase's state and its result document (None: started, nothing to show yet)."""
    doc = {} if result is None else result.model_dump(mode="json", exclude_defaults=False)
    await conn.execute(
        """
        INSERT INTO backfill.phases (run_id, phase, status, criteria, result, report_digest, finished_at)
        VALUES ($1, $2, $3, $4, $5::jsonb, $6, CASE WHEN $7 THEN now() END)
        ON CONFLICT (run_id, phase) DO UPDATE SET
            status = excluded.status, criteria = excluded.criteria, result = excluded.result,
            report_digest = coalesce(excluded.report_digest, backfill.phases.report_digest),
            finished_at = CASE WHEN $7 THEN coalesce(backfill.phases.finished_at, now()) END
        """,
        run_id,
        phase,
        status,
        criteria,
        json.dumps(_redacted_result(doc)),
        report_digest,
        finished,
    )


def _redacted_result(result: dict[str, Any]) -> dict[str, Any]:
    """A phase result as the ledger keeps it: through the redaction point, except the mini plan,
    which is the plan file's own uninterpolated text (its digest must survive)."""
    kept = {k: v for k, v in result.items() if k == "mini_plan"}
    return {**redact.redact_value({k: v for k, v in result.items() if k != "mini_plan"}), **kept}


async def set_report_digest(conn: asyncpg.Connection, run_id: str, phase: str, digest: str) -> None:
    """Record the digest of the phase's report and seal the finished phase (invariant 6)."""
    await conn.execute(
        "UPDATE backfill.phases SET report_digest = $3 WHERE run_id = $1 AND phase = $2",
        run_id,
        phase,
        digest,
    )
    row = await get_phase(conn, run_id, phase)
    if row is not None and row.finished_at is not None:
        await conn.execute(
            "UPDATE backfill.phases SET seal = $3 WHERE run_id = $1 AND phase = $2",
            run_id,
            phase,
            mac(await digest_key(conn), row.sealed_content()),
        )


async def digest_key(conn: asyncpg.Connection) -> bytes:
    """This ledger's random key for seals, decision chains and secret fingerprints."""
    key = await conn.fetchval("SELECT key FROM backfill.digest_key")
    if key is None:
        raise InvalidInput("the ledger has no digest key: run `backfill init` to migrate it")
    return bytes(key)


def mac(key: bytes, content: Any) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Decision:
    gate: str
    decision: str
    actor: str
    note: str
    override: bool
    plan_digest: str
    report_digest: str
    criteria: str
    decided_at: datetime
    variables: dict[str, str] = field(default_factory=dict)
    secret_hashes: dict[str, str] = field(default_factory=dict)
    db_user: str = ""
    phase_seal: str = ""
    prev_hash: str = ""
    chain_hash: str = ""
    id: int = 0
    run_id: str = ""

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Decision:
        d = dict(row)
        for k in ("variables", "secret_hashes"):
            d[k] = json.loads(d[k]) if isinstance(d.get(k), str) else dict(d.get(k) or {})
        return cls(**{k: v for k, v in d.items() if k in _DECISION_FIELDS})

    def chained_content(self) -> dict[str, Any]:
        """What a decision's chain hash covers: everything but its own id, time and hash."""
        return {
            "run_id": self.run_id,
            "gate": self.gate,
            "decision": self.decision,
            "actor": self.actor,
            "note": self.note,
            "override": self.override,
            "plan_digest": self.plan_digest,
            "report_digest": self.report_digest,
            "criteria": self.criteria,
            "variables": self.variables,
            "secret_hashes": self.secret_hashes,
            "db_user": self.db_user,
            "phase_seal": self.phase_seal,
            "prev_hash": self.prev_hash,
        }


_DECISION_FIELDS = frozenset(Decision.__dataclass_fields__)


async def decisions(
    conn: asyncpg.Connection, run_id: str, gate: str | None = None
) -> list[Decision]:
    if await schema_version(conn) == 0:
        return []
    rows = await conn.fetch(
        "SELECT * FROM backfill.gate_decisions WHERE run_id = $1 AND ($2::text IS NULL OR gate = $2)"
        " ORDER BY id",
        run_id,
        gate,
    )
    return [Decision.from_row(r) for r in rows]


async def record_decision(conn: asyncpg.Connection, run_id: str, d: Decision) -> None:
    """Append a decision, chained to the run's previous one. Call inside `decision_lock`."""
    key = await digest_key(conn)
    prev = await conn.fetchval(
        "SELECT chain_hash FROM backfill.gate_decisions WHERE run_id = $1 ORDER BY id DESC LIMIT 1",
        run_id,
    )
    db_user = str(await conn.fetchval("SELECT session_user"))
    chained = {
        **d.chained_content(),
        "run_id": run_id,
        "db_user": db_user,
        "prev_hash": prev or "",
    }
    await conn.execute(
        """
        INSERT INTO backfill.gate_decisions
            (run_id, gate, decision, actor, note, override, plan_digest, report_digest, criteria,
             variables, secret_hashes, phase_seal, prev_hash, chain_hash)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11::jsonb, $12, $13, $14)
        """,
        run_id,
        d.gate,
        d.decision,
        d.actor,
        d.note,
        d.override,
        d.plan_digest,
        d.report_digest,
        d.criteria,
        json.dumps(d.variables),
        json.dumps(d.secret_hashes),
        d.phase_seal,
        prev or "",
        mac(key, chained),
    )


async def record_settled_batch(
    conn: asyncpg.Connection,
    run_id: str,
    stage: str,
    status: str,
    batch_no: int,
    keys: tuple[list[str], list[str]],
    selected: int,
    attempts: int,
    errors: list[dict[str, str]],
    started_at: datetime,
    duration_ms: float,
    split_into: list[int] | None = None,
) -> None:
    """A batch that did not commit as one: 'failed' (for good), 'split' (its halves ran as
    `split_into`, every key
    committed or quarantined), 'quarantined' (one key that failed alone), or 'stopped' (a split
    the failure budget or a part's failure ended: its other keys are rediscovered later)."""
    await conn.execute(
        """INSERT INTO backfill.batches (run_id, batch_no, stage, status, first_key, last_key,
               selected, attempts, errors, started_at, duration_ms, split_into)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12)
           ON CONFLICT DO NOTHING""",
        run_id,
        batch_no,
        stage,
        status,
        keys[0],
        keys[1],
        selected,
        attempts,
        json.dumps(errors),
        started_at,
        duration_ms,
        split_into,
    )


async def quarantine_key(
    conn: asyncpg.Connection,
    run_id: str,
    env: str,
    stage: str,
    batch_no: int,
    key: list[str],
    sqlstate: str,
    message: str,
    attempts: int,
) -> None:
    """One key that failed alone: recorded once per run (a key seen again counts its attempts)."""
    await conn.execute(
        """INSERT INTO backfill.quarantine AS q
               (run_id, key, env, stage, batch_no, sqlstate, message, attempts)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
           ON CONFLICT (run_id, key) DO UPDATE SET
               batch_no = excluded.batch_no, stage = excluded.stage, sqlstate = excluded.sqlstate,
               message = excluded.message, attempts = q.attempts + excluded.attempts,
               last_seen = clock_timestamp(), released_batch = NULL, released_at = NULL""",
        run_id,
        key,
        env,
        stage,
        batch_no,
        sqlstate,
        message,
        attempts,
    )


async def quarantined(
    conn: asyncpg.Connection, run_id: str, *, until: datetime | None = None
) -> list[asyncpg.Record]:
    """The run's quarantined keys in the order they were first seen; with `until`, as they stood
    then (a report re-rendered later shows what its phase saw)."""
    return list(
        await conn.fetch(
            """SELECT key, env, stage, batch_no, sqlstate, message, attempts, first_seen,
                      last_seen, released_batch, released_at,
                      released_at IS NOT NULL AND ($2::timestamptz IS NULL OR released_at <= $2)
                          AS released
               FROM backfill.quarantine
               WHERE run_id = $1 AND ($2::timestamptz IS NULL OR first_seen <= $2)
               ORDER BY first_seen, key""",
            run_id,
            until,
        )
    )


async def open_quarantine(
    conn: asyncpg.Connection, run_id: str, key_types: list[str]
) -> list[asyncpg.Record]:
    """The run's keys still quarantined, in key order: `key` (text[]) and `k0…` typed by
    `key_types` (the target's, already quoted) so they compare with discovery's keys."""
    typed = ", ".join(f"(key[{i + 1}])::{t} AS k{i}" for i, t in enumerate(key_types))
    order = ", ".join(f"k{i}" for i in range(len(key_types)))
    return list(
        await conn.fetch(
            f"SELECT key, {typed} FROM backfill.quarantine"
            f" WHERE run_id = $1 AND released_at IS NULL ORDER BY {order}",
            run_id,
        )
    )


async def release_retried(conn: asyncpg.Connection, run_id: str) -> int:
    """Mark released the quarantined keys a later retry batch committed (its images hold the
    key): derived from the ledger, so a retry killed between its commit and this still counts."""
    tag = await conn.execute(
        """UPDATE backfill.quarantine AS q
           SET released_batch = r.batch_no, released_at = b.committed_at
           FROM backfill.row_images AS r JOIN backfill.batches AS b USING (run_id, batch_no)
           WHERE q.run_id = $1 AND q.released_at IS NULL AND r.run_id = $1
             AND r.rel IN (0, 1) AND r.key = q.key AND b.status = 'done'
             AND b.stage = 'retry' AND b.batch_no > q.batch_no""",
        run_id,
    )
    return int(tag.split()[-1])


async def release_gone(conn: asyncpg.Connection, run_id: str, keys: list[list[str]]) -> int:
    """Mark released the quarantined keys discovery no longer returns (the row was deleted,
    moved out of scope or fixed by hand): nothing is left for the run to do with them."""
    if not keys:
        return 0
    tag = await conn.execute(
        """UPDATE backfill.quarantine AS q SET released_at = clock_timestamp()
           FROM unnest($2::text[]) AS g(k)
           WHERE q.run_id = $1 AND q.released_at IS NULL AND q.key = g.k::text[]""",
        run_id,
        [_text_array(k) for k in keys],
    )
    return int(tag.split()[-1])


def _text_array(key: list[str]) -> str:
    """A text[] literal of `key`, every element quoted (PostgreSQL reads it back exactly)."""
    quoted = ('"' + k.replace("\\", "\\\\").replace('"', '\\"') + '"' for k in key)
    return "{" + ",".join(quoted) + "}"


async def failure_base(conn: asyncpg.Connection, run_id: str) -> tuple[int, int]:
    """(rows of the run's committed batches, keys still quarantined): where a continued run's
    failure rate starts."""
    row = await conn.fetchrow(
        """SELECT (SELECT coalesce(sum(selected), 0)::bigint FROM backfill.batches
                   WHERE run_id = $1 AND status = 'done') AS done,
                  (SELECT count(*) FROM backfill.quarantine
                   WHERE run_id = $1 AND released_at IS NULL) AS open""",
        run_id,
    )
    assert row is not None
    return int(row["done"]), int(row["open"])


async def decision_lock(conn: asyncpg.Connection, run_id: str) -> None:
    """Serialise decisions on a run (inside a transaction), so the chain never forks and an
    approve racing a reject sees it."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('backfill-decision'), hashtext($1))", run_id
    )


def broken_link(key: bytes, chain: list[Decision]) -> Decision | None:
    """The first decision (in id order) whose chain hash does not verify, or None."""
    prev = ""
    for d in chain:
        if d.prev_hash != prev or not hmac.compare_digest(
            mac(key, d.chained_content()), d.chain_hash
        ):
            return d
        prev = d.chain_hash
    return None


def seal_holds(key: bytes, row: PhaseRow) -> bool:
    return bool(row.seal) and hmac.compare_digest(mac(key, row.sealed_content()), row.seal)


@dataclass(frozen=True)
class RunEvent:
    run_id: str
    env: str
    kind: str
    actor: str
    db_user: str
    detail: dict[str, Any]
    at: datetime


async def record_event(
    conn: asyncpg.Connection, run_id: str, env: str, kind: str, actor: str, detail: dict[str, Any]
) -> None:
    await conn.execute(
        "INSERT INTO backfill.run_events (run_id, env, kind, actor, detail)"
        " VALUES ($1, $2, $3, $4, $5::jsonb)",
        run_id,
        env,
        kind,
        actor,
        json.dumps(detail, default=str),
    )


async def run_events(conn: asyncpg.Connection, run_id: str) -> list[RunEvent]:
    if not await conn.fetchval("SELECT to_regclass('backfill.run_events') IS NOT NULL"):
        return []
    rows = await conn.fetch(
        "SELECT run_id, env, kind, actor, db_user, detail, at FROM backfill.run_events"
        " WHERE run_id = $1 ORDER BY id",
        run_id,
    )
    return [RunEvent(**{**dict(r), "detail": json.loads(r["detail"])}) for r in rows]


# -- control requests and guard holds (migration 4) ---------------------------------------------


@dataclass(frozen=True)
class ControlRequest:
    """The request that decides a run's control state now: a cancel (final), else the latest
    pause or resume."""

    action: str  # pause | resume | cancel
    actor: str
    db_user: str
    note: str
    requested_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> ControlRequest:
        return cls(**{k: row[k] for k in ("action", "actor", "db_user", "note", "requested_at")})


async def control_state(conn: asyncpg.Connection, run_id: str) -> ControlRequest | None:
    """The run's effective control request (None: never paused or cancelled); one index read,
    cheap enough for a running apply to poll before each batch."""
    row = await conn.fetchrow(CONTROL_SQL, run_id)
    return None if row is None else ControlRequest.from_row(row)


# the effective request of run $1; engine.guards reads it in the same statement as the signals
CONTROL_SQL = (
    "SELECT action, actor, db_user, note, requested_at FROM backfill.control_requests"
    " WHERE run_id = $1 ORDER BY (action = 'cancel') DESC, id DESC LIMIT 1"
)


async def request_control(
    conn: asyncpg.Connection, run_id: str, env: str, action: str, actor: str, note: str
) -> None:
    await conn.execute(
        "INSERT INTO backfill.control_requests (run_id, env, action, actor, note)"
        " VALUES ($1, $2, $3, $4, $5)",
        run_id,
        env,
        action,
        actor,
        note,
    )


async def start_hold(
    conn: asyncpg.Connection,
    run_id: str,
    stage: str,
    signal: str,
    reason: str,
    value: float | None,
    threshold: str,
) -> int:
    """A hold begins: returns its id, for `hold_seen` and `end_hold`."""
    return int(
        await conn.fetchval(
            "INSERT INTO backfill.guard_holds (run_id, stage, signal, reason, value, threshold)"
            " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            run_id,
            stage,
            signal,
            reason,
            value,
            threshold,
        )
    )


async def hold_seen(
    conn: asyncpg.Connection, hold_id: int, reason: str, value: float | None, *, ended: bool
) -> None:
    """The hold was still there now (its reason and value as now seen); `ended`: it is over."""
    await conn.execute(
        "UPDATE backfill.guard_holds SET last_seen_at = clock_timestamp(),"
        " reason = coalesce(nullif($2, ''), reason), value = coalesce($3, value),"
        " open = open AND NOT $4 WHERE id = $1",
        hold_id,
        reason,
        value,
        ended,
    )


async def close_holds(conn: asyncpg.Connection, run_id: str) -> None:
    """Holds a killed process left open are over: a new command starts without them."""
    await conn.execute(
        "UPDATE backfill.guard_holds SET open = false WHERE run_id = $1 AND open", run_id
    )


async def open_hold(conn: asyncpg.Connection, run_id: str) -> asyncpg.Record | None:
    """The hold a running apply is in now, if any (signal, reason, value, threshold, since)."""
    if not await conn.fetchval("SELECT to_regclass('backfill.guard_holds') IS NOT NULL"):
        return None
    return await conn.fetchrow(
        "SELECT signal, reason, value, threshold, started_at FROM backfill.guard_holds"
        " WHERE run_id = $1 AND open ORDER BY id DESC LIMIT 1",
        run_id,
    )


async def record_yield(
    conn: asyncpg.Connection,
    run_id: str,
    stage: str,
    command: str,
    seconds: float,
    batches: int,
    max_factor: float,
) -> None:
    """One command's yield to busy sessions so far (its totals: saving again replaces them).
    Once a shared stage is done (`work.done`, several processes) nothing is saved: its summary
    is written from what was saved before, and re-renders the same. The stage's row is read
    FOR SHARE, so a save waits for the transaction that ends the stage and then sees it."""
    await conn.execute(
        """WITH stage AS (
               SELECT bool_or(done) AS done FROM (
                   SELECT done FROM backfill.work WHERE run_id = $1 AND stage = $2 FOR SHARE
               ) AS w
           )
           INSERT INTO backfill.yields (run_id, stage, command, seconds, batches, max_factor)
           SELECT $1, $2, $3, $4, $5, $6 FROM stage WHERE NOT coalesce(stage.done, false)
           ON CONFLICT (run_id, stage, command) DO UPDATE
           SET seconds = excluded.seconds, batches = excluded.batches,
               max_factor = excluded.max_factor, updated_at = clock_timestamp()""",
        run_id,
        stage,
        command,
        seconds,
        batches,
        max_factor,
    )


async def yielded(conn: asyncpg.Connection, run_id: str, stage: str) -> dict[str, float] | None:
    """A stage's yield to busy sessions over all its commands (None: it never waited):
    `seconds`, `batches`, `commands` and the largest `max_factor`."""
    if not await conn.fetchval("SELECT to_regclass('backfill.yields') IS NOT NULL"):
        return None
    row = await conn.fetchrow(
        "SELECT sum(seconds) AS seconds, sum(batches) AS batches, count(*) AS commands,"
        " max(max_factor) AS max_factor FROM backfill.yields"
        " WHERE run_id = $1 AND stage = $2 AND seconds > 0",
        run_id,
        stage,
    )
    if row is None or not row["commands"]:
        return None
    return {k: float(row[k]) for k in ("seconds", "batches", "commands", "max_factor")}


async def held_seconds(conn: asyncpg.Connection, run_id: str, stage: str) -> dict[str, float]:
    """Time a stage spent held, by signal (a pause is the signal `paused`), over all its commands."""
    if not await conn.fetchval("SELECT to_regclass('backfill.guard_holds') IS NOT NULL"):
        return {}
    rows = await conn.fetch(
        "SELECT signal, started_at, last_seen_at FROM backfill.guard_holds"
        " WHERE run_id = $1 AND stage = $2 ORDER BY signal, started_at",
        run_id,
        stage,
    )
    # several processes on one run each record the same hold: overlapping holds count once
    seconds: dict[str, float] = {}
    end: dict[str, datetime] = {}
    for r in rows:
        sig, start, stop = r["signal"], r["started_at"], r["last_seen_at"]
        if sig in end and start < end[sig]:
            start = end[sig]
        if stop > start:
            seconds[sig] = seconds.get(sig, 0.0) + (stop - start).total_seconds()
        end[sig] = max(end.get(sig, stop), stop)
    return {sig: round(v, 3) for sig, v in sorted(seconds.items(), key=lambda kv: (-kv[1], kv[0]))}


# The run lock: a session advisory lock keyed (hashtext('backfill-run'), hashtext(run_id)); a
# killed process's lock goes with its connection.


async def try_run_lock(conn: asyncpg.Connection, run_id: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT pg_try_advisory_lock(hashtext('backfill-run'), hashtext($1))", run_id
        )
    )


async def release_run_lock(conn: asyncpg.Connection, run_id: str) -> None:
    await conn.execute("SELECT pg_advisory_unlock(hashtext('backfill-run'), hashtext($1))", run_id)


async def run_is_locked(conn: asyncpg.Connection, run_id: str) -> bool:
    """Whether a backfill process holds the run now (phases.common.run_lock's advisory lock) in
    this database: advisory locks are per database, and a run has a ledger in each environment's
    (two of them may be databases of one server)."""
    return bool(
        await conn.fetchval(
            """SELECT EXISTS (
                   SELECT 1 FROM pg_locks
                   WHERE locktype = 'advisory' AND objsubid = 2 AND granted
                     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                     AND classid::bigint = (hashtext('backfill-run')::bigint & 4294967295)
                     AND objid::bigint = (hashtext($1)::bigint & 4294967295))""",
            run_id,
        )
    )


async def phase_progress(conn: asyncpg.Connection, run_id: str, phase: str) -> str:
    """What an unfinished phase has committed so far, in words ('' for nothing)."""
    if phase == "soak":
        n = await conn.fetchval(
            "SELECT count(DISTINCT sample_no) FROM backfill.soak_samples WHERE run_id = $1", run_id
        )
        return f"{n} sample(s)" if n else ""
    row = await conn.fetchrow(
        "SELECT count(*) AS batches, coalesce(sum(changed), 0) AS changed FROM backfill.batches"
        " WHERE run_id = $1 AND stage = $2 AND status = 'done'",
        run_id,
        phase,
    )
    if row is None or not row["batches"]:
        return ""
    return f"{row['batches']} batch(es) committed, {row['changed']} row(s) changed"


# -- batches -----------------------------------------------------------------------------------


async def batch_committed(conn: asyncpg.Connection, run_id: str, batch_no: int) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT 1 FROM backfill.batches WHERE run_id = $1 AND batch_no = $2 AND status = 'done'",
            run_id,
            batch_no,
        )
    )


async def batch_states(
    conn: asyncpg.Connection, run_id: str, first: int = 1
) -> list[asyncpg.Record]:
    """The run's batch rows (batch_no, status, last_key, stage) numbered from `first` on (all of
    them, or a window's), in batch order."""
    return list(
        await conn.fetch(
            "SELECT batch_no, status, last_key, stage FROM backfill.batches WHERE run_id = $1"
            " AND batch_no >= $2 ORDER BY batch_no",
            run_id,
            first,
        )
    )


async def committed_batches(conn: asyncpg.Connection, run_id: str, stage: str) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM backfill.batches WHERE run_id = $1 AND stage = $2"
            " AND status = 'done'",
            run_id,
            stage,
        )
    )


async def done_in_stage(conn: asyncpg.Connection, run_id: str, stage: str) -> list[int]:
    """The numbers of a stage's committed batches, in order."""
    return [
        r["batch_no"]
        for r in await conn.fetch(
            "SELECT batch_no FROM backfill.batches WHERE run_id = $1 AND stage = $2"
            " AND status = 'done' ORDER BY batch_no",
            run_id,
            stage,
        )
    ]


async def stage_batches(conn: asyncpg.Connection, run_id: str, stage: str) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in await conn.fetch(
            "SELECT * FROM backfill.batches WHERE run_id = $1 AND stage = $2 ORDER BY batch_no",
            run_id,
            stage,
        )
    ]


async def batch_totals(
    conn: asyncpg.Connection,
    run_id: str,
    stage: str | None = None,
    since: datetime | None = None,
) -> dict[str, int]:
    """The committed batches of the run, or of one of its stages, over every command that ran
    them (`since`: committed from then on, by whichever process): how many, rows changed,
    no-ops, batches that needed a retry, keys they were given."""
    row = await conn.fetchrow(
        "SELECT count(*) AS batches, coalesce(sum(changed), 0) AS changed,"
        " coalesce(sum(noop), 0) AS noop, count(*) FILTER (WHERE attempts > 1) AS retried,"
        " coalesce(sum(selected), 0) AS keys"
        " FROM backfill.batches WHERE run_id = $1 AND status = 'done'"
        " AND ($2::text IS NULL OR stage = $2)"
        " AND ($3::timestamptz IS NULL OR committed_at >= $3)",
        run_id,
        stage,
        since,
    )
    return {k: int(v) for k, v in dict(row or {}).items()}


async def errors_by_category(conn: asyncpg.Connection, run_id: str, stage: str) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT e->>'category' AS category, count(*)::int AS n FROM backfill.batches AS b,"
        " jsonb_array_elements(b.errors) AS e WHERE b.run_id = $1 AND b.stage = $2"
        " GROUP BY 1 ORDER BY 1",
        run_id,
        stage,
    )
    return {r["category"]: r["n"] for r in rows}


async def batch_timing(conn: asyncpg.Connection, run_id: str) -> asyncpg.Record | None:
    """Average duration and rows of the run's committed batches (health's batch-size tuning)."""
    return await conn.fetchrow(
        "SELECT avg(duration_ms) AS ms, avg(changed + noop) AS rows, count(*) AS n"
        " FROM backfill.batches WHERE run_id = $1 AND status = 'done'",
        run_id,
    )


# -- soak samples --------------------------------------------------------------------------------


async def last_sample_no(conn: asyncpg.Connection, run_id: str) -> int:
    return int(
        await conn.fetchval(
            "SELECT coalesce(max(sample_no), 0) FROM backfill.soak_samples WHERE run_id = $1",
            run_id,
        )
    )


async def sample_outcomes(conn: asyncpg.Connection, run_id: str) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT check_name, outcome FROM backfill.soak_samples WHERE run_id = $1"
            " ORDER BY sample_no",
            run_id,
        )
    )


async def insert_samples(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> None:
    """(run_id, sample_no, check_name, sampled_at, value, outcome, detail) rows; a sample that
    is already recorded is kept as it was."""
    await conn.executemany(
        "INSERT INTO backfill.soak_samples VALUES ($1, $2, $3, $4, $5, $6, $7)"
        " ON CONFLICT DO NOTHING",
        rows,
    )


async def samples(conn: asyncpg.Connection, run_id: str) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT * FROM backfill.soak_samples WHERE run_id = $1 ORDER BY sample_no, check_name",
            run_id,
        )
    )


# -- runs and who may write decisions --------------------------------------------------------------


@dataclass(frozen=True)
class NewRun:
    """A run's row as a phase creates it: the plan and the target as resolved in this database."""

    run_id: str
    env: str
    plan_name: str
    plan_digest: str
    plan: dict[str, Any]
    target_table: str
    key_columns: list[str]
    columns: list[str]
    key_types: list[str]
    column_types: list[str]
    operator: str
    target_schema: str
    target_name: str
    target_oid: int
    search_schemas: list[str]
    tables: list[dict[str, Any]] | None = None


async def insert_run(conn: asyncpg.Connection, run: NewRun) -> None:
    """The run's row, unless another process created it first."""
    await conn.execute(
        """
        INSERT INTO backfill.runs (run_id, env, plan_name, plan_digest, plan, target_table,
                                   key_columns, columns, key_types, column_types, operator,
                                   target_schema, target_name, target_oid, search_schemas, tables)
        VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16::jsonb)
        ON CONFLICT (run_id) DO NOTHING
        """,
        run.run_id,
        run.env,
        run.plan_name,
        run.plan_digest,
        json.dumps(run.plan),
        run.target_table,
        run.key_columns,
        run.columns,
        run.key_types,
        run.column_types,
        run.operator,
        run.target_schema,
        run.target_name,
        run.target_oid,
        run.search_schemas,
        None if run.tables is None else json.dumps(run.tables),
    )


async def login_can_write_decisions(conn: asyncpg.Connection) -> bool:
    """Whether this login could write gate decisions (superuser, owner, or a write privilege);
    False where the ledger has no decisions table yet."""
    return bool(
        await conn.fetchval(
            """SELECT r.rolsuper
                   OR pg_has_role(session_user, c.relowner, 'USAGE')
                   OR has_table_privilege(session_user, c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE')
               FROM pg_class c, pg_roles r
               WHERE c.oid = to_regclass('backfill.gate_decisions') AND r.rolname = session_user"""
        )
    )


# -- row images and rollbacks ---------------------------------------------------------------------

# one line of a rollback checksum: the row's key and an image (`img`), both as text[] text
CHECKSUM_ROW = "i.key::text || '=' || coalesce({img}::text, 'NULL')"


async def done_batches(
    conn: asyncpg.Connection, run_id: str, batches: tuple[int, int] | None, since: datetime | None
) -> list[int]:
    """The run's committed batches, newest first, within `batches` (A-B) and after `since`. A
    batch in A-B that was split stands for its parts (their numbers come later): they are
    selected too, however deep the split went."""
    rows = await conn.fetch(
        """WITH RECURSIVE chosen AS (
               SELECT batch_no, status, split_into FROM backfill.batches
               WHERE run_id = $1 AND ($2::int IS NULL OR batch_no BETWEEN $2 AND $3)
               UNION
               SELECT b.batch_no, b.status, b.split_into
               FROM chosen AS c JOIN backfill.batches AS b
                 ON b.run_id = $1 AND b.batch_no = ANY(c.split_into)
           )
           SELECT DISTINCT c.batch_no FROM chosen AS c JOIN backfill.batches AS b
             ON b.run_id = $1 AND b.batch_no = c.batch_no
           WHERE c.status = 'done' AND ($4::timestamptz IS NULL OR b.committed_at > $4)
           ORDER BY c.batch_no DESC""",
        run_id,
        batches[0] if batches else None,
        batches[1] if batches else None,
        since,
    )
    return [r["batch_no"] for r in rows]


async def changed_per_batch(
    conn: asyncpg.Connection, run_id: str, batch_nos: list[int]
) -> dict[int, int]:
    return {
        r["batch_no"]: r["changed"]
        for r in await conn.fetch(
            "SELECT batch_no, changed FROM backfill.batches WHERE run_id = $1 AND batch_no = ANY($2)",
            run_id,
            batch_nos,
        )
    }


async def image_values(
    conn: asyncpg.Connection, run_id: str, batch_no: int
) -> tuple[str | None, str | None]:
    """A batch's changed rows as the rows of an INSERT into the rollback file's images table:
    `VALUES` tuples (batch_no, key, before, after), quoted by the server (`format('%L')`, i.e.
    quote_nullable) from the text form of their arrays, which casts back to the same text[]
    exactly; and the md5 of the batch's before-images (CHECKSUM_ROW lines in key order), which
    the rollback file's verification recomputes from the table. One batch at a time: memory
    stays bounded, and no sort of the whole run is needed."""
    row = await conn.fetchrow(
        f"""SELECT E'VALUES\n' || string_agg(format('(%s, %L, %L, %L)', i.batch_no, i.key::text,
                                                      i.before::text, i.after::text), E',\n')
                       AS tuples,
                   md5(string_agg({CHECKSUM_ROW.format(img="i.before")}, '|'
                                  ORDER BY i.key::text COLLATE pg_catalog."C")) AS checksum
            FROM backfill.row_images AS i
            WHERE i.run_id = $1 AND i.batch_no = $2 AND i.op = 'U'""",
        run_id,
        batch_no,
    )
    assert row is not None  # an aggregate: always one row
    return row["tuples"], row["checksum"]


def run_checksum(batch_checksums: list[str | None]) -> str | None:
    """A run's checksum from its batches' (in batch order): md5 over them, `|`-separated, as
    `md5(string_agg(m, '|' ORDER BY batch_no))` computes it in SQL."""
    present = [c for c in batch_checksums if c is not None]
    return hashlib.md5("|".join(present).encode()).hexdigest() if present else None


async def keys_in_several_batches(
    conn: asyncpg.Connection, run_id: str, batch_nos: list[int]
) -> bool:
    """Whether some key was changed by two batches (a row changed back and applied again in a
    later pass): then those batches must be restored in order, not side by side."""
    return bool(
        await conn.fetchval(
            """SELECT EXISTS (SELECT 1 FROM backfill.batch_images AS i,
                                   unnest(i.ops, i.keys) AS u(op, key)
                              WHERE i.run_id = $1 AND i.batch_no = ANY($2) AND u.op = 'U'
                              GROUP BY u.key HAVING count(*) > 1)""",
            run_id,
            batch_nos,
        )
    )


async def batch_rolled_back(conn: asyncpg.Connection, run_id: str, batch_no: int) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT 1 FROM backfill.rollback_batches WHERE run_id = $1 AND batch_no = $2",
            run_id,
            batch_no,
        )
    )


async def rollback_totals(
    conn: asyncpg.Connection, run_id: str, batch_nos: list[int]
) -> tuple[int, int]:
    """(restored, already at their before-image) over the batches' recorded rollbacks."""
    row = await conn.fetchrow(
        "SELECT coalesce(sum(restored), 0) AS restored, coalesce(sum(already), 0) AS already"
        " FROM backfill.rollback_batches WHERE run_id = $1 AND batch_no = ANY($2)",
        run_id,
        batch_nos,
    )
    assert row is not None
    return int(row["restored"]), int(row["already"])


async def rollback_conflicts(
    conn: asyncpg.Connection, run_id: str, batch_nos: list[int], limit: int = 200
) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT DISTINCT ON (batch_no, rel, key) batch_no, rel, key, expected, current"
            " FROM backfill.rollback_conflicts WHERE run_id = $1 AND batch_no = ANY($2)"
            " ORDER BY batch_no DESC, rel, key LIMIT $3",
            run_id,
            batch_nos,
            limit,
        )
    )


# -- shaped runs (engine.shapes, rollback.shaped): images per table ------------------------------

_SHAPED_UNNEST = (
    "FROM backfill.batch_images AS i "
    "CROSS JOIN LATERAL unnest(i.ops, i.keys, i.befores, i.afters) AS u(op, key, before, after) "
)
# one batch's images of one table ($1 run; {batch} and {rel} filled in by the caller)
SHAPED_IMAGES = (
    "SELECT i.batch_no, u.op, u.key, u.before, u.after "
    + _SHAPED_UNNEST
    + "WHERE i.run_id = $1 AND i.batch_no = {batch} AND i.rel = {rel}"
)
# each row's earliest (newest) image among batches $2 of run $1, one table
# each row's earliest (newest) image among batches $2 of run $1, one table; {typed_key} is the
# key as its column types compare it (1 and 1.0 are one numeric row, whatever their text)
SHAPED_EARLIEST = (
    "SELECT DISTINCT ON ({typed_key}) i.batch_no, u.op, u.key, u.before, u.after "
    + _SHAPED_UNNEST
    + "WHERE i.run_id = $1 AND i.batch_no = ANY($2) AND i.rel = {rel} AND u.op <> 'N' "
    "ORDER BY {typed_key}, i.batch_no"
)
SHAPED_NEWEST = SHAPED_EARLIEST.replace(
    "ORDER BY {typed_key}, i.batch_no", "ORDER BY {typed_key}, i.batch_no DESC"
)
SHAPED_CONFLICT_KEYS = (
    "SELECT DISTINCT key FROM backfill.rollback_conflicts "
    "WHERE run_id = $1 AND batch_no = ANY($2) AND rel = {rel}"
)


async def foreign_keys_between(conn: asyncpg.Connection, oids: list[int]) -> list[tuple[int, int]]:
    """(referencing, referenced) table pairs among `oids`."""
    rows = await conn.fetch(
        "SELECT conrelid::oid::bigint AS child, confrelid::oid::bigint AS parent "
        "FROM pg_constraint WHERE contype = 'f' AND conrelid = ANY($1::oid[]) "
        "AND confrelid = ANY($1::oid[])",
        oids,
    )
    return [(int(r["child"]), int(r["parent"])) for r in rows]


async def record_shaped_conflicts(
    conn: asyncpg.Connection, select_sql: str, run_id: str, batch_no: int
) -> int:
    """Rows an undo left alone, from `select_sql` (run, batch, rel, key, expected, current)."""
    tag = await conn.execute(
        "INSERT INTO backfill.rollback_conflicts (run_id, batch_no, rel, key, expected, current) "
        + select_sql,
        run_id,
        batch_no,
    )
    return int(tag.rsplit(" ", 1)[-1])


async def shaped_image_count(conn: asyncpg.Connection, run_id: str, batch_no: int) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) "
            + _SHAPED_UNNEST
            + "WHERE i.run_id = $1 AND i.batch_no = $2 AND u.op <> 'N'",
            run_id,
            batch_no,
        )
    )


async def record_rollback_batch(
    conn: asyncpg.Connection,
    run_id: str,
    batch_no: int,
    restored: int,
    conflicts: int,
    already: int,
) -> None:
    await conn.execute(
        "INSERT INTO backfill.rollback_batches (run_id, batch_no, restored, conflicts, already) "
        "VALUES ($1, $2, $3, $4, $5)",
        run_id,
        batch_no,
        restored,
        conflicts,
        already,
    )


_SHAPED_IMAGE_ROWS = """
WITH b AS (SELECT * FROM backfill.batch_images WHERE run_id = $1 AND batch_no = $2)
SELECT CASE WHEN (SELECT bool_and(b.digests) FROM b)
       THEN (SELECT string_agg(format('SELECT %s, %s, u.op, u.key, NULL, u.after '
                                      'FROM unnest(%L::text[], %L::text[], %L::text[]) '
                                      'AS u(op, key, after) WHERE u.op <> ''N''',
                                      b.batch_no, b.rel, b.ops, b.keys, b.afters),
                               E'\nUNION ALL\n' ORDER BY b.rel) FROM b)
       ELSE (SELECT E'VALUES\n' || string_agg(format('(%s, %s, %L, %L, %L, %L)', b.batch_no,
                                                     b.rel, u.op, u.key, u.before, u.after),
                                              E',\n')
             FROM b CROSS JOIN LATERAL unnest(b.ops, b.keys, b.befores, b.afters)
                  AS u(op, key, before, after)
             WHERE u.op <> 'N')
       END AS body,
       (SELECT count(*)::int FROM b CROSS JOIN LATERAL unnest(b.ops) AS o WHERE o <> 'N') AS n"""


async def shaped_image_values(
    conn: asyncpg.Connection, run_id: str, batch_no: int
) -> tuple[str | None, int]:
    """A batch's images of every table as the rows of an INSERT into the rollback file's images
    table (batch_no, rel, op, key, before, after), quoted by the server (`format('%L')`), and
    how many: `VALUES` tuples, one per row; or, when every table of the batch keeps digests (an
    insert-only batch: a key and a digest per row), one `SELECT … FROM unnest(…)` over the
    batch's arrays per table (half the bytes, less of the server's time)."""
    row = await conn.fetchrow(_SHAPED_IMAGE_ROWS, run_id, batch_no)
    assert row is not None
    n = int(row["n"])
    return (row["body"] if n else None), n


async def table_counts(
    conn: asyncpg.Connection, run_id: str, stage: str
) -> dict[int, dict[str, int]]:
    """A shaped run's images in one stage, per table (rel): inserted, updated, deleted, unchanged."""
    rows = await conn.fetch(
        "SELECT i.rel, count(*) FILTER (WHERE u.op = 'I')::int AS inserted,"
        " count(*) FILTER (WHERE u.op = 'U')::int AS updated,"
        " count(*) FILTER (WHERE u.op = 'D')::int AS deleted,"
        " count(*) FILTER (WHERE u.op = 'N')::int AS unchanged"
        " FROM backfill.batch_images AS i JOIN backfill.batches AS b USING (run_id, batch_no)"
        " CROSS JOIN LATERAL unnest(i.ops) AS u(op)"
        " WHERE i.run_id = $1 AND b.stage = $2 AND b.status = 'done' GROUP BY i.rel",
        run_id,
        stage,
    )
    return {
        int(r["rel"]): {k: int(r[k]) for k in ("inserted", "updated", "deleted", "unchanged")}
        for r in rows
    }


async def refresh_run_tables(
    conn: asyncpg.Connection, run_id: str, tables: list[dict[str, Any]] | None
) -> None:
    """A run's recorded tables as they are now, while no batch has run in this environment
    (a health check re-run after prod's schema was fixed); never once images exist."""
    await conn.execute(
        "UPDATE backfill.runs SET tables = $2::jsonb WHERE run_id = $1 AND NOT EXISTS "
        "(SELECT 1 FROM backfill.batches WHERE run_id = $1)",
        run_id,
        None if tables is None else json.dumps(tables),
    )


async def references_to(
    conn: asyncpg.Connection, oid: int
) -> list[tuple[str, list[str], list[str]]]:
    """Every foreign key that references table `oid`: (the referencing table, quoted and
    qualified; its columns; the referenced columns), in constraint order."""
    rows = await conn.fetch(
        """SELECT format('%I.%I', n.nspname, c.relname) AS child,
                  array(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY AS x(n, o)
                        JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = x.n
                        ORDER BY x.o) AS child_cols,
                  array(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY AS x(n, o)
                        JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = x.n
                        ORDER BY x.o) AS parent_cols
           FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE k.contype = 'f' AND k.confrelid = $1 ORDER BY k.conname""",
        oid,
    )
    return [(r["child"], list(r["child_cols"]), list(r["parent_cols"])) for r in rows]


_MANIFEST_KEYS = """
    SELECT i.batch_no, i.rel,
           (CASE WHEN i.key_width = 1 THEN ARRAY[u.key] ELSE u.key::text[] END) AS key
    FROM backfill.batch_images AS i
    CROSS JOIN LATERAL unnest(i.ops, i.keys) AS u(op, key)
    WHERE i.run_id = $1 AND u.op IN ('I', 'U', 'D')"""


async def manifest_rows(
    conn: asyncpg.Connection,
    run_id: str,
    stage: str,
    keys_up_to: int,
    batch_nos: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Per committed batch of a stage (or only `batch_nos` of them) and table (rel): the keys it
    changed (inserted, updated, deleted), their count and md5 (over the keys' text in order,
    `|`-separated); the keys themselves (JSON, each a list of the key's columns as text) only up
    to `keys_up_to`, read by a second statement for those groups alone (sorting a large batch's
    keys a second time, for a list that is not kept, cost more than the rest)."""
    rows = [
        dict(r)
        for r in await conn.fetch(
            f"""SELECT b.batch_no, b.stage, k.rel, b.started_at, count(*)::int AS changed,
                       b.manifest::text AS manifest,
                       md5(string_agg(k.key_text, '|' ORDER BY k.key_text COLLATE pg_catalog."C"))
                           AS keys_md5
                FROM backfill.batches AS b
                JOIN (SELECT batch_no, rel, key::text AS key_text FROM ({_MANIFEST_KEYS}) AS m)
                     AS k USING (batch_no)
                WHERE b.run_id = $1 AND b.stage = $2 AND b.status = 'done'
                  AND ($3::int[] IS NULL OR b.batch_no = ANY($3))
                GROUP BY b.batch_no, b.stage, k.rel, b.started_at, b.manifest::text
                ORDER BY b.batch_no, k.rel""",
            run_id,
            stage,
            batch_nos,
        )
    ]
    listed = [(r["batch_no"], r["rel"]) for r in rows if r["changed"] <= keys_up_to]
    keys: dict[tuple[int, int], str] = {}
    if listed:
        for listing in await conn.fetch(
            f"""SELECT m.batch_no, m.rel, json_agg(m.key ORDER BY m.key::text COLLATE pg_catalog."C")::text
                       AS keys
                FROM ({_MANIFEST_KEYS}) AS m
                WHERE (m.batch_no, m.rel) IN (SELECT * FROM unnest($2::int[], $3::int[]))
                GROUP BY m.batch_no, m.rel""",
            run_id,
            [b for b, _ in listed],
            [rel for _, rel in listed],
        ):
            keys[(listing["batch_no"], listing["rel"])] = listing["keys"]
    for r in rows:
        r["keys"] = keys.get((r["batch_no"], r["rel"]))
    return rows


# -- windows (#14) --------------------------------------------------------------------------------


async def record_windows(
    conn: asyncpg.Connection,
    run_id: str,
    env: str,
    windows: list[tuple[int, str, str | None, str | None]],
) -> list[asyncpg.Record]:
    """The run's windows in `env` as first recorded (recorded now if none yet), in order."""
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('backfill-windows'), hashtext($1))", run_id
        )
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT FROM backfill.windows WHERE run_id = $1 AND env = $2)",
            run_id,
            env,
        ):
            await conn.executemany(
                "INSERT INTO backfill.windows (run_id, env, window_no, label, lower_bound,"
                " upper_bound) VALUES ($1, $2, $3, $4, $5, $6)",
                [(run_id, env, *w) for w in windows],
            )
        return await window_rows(conn, run_id, env)


# What window `x`'s batches did: those of its run numbered from its first batch (windows run one
# after another, so a window's batches are the run's latest), but a quarantine retry's (made while
# the window was open: they belong to no window), and the keys they quarantined (released by a
# retry since, or not: they were quarantined in this window).
_WINDOW_COUNTS = """
SELECT c.keys, c.changed, c.noop, q.n AS quarantined
FROM (SELECT coalesce(sum(b.selected), 0) AS keys, coalesce(sum(b.changed), 0) AS changed,
             coalesce(sum(b.noop), 0) AS noop
      FROM backfill.batches b
      WHERE b.run_id = x.run_id AND b.status = 'done' AND b.batch_no >= x.first_batch
        AND b.stage <> 'retry') AS c,
     (SELECT count(*) AS n FROM backfill.quarantine qq
      WHERE qq.run_id = x.run_id AND qq.batch_no >= x.first_batch
        AND qq.stage <> 'retry') AS q"""


async def window_rows(conn: asyncpg.Connection, run_id: str, env: str) -> list[asyncpg.Record]:
    """The run's windows in `env`, in order. A running window's counts are its batches' so far
    (a canary stops inside a window: its summary shows what the window did)."""
    return list(
        await conn.fetch(
            f"""
SELECT x.run_id, x.env, x.window_no, x.label, x.lower_bound, x.upper_bound, x.status,
       x.first_batch, x.discovered, x.started_at, x.finished_at,
       coalesce(x.keys, s.keys) AS keys, coalesce(x.changed, s.changed) AS changed,
       coalesce(x.noop, s.noop) AS noop, coalesce(x.quarantined, s.quarantined) AS quarantined
FROM backfill.windows AS x
LEFT JOIN LATERAL ({_WINDOW_COUNTS}) AS s ON x.status = 'running'
WHERE x.run_id = $1 AND x.env = $2
ORDER BY x.window_no""",
            run_id,
            env,
        )
    )


async def start_window(
    conn: asyncpg.Connection,
    run_id: str,
    env: str,
    window_no: int,
    first_batch: int,
    discovered: int,
) -> None:
    await conn.execute(
        "UPDATE backfill.windows SET status = 'running', first_batch = $3, discovered = $4,"
        " started_at = clock_timestamp() WHERE run_id = $1 AND window_no = $2 AND env = $5",
        run_id,
        window_no,
        first_batch,
        discovered,
        env,
    )


async def finish_window(
    conn: asyncpg.Connection, run_id: str, env: str, window_no: int
) -> asyncpg.Record:
    """The window done, with the counts of its batches (those numbered from its first batch)."""
    row = await conn.fetchrow(
        f"""
UPDATE backfill.windows AS w SET status = 'done', finished_at = clock_timestamp(),
       keys = s.keys, changed = s.changed, noop = s.noop, quarantined = s.quarantined
FROM backfill.windows AS x, LATERAL ({_WINDOW_COUNTS}) AS s
WHERE w.run_id = $1 AND w.env = $3 AND w.window_no = $2
  AND x.run_id = w.run_id AND x.env = w.env AND x.window_no = w.window_no
RETURNING w.*""",
        run_id,
        window_no,
        env,
    )
    assert row is not None
    return row


async def last_batch_no(conn: asyncpg.Connection, run_id: str) -> int:
    return int(
        await conn.fetchval(
            "SELECT coalesce(max(batch_no), 0) FROM backfill.batches WHERE run_id = $1", run_id
        )
    )


async def window_status(conn: asyncpg.Connection, run_id: str, env: str, window_no: int) -> str:
    """A window's status, its row locked until the transaction ends."""
    return str(
        await conn.fetchval(
            "SELECT status FROM backfill.windows WHERE run_id = $1 AND env = $2"
            " AND window_no = $3 FOR UPDATE",
            run_id,
            env,
            window_no,
        )
    )


# -- processes (#15) ------------------------------------------------------------------------------


async def register_process(
    conn: asyncpg.Connection,
    run_id: str,
    process_id: str,
    env: str,
    phase: str,
    host: str,
    pid: int,
    operator: str,
    *,
    joined: bool = False,
) -> None:
    """A process starts working on the run (`joined`: a stage another process leads; the
    column exists from ledger migration 9, which every apply has run first)."""
    await conn.execute(
        "INSERT INTO backfill.processes (run_id, process_id, env, phase, host, pid, operator"
        + (
            ", joined) VALUES ($1, $2, $3, $4, $5, $6, $7, true)"
            if joined
            else ") VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ),
        run_id,
        process_id,
        env,
        phase,
        host,
        pid,
        operator,
    )


async def beat(conn: asyncpg.Connection, run_id: str, process_id: str) -> None:
    await conn.execute(
        "UPDATE backfill.processes SET heartbeat = clock_timestamp()"
        " WHERE run_id = $1 AND process_id = $2",
        run_id,
        process_id,
    )


async def set_process_phase(
    conn: asyncpg.Connection, run_id: str, process_id: str, phase: str
) -> None:
    await conn.execute(
        "UPDATE backfill.processes SET phase = $3 WHERE run_id = $1 AND process_id = $2",
        run_id,
        process_id,
        phase,
    )


async def end_process(conn: asyncpg.Connection, run_id: str, process_id: str, outcome: str) -> None:
    await conn.execute(
        "UPDATE backfill.processes SET heartbeat = clock_timestamp(),"
        " finished_at = clock_timestamp(), outcome = $3 WHERE run_id = $1 AND process_id = $2",
        run_id,
        process_id,
        outcome,
    )


async def run_processes(conn: asyncpg.Connection, run_id: str) -> list[asyncpg.Record]:
    """Every process that worked on the run here, oldest first, with the seconds since its last
    heartbeat (by the database's clock), the batches it committed (the batch rows name their
    process; rows from before they did: those of its phase committed between its start and its
    end) and the leases it holds open (claimed pages with no batch row yet)."""
    if not await conn.fetchval("SELECT to_regclass('backfill.processes') IS NOT NULL"):
        return []
    if not await conn.fetchval("SELECT to_regclass('backfill.leases') IS NOT NULL"):
        # a ledger from before leases (migration 9), read without writing to it
        return list(
            await conn.fetch(
                """SELECT p.*, extract(epoch FROM clock_timestamp() - p.heartbeat)::float8
                          AS silent, NULL::int[] AS leases,
                          (SELECT count(*) FROM backfill.batches b
                            WHERE b.run_id = p.run_id AND b.status = 'done' AND b.stage = p.phase
                              AND b.committed_at BETWEEN p.started_at AND coalesce(
                                  p.finished_at,
                                  (SELECT min(q.started_at) FROM backfill.processes q
                                    WHERE q.run_id = p.run_id AND q.started_at > p.started_at),
                                  'infinity')) AS batches
                   FROM backfill.processes p WHERE p.run_id = $1 ORDER BY p.started_at""",
                run_id,
            )
        )
    return list(
        await conn.fetch(
            """SELECT p.*, extract(epoch FROM clock_timestamp() - p.heartbeat)::float8 AS silent,
                      (SELECT count(*) FROM backfill.batches b
                        WHERE b.run_id = p.run_id AND b.status = 'done'
                          AND (b.process = p.process_id
                               OR b.process IS NULL AND b.stage = p.phase
                                  AND b.committed_at BETWEEN p.started_at AND coalesce(
                                      p.finished_at,
                                      (SELECT min(q.started_at) FROM backfill.processes q
                                        WHERE q.run_id = p.run_id
                                          AND q.started_at > p.started_at),
                                      'infinity'))) AS batches,
                      (SELECT array_agg(l.batch_no ORDER BY l.batch_no)
                         FROM backfill.leases l
                        WHERE l.run_id = p.run_id AND l.owner = p.process_id
                          AND NOT EXISTS (SELECT 1 FROM backfill.batches b
                                          WHERE b.run_id = l.run_id
                                            AND b.batch_no = l.batch_no)) AS leases
               FROM backfill.processes p WHERE p.run_id = $1 ORDER BY p.started_at""",
            run_id,
        )
    )


# -- leases: several processes on one stage (#15) ------------------------------------------------

SETTLED = ("done", "split", "quarantined")  # batch rows whose keys need nothing more

# a lease is open while no settled batch row has its number
_OPEN = f"""NOT EXISTS (
    SELECT 1 FROM backfill.batches b
    WHERE b.run_id = l.run_id AND b.batch_no = l.batch_no
      AND b.status IN ({", ".join(f"'{s}'" for s in SETTLED)}))"""


def _alive(run: str, process: str, timeout: str) -> str:
    """SQL: the process `process` (a column) of run `run` is alive: it has not ended and its
    heartbeat is younger than `timeout` (a parameter) seconds."""
    return f"""EXISTS (
    SELECT 1 FROM backfill.processes p
    WHERE p.run_id = {run} AND p.process_id = {process} AND p.finished_at IS NULL
      AND p.heartbeat > clock_timestamp() - make_interval(secs => {timeout}))"""


# a lease's owner is alive ({timeout}: the parameter holding the lease timeout)
_LIVE = _alive("l.run_id", "l.owner", "{timeout}")


@dataclass(frozen=True)
class Work:
    """A stage's shared cursor (backfill.work)."""

    stage: str
    pass_no: int
    position: list[str] | None
    next_no: int
    claimed: int
    leader: str
    stopped: str | None
    done: bool
    leader_live: bool

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Work:
        return cls(
            row["stage"],
            row["pass"],
            list(row["position"]) if row["position"] is not None else None,
            row["next_no"],
            row["claimed"],
            row["leader"],
            row["stopped"],
            row["done"],
            row["leader_live"],
        )


_WORK = f"""SELECT w.*, {_alive("w.run_id", "w.leader", "$3")} AS leader_live
            FROM backfill.work w WHERE w.run_id = $1 AND w.stage = $2"""


async def get_work(
    conn: asyncpg.Connection, run_id: str, stage: str, lease_timeout: float
) -> Work | None:
    row = await conn.fetchrow(_WORK, run_id, stage, lease_timeout)
    return Work.from_row(row) if row is not None else None


async def joinable_stage(conn: asyncpg.Connection, run_id: str, lease_timeout: float) -> str | None:
    """The stage of the run that a process may join now: one whose leader is alive, neither
    stopped nor done (None: none)."""
    if not await conn.fetchval("SELECT to_regclass('backfill.work') IS NOT NULL"):
        return None
    return await conn.fetchval(  # type: ignore[no-any-return]
        f"""SELECT w.stage FROM backfill.work w
            WHERE w.run_id = $1 AND NOT w.done AND w.stopped IS NULL
              AND {_alive("w.run_id", "w.leader", "$2")}""",
        run_id,
        lease_timeout,
    )


async def lead_work(
    conn: asyncpg.Connection,
    run_id: str,
    stage: str,
    me: str,
    lease_timeout: float,
    *,
    position: list[str] | None,
    next_no: int,
    claimed: int,
) -> tuple[Work, int]:
    """The leader takes the stage's cursor: a new one at `position` (the resume point) when the
    stage has none yet, else the one it has, as every process left it. Its open leases are never
    dropped: a process that looks gone may be only frozen and commit its batch later, so each
    lease is applied under its own number (taken over) and never paged again under another.
    The previous leader was recorded gone when this process took the run lock
    (`lock_losers_gone`), so its leases are taken over without waiting for `lease_timeout`
    (under their own numbers, so a batch it still commits is committed once).
    Returns the cursor and how many open leases it has."""
    async with conn.transaction():
        await conn.execute(
            """INSERT INTO backfill.work (run_id, stage, pass, position, next_no, claimed, leader)
               VALUES ($1, $2, 1, $3, $4, $5, $6)
               ON CONFLICT (run_id, stage) DO UPDATE SET
                   next_no = greatest(backfill.work.next_no, $4), leader = $6, stopped = NULL,
                   done = false""",
            run_id,
            stage,
            position,
            next_no,
            claimed,
            me,
        )
        work = await get_work(conn, run_id, stage, lease_timeout)
        assert work is not None
        return work, (await open_leases(conn, run_id, stage, lease_timeout))[0]


async def claim_page(
    conn: asyncpg.Connection,
    run_id: str,
    stage: str,
    me: str,
    *,
    pass_no: int,
    after: list[str] | None,
    last: list[str],
    size: int,
    interval: float,
    limit: int | None,
) -> tuple[int, float] | None:
    """Claim the page (after, last] for `me`: its batch number and the seconds to wait for its
    slot under the run's rate. None when the cursor moved on since it was read (another
    process claimed that page), or the stage was stopped, is done or reached `limit`."""
    # one statement (one round trip): the compare-and-set and the lease row commit together
    row = await conn.fetchrow(
        """WITH w AS (
               UPDATE backfill.work SET position = $5, next_no = next_no + 1,
                   claimed = claimed + 1,
                   next_slot = CASE WHEN $6::float8 > 0 THEN greatest(clock_timestamp(),
                       coalesce(next_slot, '-infinity')) + make_interval(secs => $6) END
               WHERE run_id = $1 AND stage = $2 AND pass = $3
                 AND position IS NOT DISTINCT FROM $4::text[]
                 AND stopped IS NULL AND NOT done AND ($7::int IS NULL OR claimed < $7)
               RETURNING next_no - 1 AS batch_no,
                   CASE WHEN $6::float8 > 0 THEN extract(epoch FROM next_slot
                       - make_interval(secs => $6) - clock_timestamp())::float8 ELSE 0 END
                       AS wait),
           l AS (
               INSERT INTO backfill.leases (run_id, batch_no, stage, pass, after_key, last_key,
                                            size, owner)
               SELECT $1, w.batch_no, $2, $3, $4::text[], $5, $8, $9 FROM w)
           SELECT batch_no, wait FROM w""",
        run_id,
        stage,
        pass_no,
        after,
        last,
        interval,
        limit,
        size,
        me,
    )
    if row is None:
        return None
    return int(row["batch_no"]), max(float(row["wait"]), 0.0)


@dataclass(frozen=True)
class Lease:
    batch_no: int
    after_key: list[str] | None
    last_key: list[str]
    size: int
    wait: float  # seconds to its slot under the run's rate
    was: str  # the owner it was taken from


async def take_over(
    conn: asyncpg.Connection,
    run_id: str,
    stage: str,
    me: str,
    lease_timeout: float,
    interval: float,
) -> Lease | None:
    """An open lease of the stage whose owner is gone (no heartbeat for `lease_timeout` seconds, or
    ended), now `me`'s; when its number already has a batch row (the owner's batch failed), it
    gets a new number. None: no such lease, or the stage was stopped."""
    async with conn.transaction():
        row = await conn.fetchrow(
            f"""SELECT l.* FROM backfill.leases l
                WHERE l.run_id = $1 AND l.stage = $2 AND l.owner <> $3 AND {_OPEN}
                  AND NOT {_LIVE.format(timeout="$4")}
                  AND EXISTS (SELECT 1 FROM backfill.work w WHERE w.run_id = l.run_id
                              AND w.stage = l.stage AND w.stopped IS NULL)
                ORDER BY l.batch_no LIMIT 1 FOR UPDATE OF l SKIP LOCKED""",
            run_id,
            stage,
            me,
            lease_timeout,
        )
        if row is None:
            return None
        batch_no = row["batch_no"]
        renumber = bool(
            await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM backfill.batches WHERE run_id = $1 AND batch_no = $2)",
                run_id,
                batch_no,
            )
        )
        slot = await conn.fetchrow(
            """UPDATE backfill.work SET
                   next_no = next_no + CASE WHEN $3 THEN 1 ELSE 0 END,
                   next_slot = CASE WHEN $4::float8 > 0 THEN greatest(clock_timestamp(),
                       coalesce(next_slot, '-infinity')) + make_interval(secs => $4) END
               WHERE run_id = $1 AND stage = $2
               RETURNING next_no - 1 AS new_no,
                   CASE WHEN $4::float8 > 0 THEN extract(epoch FROM next_slot
                       - make_interval(secs => $4) - clock_timestamp())::float8 ELSE 0 END
                       AS wait""",
            run_id,
            stage,
            renumber,
            interval,
        )
        assert slot is not None
        new_no = slot["new_no"] if renumber else batch_no
        await conn.execute(
            """UPDATE backfill.leases SET batch_no = $4, owner = $3, takeovers = takeovers + 1,
                   claimed_at = clock_timestamp()
               WHERE run_id = $1 AND batch_no = $2""",
            run_id,
            batch_no,
            me,
            new_no,
        )
        return Lease(
            new_no,
            list(row["after_key"]) if row["after_key"] is not None else None,
            list(row["last_key"]),
            row["size"],
            max(float(slot["wait"]), 0.0),
            row["owner"],
        )


async def drop_lease(conn: asyncpg.Connection, run_id: str, batch_no: int) -> None:
    """A taken-over lease whose range discovery no longer returns anything: nothing to apply."""
    await conn.execute(
        "DELETE FROM backfill.leases WHERE run_id = $1 AND batch_no = $2", run_id, batch_no
    )


async def open_leases(
    conn: asyncpg.Connection, run_id: str, stage: str, lease_timeout: float
) -> tuple[int, int]:
    """(open leases of the stage, of those whose owner is gone)."""
    row = await conn.fetchrow(
        f"""SELECT count(*) AS open, count(*) FILTER (WHERE NOT {_LIVE.format(timeout="$3")})
                   AS gone
            FROM backfill.leases l WHERE l.run_id = $1 AND l.stage = $2 AND {_OPEN}""",
        run_id,
        stage,
        lease_timeout,
    )
    assert row is not None
    return int(row["open"]), int(row["gone"])


async def next_batch_no(conn: asyncpg.Connection, run_id: str, stage: str) -> int:
    """A batch number from the stage's shared cursor (a split's part)."""
    return int(
        await conn.fetchval(
            "UPDATE backfill.work SET next_no = next_no + 1 WHERE run_id = $1 AND stage = $2"
            " RETURNING next_no - 1",
            run_id,
            stage,
        )
    )


async def _lease_open(conn: asyncpg.Connection, run_id: str, stage: str) -> bool:
    """Whether a lease of the stage is open, looked at under the cursor's row lock (inside the
    caller's transaction): a claim in flight commits its lease before the look."""
    await conn.execute(
        "SELECT 1 FROM backfill.work WHERE run_id = $1 AND stage = $2 FOR UPDATE", run_id, stage
    )
    return bool(
        await conn.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM backfill.leases l WHERE l.run_id = $1"
            f" AND l.stage = $2 AND {_OPEN})",
            run_id,
            stage,
        )
    )


async def next_pass(conn: asyncpg.Connection, run_id: str, stage: str, pass_no: int) -> bool:
    """Open the next pass (its pages start from the beginning again); False (not opened) while
    a lease is open: a page claimed after the leader's last look is applied first, so the new
    pass never pages its keys again under another number."""
    async with conn.transaction():
        if await _lease_open(conn, run_id, stage):
            return False
        await conn.execute(
            "UPDATE backfill.work SET pass = $3 + 1, position = NULL"
            " WHERE run_id = $1 AND stage = $2 AND pass = $3",
            run_id,
            stage,
            pass_no,
        )
        return True


async def next_free_batch_no(conn: asyncpg.Connection, run_id: str) -> int:
    """A batch number above every one the run used or claimed: its batch rows, its stages'
    shared cursors and their leases (a quarantine retry between two commands of a stage)."""
    return int(
        await conn.fetchval(
            """SELECT greatest(
                   (SELECT max(batch_no) + 1 FROM backfill.batches WHERE run_id = $1),
                   (SELECT max(next_no) FROM backfill.work WHERE run_id = $1),
                   (SELECT max(batch_no) + 1 FROM backfill.leases WHERE run_id = $1),
                   1)""",
            run_id,
        )
    )


async def stop_work(conn: asyncpg.Connection, run_id: str, stage: str, reason: str) -> None:
    """No process may claim another page of the stage (a failed batch, a halt); the next
    leader clears it."""
    await conn.execute(
        "UPDATE backfill.work SET stopped = coalesce(stopped, $3) WHERE run_id = $1 AND stage = $2",
        run_id,
        stage,
        reason,
    )


async def finish_work(conn: asyncpg.Connection, run_id: str, stage: str) -> bool:
    """Mark the stage's cursor done, so no process claims another page; False (not done) while
    a lease is open: a page claimed since the leader last looked (rows that arrived after the
    cursor) is applied and counted before the stage ends."""
    async with conn.transaction():
        if await _lease_open(conn, run_id, stage):
            return False
        await conn.execute(
            "UPDATE backfill.work SET done = true WHERE run_id = $1 AND stage = $2", run_id, stage
        )
        return True


async def shared_by(
    conn: asyncpg.Connection, run_id: str, stage: str, me: str, pass_no: int
) -> bool:
    """Whether another process claimed pages of this pass."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM backfill.leases WHERE run_id = $1 AND stage = $2"
            " AND pass = $4 AND owner <> $3)",
            run_id,
            stage,
            me,
            pass_no,
        )
    )


async def release_claim(
    conn: asyncpg.Connection,
    run_id: str,
    stage: str,
    batch_no: int,
    after: list[str] | None,
    last: list[str],
) -> bool:
    """Give back a page claimed but never handed to a batch (the process stopped first) when
    nothing was claimed after it: the cursor, the number and the claim count go back. False
    when another claim followed: the lease stays open, for whoever continues once this
    process has ended."""
    async with conn.transaction():
        back = await conn.fetchval(
            """UPDATE backfill.work SET position = $4, next_no = $3, claimed = claimed - 1
               WHERE run_id = $1 AND stage = $2 AND next_no = $3 + 1
                 AND position IS NOT DISTINCT FROM $5::text[]
               RETURNING true""",
            run_id,
            stage,
            batch_no,
            after,
            last,
        )
        if back:
            await conn.execute(
                "DELETE FROM backfill.leases WHERE run_id = $1 AND batch_no = $2", run_id, batch_no
            )
        return bool(back)


async def stage_processes(
    conn: asyncpg.Connection, run_id: str, stage: str
) -> list[asyncpg.Record]:
    """The processes that committed batches of a stage (the batch rows name them), with their
    batches, rows changed and taken-over leases; oldest first. Only facts that stay as they are
    once the stage finished (the summary is sealed by its digest): not how a process ended."""
    return list(
        await conn.fetch(
            """SELECT b.process, p.host, p.pid, p.started_at,
                      count(*) AS batches, sum(b.changed) AS changed,
                      (SELECT count(*) FROM backfill.leases l WHERE l.run_id = $1
                         AND l.owner = b.process AND l.takeovers > 0) AS taken_over
               FROM backfill.batches b
               LEFT JOIN backfill.processes p
                 ON p.run_id = b.run_id AND p.process_id = b.process
               WHERE b.run_id = $1 AND b.stage = $2 AND b.status = 'done'
                 AND b.process IS NOT NULL
               GROUP BY b.process, p.host, p.pid, p.started_at
               ORDER BY p.started_at NULLS LAST""",
            run_id,
            stage,
        )
    )


async def lock_losers_gone(conn: asyncpg.Connection, run_id: str) -> None:
    """This connection holds the run lock now: every other process that held it (not one that
    joined a stage) and recorded no end has lost it (killed, or cut off from the database), so
    it is recorded gone and its leases may be taken over at once."""
    if not await conn.fetchval("SELECT to_regclass('backfill.leases') IS NOT NULL"):
        return  # a ledger from before leases: nothing to take over
    await conn.execute(
        """UPDATE backfill.processes SET finished_at = clock_timestamp(),
               outcome = 'gone: another process took the run lock'
           WHERE run_id = $1 AND finished_at IS NULL AND NOT joined""",
        run_id,
    )


async def live_processes(
    conn: asyncpg.Connection, run_id: str, lease_timeout: float, *, joined: bool = False
) -> list[asyncpg.Record]:
    """The run's processes that still beat (not ended, heartbeat younger than the timeout);
    with `joined`, only those that joined a stage (the others held the run lock)."""
    if not await conn.fetchval("SELECT to_regclass('backfill.leases') IS NOT NULL"):
        return []
    return list(
        await conn.fetch(
            """SELECT process_id, host, pid, phase, env FROM backfill.processes
               WHERE run_id = $1 AND finished_at IS NULL AND (joined OR NOT $3)
                 AND heartbeat > clock_timestamp() - make_interval(secs => $2)
               ORDER BY started_at""",
            run_id,
            lease_timeout,
            joined,
        )
    )


async def close_work(
    conn: asyncpg.Connection, run_id: str, reason: str, lease_timeout: float
) -> tuple[int, int]:
    """Before a rollback: no process claims another page of the run (every stage stopped), and
    every lease still open gets a tombstone batch row (status 'abandoned'), so a process that
    is only frozen can never commit its batch later (the primary key refuses it; a split part's
    lease check refuses it too). Returns (leases whose live owner is still applying them, open
    leases tombstoned): call again while the first is not 0."""
    if not await conn.fetchval("SELECT to_regclass('backfill.work') IS NOT NULL"):
        return 0, 0
    await conn.execute(
        "UPDATE backfill.work SET stopped = coalesce(stopped, $2) WHERE run_id = $1 AND NOT done",
        run_id,
        reason,
    )
    live = int(
        await conn.fetchval(
            f"""SELECT count(*) FROM backfill.leases l WHERE l.run_id = $1 AND {_OPEN}
                AND {_LIVE.format(timeout="$2")}
                AND NOT EXISTS (SELECT 1 FROM backfill.batches b WHERE b.run_id = l.run_id
                                AND b.batch_no = l.batch_no)""",
            run_id,
            lease_timeout,
        )
    )
    if live:
        return live, 0
    async with conn.transaction():
        tombstoned = await conn.fetch(
            f"""INSERT INTO backfill.batches (run_id, batch_no, stage, status, first_key,
                                              last_key, started_at, duration_ms, errors)
                SELECT l.run_id, l.batch_no, l.stage, 'abandoned', NULL, l.last_key,
                       clock_timestamp(), 0,
                       jsonb_build_array(jsonb_build_object('category', 'abandoned',
                           'error', 'the run was rolled back before this lease was applied'))
                FROM backfill.leases l WHERE l.run_id = $1 AND {_OPEN}
                ON CONFLICT (run_id, batch_no) DO NOTHING
                RETURNING batch_no""",
            run_id,
        )
        await conn.execute(
            "UPDATE backfill.leases SET owner = 'rollback' WHERE run_id = $1 AND batch_no ="
            " ANY($2::int[])",
            run_id,
            [r["batch_no"] for r in tombstoned],
        )
    return 0, len(tombstoned)
