"""The `backfill` command: parse flags, call a phase with anyio.run, print, map errors to exit codes.

Each command imports its phase when it runs: importing them all costs every command (`status`,
`approve`, `--help`) about 0.7 s of start-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import asyncpg
import structlog
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from runner import events
from runner import version as package_version
from runner.db import Databases
from runner.errors import (
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_GATE_WAITING,
    EXIT_INVALID,
    EXIT_NO_GO,
    BackfillError,
    InvalidInput,
)
from runner.plan import LoadedPlan, load_plan, parse_duration

app = typer.Typer(
    name="backfill",
    help="A guarded, staged-rollout backfill runner for PostgreSQL.\n\n"
    "Exit codes: 0 done · 1 the work failed · 2 invalid input · 3 halted at a gate · 4 no-go.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


class _RedactingStream:
    """stdout or stderr as they are at write time, through the one redaction point: nothing this
    process prints (messages, tables, tracebacks) can carry a registered secret."""

    def __init__(self, name: Literal["stdout", "stderr"]) -> None:
        self.name = name

    @property
    def _stream(self) -> Any:
        return getattr(sys, self.name)

    def write(self, text: str) -> int:
        return int(self._stream.write(events.redact_text(text)))

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return bool(self._stream.isatty())

    def fileno(self) -> int:
        return int(self._stream.fileno())

    @property
    def encoding(self) -> str:
        return str(getattr(self._stream, "encoding", None) or "utf-8")


out = Console(file=_RedactingStream("stdout"), highlight=False, soft_wrap=True)  # type: ignore[arg-type]
err = Console(file=_RedactingStream("stderr"), highlight=False, soft_wrap=True)  # type: ignore[arg-type]
_state: dict[str, Any] = {"verbose": False, "quiet": False}

PlanArg = Annotated[
    Path, typer.Argument(help="The plan file (.toml or .json).", show_default=False, metavar="PLAN")
]
EnvOpt = Annotated[
    str, typer.Option("--env", "-e", help="Environment name from the plan.", envvar="BACKFILL_ENV")
]
RunOpt = Annotated[
    str | None, typer.Option("--run", help="Continue this run id.", envvar="BACKFILL_RUN")
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar; periodic log lines.")
]
MaxRowsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-rows",
        min=1,
        help="Stop cleanly after this many rows (exit 0, status capped); --run continues.",
    ),
]
MetricsPortOpt = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        min=1,
        max=65535,
        help="Serve Prometheus metrics on this port while the apply runs "
        "(address: BACKFILL_METRICS_ADDR, default 127.0.0.1).",
        envvar="BACKFILL_METRICS_PORT",
    ),
]


def _metrics_addr() -> str:
    return os.environ.get("BACKFILL_METRICS_ADDR") or "127.0.0.1"


def _configure_logging(console_level: int) -> None:
    def console(_: Any, method: str, event: Any) -> Any:
        level = logging.getLevelName(method.upper()) if isinstance(method, str) else logging.INFO
        if not isinstance(level, int):
            level = logging.INFO
        if level < console_level or event.get("event", "").startswith("batch.done"):
            raise structlog.DropEvent
        return event

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            events.redact,
            events.to_sink,
            console,
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def _version(value: bool) -> None:
    if value:
        out.print(f"backfill {package_version()}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log more and show tracebacks.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="NAME=VALUE for a [params] entry of the plan (repeat it); before the command: "
            "backfill --param since=2024-01-01 apply …",
        ),
    ] = None,
) -> None:
    for item in param or []:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            err.print(f"error: --param {item!r}: write NAME=VALUE (e.g. --param since=2024-01-01)")
            raise typer.Exit(EXIT_INVALID)
        # every plan this command loads (the run's, prod's mini plan) reads it like a variable
        os.environ[name] = value
    _state["verbose"] = verbose
    _state["command"] = ctx.invoked_subcommand or ""
    _configure_logging(logging.DEBUG if verbose else logging.WARNING)


def _run(make: Callable[[], Awaitable[int]]) -> None:
    """The one error boundary: expected errors become a message and an exit code, never a traceback."""
    try:
        try:
            code = anyio.run(make)
        except BaseExceptionGroup as group:
            raise _first_leaf(group) from group
    except BackfillError as e:
        err.print(f"error: {events.redact_text(str(e))}", markup=False)
        if _state["verbose"]:
            err.print(events.redact_text(traceback.format_exc()), markup=False)
        code = e.exit_code
    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError, OSError) as e:
        err.print(
            f"error: lost the connection to the database and could not get it back: "
            f"{events.redact_text(str(e))}\n  → {_continue_hint()}",
            markup=False,
        )
        code = EXIT_FAILED
    except asyncpg.PostgresError as e:
        err.print(
            f"error: the database refused a statement: {type(e).__name__}: "
            f"{events.redact_text(' '.join(str(e).split()))}\n"
            "  → check the plan's SQL (`backfill validate PLAN --env ENV` prepares it); every "
            "committed batch is kept",
            markup=False,
        )
        if _state["verbose"]:
            err.print(events.redact_text(traceback.format_exc()), markup=False)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        err.print(
            "interrupted: every committed batch is kept; continue with the same command and --run"
        )
        code = 130
    except (Exception, asyncio.CancelledError) as e:
        err.print(
            f"internal error: {type(e).__name__}: {events.redact_text(str(e))}",
            markup=False,
        )
        err.print("run again with -v for the traceback, and report it", markup=False)
        if _state["verbose"]:
            err.print(events.redact_text(traceback.format_exc()), markup=False)
        code = EXIT_FAILED
    finally:
        events.detach()
    raise typer.Exit(code)


def _continue_hint() -> str:
    """How to go on after a lost connection, for the command that was running."""
    command = _state.get("command", "")
    if command in ("apply", "soak", "health", "pipeline"):
        return (
            "every committed batch and sample is kept; when the database is reachable, run the "
            "same command again with --run RUN (the run id printed above) to continue the run"
        )
    if command == "rollback":
        return (
            "every restored batch is kept; when the database is reachable, run the same "
            "`backfill rollback RUN --env ENV` again: it continues where it stopped"
        )
    return "nothing was lost; when the database is reachable, run the same command again"


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error an operator should see from a task group: a BackfillError if there is one,
    else the first that is not a cancellation (a sibling's failure cancels the others)."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup[BaseException]) -> None:
        for e in g.exceptions:
            walk(e) if isinstance(e, BaseExceptionGroup) else leaves.append(e)

    walk(group)
    cancelled = asyncio.CancelledError
    return next(
        (e for e in leaves if isinstance(e, BackfillError)),
        next((e for e in leaves if not isinstance(e, cancelled)), leaves[0]),
    )


def _run_flag(run: str | None) -> str | None:
    """`--run`, refusing an empty BACKFILL_RUN (click reads it as unset) instead of a new run."""
    if run is None and os.environ.get("BACKFILL_RUN") == "":
        raise InvalidInput(
            "BACKFILL_RUN is set but empty",
            hint="unset it to start a new run, or set it to the run id to continue",
        )
    return run


def _load(path: Path) -> LoadedPlan:
    loaded = load_plan(path)
    events.add_secrets(loaded.secrets)
    return loaded


_QUIET_LINE_EVERY_S = 5.0  # without a terminal, a progress line at most this often


class _ProgressView:
    """A rich progress bar on a terminal, or one log line every few seconds elsewhere."""

    def __init__(self, quiet: bool) -> None:
        self.tty = err.is_terminal and not quiet
        self.bar: Progress | None = None
        self.task: Any = None
        self.last_line = 0.0
        self.t0 = time.monotonic()
        self.rows = 0
        self.title = ""
        self.held = ""
        self.yielding = ""

    def _description(self) -> str:
        if self.held:
            return self.held
        return f"{self.title} · {self.yielding}" if self.yielding else self.title

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "start":
            self.rows = data["rows"]
            if self.tty:
                self.bar = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    TextColumn("{task.completed:,}/{task.total:,} rows"),
                    TextColumn("{task.fields[batches]} batches · {task.fields[rate]} rows/s"),
                    TimeElapsedColumn(),
                    TextColumn("ETA"),
                    TimeRemainingColumn(),
                    console=err,
                    transient=False,
                )
                self.bar.start()
                self.title = f"{data['stage']} on {data['env']}"
                self.task = self.bar.add_task(
                    self.title,
                    total=max(self.rows, 1),
                    batches=0,
                    rate="–",
                )
            else:
                err.print(
                    f"{data['stage']} on {data['env']}: {self.rows:,} row(s) need the backfill "
                    f"(run {data['run_id']})",
                    markup=False,
                )
        elif kind == "window":  # a windowed run starts (or continues) one of its windows
            where = f"window {data['no']}/{data['of']} {data['label']}"
            if self.bar is not None:
                self.title = f"{self.title.split(' · ')[0]} · {where}"
                self.bar.update(self.task, description=self._description())
            else:
                counted = data.get("counted")  # a continued window: some of it done since
                more = "" if counted is None else f" (continued; {counted:,} counted at its start)"
                err.print(f"{where}{more}: {data['rows']:,} row(s) need the backfill", markup=False)
        elif kind in ("hold", "resume", "yield"):
            self._watched(kind, data)
        elif kind == "notice":  # something the operator should know, once
            err.print(f"note: {data['text']}", markup=False)
        elif kind == "batch":
            t = data["totals"]
            done = t.get("keys", 0)  # keys of committed batches: the unit of "rows needing it"
            elapsed = max(time.monotonic() - self.t0, 1e-6)
            rate = done / elapsed
            if self.bar is not None:
                self.bar.update(
                    self.task, completed=done, batches=t.get("batches", 0), rate=f"{rate:,.0f}"
                )
            elif (
                time.monotonic() - self.last_line > _QUIET_LINE_EVERY_S
                or data["outcome"].status == "failed"
            ):
                self.last_line = time.monotonic()
                eta = (self.rows - done) / rate if rate > 0 and self.rows > done else 0
                yielding = f", {self.yielding}" if self.yielding else ""
                err.print(
                    f"progress: {t.get('batches', 0)} batches, {done:,}/{self.rows:,} rows, "
                    f"{rate:,.0f} rows/s, ETA {eta:,.0f} s{yielding}",
                    markup=False,
                )

    def _watched(self, kind: str, data: dict[str, Any]) -> None:
        """A guard or a pause holds the run or lets it go (`hold`, `resume`); other sessions
        are busy and each batch is followed by a wait, or no longer (`yield`)."""
        if kind == "yield":
            factor = data["factor"]
            self.yielding = (
                f"yielding {factor:.1f}× the batch time to {data['busy']:.1f} busy sessions"
                if factor > 0
                else ""
            )
        else:
            self.held = f"held: {data['reason']}" if kind == "hold" else ""
        if self.bar is not None:
            self.bar.update(self.task, description=self._description())
        elif kind != "yield":
            err.print(self.held or f"resumed ({data['signal']} clear)", markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# -- commands ----------------------------------------------------------------------------------


@app.command(short_help="Check a plan; with --env, against its database.")
def validate(
    plan: PlanArg,
    env: Annotated[
        str | None,
        typer.Option(
            "--env", "-e", help="Also check against this environment's database (read-only)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check a plan file, and with --env its SQL against the database, changing nothing."""
    from runner.commands.validate import validate as check

    async def go() -> int:
        result = await check(plan, _load(plan), env)
        if as_json:
            out.print(json.dumps(result.doc, indent=2), markup=False)
        else:
            for line in result.lines:
                out.print(line, markup=False)
        if not result.ok:
            err.print(
                f"error: {plan}: the plan does not fit environment {env!r} (see FAIL lines above)"
            )
            return EXIT_INVALID
        return EXIT_DONE

    _run(go)


