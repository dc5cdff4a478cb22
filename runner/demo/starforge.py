"""The Starforge scenario (seed 002): raw `hero_snapshots` JSON normalized into `user_troops`,
`user_pets` and `user_hero_summary` by idempotent upserts.

The JSON is as messy as the seed's runbook fears: wrong types, missing keys, nulls, empty arrays,
duplicate troop entries, troops missing from the catalog, and a few percent of payloads that are
not a profile at all (double-encoded and truncated, `null`, an array); the plan reads all of that.
About 0.3 % of the snapshots are malformed beyond what it reads (`POISON`: a TroopId of
"undefined", a Level of 4294967295): its apply fails on them, and the runner quarantines them
(#12). Every choice is a hash of the snapshot id, so a scale always yields the same data.

Some normalized rows exist before the backfill: a legacy import (old, so the backfill updates
them where a snapshot lists the same troop) and the real-time ETL's rows for the newest snapshots,
written by the plan's own statements (so the backfill finds them newer and leaves them alone).
"""

from __future__ import annotations

import asyncpg

from runner.demo import snapshot

TABLES = ("hero_snapshots", "user_troops", "user_pets", "user_hero_summary")
BEFORE_SCHEMA = "starforge_before"  # a copy of TABLES as seeded, to show the rollback is exact
TROOPS = 60  # catalog sizes
PETS = 20

SCHEMA = f"""
DROP SCHEMA IF EXISTS backfill CASCADE;
DROP SCHEMA IF EXISTS {BEFORE_SCHEMA} CASCADE;
DROP TABLE IF EXISTS public.user_hero_summary, public.user_pets, public.user_troops,
                     public.hero_snapshots, public.pet_catalog, public.troop_catalog,
                     public.users CASCADE;
CREATE TABLE public.users (
    id         bigint PRIMARY KEY,
    namecode   text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL
);
CREATE TABLE public.troop_catalog (
    id     int PRIMARY KEY,
    name   text NOT NULL,
    rarity text NOT NULL
);
CREATE TABLE public.pet_catalog (
    id   int PRIMARY KEY,
    name text NOT NULL
);
CREATE TABLE public.hero_snapshots (
    id           bigint PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES public.users,
    created_at   timestamptz NOT NULL,
    size_bytes   int NOT NULL,
    raw          jsonb NOT NULL,
    processed_at timestamptz
);
CREATE INDEX hero_snapshots_unprocessed ON public.hero_snapshots (id) WHERE processed_at IS NULL;
CREATE INDEX hero_snapshots_user ON public.hero_snapshots (user_id, created_at);
CREATE TABLE public.user_troops (
    user_id     bigint NOT NULL REFERENCES public.users,
    troop_id    int NOT NULL REFERENCES public.troop_catalog,
    amount      int NOT NULL,
    level       int NOT NULL,
    snapshot_id bigint,                -- the snapshot these values come from (NULL: legacy import)
    snapshot_at timestamptz NOT NULL,  -- its created_at: the newest snapshot wins
    PRIMARY KEY (user_id, troop_id)
);
CREATE TABLE public.user_pets (
    user_id     bigint NOT NULL REFERENCES public.users,
    pet_id      int NOT NULL REFERENCES public.pet_catalog,
    level       int NOT NULL,
    snapshot_id bigint,
    snapshot_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, pet_id)
);
CREATE TABLE public.user_hero_summary (
    user_id          bigint PRIMARY KEY REFERENCES public.users,
    troop_count      int NOT NULL,
    troop_power      bigint NOT NULL,  -- sum of amount × level
    pet_count        int NOT NULL,
    last_snapshot_at timestamptz,
    updated_at       timestamptz NOT NULL
);
-- h(n, salt): a stable pseudo-random number in 0..999 for the demo's choices
CREATE FUNCTION pg_temp.h(n bigint, salt int) RETURNS int LANGUAGE sql IMMUTABLE AS
$$ SELECT ((hashint8(n * 7919 + salt)::bigint + 2147483648) % 1000)::int $$;
"""

# $1 users
CATALOGS = [
    """INSERT INTO public.users
       SELECT u, 'SF-' || lpad(u::text, 6, '0'), '2023-01-01'::timestamptz + u * interval '1 hour'
       FROM generate_series(1, $1::bigint) AS u""",
    f"""INSERT INTO public.troop_catalog
        SELECT t, 'troop ' || t, (ARRAY['common', 'rare', 'epic', 'legendary'])[1 + t % 4]
        FROM generate_series(1, {TROOPS}) AS t""",
    f"""INSERT INTO public.pet_catalog SELECT p, 'pet ' || p FROM generate_series(1, {PETS}) AS p""",
]

