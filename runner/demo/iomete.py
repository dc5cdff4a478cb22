"""The IOMETE file-ingestion scenario (seed 004): `processed_files` brought up to date with the
files in storage, for a date range, partition by partition.

`source_files` lists what a storage listing would return (path, size, ETag, modification time),
partitioned by month of the file's `day` (January to April 2024, and a DEFAULT partition for the
rest). `processed_files` is the ingestion's record of what it loaded. Before the backfill, a file is
in one of five states, chosen by a hash of its id (so a scale always yields the same data):

- done: SUCCESS with the file's current ETag (skipped: the backfill leaves the row as it is);
- changed: SUCCESS with an older ETag, the file re-uploaded since (redone, `retry_count` + 1);
- failed: FAILED with an error (retried, `retry_count` + 1);
- stale: PROCESSING, claimed by a run that died long ago (retried);
- new: no row at all (picked up).

Files outside the plan's `[since, until)` (December 2023 and May 2024) are in every state too, and
stay as they are.
"""

from __future__ import annotations

import asyncpg

from runner.demo import snapshot

TABLES = ("source_files", "processed_files")
BEFORE_SCHEMA = "iomete_before"  # a copy of TABLES as seeded, to show the rollback is exact
MONTHS = ("2024-01", "2024-02", "2024-03", "2024-04")  # the named partitions
FIRST_DAY = "2023-12-01"  # files from here, for DAYS days: December and May land in DEFAULT
DAYS = 183
IN_RANGE = ("2024-01-01", "2024-05-01")  # the plan's default [since, until)

_PARTITIONS = "\n".join(
    f"CREATE TABLE public.source_files_{m.replace('-', '_')} PARTITION OF public.source_files "
    f"FOR VALUES FROM ('{m}-01') TO (('{m}-01'::date + interval '1 month')::date);"
    for m in MONTHS
)

SCHEMA = f"""
DROP SCHEMA IF EXISTS backfill CASCADE;
DROP SCHEMA IF EXISTS {BEFORE_SCHEMA} CASCADE;
DROP TABLE IF EXISTS public.processed_files, public.source_files CASCADE;
CREATE TABLE public.source_files (
    file_id     bigint NOT NULL,
    day         date NOT NULL,         -- the day=… of the file's path
    path        text NOT NULL,
    size_bytes  bigint NOT NULL,
    etag        text NOT NULL,         -- a new ETag when the file is re-uploaded
    modified_at timestamptz NOT NULL,
    PRIMARY KEY (file_id, day),
    UNIQUE (path, day)
) PARTITION BY RANGE (day);
{_PARTITIONS}
CREATE TABLE public.source_files_default PARTITION OF public.source_files DEFAULT;
CREATE TABLE public.processed_files (
    file_path    text PRIMARY KEY,
    file_id      bigint NOT NULL,
    day          date NOT NULL,
    status       text NOT NULL CHECK (status IN ('SUCCESS', 'FAILED', 'PROCESSING')),
    file_etag    text,                 -- the ETag of the version loaded (or tried)
    size_bytes   bigint,
    rows_loaded  bigint,
    retry_count  int NOT NULL DEFAULT 0,
    error        text,
    processed_at timestamptz NOT NULL
);
CREATE INDEX processed_files_status ON public.processed_files (status) WHERE status <> 'SUCCESS';
-- h(n, salt): a stable pseudo-random number in 0..999 for the demo's choices
CREATE FUNCTION pg_temp.h(n bigint, salt int) RETURNS int LANGUAGE sql IMMUTABLE AS
$$ SELECT ((hashint8(n * 7919 + salt)::bigint + 2147483648) % 1000)::int $$;
"""

# $1 files per day. A changed file (state 'changed', see STATES) was re-uploaded: new ETag, newer
# modification time.
FILES = f"""
INSERT INTO public.source_files (file_id, day, path, size_bytes, etag, modified_at)
SELECT g, day,
       format('s3://billing-exports/cur/year=%s/month=%s/day=%s/part-%s.parquet',
              to_char(day, 'YYYY'), to_char(day, 'MM'), to_char(day, 'DD'),
              lpad(((g - 1) % $1)::text, 5, '0')),
       (1 + pg_temp.h(g, 1)) * 131072 + pg_temp.h(g, 2),
       md5(CASE WHEN state = 'changed' THEN 'v2:' ELSE 'v1:' END || g),
       day + interval '1 hour' * (1 + pg_temp.h(g, 3) % 20)
           + CASE WHEN state = 'changed' THEN interval '40 days' ELSE interval '0' END
FROM (SELECT g, DATE '{FIRST_DAY}' + ((g - 1) / $1)::int AS day, {{state}} AS state
      FROM generate_series(1, $1::bigint * {DAYS}) AS g) AS s
"""