@app.command(short_help="Create or migrate the ledger schema.")
def init(plan: PlanArg, env: EnvOpt) -> None:
    """Create or migrate the ledger (control schema `backfill`) in an environment's database."""
    from runner.commands.validate import init as init_ledger

    async def go() -> int:
        out.print(await init_ledger(_load(plan), env))
        return EXIT_DONE

    _run(go)


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1e6:,.1f} MB"


def _seconds(s: float) -> str:
    return f"{s:,.0f} s" if s >= 10 else f"{s:.1f} s"  # noqa: PLR2004


def _impact_lines(impact: dict[str, Any], workers: int) -> list[str]:
    """The dry run's impact estimate, as an operator reads it."""
    lines = [
        f"  size: about {_bytes(impact['bytes'])}"
        f" ({impact.get('bytes_from', 'the table average times the rows')})"
    ]
    if impact.get("time_column"):
        lines.append(f"  {impact['time_column']}: from {impact['oldest']} to {impact['newest']}")
    sample = impact["sample"]
    if sample["seconds"] is not None:
        lines.append(
            f"  sample batch: {sample['rows']:,} row(s) in {sample['seconds'] * 1000:,.0f} ms "
            f"({sample['note']})"
        )
        lines.append(
            f"  estimated duration: about {impact['estimated_seconds']:,.0f} s with "
            f"{workers} worker(s) (the batches x the sample's time per row / the workers, or the "
            "configured rate if slower; the runner's images and checks add to it)"
        )
    else:
        lines.append(f"  no duration estimate: {sample['note']}")
    if "windows" in impact:
        shown = impact["windows"]
        lines.append(
            f"  windows: {impact['windows_total']:,}; rows discovery returns outside them "
            f"(not touched): {impact['outside_windows']:,}"
        )
        for w in shown:
            est = w["estimated_seconds"]
            lines.append(
                f"    {w['no']:>4}. {w['label']}: {w['rows']:,} row(s), {w['batches']:,} batch(es)"
                + (f", about {_seconds(est)}" if est is not None else "")
            )
        if impact["windows_total"] > len(shown):
            lines.append(f"    … and {impact['windows_total'] - len(shown):,} more windows")
    return lines


