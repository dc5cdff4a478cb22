"""What the benchmarks share: a fresh database to measure in, and running a few statements."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import psutil  # type: ignore[import-untyped]

from runner.db import EmbeddedServer, dsn_with_database

ROOT = Path(__file__).resolve().parent.parent


async def _exec(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for s in statements:
            await conn.execute(s)
    finally:
        await conn.close()


def sql(dsn: str, *statements: str) -> None:
    """Run the statements in order on one connection."""
    anyio.run(_exec, dsn, *statements)


def server_cpu(datadir: Path) -> float:
    """The CPU seconds so far of the server whose data lives under `datadir`: the postmaster's
    own, its children's that have exited (a backend ends with its connection) and its live
    children's."""
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] != "postgres" or str(datadir) not in " ".join(p.info["cmdline"] or []):
            continue
        try:
            t = p.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in p.children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    c = child.cpu_times()
                    total += c.user + c.system
            return total
        except psutil.NoSuchProcess:
            continue
    return 0.0


def byte_compile() -> None:
    """Byte-compile the runner and its dependencies, as an installed package is (pip compiles at
    install; Python writes the cache on first use): the commands measured start as an operator's
    do, not compiling every module again where bytecode is not written (PYTHONDONTWRITEBYTECODE,
    set on some CI and sandbox machines, costs ~0.3 s of each start here)."""
    roots = [ROOT / "runner", *(Path(p) for p in sys.path if p.endswith("site-packages"))]
    t0 = time.perf_counter()
    for root in roots:
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", "-j", "0", str(root)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    print(f"byte-compiled the runner and its dependencies first ({time.perf_counter() - t0:.1f} s)")


@contextlib.contextmanager
def bench_database() -> Iterator[tuple[Path, str, str]]:
    """A scratch folder and a fresh `backfill_bench` database, on BACKFILL_BENCH_DSN's server or
    on an embedded one started (and stopped) here: (folder, dsn, which server). The runner is
    byte-compiled first (`byte_compile`)."""
    byte_compile()
    with tempfile.TemporaryDirectory(prefix="backfill-bench-") as tmp:
        work = Path(tmp)
        server = None
        if os.environ.get("BACKFILL_BENCH_DSN"):
            admin = os.environ["BACKFILL_BENCH_DSN"]
        else:
            server = EmbeddedServer(work / "pg")
            server.start()
            admin = server.uri("postgres")
        try:
            sql(admin, "DROP DATABASE IF EXISTS backfill_bench", "CREATE DATABASE backfill_bench")
            yield (
                work,
                dsn_with_database(admin, "backfill_bench"),
                "embedded" if server else "BACKFILL_BENCH_DSN",
            )
        finally:
            if server is not None:
                server.stop()


def run_backfill_apply(
    plan: dict[str, Any], workdir: Path, profile: Path | None = None
) -> dict[str, Any]:
    """`backfill apply PLAN --env staging` in its own process, as an operator runs it: wall time,
    the batch loop's time (execution_results.json), rows changed and peak RSS. Expects the apply
    to halt at its gate (exit 3). With `profile`, under `py-spy record`: a flame graph there (or
    collapsed stacks, one per line, for a .txt)."""
    name = plan["plan"]["name"]
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(plan))
    env = {**os.environ, "BACKFILL_LOGS": str(workdir / "logs"), "BACKFILL_ACTOR": "bench"}
    t0 = time.perf_counter()
    # a .txt profile is py-spy's raw format (collapsed stacks, one per line), else a flame graph
    raw = ["-f", "raw"] if profile and profile.suffix == ".txt" else []
    spy = ["py-spy", "record", "-o", str(profile), "-r", "200", *raw, "--"] if profile else []
    proc = psutil.Popen(
        [*spy, sys.executable, "-m", "runner", "apply", str(path), "--env", "staging", "--quiet"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            peak = max(peak, proc.memory_info().rss)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode != (0 if profile else 3):  # py-spy exits 0 after its child
        raise SystemExit(f"runner failed ({proc.returncode}):\n{out.decode()}\n{err.decode()}")
    results = next((workdir / "logs").rglob(f"{name}/*/staging/execution_results.json"))
    data = json.loads(results.read_text())
    return {
        "wall": wall,
        "loop": data["timing"]["elapsed_seconds"],
        "counting": data["timing"]["counting_seconds"],
        "changed": data["totals"]["changed"],
        "rss": peak,
    }
