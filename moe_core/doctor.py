"""Run doctor: find damaged or missing pieces of a run and repair what can be recomputed.

Why: a kill, a full disk or a hand edit can leave a truncated routing file, a broken table or a
stale temp file; readers then failed far from the cause, and deleting a file as advised could leave
a run stuck. Every per-batch artifact is checked cheaply (safetensors header against the file size,
Parquet footer and columns, JSON structure); ``diagnose(run, repair=True)`` (``python -m moe_core
doctor --run R``, or the button on the Runs page) then:

- removes a batch whose routing or outputs are damaged, so a resume redoes exactly that batch;
- recomputes a batch's risk table from its routing and outputs, and the aggregated tables;
- deletes stale ``.*.tmp`` leftovers and the lease of a dead writer; marks steps of dead processes failed;
- writes a lost or damaged plan again from the recorded prompt files when it comes out identical;
- names everything else (masks, trainings, evaluations) with its one-line fix.

    for f in diagnose(run, repair=True): print(f.line())
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from moe_core.analysis.analyse import (
    SCOPE_SPAN,
    analysis_config_of,
    batch_risk_table,
    finalize_analysis,
)
from moe_core.analysis.batch_files import PER_BATCH, batch_problems, drop_batch
from moe_core.analysis.masks import ExpertMask, load_batch_masks
from moe_core.analysis.risk import AGG_SEED_COLUMNS, SEED_COLUMNS
from moe_core.batching.plan import save_plan
from moe_core.model.routing import load_batch_routing
from moe_core.pipeline import AnalyseSpec, compose
from moe_core.store.atomic import finish_commits
from moe_core.store.events import INTERRUPTED, step_status
from moe_core.store.files import RunError, listed, read_json, write_parquet
from moe_core.store.integrity import check_json, check_parquet
from moe_core.store.lease import LEASE, holder
from moe_core.store.provenance import plan_fingerprint, recorded
from moe_core.store.run import ARTIFACTS, Run

log = logging.getLogger(__name__)

_TMP = re.compile(r"^\..+\.(tmp|old)$")  # atomic.py's temp files and folders


@dataclass
class Finding:
    """One damaged or missing piece: where, what is wrong, the fix, and whether ``diagnose`` did it."""

    path: str  # relative to the run
    problem: str
    fix: str
    repaired: bool = False

    def line(self) -> str:
        return f"{'repaired' if self.repaired else 'PROBLEM '}  {self.path}: {self.problem} -> {self.fix}"


def recompute_risk(run: Run, b: int) -> None:
    """Batch ``b``'s risk table again from its routing file and outputs (same values as the analysis)."""

    cfg = analysis_config_of(run)
    span = SCOPE_SPAN[cfg.scope if cfg else "generated"]
    routing = load_batch_routing(run.path_for("routing", batch_idx=b))
    outputs = read_json(run.path_for("outputs", batch_idx=b))
    k = int(routing.meta.get("top_k") or routing[0].expert_ids.shape[-1])
    ids = {
        lab: [
            routing[s["in_batch_idx"]].select(span)[0]
            for s in outputs["samples"]
            if s["kept"] and s["label"] == lab
        ]
        for lab in ("safe", "unsafe")
    }
    table = batch_risk_table(
        b, ids["safe"], ids["unsafe"], int(routing.meta["num_experts"]), routing.moe_layers, k
    )
    write_parquet(run.path_for("risk", batch_idx=b), table)


# -- the whole run -----------------------------------------------------------------------------
def _rel(run: Run, p: Path) -> str:
    return p.relative_to(run.path).as_posix()