def _print_apply(result: Any) -> int:
    if result.status == "dry-run":
        d = result.dry_run
        out.print(f"dry run on {d['env']} ({d['target']}): nothing was written", markup=False)
        out.print(f"  rows needing the backfill: {d['rows_needing_backfill']:,}", markup=False)
        out.print(
            f"  batches: {d['batches']:,} of {d['batch_size']:,} with {d['workers']} worker(s)",
            markup=False,
        )
        est = d["estimated_seconds_at_rate"]
        out.print(
            "  duration at the configured rate: "
            + (
                f"at least {est:.0f} s"
                if est is not None
                else "unthrottled (as fast as the database allows)"
            ),
            markup=False,
        )
        for line in _impact_lines(d["impact"], d["workers"]):
            out.print(line, markup=False)
        if d["first_batch_keys"]:
            out.print(
                f"  first batch keys: {d['first_batch_keys'][0]} … {d['first_batch_keys'][1]}",
                markup=False,
            )
            out.print("  EXPLAIN of the first batch:", markup=False)
            for line in d["explain_first_batch"]:
                out.print(f"    {line}", markup=False)
        out.print("  each batch runs, in one transaction:", markup=False)
        for step in d["batch_statements"]:
            out.print(f"  -- {step['what']}", markup=False)
            for line in step["sql"].splitlines():
                out.print(f"    {line}", markup=False)
        return EXIT_DONE
    t = result.totals
    if result.status == "joined":
        out.print(
            f"joined the {result.stage} of run {result.run_id} on {result.env}: this process "
            f"committed {t.batches:,} batch(es), {t.changed:,} row(s) changed, {t.noop:,} "
            "no-op(s); the process that leads the stage finishes it (summary, rollback file, "
            "gate)",
            markup=False,
        )
        out.print(f"next: {result.next_command}", markup=False)
        return EXIT_DONE
    out.print(f"{result.stage} on {result.env}: run {result.run_id}", markup=False)
    out.print(
        f"  {t.changed:,} row(s) changed, {t.noop:,} no-op(s), {t.batches:,} batch(es)",
        markup=False,
    )
    if result.summary_path:
        out.print(f"  summary:  {result.summary_path}", markup=False)
    if result.rollback_path:
        out.print(f"  rollback: {result.rollback_path}", markup=False)
    if result.status == "halted":
        out.print(f"halted at gate {result.gate}: review the summary, then run", markup=False)
        out.print(f"  {result.next_command}", markup=False)
        return EXIT_GATE_WAITING
    if result.status == "capped":
        out.print(
            f"capped: this command's row cap ({result.totals.keys:,} row(s) handed to batches, "
            "quarantined ones included) is reached; every committed batch is kept and the "
            "stage goes on with the next command (no summary or gate until it finishes)",
            markup=False,
        )
    out.print(f"next: {result.next_command}", markup=False)
    return EXIT_DONE


