"""backfill: a guarded, staged-rollout backfill runner for PostgreSQL."""


def version() -> str:
    """The installed package's version (read only when asked: importlib.metadata costs ~30 ms
    of every start)."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("backfill")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+source"