# One troop entry of snapshot g, position i: mostly well formed, sometimes not.
_TROOP_ENTRY = """
CASE
    WHEN kind < 800 THEN jsonb_build_object('TroopId', tid, 'Amount', amt, 'Level', lvl)
    WHEN kind < 840 THEN jsonb_build_object('TroopId', tid::text, 'Amount', amt::text, 'Level', lvl)
    WHEN kind < 870 THEN jsonb_build_object('TroopId', tid, 'Level', lvl)
    WHEN kind < 900 THEN jsonb_build_object('TroopId', tid, 'Amount', amt)
    WHEN kind < 920 THEN jsonb_build_object('TroopId', tid, 'Amount', 'lots', 'Level', lvl)
    WHEN kind < 940 THEN jsonb_build_object('TroopId', tid, 'Amount', amt, 'Level', NULL)
    WHEN kind < 955 THEN jsonb_build_object('TroopId', 9000 + tid, 'Amount', amt, 'Level', lvl)
    WHEN kind < 970 THEN to_jsonb('troop:' || tid)
    WHEN kind < 985 THEN jsonb_build_object('TroopId', tid + 0.5, 'Amount', amt, 'Level', lvl)
    ELSE jsonb_build_object('TroopId', tid, 'Amount', jsonb_build_object('value', amt), 'Level', lvl)
END"""

_TROOPS = f"""
(SELECT coalesce(jsonb_agg({_TROOP_ENTRY} ORDER BY i), '[]')
 FROM generate_series(1, CASE WHEN pg_temp.h(g, 4) < 5 THEN 300 ELSE 3 + pg_temp.h(g, 5) % 22 END) AS i,
      LATERAL (SELECT 1 + pg_temp.h(g * 1000 + i, 6) % {TROOPS} AS tid,
                      pg_temp.h(g * 1000 + i, 7) * 3 AS amt,
                      1 + pg_temp.h(g * 1000 + i, 8) % 30 AS lvl,
                      pg_temp.h(g * 1000 + i, 3) AS kind) AS v)"""

_PETS = f"""
(SELECT coalesce(jsonb_agg(CASE WHEN pg_temp.h(g * 100 + i, 11) < 900
                                THEN jsonb_build_object('PetId', 1 + pg_temp.h(g * 100 + i, 12) % {PETS},
                                                        'Level', 1 + pg_temp.h(g * 100 + i, 13) % 10)
                                WHEN pg_temp.h(g * 100 + i, 11) < 950
                                THEN jsonb_build_object('PetId', 1 + pg_temp.h(g * 100 + i, 12) % {PETS})
                                ELSE jsonb_build_object('PetId', NULL, 'Level', 3) END ORDER BY i), '[]')
 FROM generate_series(1, pg_temp.h(g, 10) % 6) AS i)"""

SNAPSHOTS = f"""
INSERT INTO public.hero_snapshots (id, user_id, created_at, size_bytes, raw)
SELECT g, user_id, created_at, octet_length(raw::text), raw
FROM (
    SELECT g, user_id, created_at,
           CASE WHEN k < 20 THEN to_jsonb(left(doc::text, 10 + pg_temp.h(g, 2) % 40))  -- truncated, double-encoded
                WHEN k < 25 THEN 'null'::jsonb
                WHEN k < 30 THEN '[]'::jsonb
                WHEN k < 50 THEN jsonb_build_object('Version', 3)                      -- no ProfileData
                ELSE doc END AS raw
    FROM (
        SELECT g, 1 + (hashint8(g * 7919 + 1)::bigint + 2147483648) % $2::bigint AS user_id,
               '2026-06-01'::timestamptz - ($1::bigint - g) * interval '7 minutes' AS created_at,
               pg_temp.h(g, 0) AS k,
               jsonb_build_object('Version', 3, 'ProfileData',
                   jsonb_build_object('Level', 1 + g % 80)
                   || CASE WHEN pg_temp.h(g, 9) < 20 THEN '{{}}'                       -- key missing
                           WHEN pg_temp.h(g, 9) < 30 THEN '{{"Troops": null}}'
                           WHEN pg_temp.h(g, 9) < 50 THEN '{{"Troops": "none"}}'       -- wrong type
                           WHEN pg_temp.h(g, 9) < 80 THEN '{{"Troops": []}}'
                           WHEN pg_temp.h(g, 9) < 90 THEN '{{"Troops": {{"1": 5}}}}'
                           ELSE jsonb_build_object('Troops', {_TROOPS}) END::jsonb
                   || CASE WHEN pg_temp.h(g, 14) < 100 THEN '{{}}'
                           WHEN pg_temp.h(g, 14) < 120 THEN '{{"Pets": null}}'
                           ELSE jsonb_build_object('Pets', {_PETS}) END::jsonb) AS doc
        FROM generate_series(1, $1::bigint) AS g
    ) AS s
) AS t
"""

