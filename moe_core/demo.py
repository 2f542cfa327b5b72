"""The demo sequence: the whole method on one run, as pipeline steps in order.

    analyze -> select -> train (chosen experts, as many random experts, full fine-tuning) -> evaluate

Why a module of its own: the CLI (``python -m moe_core demo``), the app's one-click demo (a CLI job)
and tests share one definition of the sequence; each stage is a pipeline step built from the
``DemoSpec`` (``specs.py``), so the demo never writes into a run past the pipeline. Stages after the
analysis run under the run's writer lease held for the whole demo, so no other writer slips in
between two stages.

    for stage in demo_stages(spec): print(stage.command, stage.job_suffix)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moe_core.pipeline import finished_with
from moe_core.specs import AnalyseSpec, DemoSpec, EvaluateSpec, SelectSpec, TrainSpec
from moe_core.store.run import Run

log = logging.getLogger(__name__)
StageSpec = AnalyseSpec | SelectSpec | TrainSpec | EvaluateSpec
TRAINED = ("experts", "random_experts", "full")  # what the demo trains, in this order


@dataclass(frozen=True)
class Stage:
    """One step of the demo: the CLI command that runs it, its spec, and its job name's suffix."""

    command: str  # "analyze" | "select" | "train" | "evaluate"
    spec: StageSpec
    job_suffix: str | None  # None: the demo's own job; else the stage's job is "<job>-<suffix>"


def demo_stages(spec: DemoSpec) -> list[Stage]:
    """The demo's steps in order (the analysis first; training and evaluation unless ``skip_training``)."""
    stages = [Stage("analyze", spec, None), Stage("select", spec.select_spec(), None)]
    if not spec.skip_training:
        stages += [Stage("train", spec.train_spec(b), f"train-{b}") for b in TRAINED]
        stages.append(Stage("evaluate", spec.evaluate_spec(), "eval"))
    return stages


def run_demo(
    spec: DemoSpec,
    run_stage: Callable[[Stage, Run | None], tuple[Run | None, Any]],
) -> Run | None:
    """Run every stage with ``run_stage(stage, run) -> (run, result)``; None when a stage was stopped.

    ``run_stage`` runs one pipeline step (the CLI passes one that reports each stage as its own job);
    a result of None means the stage was stopped, which ends the demo there. The first stage (the
    analysis) creates or opens the run (and resumes it); the rest hold its writer lease for the whole
    sequence, and a stage that already finished with the same settings is gone past (``--overwrite``
    redoes it).
    """
    first, *rest = demo_stages(spec)
    run, result = run_stage(first, None)
    if run is None or result is None:
        return None
    with run.writing("demo"):
        for stage in rest:
            if not spec.overwrite and finished_with(run, step_of(stage), stage.spec):
                log.info("demo: %s already finished with these settings; going on", step_of(stage))
                continue  # a killed or stopped demo resumes at its first unfinished stage
            _, result = run_stage(stage, run)
            if result is None:
                return None
    return run


def step_of(stage: Stage) -> str:
    """The manifest step a stage records: select:<mask>, train:<training>, evaluation:<name>."""
    spec = stage.spec
    if isinstance(spec, TrainSpec):
        return f"train:{spec.training_name()}"
    return f"{'evaluation' if stage.command == 'evaluate' else stage.command}:{spec.name}"
