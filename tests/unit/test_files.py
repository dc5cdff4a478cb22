"""Writing a file whole or not at all (runner/files.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from runner import files


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_processs_first_write_into_a_folder_clears_dead_writers_files(tmp_path: Path) -> None:
    dead = _dead_pid()
    left = [
        tmp_path / f".batch_00001.json.{dead}.0123abcd.tmp",
        tmp_path / f".rollback.2026.sql.{dead}.89abcdef.tmp",  # dots in the name
    ]
    mine = tmp_path / f".other.json.{os.getpid()}.00000000.tmp"  # alive: kept
    unrelated = tmp_path / ".notes.tmp"
    for p in [*left, mine, unrelated]:
        p.write_text("x")
    files._cleared.discard(tmp_path)
    with files.writing(tmp_path / "batch_00002.json") as out:
        out.write("{}\n")
    assert (tmp_path / "batch_00002.json").read_text() == "{}\n"
    assert not any(p.exists() for p in left)
    assert mine.exists()
    assert unrelated.exists()
    # later writes into the folder do not look through it again (a file per batch: n²)
    again = tmp_path / f".batch_00003.json.{dead}.fedcba98.tmp"
    again.write_text("x")
    with files.writing(tmp_path / "batch_00004.json") as out:
        out.write("{}\n")
    assert again.exists()
