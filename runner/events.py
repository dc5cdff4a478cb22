"""structlog's JSON-lines sink: the CLI configures structlog, phases attach the run's events.jsonl."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

from runner import redact as _redact


class _Sink:
    """The one open events.jsonl of this process (structlog is configured once per process)."""

    file: TextIO | None = None


_sink = _Sink()


def add_secrets(values: set[str] | frozenset[str]) -> None:
    _redact.register(values)


def redact_text(text: str) -> str:
    """Free text with every known secret and DSN password replaced."""
    return _redact.redact_text(text)


def attach(path: Path) -> None:
    """Append this command's events to `path` from now on."""
    detach()
    path.parent.mkdir(parents=True, exist_ok=True)
    _sink.file = path.open("a", encoding="utf-8")


def detach() -> None:
    if _sink.file is not None:
        _sink.file.close()
        _sink.file = None


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: no DSN password or secret plan value leaves the process."""
    for k, v in list(event.items()):
        event[k] = _redact.redact_value(v)
    return event


def to_sink(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: write the event as one JSON line to the run's events.jsonl."""
    if _sink.file is not None:
        _sink.file.write(json.dumps(dict(event), default=str, sort_keys=True) + "\n")
        _sink.file.flush()
    return event
