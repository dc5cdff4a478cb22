"""The rollout, defined once: its phases in order, where each runs, its gate and its report.

`pipeline`, `status`, `approve`/`reject`, `report` and every next-step hint read this table.
Adding a phase is one row here, one module under `phases/` (registered in `pipeline.RUNNERS`)
and one template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runner.plan import Pipeline as PipelineEnvs


@dataclass(frozen=True)
class PhaseSpec:
    name: str  # the phase as the ledger records it
    role: Literal["staging", "prod"]  # which of the plan's pipeline environments it runs on
    report: str  # its report, in the environment's folder of the run
    gated: bool  # halts at gate `<name>-<env>` until a decision opens it
    plan_key: Literal["plan_path", "mini_plan_path"]  # the plan that drives it (run.json key)
    runs: str  # what runs it: a key of pipeline.RUNNERS


ROLLOUT: tuple[PhaseSpec, ...] = (
    PhaseSpec("apply", "staging", "backfill_summary.md", True, "plan_path", "apply"),
    PhaseSpec("soak", "staging", "staging_observability.md", True, "plan_path", "soak"),
    PhaseSpec("health", "prod", "prod_health_check.md", True, "plan_path", "health"),
    PhaseSpec("canary", "prod", "canary_summary.md", True, "mini_plan_path", "mini-apply"),
    PhaseSpec("rest", "prod", "rest_summary.md", False, "mini_plan_path", "mini-apply"),
)

GATED: tuple[str, ...] = tuple(p.name for p in ROLLOUT if p.gated)


def phase(name: str) -> PhaseSpec:
    for spec in ROLLOUT:
        if spec.name == name:
            return spec
    raise KeyError(f"no phase {name!r} in the rollout")


def gate_name(phase_name: str, env: str) -> str:
    return f"{phase_name}-{env}"


def env_of(spec: PhaseSpec, pipeline: PipelineEnvs) -> str:
    return pipeline.staging if spec.role == "staging" else pipeline.prod


def by_environment(pipeline: PipelineEnvs) -> list[tuple[str, tuple[PhaseSpec, ...]]]:
    """The phases grouped by the environment they run on, in rollout order."""
    groups: list[tuple[str, tuple[PhaseSpec, ...]]] = []
    for spec in ROLLOUT:
        env = env_of(spec, pipeline)
        if groups and groups[-1][0] == env:
            groups[-1] = (env, (*groups[-1][1], spec))
        else:
            groups.append((env, (spec,)))
    return groups