@app.command(short_help="Apply the backfill in batches; halt at a gate.")
def apply(
    plan: PlanArg,
    env: EnvOpt,
    run: RunOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count, estimate and EXPLAIN; write nothing.")
    ] = False,
    quiet: QuietOpt = False,
    metrics_port: MetricsPortOpt = None,
    max_rows: MaxRowsOpt = None,
    no_sample: Annotated[
        bool,
        typer.Option(
            "--no-sample",
            help="With --dry-run: do not time a sample batch (run and rolled back) for the estimate.",
        ),
    ] = False,
) -> None:
    """Apply the backfill in keyset batches (staging, or prod from the mini plan); halts at a gate."""
    from runner.engine.metrics import serve
    from runner.phases.apply import apply as run_apply
    from runner.phases.common import operator_name

    async def go() -> int:
        loaded = _load(plan)
        view = _ProgressView(quiet)
        try:
            with serve(metrics_port, _metrics_addr()):
                async with Databases(loaded.plan) as dbs:
                    result = await run_apply(
                        loaded,
                        dbs,
                        env=env,
                        run_id=_run_flag(run),
                        dry_run=dry_run,
                        operator=operator_name(),
                        progress=view,
                        max_rows=max_rows,
                        sample=not no_sample,
                    )
        finally:
            view.close()
        return _print_apply(result)

    _run(go)


