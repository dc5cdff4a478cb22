"""`backfill demo`: the seed-003 rollout on the embedded server, from empty to as far as it may go."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from runner.artifacts import logs_root
from runner.commands.pipeline import run_pipeline
from runner.db import Databases, home_dir
from runner.demo.data import seed
from runner.errors import EXIT_DONE, EXIT_GATE_WAITING, InvalidInput
from runner.phases.common import ProgressCallback, command_prefix, operator_name
from runner.plan import load_plan

DEMO_APPROVER = "demo-approver"
PLAN_NAME = "profiles_results_v1_2_1.toml"


MAX_SCALE = 200  # thousands of rows: the demo stays a demo


def demo_plan_path() -> Path:
    """plans/ of the working directory (a checkout), else the copy shipped in the package."""
    for candidate in (
        Path("plans") / PLAN_NAME,
        Path(__file__).resolve().parents[2] / "plans" / PLAN_NAME,
        Path(__file__).resolve().parent / PLAN_NAME,
    ):
        if candidate.exists():
            return candidate
    raise InvalidInput(
        f"cannot find the demo plan {PLAN_NAME}", hint="run the demo from the project checkout"
    )


async def run_demo(
    *,
    scale: float,
    auto_approve: bool,
    soak_seconds: float,
    progress: ProgressCallback,
    say: Callable[[str], None],
) -> int:
    if scale <= 0 or scale > MAX_SCALE:
        raise InvalidInput(f"--scale {scale}: choose a value above 0 and at most {MAX_SCALE}")
    if soak_seconds <= 0:
        raise InvalidInput("--soak-seconds must be above 0")
    # The demo only ever touches the embedded server, whatever STAGING_DSN / PROD_DSN say.
    os.environ["STAGING_DSN"] = "embedded"
    os.environ["PROD_DSN"] = "embedded"
    os.environ.setdefault("BACKFILL_ACTOR", operator_name())
    path = demo_plan_path()
    loaded = load_plan(path)
    rows = max(int(20_000 * scale), 200)
    say(f"backfill demo: embedded PostgreSQL under {home_dir()} (first start takes a few seconds)")
    async with Databases(loaded.plan) as dbs:
        async with dbs.connection("staging") as conn:
            await seed(conn, rows=rows, already_stamped=0.0, new_from=rows + 1)
        async with dbs.connection("prod") as conn:
            await seed(conn, rows=int(rows * 1.2), already_stamped=0.3, new_from=1)
    say(
        f"  staging: {rows:,} sessions and profiles; prod: {int(rows * 1.2):,}, ~30% already stamped"
    )
    say(f"  plan: {path}")
    code = await run_pipeline(
        loaded,
        run_id=None,
        operator=os.environ["BACKFILL_ACTOR"],
        progress=progress,
        say=say,
        auto_approver=DEMO_APPROVER if auto_approve else None,
        soak_duration=soak_seconds,
        soak_interval=max(soak_seconds / 3, 0.5),
    )
    runs = sorted(logs_root().glob(f"{loaded.plan.name}/*/run.json"))
    if runs:
        root = runs[-1].parent
        say("\nartifacts:")
        for f in sorted(p for p in root.rglob("*") if p.is_file() and "batches" not in p.parts):
            say(f"  {f}")
        say(f"  {root}/*/batches/ ({sum(1 for _ in root.rglob('batch_*.json'))} per-batch logs)")
        cmd = command_prefix()
        if code == EXIT_GATE_WAITING:
            say(
                f"\nThe demo stopped at a gate, as a real rollout does (exit code 3 outside the demo).\n"
                f"Read the report above, then approve as a plan approver and continue:\n"
                f"  {cmd} approve {root.name} --gate apply-staging --as alice\n"
                f"  {cmd} pipeline {path} --run {root.name} --soak-duration 30s --soak-interval 10s\n"
                f"or walk every gate at once: {cmd} demo --auto-approve"
            )
            return EXIT_DONE
    return code