def _batches(run: Run, repair: bool) -> list[Finding]:
    """Every per-batch artifact; repairs: recompute risk, or remove the batch so a resume redoes it."""
    found = []
    batches = set()
    for kind in PER_BATCH:
        batches |= run.completed_batches(kind)
    for b in sorted(batches):
        problems = batch_problems(run, b)
        if not problems:
            continue
        only_risk = set(problems) == {"risk"}
        if problems.get("outputs") == "missing":  # killed mid-batch: outputs (written last) never came
            problems = {"outputs": "missing: the batch was interrupted before it finished"}
        for kind, problem in problems.items():
            fix = (
                "recomputed from the batch's routing and outputs"
                if only_risk
                else f"batch {b} removed; resume the analysis (`python -m moe_core analyze --run {run.path}`) to redo it"
            )
            found.append(Finding(_rel(run, run.path_for(kind, batch_idx=b)), problem, fix))
        if repair:
            try:
                recompute_risk(run, b) if only_risk else drop_batch(run, b)
            except Exception as e:  # noqa: BLE001 - a failed recompute falls back to redoing the batch
                log.warning("batch %d: recomputing its risk table failed (%s); removing the batch", b, e)
                drop_batch(run, b)
                for f in found[-len(problems) :]:
                    f.fix = f"batch {b} removed; resume the analysis to redo it"
            for f in found[-len(problems) :]:
                f.repaired = True
    return found


def _tables(run: Run, repair: bool, batches_changed: bool) -> list[Finding]:

    found = []
    if not run.completed_batches():
        return found
    for kind, cols in (("risk_per_batch", SEED_COLUMNS), ("risk_aggregated", AGG_SEED_COLUMNS)):
        p = run.path_for(kind)
        problem = "missing" if not p.is_file() else check_parquet(p, cols)
        if problem or batches_changed:
            found.append(
                Finding(
                    _rel(run, p),
                    problem or "out of date (batches were repaired)",
                    "recomputed from the per-batch risk tables",
                )
            )
    if found and repair:
        finalize_analysis(run)
        for f in found:
            f.repaired = True
    return found


def _files(run: Run) -> list[Finding]:
    """Plan, masks, training metadata and evaluations: named with their fix (not recomputable here)."""

    found = []
    plan = run.path_for("plan")
    if plan.is_file() and (
        problem := check_json(
            plan,
            lambda d: None if isinstance(d, dict) and "batches" in d else "not a batch plan (no batches)",
        )
    ):
        found.append(
            Finding("plan.json", problem, "restore it from a copy, or start a new run from the same prompts")
        )
    elif not plan.is_file() and run.completed_batches():
        found.append(
            Finding("plan.json", "missing while batches were analysed", "restore it, or start a new run")
        )
    for p in _own(listed(run.path / "masks")):
        try:
            is_batches = "batches" in json.loads(p.read_text(encoding="utf-8"))
            load_batch_masks(p) if is_batches else ExpertMask.load(p)
        except Exception as e:  # noqa: BLE001 - any failure to load is the finding
            found.append(
                Finding(
                    _rel(run, p),
                    str(e).splitlines()[0][:200],
                    f"delete it and run `python -m moe_core select --run {run.path} --name {p.stem}`",
                )
            )
    for p in _own([*run.path.glob("train/*/*.json"), *run.path.glob("eval/**/*.json")]):
        if problem := check_json(p):
            found.append(
                Finding(_rel(run, p), problem, "delete it and run that training or evaluation again")
            )
    for p in _own(run.path.glob("eval/**/*.parquet")):
        if problem := check_parquet(p):
            found.append(Finding(_rel(run, p), problem, "delete it and run the evaluation again"))
    try:
        trainings = run.trainings()
    except RunError:
        trainings = {}  # a path that leads outside the run: _outside_paths names it
    for name, info in trainings.items():
        merged = Path(info.get("merged") or "")
        if info.get("merged") and not (merged / "config.json").is_file():
            found.append(
                Finding(
                    f"train/{name}",
                    f"the trained model {merged} is missing",
                    f"run `python -m moe_core train --run {run.path} --name {name}` again",
                )
            )
    return found


def _own(paths: Iterable[Path]) -> list[Path]:
    """The paths that are not links (a link is named once by ``_links``, never read through)."""
    return sorted(p for p in paths if not p.is_symlink())


def _recompose_plan(run: Run) -> bool:
    """Write the plan again from the prompt files and settings the run recorded, if it comes out identical
    to the one its batches were analysed with (same fingerprint); False when that cannot be shown."""

    prov = recorded(run)
    if not prov.get("plan_source") or not prov.get("plan_fingerprint"):
        return False
    try:
        plan = compose(AnalyseSpec(**prov["plan_source"]))
    except Exception as e:  # noqa: BLE001 - the prompt files moved or changed: the finding stays, with its fix
        log.warning("run %s: cannot recompose the plan: %s", run.id, e)
        return False
    if plan_fingerprint(plan) != prov["plan_fingerprint"]:
        return False
    save_plan(run.path_for("plan"), plan)
    return True


