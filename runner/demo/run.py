"""`backfill demo`: a seed scenario's rollout on the embedded server, from empty to as far as it
may go. `profiles` (seed 003, the default) stamps profiles; `starforge` (seed 002) normalizes
hero_snapshots JSON into three tables; `iomete` (seed 004) brings processed_files up to date for a
date range, partition by partition; `metadata` (seeds 000/001) emits metadata records month by
month with a manifest. The last three end by undoing staging's rehearsal exactly."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from runner.artifacts import logs_root
from runner.commands.pipeline import run_pipeline
from runner.commands.rollback import undo
from runner.db import Databases, home_dir
from runner.demo import iomete, metadata, starforge
from runner.demo.data import seed
from runner.errors import EXIT_DONE, EXIT_FAILED, EXIT_GATE_WAITING, InvalidInput
from runner.phases.common import ProgressCallback, command_prefix, operator_name
from runner.plan import LoadedPlan, load_plan

DEMO_APPROVER = "demo-approver"
PLAN_NAME = "profiles_results_v1_2_1.toml"
SCENARIOS = {
    "profiles": PLAN_NAME,
    "starforge": "starforge_hero_snapshots.toml",
    "iomete": "iomete_processed_files.toml",
    "metadata": "metadata_history.toml",
}


MAX_SCALE = 200  # thousands of rows: the demo stays a demo


def demo_plan_path(name: str = PLAN_NAME) -> Path:
    """plans/ of the working directory (a checkout), else the copy shipped in the package."""
    for candidate in (
        Path("plans") / name,
        Path(__file__).resolve().parents[2] / "plans" / name,
        Path(__file__).resolve().parent / name,
    ):
        if candidate.exists():
            return candidate
    raise InvalidInput(
        f"cannot find the demo plan {name}", hint="run the demo from the project checkout"
    )


@dataclass(frozen=True)
class Seeded:
    """What the demo says about the data it made."""

    lines: list[str]


async def _seed_profiles(dbs: Databases, loaded: LoadedPlan, scale: float) -> Seeded:
    rows = max(int(20_000 * scale), 200)
    async with dbs.connection("staging") as conn:
        await seed(conn, rows=rows, already_stamped=0.0, new_from=rows + 1)
    async with dbs.connection("prod") as conn:
        await seed(conn, rows=int(rows * 1.2), already_stamped=0.3, new_from=1)
    return Seeded(
        [
            f"  staging: {rows:,} sessions and profiles; prod: {int(rows * 1.2):,}, ~30% already stamped"
        ]
    )


async def _seed_starforge(dbs: Databases, loaded: LoadedPlan, scale: float) -> Seeded:
    snapshots = max(int(10_000 * scale), 200)
    statements = loaded.plan.apply.all
    lines = []
    for env, n, share in (("staging", snapshots, 0.05), ("prod", int(snapshots * 1.2), 0.1)):
        async with dbs.connection(env) as conn:
            counts = await starforge.seed(
                conn, snapshots=n, realtime_share=share, statements=statements
            )
        lines.append(
            f"  {env}: {counts['hero_snapshots']:,} hero_snapshots ({share:.0%} newest already "
            f"processed by the real-time ETL); user_troops {counts['user_troops']:,}, user_pets "
            f"{counts['user_pets']:,}, user_hero_summary {counts['user_hero_summary']:,} rows before; "
            f"{counts['poisoned']:,} snapshot(s) malformed beyond what the plan reads (its apply "
            "fails on them: they should end quarantined, the rest applied)"
        )
    return Seeded(lines)


async def _seed_iomete(dbs: Databases, loaded: LoadedPlan, scale: float) -> Seeded:
    lines = []
    for env, per_day, done in (
        ("staging", max(int(20 * scale), 2), 0.55),
        ("prod", max(int(24 * scale), 2), 0.65),
    ):
        async with dbs.connection(env) as conn:
            c = await iomete.seed(conn, per_day=per_day, done=done)
        since, until = iomete.IN_RANGE
        lines.append(
            f"  {env}: {c['source_files']:,} files in source_files ({per_day} a day, "
            f"{iomete.FIRST_DAY} .. 2024-05-31; partitions by month, December and May in DEFAULT), "
            f"{c['processed_files']:,} processed_files rows; in [{since}, {until}): "
            f"{c.get('done', 0):,} done, {c.get('changed', 0):,} changed, {c.get('failed', 0):,} "
            f"failed, {c.get('stale', 0):,} stale, {c.get('new', 0):,} new"
        )
    return Seeded(lines)


async def _seed_metadata(dbs: Databases, loaded: LoadedPlan, scale: float) -> Seeded:
    statements = loaded.plan.apply.all
    lines = []
    for env, spacing, live_from in (("staging", 90.0, "2024-07-01"), ("prod", 75.0, "2024-06-15")):
        async with dbs.connection(env) as conn:
            c = await metadata.seed(
                conn,
                spacing_minutes=max(spacing / scale, 1.0),
                live_from=live_from,
                statements=statements,
            )
        lines.append(
            f"  {env}: {c['ingestion_events']:,} ingestion_events ({metadata.FIRST} .. "
            f"{metadata.END}, {c['in_range']:,} in [{metadata.IN_RANGE[0]}, "
            f"{metadata.IN_RANGE[1]})); {c['metadata_records']:,} metadata_records already "
            f"emitted live since {live_from}; {c['variability_jobs']} variability jobs"
        )
    return Seeded(lines)


SEEDERS = {
    "profiles": _seed_profiles,
    "starforge": _seed_starforge,
    "iomete": _seed_iomete,
    "metadata": _seed_metadata,
}


# The scenarios whose staging rehearsal the demo undoes, each module with `rows_not_as_before`
UNDONE: dict[str, ModuleType] = {"starforge": starforge, "iomete": iomete, "metadata": metadata}


async def run_demo(
    *,
    scale: float,
    auto_approve: bool,
    soak_seconds: float,
    progress: ProgressCallback,
    say: Callable[[str], None],
    scenario: str = "profiles",
) -> int:
    if scenario not in SCENARIOS:
        raise InvalidInput(
            f"--scenario {scenario}: no such demo", hint=f"choose one of {', '.join(SCENARIOS)}"
        )
    if scale <= 0 or scale > MAX_SCALE:
        raise InvalidInput(f"--scale {scale}: choose a value above 0 and at most {MAX_SCALE}")
    if soak_seconds <= 0:
        raise InvalidInput("--soak-seconds must be above 0")
    # The demo only ever touches the embedded server, whatever STAGING_DSN / PROD_DSN say.
    os.environ["STAGING_DSN"] = "embedded"
    os.environ["PROD_DSN"] = "embedded"
    os.environ.setdefault("BACKFILL_ACTOR", operator_name())
    path = demo_plan_path(SCENARIOS[scenario])
    loaded = load_plan(path)
    say(f"backfill demo: embedded PostgreSQL under {home_dir()} (first start takes a few seconds)")
    async with Databases(loaded.plan) as dbs:
        seeded = await SEEDERS[scenario](dbs, loaded, scale)
    for line in seeded.lines:
        say(line)
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
    if not runs:
        return code
    root = runs[-1].parent
    if scenario in UNDONE and code == EXIT_DONE:
        code = await _undo_rehearsal(loaded, root.name, say, UNDONE[scenario])
    say("\nartifacts:")
    for f in sorted(p for p in root.rglob("*") if p.is_file() and "batches" not in p.parts):
        say(f"  {f}")
    say(f"  {root}/*/batches/ ({sum(1 for _ in root.rglob('batch_*.json'))} per-batch logs)")
    cmd = command_prefix()
    if code == EXIT_GATE_WAITING:
        scenario_flag = "" if scenario == "profiles" else f" --scenario {scenario}"
        say(
            f"\nThe demo stopped at a gate, as a real rollout does (exit code 3 outside the demo).\n"
            f"Read the report above, then approve as a plan approver and continue:\n"
            f"  {cmd} approve {root.name} --gate apply-staging --as alice\n"
            f"  {cmd} pipeline {path} --run {root.name} --soak-duration 30s --soak-interval 10s\n"
            f"or walk every gate at once: {cmd} demo{scenario_flag} --auto-approve"
        )
        return EXIT_DONE
    return code


async def _undo_rehearsal(
    loaded: LoadedPlan, run_id: str, say: Callable[[str], None], scenario: ModuleType
) -> int:
    """Prod keeps the backfill: what undoing it would restore is shown (a dry run). Staging's
    rehearsal is undone for real, and the scenario's tables compared bytewise with their copy
    from before the rollout (`scenario.rows_not_as_before`)."""
    say("\nrollback: what undoing prod would restore (dry run: prod keeps the backfill)")
    dry = await undo(
        run_id,
        loaded.plan.pipeline.prod,
        dry_run=True,
        emit=False,
        batches=None,
        since=None,
        plan_path=None,
    )
    for line in dry.lines:
        say(f"  {line}")
    env = loaded.plan.pipeline.staging
    say("rollback: staging's rehearsal undone for real")
    done = await undo(
        run_id, env, dry_run=False, emit=False, batches=None, since=None, plan_path=None
    )
    for line in done.lines:
        say(f"  {line}")
    async with Databases(loaded.plan) as dbs, dbs.connection(env) as conn:
        differ = await scenario.rows_not_as_before(conn)
    for table, n in differ.items():
        what = "bytewise as before the rollout" if n == 0 else f"{n:,} row(s) NOT as before"
        say(f"  {env}.{table}: {what}")
    return done.exit_code if not any(differ.values()) else EXIT_FAILED