def _decide(
    decision: Literal["approve", "reject"],
    run: str,
    gate: str,
    actor: str,
    note: str,
    override: bool,
    plan: Path | None,
) -> None:
    from runner.commands.decide import decide

    async def go() -> int:
        state = await decide(
            run, gate, decision, actor=actor, note=note, override=override, plan_path=plan
        )
        verb = "approved" if decision == "approve" else "rejected"
        out.print(
            f"gate {gate} of run {run}: {verb} by {actor or 'your database login'}"
            + (" (override)" if override else ""),
            markup=False,
        )
        out.print(f"next: {state}", markup=False)
        return EXIT_DONE

    _run(go)


ActorOpt = Annotated[
    str,
    typer.Option(
        "--as",
        help="Who decides (must be in gates.approvers). With gates.identity = 'database', "
        "your database login (BACKFILL_APPROVER_DSN) decides and --as may be left out.",
        envvar="BACKFILL_APPROVER",
    ),
]
GateOpt = Annotated[
    str,
    typer.Option(
        "--gate", help="The gate, e.g. apply-staging, soak-staging, health-prod, canary-prod."
    ),
]
NoteOpt = Annotated[
    str, typer.Option("--note", help="Why; required for inconclusive criteria and overrides.")
]
PlanOpt = Annotated[
    Path | None, typer.Option("--plan", help="The plan file, if not the one the run recorded.")
]


@app.command(short_help="Open a gate for the plan and report you read.")
def approve(
    run: Annotated[str, typer.Argument(help="The run id.")],
    gate: GateOpt,
    actor: ActorOpt = "",
    note: NoteOpt = "",
    override: Annotated[
        bool, typer.Option("--override", help="Open a gate whose criteria failed (needs --note).")
    ] = False,
    plan: PlanOpt = None,
) -> None:
    """Record an approval bound to the plan digest and the report you reviewed."""
    _decide("approve", run, gate, actor, note, override, plan)


