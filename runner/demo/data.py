"""The seed-003 scenario: scoring sessions, profiles to stamp, telemetry and tokenized results."""

from __future__ import annotations

import asyncpg

SCHEMA = """
DROP SCHEMA IF EXISTS backfill CASCADE;
DROP TABLE IF EXISTS public.tokenized_results, public.telemetry_events, public.profiles,
                     public.scoring_sessions CASCADE;
CREATE TABLE public.scoring_sessions (
    id             bigint PRIMARY KEY,
    user_id        bigint NOT NULL,
    status         text NOT NULL CHECK (status IN ('completed', 'in_progress')),
    engine_version text NOT NULL,
    started_at     timestamptz NOT NULL,
    completed_at   timestamptz
);
CREATE TABLE public.profiles (
    id                 bigint PRIMARY KEY,
    session_id         bigint NOT NULL REFERENCES public.scoring_sessions,
    user_id            bigint NOT NULL,
    display_name       text NOT NULL,
    results            jsonb NOT NULL,
    results_version    text,
    results_stamped_at timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX profiles_session ON public.profiles (session_id);
CREATE TABLE public.telemetry_events (
    id             bigserial PRIMARY KEY,
    session_id     bigint,
    kind           text NOT NULL,
    fc_kind        text,
    engine_version text,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX telemetry_kind_time ON public.telemetry_events (kind, created_at);
CREATE TABLE public.tokenized_results (
    id          bigserial PRIMARY KEY,
    session_id  bigint NOT NULL,
    token       text NOT NULL,
    access_ok   boolean NOT NULL,
    accessed_at timestamptz NOT NULL DEFAULT now()
);
"""

# $1 rows, $2 share already stamped (prod), $3 first id of rows that are "new" in prod
SEED = [
    """INSERT INTO public.scoring_sessions
       SELECT g, g % 5000 + 1,
              CASE WHEN g % 9 = 0 THEN 'in_progress' ELSE 'completed' END,
              'v1.2', now() - (g % 2000) * interval '1 minute',
              CASE WHEN g % 9 = 0 THEN NULL ELSE now() - (g % 2000) * interval '1 minute' + interval '5 minutes' END
       FROM generate_series(1, $1::bigint) AS g""",
    """INSERT INTO public.profiles (id, session_id, user_id, display_name, results, results_version,
                                    results_stamped_at, updated_at)
       SELECT g, g, g % 5000 + 1, 'player ' || g || CASE WHEN g % 50 = 0 THEN ' O''Brien \\ "quoted"' ELSE '' END,
              jsonb_build_object('score', g % 100, 'bands', jsonb_build_array(g % 3, g % 5), 'engine', 'v1.2'),
              CASE WHEN random() < $2::float8 THEN 'v1.2.1' WHEN g % 2 = 0 THEN 'v1.1.0' END,
              NULL, now() - (g % 500) * interval '1 hour'
       FROM generate_series(1, $1::bigint) AS g
       WHERE g % 10 <> 7 OR g >= $3::bigint""",
    """UPDATE public.profiles SET results_stamped_at = updated_at WHERE results_version = 'v1.2.1'""",
    """INSERT INTO public.telemetry_events (session_id, kind, fc_kind, engine_version, created_at)
       SELECT g, 'fc_call', 'functions', 'v1.2', now() - (g % 720) * interval '1 minute'
       FROM generate_series(1, greatest($1::bigint / 4, 100)) AS g""",
    """INSERT INTO public.telemetry_events (session_id, kind, fc_kind, engine_version, created_at)
       SELECT g, 'fc_call', 'legacy', 'v1.1', now() - interval '30 days' - g * interval '1 minute'
       FROM generate_series(1, 50) AS g""",
    """INSERT INTO public.telemetry_events (session_id, kind, engine_version, created_at)
       SELECT g, 'engine_version_override', 'v1.1', now() - interval '40 days'
       FROM generate_series(1, 20) AS g""",
    """INSERT INTO public.tokenized_results (session_id, token, access_ok, accessed_at)
       SELECT g, md5(g::text), true, now() - (g % 600) * interval '1 minute'
       FROM generate_series(1, greatest($1::bigint / 10, 50)) AS g""",
    "ANALYZE",
]


async def seed(
    conn: asyncpg.Connection, *, rows: int, already_stamped: float, new_from: int
) -> None:
    """(Re)create the scenario; profiles with id % 10 = 7 below `new_from` do not exist (prod has more)."""
    await conn.execute(SCHEMA)
    params = (rows, already_stamped, new_from)
    for sql in SEED:
        used = max((n for n in (1, 2, 3) if f"${n}" in sql), default=0)
        await conn.execute(sql, *params[:used])
