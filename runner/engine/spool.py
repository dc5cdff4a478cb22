"""Per-batch byte chunks on disk: what a stage's files need of each batch, kept while it runs.

The apply reads each committed batch's share of its rollback file and manifest while the batches
run (`phases.follow`). Kept in memory, that share grows with the run (a manifest lists up to a
thousand keys per batch); kept here, in an unnamed file beside the run's files, memory holds only
where each batch's chunk is, and the file is gone with the process, even a killed one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class Spool:
    """Chunks of bytes by batch number, written in any order, read back in any order."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115  (closed in close())
        self._where: dict[int, tuple[int, int]] = {}  # batch -> (offset, length) in the file

    def __contains__(self, batch_no: object) -> bool:
        return batch_no in self._where

    def __len__(self) -> int:
        return len(self._where)

    def put(self, batch_no: int, data: bytes) -> None:
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(data)
        self._where[batch_no] = (offset, len(data))

    def get(self, batch_no: int) -> bytes:
        out = bytearray()
        self._read(batch_no, out.extend)
        return bytes(out)

    def copy_to(self, out: BinaryIO, batch_nos: list[int]) -> None:
        """The chunks of `batch_nos`, in that order, into `out`."""
        for no in batch_nos:
            self._read(no, out.write)

    def _read(self, batch_no: int, sink: Callable[[bytes], object]) -> None:
        self._file.flush()
        offset, length = self._where[batch_no]
        while length:
            chunk = os.pread(self._file.fileno(), min(length, 1 << 20), offset)
            sink(chunk)
            offset += len(chunk)
            length -= len(chunk)

    def close(self) -> None:
        self._file.close()
