"""Writing a file whole or not at all, in a folder several processes of one run may write.

A file is written into a temporary file beside it, named for its writer (`.NAME.PID.NONCE.tmp`:
two processes writing the same file at once must not rename each other's away), and renamed
over it when complete. A writer killed part-way leaves its temporary file behind; the next write
of the same file removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import glob
import os
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
    clear_dead_writers(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # newline="": what is written is what the file holds (a value's \r stays a \r)
        with tmp.open("wb") if binary else tmp.open("w", encoding="utf-8", newline="") as out:
            yield out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def clear_dead_writers(path: Path) -> None:
    """Remove the temporary files of `path` left by writers whose process has ended."""
    prefix = f".{path.name}."
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