def _commits(run: Run, repair: bool) -> list[Finding]:
    """Transactions (``store.atomic.commit_files``) a kill cut between their renames: finished on repair."""
    found = []
    for journal in sorted(run.path.rglob(".txn-*.json")):
        if journal.is_symlink() or not journal.is_file():
            continue
        found.append(
            Finding(
                _rel(run, journal.parent),
                f"a save was cut short between its renames ({journal.name}); readers already see the new files",
                "finished: the new files put in place",
                repair,
            )
        )
        if repair:
            finish_commits(journal.parent)
    return found


def _links(run: Run) -> list[Finding]:
    """Symbolic links inside the run that lead out of it: readers refuse them (paths stay inside the run)."""
    found = []
    for p in sorted(run.path.rglob("*")):
        if p.is_symlink() and not _TMP.match(p.name) and not p.resolve().is_relative_to(run.path.resolve()):
            found.append(
                Finding(
                    _rel(run, p),
                    f"a link out of the run (to {os.readlink(p)}); the run's own files must be inside it",
                    "replace the link with a copy of what it points to, or delete it",
                )
            )
    return found


def _leftovers(run: Run, repair: bool) -> list[Finding]:
    """Stale temp files, a dead writer's lease and steps a dead process left "running"."""

    found = []
    pending = {(j.parent / (j.name[: -len(".json")] + ".tmp")) for j in run.path.rglob(".txn-*.json")}
    for p in sorted(run.path.rglob(".*")):
        if _TMP.match(p.name) and p not in pending:
            found.append(Finding(_rel(run, p), "left over by an interrupted write", "deleted", repair))
            if repair:  # a link is removed itself, never what it points to
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(
                    missing_ok=True
                )
    lease = run.path / LEASE
    if lease.is_file() and holder(run.path) is None:
        found.append(Finding(LEASE, "lease of a writer that is gone", "deleted", repair))
        if repair:
            lease.unlink(missing_ok=True)
    for name, step in run.manifest.get("steps", {}).items():
        if step_status(step) == INTERRUPTED:
            found.append(
                Finding(
                    f"manifest.json steps.{name}",
                    "'running', but its process is gone",
                    "recorded as failed; run the step again (it resumes where it can)",
                    repair,
                )
            )
            if repair:
                run.set_step(name, "failed", reason="interrupted: the process ended without reporting")
    return found


def _outside_paths(run: Run) -> list[Finding]:
    """Manifest paths of the run's own artifacts (trainings' merged models) that lead outside the run."""
    found = []
    for key, step in sorted(run.manifest.get("steps", {}).items()):
        stored = step.get("merged") if isinstance(step, dict) else None
        try:
            run.resolve(stored)
        except RunError as e:
            found.append(
                Finding(
                    f"manifest.json (steps.{key}.merged)",
                    str(e).split(";")[0],
                    f"train it again in this run (`python -m moe_core train --run {run.path} --overwrite`) "
                    "or delete that step from the manifest",
                )
            )
    return found


def diagnose(run: Run, repair: bool = False) -> list[Finding]:
    """Every damaged or missing piece of ``run``; with ``repair`` the recomputable ones are fixed.

    Repairs hold the run's writer lease, so they never race a running job (``RunBusyError`` then).
    """
    if not repair:
        found = (
            _commits(run, False) + _leftovers(run, False) + _batches(run, False) + _tables(run, False, False)
        )
        return found + _files(run) + _outside_paths(run) + _links(run)
    with run.writing("doctor"):
        run._update(lambda m: None)  # rewrites a manifest the reader normalised (e.g. "steps": [])
        found = _commits(run, True) + _leftovers(run, True)
        batches = _batches(run, True)
        files = _files(run)
        for f in files:
            if f.path == "plan.json" and _recompose_plan(run):
                f.repaired, f.fix = (
                    True,
                    "written again from the run's recorded prompt files (identical fingerprint)",
                )
        found += batches + _tables(run, True, bool(batches)) + files + _outside_paths(run) + _links(run)
    return found


assert set(PER_BATCH) <= set(ARTIFACTS)