@app.command(short_help="Close a gate for good (no-go).")
def reject(
    run: Annotated[str, typer.Argument(help="The run id.")],
    gate: GateOpt,
    actor: ActorOpt = "",
    note: NoteOpt = "",
    plan: PlanOpt = None,
) -> None:
    """Record a rejection: the gate stays closed (no-go)."""
    _decide("reject", run, gate, actor, note, False, plan)


@app.command(short_help="A run's phases, gates and next command.")
def status(
    run: Annotated[str | None, typer.Argument(help="The run id (default: list runs).")] = None,
    plan: PlanOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print it as JSON, for scripts.")] = False,
) -> None:
    """Show a run's phases, gates and decisions, and the next command; without RUN, list runs."""
    from runner.commands.status import list_run_rows, read_status

    async def go() -> int:
        if run is None:
            rows = list_run_rows()
            if as_json:
                out.print(json.dumps(rows, indent=2, default=str), markup=False)
                return EXIT_DONE
            if not rows:
                out.print(
                    "no runs yet under backfill_logs/; start one with `backfill apply PLAN --env staging`"
                )
            for r in rows:
                out.print(f"{r['run_id']}  plan {r['plan']}", markup=False)
            return EXIT_DONE
        status = await read_status(run, plan)
        if as_json:
            out.print(json.dumps(status.doc(), indent=2), markup=False)
        else:
            out.print("\n".join(status.lines()), markup=False)
        return EXIT_DONE

    _run(go)


@app.command(short_help="Watch read-only checks over time; halt at a gate.")
def soak(
    plan: PlanArg,
    env: EnvOpt,
    run: Annotated[str, typer.Option("--run", help="The run whose apply this soak watches.")],
    duration: Annotated[
        str | None, typer.Option("--duration", help="e.g. 6h, 30m, 90s (default: the plan's).")
    ] = None,
    interval: Annotated[
        str | None, typer.Option("--interval", help="e.g. 5m, 10s (default: the plan's).")
    ] = None,
) -> None:
    """Watch read-only checks over time against thresholds and baselines; halts at a go/no-go gate."""
    from runner.phases.common import operator_name
    from runner.phases.soak import soak as run_soak

    async def go() -> int:
        loaded = _load(plan)
        try:
            d = parse_duration(duration) if duration else None
            i = parse_duration(interval) if interval else None
        except ValueError as e:
            raise InvalidInput(f"--duration/--interval: {e}") from None

        def tick(kind: str, data: dict[str, Any]) -> None:
            if kind == "sample":
                err.print(
                    f"sample {data['sample_no']} at {data['elapsed']:.0f}s: "
                    + ", ".join(f"{k}={v}" for k, v in data["outcomes"].items()),
                    markup=False,
                )

        async with Databases(loaded.plan) as dbs:
            result = await run_soak(
                loaded,
                dbs,
                env=env,
                run_id=run,
                duration=d,
                interval=i,
                operator=operator_name(),
                progress=tick,
            )
        out.print(
            f"soak on {env}: verdict {result.verdict.upper()} after {result.observed_seconds:.0f}s, "
            f"{result.samples} sample(s)",
            markup=False,
        )
        out.print(f"  report: {result.report_path}", markup=False)
        if result.verdict == "fail":
            out.print(f"no-go: {result.reason}", markup=False)
            return EXIT_NO_GO
        out.print(f"halted at gate {result.gate}: {result.next_command}", markup=False)
        return EXIT_GATE_WAITING

    _run(go)


