"""structlog's JSON-lines sink: the CLI configures structlog, phases attach the run's events.jsonl."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

from runner.db import redact_all

_secrets: set[str] = set()
_sink: TextIO | None = None


def add_secrets(values: set[str] | frozenset[str]) -> None:
    _secrets.update(values)


def attach(path: Path) -> None:
    """Append this command's events to `path` from now on."""
    global _sink  # noqa: PLW0603  (one sink per process, like structlog's own configuration)
    detach()
    path.parent.mkdir(parents=True, exist_ok=True)
    _sink = path.open("a", encoding="utf-8")


def detach() -> None:
    global _sink  # noqa: PLW0603
    if _sink is not None:
        _sink.close()
        _sink = None


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: no DSN password or secret plan value leaves the process."""
    for k, v in list(event.items()):
        if isinstance(v, str):
            event[k] = redact_all(v, _secrets)
    return event


def to_sink(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: write the event as one JSON line to the run's events.jsonl."""
    if _sink is not None:
        _sink.write(json.dumps(dict(event), default=str, sort_keys=True) + "\n")
        _sink.flush()
    return event