# About 0.3 % of the snapshots (hashes under $1 of 1000) get one troop entry the plan cannot read: a TroopId
# that is not a number (a client that sent "undefined": 22P02) or a Level beyond int (-1 written
# unsigned: 22003). The entry's other fields are valid (its troop is in the catalog), so the
# apply's casts always reach the bad value. A snapshot that was not a profile becomes one.
POISON = f"""
UPDATE public.hero_snapshots
SET raw = p.raw, size_bytes = octet_length(p.raw::text)
FROM (
    SELECT s.id, jsonb_set(
               CASE WHEN jsonb_typeof(s.raw -> 'ProfileData') = 'object' THEN s.raw
                    ELSE jsonb_build_object('Version', 3, 'ProfileData',
                                            jsonb_build_object('Level', 1 + s.id % 80)) END,
               '{{ProfileData,Troops}}',
               CASE WHEN jsonb_typeof(s.raw -> 'ProfileData' -> 'Troops') = 'array'
                    THEN s.raw -> 'ProfileData' -> 'Troops' ELSE '[]' END
               || jsonb_build_array(CASE WHEN pg_temp.h(s.id, 16) < 500
                   THEN jsonb_build_object('TroopId', 'undefined', 'Amount', 10, 'Level', 3)
                   ELSE jsonb_build_object('TroopId', 1 + s.id % {TROOPS}, 'Amount', 10,
                                           'Level', 4294967295) END)) AS raw
    FROM public.hero_snapshots AS s
    WHERE pg_temp.h(s.id, 15) < $1
) AS p
WHERE p.id = hero_snapshots.id
RETURNING hero_snapshots.id
"""
POISON_PER_THOUSAND = 4

# Legacy rows ($1 users), older than every snapshot: the backfill updates those a snapshot lists again.
LEGACY = [
    f"""INSERT INTO public.user_troops
        SELECT u, 1 + (u * 7 + n) % {TROOPS}, 1, 1, NULL, '2024-01-01'
        FROM generate_series(1, $1::bigint) AS u, generate_series(0, 4) AS n
        WHERE u % 4 = 0""",
    f"""INSERT INTO public.user_pets
        SELECT u, 1 + u % {PETS}, 1, NULL, '2024-01-01'
        FROM generate_series(1, $1::bigint) AS u WHERE u % 4 = 0""",
    """INSERT INTO public.user_hero_summary
       SELECT u, 5, 5, 1, NULL, '2024-01-01' FROM generate_series(1, $1::bigint) AS u
       WHERE u % 4 = 0""",
]


async def seed(
    conn: asyncpg.Connection,
    *,
    snapshots: int,
    realtime_share: float,
    statements: list[str],
) -> dict[str, int]:
    """(Re)create the scenario. The newest `realtime_share` of the snapshots were processed by
    the real-time ETL (the plan's own `statements`), but for the malformed ones, which it failed
    on and left unprocessed; returns the rows of each table and how many snapshots are malformed
    (`poisoned`)."""
    users = max(snapshots // 5, 20)
    await conn.execute(SCHEMA)
    for sql in CATALOGS:
        await conn.execute(sql, *((users,) if "$1" in sql else ()))
    await conn.execute(SNAPSHOTS, snapshots, users)
    poisoned = {int(r["id"]) for r in await conn.fetch(POISON, POISON_PER_THOUSAND)}
    for sql in LEGACY:
        await conn.execute(sql, users)
    done = int(snapshots * realtime_share)
    if done:
        ids = [i for i in range(snapshots - done + 1, snapshots + 1) if i not in poisoned]
        async with conn.transaction():
            for sql in statements:
                await conn.execute(sql, ids)
    await conn.execute("ANALYZE")
    await keep_before(conn)
    counts = {t: int(await conn.fetchval(f"SELECT count(*) FROM public.{t}")) for t in TABLES}
    return counts | {"poisoned": len(poisoned)}


async def keep_before(conn: asyncpg.Connection) -> None:
    """Copy the tables as they are now, to compare with after a rollback."""
    await snapshot.keep(conn, BEFORE_SCHEMA, TABLES)


KEYS = {
    "hero_snapshots": "id",
    "user_troops": "user_id, troop_id",
    "user_pets": "user_id, pet_id",
    "user_hero_summary": "user_id",
}


async def rows_not_as_before(conn: asyncpg.Connection) -> dict[str, int]:
    """Per table, the rows not bytewise equal to the copy made when seeding."""
    return await snapshot.rows_differing(conn, BEFORE_SCHEMA, {t: KEYS[t] for t in TABLES})