# $1 files per day. What the ingestion recorded before the backfill (no row: new).
PROCESSED = f"""
INSERT INTO public.processed_files
SELECT f.path, f.file_id, f.day,
       CASE s.state WHEN 'failed' THEN 'FAILED' WHEN 'stale' THEN 'PROCESSING' ELSE 'SUCCESS' END,
       md5('v1:' || f.file_id), f.size_bytes,
       CASE WHEN s.state IN ('done', 'changed') THEN f.size_bytes / 512 END,
       CASE s.state WHEN 'failed' THEN 1 + pg_temp.h(f.file_id, 5) % 3 ELSE 0 END,
       CASE WHEN s.state = 'failed'
            THEN (ARRAY['ParquetDecodingException: Can not read value at 0 in block -1',
                        'AccessDenied: s3:GetObject', 'Timeout after 300 s'])
                 [1 + pg_temp.h(f.file_id, 6) % 3] END,
       f.day + interval '1 day' + interval '1 minute' * pg_temp.h(f.file_id, 7)
FROM public.source_files AS f
JOIN (SELECT g, {{state}} AS state FROM generate_series(1, $1::bigint * {DAYS}) AS g) AS s
  ON s.g = f.file_id
WHERE s.state <> 'new'
"""


def _state(done: float) -> str:
    """The SQL choosing file g's state: a `done` share done, then 8 % changed, 5 % failed,
    2 % stale, the rest new."""
    d = int(done * 1000)
    return (
        f"CASE WHEN pg_temp.h(g, 10) < {d} THEN 'done' "
        f"WHEN pg_temp.h(g, 10) < {d + 80} THEN 'changed' "
        f"WHEN pg_temp.h(g, 10) < {d + 130} THEN 'failed' "
        f"WHEN pg_temp.h(g, 10) < {d + 150} THEN 'stale' ELSE 'new' END"
    )


async def seed(conn: asyncpg.Connection, *, per_day: int, done: float) -> dict[str, int]:
    """(Re)create the scenario: `per_day` files a day from December 2023 to May 2024, a `done`
    share of them already loaded. Returns the files in each state within IN_RANGE, and the rows
    of each table."""
    state = _state(done)
    await conn.execute(SCHEMA)
    await conn.execute(FILES.replace("{state}", state), per_day)
    await conn.execute(PROCESSED.replace("{state}", state), per_day)
    await conn.execute("ANALYZE public.source_files, public.processed_files")
    await keep_before(conn)
    counts = {
        r["state"]: int(r["n"])
        for r in await conn.fetch(
            f"SELECT state, count(*) AS n FROM (SELECT {state} AS state, "
            f"DATE '{FIRST_DAY}' + ((g - 1) / $1)::int AS day "
            "FROM generate_series(1, $1::bigint * $2) AS g) AS s "
            "WHERE day >= $3::text::date AND day < $4::text::date GROUP BY 1",
            per_day,
            DAYS,
            *IN_RANGE,
        )
    }
    for t in TABLES:
        counts[t] = int(await conn.fetchval(f"SELECT count(*) FROM public.{t}"))
    return counts


async def keep_before(conn: asyncpg.Connection) -> None:
    """Copy the tables as they are now, to compare with after a rollback."""
    await snapshot.keep(conn, BEFORE_SCHEMA, TABLES)


KEYS = {"source_files": "file_id, day", "processed_files": "file_path"}


async def rows_not_as_before(conn: asyncpg.Connection) -> dict[str, int]:
    """Per table, the rows not bytewise equal to the copy made when seeding."""
    return await snapshot.rows_differing(conn, BEFORE_SCHEMA, {t: KEYS[t] for t in TABLES})
