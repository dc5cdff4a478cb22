"""A demo's tables as seeded, kept in a schema of their own, to show that a rollback leaves them
exactly as they were."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import asyncpg


async def keep(conn: asyncpg.Connection, schema: str, tables: Iterable[str]) -> None:
    """Copy the tables as they are now into `schema` (created here)."""
    await conn.execute(f"CREATE SCHEMA {schema}")
    for t in tables:
        await conn.execute(f"CREATE TABLE {schema}.{t} AS SELECT * FROM public.{t}")


async def rows_differing(
    conn: asyncpg.Connection, schema: str, keys: Mapping[str, str]
) -> dict[str, int]:
    """Per table (`keys`: table → its key columns), the rows not bytewise equal to the copy in
    `schema` (missing and extra rows included): `record_image_eq` compares the stored bytes,
    not their text."""
    return {
        t: int(
            await conn.fetchval(
                f"SELECT count(*) FROM public.{t} AS cur FULL JOIN {schema}.{t} AS was "
                f"USING ({key}) WHERE cur IS NULL OR was IS NULL "
                "OR NOT record_image_eq(cur, was)"
            )
        )
        for t, key in keys.items()
    }