@app.command(short_help="Check prod read-only; write the prod mini plan.")
def health(
    plan: PlanArg,
    env: EnvOpt,
    run: Annotated[str, typer.Option("--run", help="The run whose soak gate was approved.")],
) -> None:
    """Read-only prod check: what still needs backfill, capacity, schema drift; writes the mini plan."""
    from runner.phases.common import operator_name
    from runner.phases.health import health as run_health

    async def go() -> int:
        loaded = _load(plan)
        async with Databases(loaded.plan) as dbs:
            result = await run_health(loaded, dbs, env=env, run_id=run, operator=operator_name())
        out.print(f"health of {env}: verdict {result.verdict.upper()}", markup=False)
        out.print(f"  rows needing the backfill: {result.rows_needing:,}", markup=False)
        out.print(f"  report:    {result.report_path}", markup=False)
        out.print(f"  mini plan: {result.mini_plan_path}", markup=False)
        if result.verdict == "no-go":
            for b in result.blockers:
                out.print(f"  blocker: {b}", markup=False)
            return EXIT_NO_GO
        out.print(f"halted at gate {result.gate}: {result.next_command}", markup=False)
        return EXIT_GATE_WAITING

    _run(go)


@app.command(short_help="Run the next phase whose gate is open.")
def pipeline(
    plan: PlanArg,
    run: RunOpt = None,
    soak_duration: Annotated[
        str | None,
        typer.Option("--soak-duration", help="Override the plan's soak duration (e.g. 30s)."),
    ] = None,
    soak_interval: Annotated[
        str | None,
        typer.Option("--soak-interval", help="Override the plan's soak interval (e.g. 10s)."),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the next phase whose gate is open; stop at the first gate that waits."""
    from runner.commands.pipeline import run_pipeline
    from runner.phases.common import operator_name

    async def go() -> int:
        loaded = _load(plan)
        try:
            duration = parse_duration(soak_duration) if soak_duration else None
            interval = parse_duration(soak_interval) if soak_interval else None
        except ValueError as e:
            raise InvalidInput(f"--soak-duration/--soak-interval: {e}") from None
        view = _ProgressView(quiet)
        try:
            outcome = await run_pipeline(
                loaded,
                run_id=_run_flag(run),
                operator=operator_name(),
                progress=view,
                say=lambda s: out.print(s, markup=False),
                soak_duration=duration,
                soak_interval=interval,
            )
        finally:
            view.close()
        return outcome

    _run(go)


@app.command(short_help="Undo a run: SQL for psql, or restore + verify.")
def rollback(
    run: Annotated[str, typer.Argument(help="The run id to undo.")],
    env: EnvOpt,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be restored and what conflicts.")
    ] = False,
    emit: Annotated[
        bool, typer.Option("--emit", help="Only write the rollback SQL file for psql.")
    ] = False,
    batches: Annotated[str | None, typer.Option("--batches", help="Only batches A-B.")] = None,
    since: Annotated[
        datetime | None,
        typer.Option("--since", help="Only batches committed after this time (ISO 8601)."),
    ] = None,
    plan: PlanOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            max=32,
            help="Connections restoring batches side by side (default: the plan's batching.workers).",
        ),
    ] = None,
) -> None:
    """Undo a run in one environment: emit SQL for psql, or restore batched and verified."""
    from runner.commands.rollback import undo

    async def go() -> int:
        result = await undo(
            run,
            env,
            dry_run=dry_run,
            emit=emit,
            batches=batches,
            since=since,
            plan_path=plan,
            workers=workers,
        )
        for line in result.lines:
            out.print(line, markup=False)
        return result.exit_code

    _run(go)


@app.command(short_help="Re-render a run's reports from the ledger.")
def report(
    run: Annotated[str, typer.Argument(help="The run id.")],
    plan: PlanOpt = None,
) -> None:
    """Re-render every Markdown report and the rollback SQL of a run from the ledger."""
    from runner.commands.report import rerender

    async def go() -> int:
        for path in await rerender(run, plan):
            out.print(str(path), markup=False)
        return EXIT_DONE

    _run(go)


@app.command(short_help="The staged rollout on an embedded PostgreSQL.")
def demo(
    scale: Annotated[
        float, typer.Option("--scale", help="Data size: 1 ≈ 20k profiles in staging.")
    ] = 1.0,
    auto_approve: Annotated[
        bool,
        typer.Option(
            "--auto-approve",
            help="Approve every gate as the demo approver and walk the whole rollout.",
        ),
    ] = False,
    soak_seconds: Annotated[
        float, typer.Option("--soak-seconds", help="How long the demo soak watches.")
    ] = 6.0,
    scenario: Annotated[
        str,
        typer.Option(
            "--scenario",
            help="profiles: stamp profiles (seed 003); starforge: normalize hero_snapshots JSON "
            "into three tables by upserts (seed 002); iomete: load new, changed and failed files "
            "of a date range into processed_files, partition by partition (seed 004); metadata: "
            "emit metadata records month by month, pausing the variability jobs per window, with "
            "a manifest (seed 000). The last three end by undoing staging's rehearsal exactly.",
        ),
    ] = "profiles",
    quiet: QuietOpt = False,
) -> None:
    """Create demo staging/prod databases on the embedded server and run the pipeline on them."""
    from runner.demo.run import run_demo

    async def go() -> int:
        view = _ProgressView(quiet)
        try:
            return await run_demo(
                scale=scale,
                auto_approve=auto_approve,
                soak_seconds=soak_seconds,
                scenario=scenario,
                progress=view,
                say=lambda s: out.print(s, markup=False),
            )
        finally:
            view.close()

    _run(go)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        app()
    except SystemExit as e:
        # click reports usage errors with exit code 2 already, which matches "invalid input"
        raise SystemExit(e.code) from None


__all__ = [
    "EXIT_DONE",
    "EXIT_FAILED",
    "EXIT_GATE_WAITING",
    "EXIT_INVALID",
    "EXIT_NO_GO",
    "app",
    "main",
]


# -- steering a running apply (#13): requests in the ledger, obeyed before its next batch ---------

ControlNoteOpt = Annotated[
    str, typer.Option("--note", help="Why; shown by `status` and in the ledger.")
]


def _control(
    action: Literal["pause", "resume", "cancel"], run: str, env: str, note: str, plan: Path | None
) -> None:
    from runner.commands import control

    async def go() -> int:
        outcome = await getattr(control, action)(run, env, note=note, plan_path=plan)
        out.print(outcome.message, markup=False)
        return EXIT_DONE

    _run(go)


@app.command(short_help="Start no new batch of a run until resumed.")
def pause(
    run: Annotated[str, typer.Argument(help="The run id.")],
    env: EnvOpt,
    note: ControlNoteOpt = "",
    plan: PlanOpt = None,
) -> None:
    """Pause a run: its running apply finishes the batches in flight and starts no new one."""
    _control("pause", run, env, note, plan)


@app.command(short_help="Let a paused run go on.")
def resume(
    run: Annotated[str, typer.Argument(help="The run id.")],
    env: EnvOpt,
    note: ControlNoteOpt = "",
    plan: PlanOpt = None,
) -> None:
    """Resume a paused run: its running apply starts batches again."""
    _control("resume", run, env, note, plan)


@app.command(short_help="Stop a run for good; committed batches stay.")
def cancel(
    run: Annotated[str, typer.Argument(help="The run id.")],
    env: EnvOpt,
    note: ControlNoteOpt = "",
    plan: PlanOpt = None,
) -> None:
    """Cancel a run: its running apply stops after the batches in flight; rollback undoes it."""
    _control("cancel", run, env, note, plan)


# -- keys left out because their data made the apply fail (#12) ---------------------------------


@app.command(short_help="List a run's quarantined keys, or re-try them.")
def quarantine(
    run: Annotated[str, typer.Argument(help="The run id.")],
    env: EnvOpt,
    retry: Annotated[
        bool,
        typer.Option(
            "--retry", help="Re-try the quarantined keys as new batches of the run (after a fix)."
        ),
    ] = False,
    plan: PlanOpt = None,
) -> None:
    """List the keys a run quarantined in one environment, or re-try them (images and rollback
    as for every batch); exit 1 when keys are still quarantined after a retry."""
    from runner.commands import quarantine as command

    async def go() -> int:
        outcome = await (command.retry if retry else command.show)(run, env, plan)
        for line in outcome.lines:
            out.print(line, markup=False)
        return outcome.exit_code

    _run(go)
