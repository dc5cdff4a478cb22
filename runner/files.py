"""Writing a file whole or not at all, in a folder several processes of one run may write.

A file is written into a temporary file beside it, named for its writer (`.NAME.PID.NONCE.tmp`:
two processes writing the same file at once must not rename each other's away), and renamed
over it when complete. A writer killed part-way leaves its temporary file behind; a process's
first write into a folder removes every such file there whose process is gone (once per folder
and process: a run's folder holds a file per batch, and looking through it at every write would
cost a run of n batches n² directory entries).
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO, TextIO, cast


@contextlib.contextmanager
def writing(path: Path) -> Iterator[TextIO]:
    """`path` written as UTF-8 text, whole or not at all."""
    with _writing(path, binary=False) as out:
        yield cast(TextIO, out)


@contextlib.contextmanager
def writing_bytes(path: Path) -> Iterator[BinaryIO]:
    """`path` written as bytes, whole or not at all."""
    with _writing(path, binary=True) as out:
        yield cast(BinaryIO, out)


@contextlib.contextmanager
def _writing(path: Path, *, binary: bool) -> Iterator[IO[Any]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent not in _cleared:
        clear_dead_writers(path.parent)
        _cleared.add(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # newline="": what is written is what the file holds (a value's \r stays a \r)
        with tmp.open("wb") if binary else tmp.open("w", encoding="utf-8", newline="") as out:
            yield out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")  # .NAME.PID.NONCE.tmp
_cleared: set[Path] = set()  # the folders this process has cleared of dead writers' files


def clear_dead_writers(folder: Path) -> None:
    """Remove the temporary files in `folder` left by writers whose process has ended."""
    for tmp in folder.glob(".*.tmp"):
        m = _TEMPORARY.match(tmp.name)
        if m and not _alive(int(m.group(1))):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
