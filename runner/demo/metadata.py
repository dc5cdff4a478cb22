"""The metadata-history scenario (seeds 000 and 001): historical ingestion events turned into
`ingestion_volume` and `ingestion_runtime` metadata records, window by window.

`ingestion_events` holds the state database's event history as it was logged: table names in
mixed case, with stray spaces, sometimes without a schema (`schema.table` lower case is the
normal form; the record's namespace and entity are its parts upper-cased, non-alphanumerics as
`_`, like the live emitter's `safe_upper`). Failed events carry their error. The live emitter has
written records since `live_from` (July 2024 in staging, mid-June in prod), so the newest events
need nothing; events before 2024 are outside the backfill's range and stay without records.
`variability_jobs` are the automated variability computations the plan pauses while a window
runs; `variability_pauses` logs each window's pause and resume.

Every choice is a hash of the event id, so a scale always yields the same data.
"""

from __future__ import annotations

import asyncpg

from runner.demo import snapshot

TABLES = ("ingestion_events", "metadata_records")  # what the batches read and write
BEFORE_SCHEMA = "metadata_before"  # a copy of TABLES as seeded, to show the rollback is exact
JOBS = ("orders_moving_average", "billing_variability", "crm_variability")
FIRST = "2023-12-01"  # events from here, every `spacing`, until END
END = "2024-08-01"
IN_RANGE = ("2024-01-01", "2024-07-01")  # the plan's default [since, until)

# As the ingestion logs wrote them; each normalizes to one of six tables.
TABLE_NAMES = [
    "Sales.Orders",
    "sales.orders ",
    "SALES.ORDER_ITEMS",
    "sales.order_items",
    "billing.Daily-Costs",
    "Billing.daily-costs",
    "crm.Accounts",
    "CRM.accounts",
    "Inventory.Stock_Levels",
    "events",
    "EVENTS",
    " public.Events",
]

SCHEMA = f"""
DROP SCHEMA IF EXISTS backfill CASCADE;
DROP SCHEMA IF EXISTS {BEFORE_SCHEMA} CASCADE;
DROP TABLE IF EXISTS public.metadata_records, public.ingestion_events, public.variability_jobs,
                     public.variability_pauses CASCADE;
CREATE TABLE public.ingestion_events (
    id          bigint PRIMARY KEY,
    table_name  text NOT NULL,         -- as logged
    event_time  timestamptz NOT NULL,  -- when the load finished
    run_id      text NOT NULL,
    rows        bigint,
    mode        text NOT NULL CHECK (mode IN ('full', 'incremental')),
    load_date   date NOT NULL,
    duration_ms int NOT NULL,
    status      text NOT NULL CHECK (status IN ('success', 'failed')),
    error       text
);
CREATE INDEX ingestion_events_time ON public.ingestion_events (event_time);
CREATE TABLE public.metadata_records (
    event_id   bigint NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('ingestion_volume', 'ingestion_runtime')),
    namespace  text NOT NULL,
    entity     text NOT NULL,
    version    int NOT NULL,
    payload    jsonb NOT NULL,
    emitted_at timestamptz NOT NULL,
    PRIMARY KEY (event_id, kind)
);
CREATE TABLE public.variability_jobs (
    name       text PRIMARY KEY,
    paused     boolean NOT NULL DEFAULT false,
    paused_at  timestamptz,
    resumed_at timestamptz
);
CREATE TABLE public.variability_pauses (
    id           bigserial PRIMARY KEY,
    window_label text NOT NULL,
    lower_bound  text NOT NULL,
    upper_bound  text NOT NULL,
    jobs_paused  int NOT NULL,
    paused_at    timestamptz NOT NULL,
    jobs_resumed int,
    resumed_at   timestamptz
);
-- h(n, salt): a stable pseudo-random number in 0..999 for the demo's choices
CREATE FUNCTION pg_temp.h(n bigint, salt int) RETURNS int LANGUAGE sql IMMUTABLE AS
$$ SELECT ((hashint8(n * 7919 + salt)::bigint + 2147483648) % 1000)::int $$;
"""

