"""Pure parts of the engine: statement binding, the scope guard's arithmetic, SQL shaping, pacing."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from runner.engine.executor import Batch, BatchContext, unexpected_writes
from runner.engine.target import (
    LEDGER_PARAMS,
    BatchStatement,
    Column,
    TargetInfo,
    as_subquery,
    plain_statement,
)
from runner.engine.throttle import Throttle
from runner.phases.apply import elide_arrays

TARGET = TargetInfo(
    schema="public",
    name="items",
    key=(Column("id", "bigint"),),
    columns=(Column("val", "text"),),
    others=(Column("note", "text"),),
    oid=4242,
)


def _batch() -> Batch:
    return Batch(7, "apply", ([1, 2, 3],), ["1"], ["3"])


def test_every_statement_binds_its_parameters_in_the_order_its_sql_numbers_them() -> None:
    values = BatchContext(_batch(), "run-1", 2, [], datetime(2026, 1, 1, tzinfo=UTC)).values(TARGET)
    for statement in (TARGET.capture, TARGET.finalize, TARGET.returning_apply("UPDATE x")):
        bound = statement.bind(values)
        assert len(bound) == len(statement.params)
        used = {int(n) for n in re.findall(r"\$(\d+)", statement.sql)}
        assert used <= set(range(1, len(statement.params) + 1)), statement.sql
    one = TARGET.returning_apply("UPDATE items SET val = 'x' WHERE id = ANY($1)")
    assert one.params == ("k0", *LEDGER_PARAMS, "target")
    bound = one.bind(values)
    assert bound[0] == [1, 2, 3]
    assert bound[one.params.index("batch_size")] == 3
    assert bound[-1] == '"public"."items"'
    # the ledger row's batch size is the parameter the statement names for it
    size_ref = f"${one.params.index('batch_size') + 1}::int"
    assert size_ref in one.sql


def test_a_statement_missing_a_value_fails_loudly() -> None:
    with pytest.raises(KeyError):
        BatchStatement("SELECT $1", ("nope",)).bind({})


def _writes(**tables: tuple[int, int, int, int]) -> dict[int, tuple[str, str, int, int, int]]:
    """name → (oid, ins, upd, del); schema from the name's prefix."""
    out = {}
    for name, (oid, ins, upd, dele) in tables.items():
        schema, _, table = name.partition("__")
        out[oid] = (schema, table, ins, upd, dele)
    return out


def test_the_guard_counts_only_what_this_transaction_wrote() -> None:
    start = _writes(public__items=(4242, 0, 500, 0), public__audit=(9, 30, 0, 0))
    end = _writes(
        public__items=(4242, 0, 600, 0),
        public__audit=(9, 30, 0, 0),  # written by an earlier transaction, not this one
        backfill__batches=(11, 1, 0, 0),
        backfill__batch_images=(12, 1, 0, 0),
    )
    assert unexpected_writes(start, end, TARGET, statement_rows=100) == []


def test_the_guard_names_each_table_and_what_was_written() -> None:
    end = _writes(
        public__items=(4242, 2, 105, 1),
        public__audit=(9, 100, 0, 0),
        backfill__batches=(11, 2, 0, 0),
    )
    found = unexpected_writes({}, end, TARGET, statement_rows=100)
    assert found == [
        "public.items: 2 inserted, 1 deleted, 5 updated beyond the 100 row(s) the apply "
        "statement updated",
        "public.audit: 100 inserted",
        "backfill.batches: 2 inserted",
    ]


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1", "(SELECT 1\n)"),
        ("SELECT 1 -- the last rows\n", "(SELECT 1 -- the last rows\n)"),
        ("SELECT 1;  \n", "(SELECT 1\n)"),
    ],
)
def test_a_plan_statement_wraps_whatever_it_ends_with(sql: str, expected: str) -> None:
    assert as_subquery(sql) == expected
    assert plain_statement(sql).endswith("\n")


def test_explain_lines_show_the_first_keys_of_a_batch_only() -> None:
    line = "Index Cond: (id = ANY ('{1,2,3,4,5,6,7,8}'::bigint[]))"
    assert elide_arrays(line) == "Index Cond: (id = ANY ('{1,2,3,… 5 more}'::bigint[]))"
    assert elide_arrays("Filter: (val = ANY ('{a,b}'::text[]))") == (
        "Filter: (val = ANY ('{a,b}'::text[]))"
    )


def test_the_throttle_floor_is_the_slower_of_its_two_limits() -> None:
    assert Throttle(None, None, 100).seconds_for(10, 1000) == 0.0
    assert not Throttle(None, None, 100).limited
    assert Throttle(60, None, 100).seconds_for(10, 1000) == 9.0  # the first batch does not wait
    assert Throttle(60, 50, 100).seconds_for(10, 1000) == 20.0


def test_a_failed_reconnect_is_a_lost_connection_to_retry_not_an_internal_error() -> None:
    import asyncpg

    from runner.engine.executor import TRANSIENT, classify
    from runner.errors import ConnectionFailed

    assert classify(ConnectionFailed("cannot connect to environment 'staging'")) in TRANSIENT
    assert classify(asyncpg.InternalClientError("another operation is in progress")) in TRANSIENT


def test_a_secret_cut_short_by_a_database_message_is_masked_too() -> None:
    from runner.redact import redact_all

    secret = "LongKey" + "Z" * 100
    text = f"Failing row contains (1, c9{secret[:40]}...)."
    assert secret[:8] not in redact_all(text, [secret])
    assert "sslpassword=***" in redact_all("postgresql://u@h/d?sslpassword=hunter2", [])
