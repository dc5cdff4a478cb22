"""SQL literals of the emitted rollback: no value can break out of its literal."""

from __future__ import annotations

import pytest

from runner.errors import InvalidInput
from runner.rollback import parse_batch_range, sql_literal


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("plain", "'plain'"),
        ("O'Brien", "'O''Brien'"),
        ("back\\slash", "'back\\slash'"),
        ("$$ dollar $$", "'$$ dollar $$'"),
        (None, "NULL"),
        ("", "''"),
        ("';DROP TABLE x;--", "''';DROP TABLE x;--'"),
    ],
)
def test_sql_literal(value: str | None, literal: str) -> None:
    assert sql_literal(value) == literal


def test_nul_bytes_are_refused() -> None:
    with pytest.raises(ValueError, match="NUL"):
        sql_literal("a\x00b")


def test_batch_ranges() -> None:
    assert parse_batch_range("3-10") == (3, 10)
    assert parse_batch_range("4") == (4, 4)
    assert parse_batch_range(None) is None
    for bad in ("x", "5-2", "0-3"):
        with pytest.raises(InvalidInput):
            parse_batch_range(bad)