_NAMES = "ARRAY[" + ", ".join("'" + n.replace("'", "''") + "'" for n in TABLE_NAMES) + "]"

# $1 the spacing between events (an interval). 3 % failed, a third of the loads incremental.
EVENTS = f"""
INSERT INTO public.ingestion_events
SELECT g, ({_NAMES})[1 + pg_temp.h(g, 1) % {len(TABLE_NAMES)}], t,
       'run-' || to_char(t, 'YYYYMMDD') || '-' || lpad((pg_temp.h(g, 2) % 100)::text, 2, '0'),
       CASE WHEN failed THEN NULL ELSE pg_temp.h(g, 3)::bigint * 137 END,
       CASE WHEN pg_temp.h(g, 4) < 333 THEN 'incremental' ELSE 'full' END,
       (t - interval '1 day')::date,
       200 + pg_temp.h(g, 5) * 37,
       CASE WHEN failed THEN 'failed' ELSE 'success' END,
       CASE WHEN failed THEN (ARRAY['source timeout after 300 s', 'permission denied for table',
                                    'duplicate key value violates unique constraint'])
                             [1 + pg_temp.h(g, 7) % 3] END
FROM (SELECT g, TIMESTAMPTZ '{FIRST} 00:00:00+00' + $1::text::interval * (g - 1)
                + interval '1 second' * pg_temp.h(g, 8) AS t,
             pg_temp.h(g, 6) < 30 AS failed
      FROM generate_series(1, (extract(epoch FROM TIMESTAMPTZ '{END} 00:00:00+00'
                                      - TIMESTAMPTZ '{FIRST} 00:00:00+00')
                               / extract(epoch FROM $1::text::interval))::bigint) AS g) AS s
"""

JOBS_SQL = "INSERT INTO public.variability_jobs (name) SELECT unnest($1::text[])"


async def seed(
    conn: asyncpg.Connection, *, spacing_minutes: float, live_from: str, statements: list[str]
) -> dict[str, int]:
    """(Re)create the scenario: an event every `spacing_minutes` from December 2023 to July
    2024; the records of events from `live_from` on written by the live emitter (the plan's own
    `statements`, as of a month before the backfill). Returns the rows of each table and the
    events in the plan's default range."""
    await conn.execute(SCHEMA)
    await conn.execute(EVENTS, f"{spacing_minutes} minutes")
    await conn.execute(JOBS_SQL, list(JOBS))
    live = [
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM public.ingestion_events WHERE event_time >= $1::text::timestamptz",
            live_from,
        )
    ]
    if live:
        async with conn.transaction():
            for sql in statements:
                await conn.execute(sql, live)
            # emitted as they happened, not now
            await conn.execute(
                "UPDATE public.metadata_records AS r SET emitted_at = e.event_time "
                "+ interval '2 minutes' FROM public.ingestion_events AS e WHERE e.id = r.event_id"
            )
    await conn.execute("ANALYZE")
    await keep_before(conn)
    counts = {
        t: int(await conn.fetchval(f"SELECT count(*) FROM public.{t}"))
        for t in (*TABLES, "variability_jobs")
    }
    counts["in_range"] = int(
        await conn.fetchval(
            "SELECT count(*) FROM public.ingestion_events "
            "WHERE event_time >= $1::text::timestamptz AND event_time < $2::text::timestamptz",
            *IN_RANGE,
        )
    )
    return counts


async def keep_before(conn: asyncpg.Connection) -> None:
    """Copy the tables as they are now, to compare with after a rollback."""
    await snapshot.keep(conn, BEFORE_SCHEMA, TABLES)


KEYS = {"ingestion_events": "id", "metadata_records": "event_id, kind"}


async def rows_not_as_before(conn: asyncpg.Connection) -> dict[str, int]:
    """Per table, the rows not bytewise equal to the copy made when seeding."""
    return await snapshot.rows_differing(conn, BEFORE_SCHEMA, {t: KEYS[t] for t in TABLES})
