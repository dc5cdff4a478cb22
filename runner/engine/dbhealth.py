"""Built-in database health, sampled without any plan configuration (soak and prod health)."""

from __future__ import annotations

from typing import Any

import asyncpg

from runner.db import fetch_one

HEALTH_SQL = """
SELECT
    (SELECT count(*) FROM pg_stat_activity)::float8 AS connections,
    current_setting('max_connections')::float8 AS max_connections,
    (SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0)
       FROM pg_stat_activity
      WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid())::float8 AS longest_transaction_s,
    (SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock')::float8 AS lock_waiters,
    (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = to_regclass($1))::float8 AS dead_tuples,
    (SELECT n_live_tup FROM pg_stat_user_tables WHERE relid = to_regclass($1))::float8 AS live_tuples,
    (SELECT count(*) FROM pg_stat_replication)::float8 AS replicas,
    (SELECT max(extract(epoch FROM replay_lag)) FROM pg_stat_replication)::float8 AS replication_lag_s
"""

# name → (label, how to show it: share | seconds | count)
METRICS: dict[str, tuple[str, str]] = {
    "db.connection_use": ("connections in use / max_connections", "share"),
    "db.longest_transaction_s": ("longest open transaction", "seconds"),
    "db.lock_waiters": ("sessions waiting on locks", "count"),
    "db.dead_tuples": ("dead tuples on the target table", "count"),
    "db.replication_lag_s": ("replication lag, where there are replicas", "seconds"),
}


async def sample(conn: asyncpg.Connection, target_table: str) -> dict[str, float | None]:
    r: dict[str, Any] = dict(await fetch_one(conn, HEALTH_SQL, target_table))
    return {
        "db.connection_use": r["connections"] / r["max_connections"]
        if r["max_connections"]
        else None,
        "db.longest_transaction_s": r["longest_transaction_s"],
        "db.lock_waiters": r["lock_waiters"],
        "db.dead_tuples": r["dead_tuples"],
        "db.replication_lag_s": r["replication_lag_s"] if r["replicas"] else None,
        "db.connections": r["connections"],
        "db.max_connections": r["max_connections"],
    }
