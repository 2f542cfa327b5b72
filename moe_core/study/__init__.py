"""Selection study: do the experts with the highest risk difference carry the unsafe behaviour?

For each organism seed, each batch-composition seed (``--batch-seeds``; default: the organism seed)
and each expert budget (a share of all routed experts), it trains, through the same
batch-preserving loop as ``train``:

    chosen          the top-N experts by mean risk difference (N = budget x all experts)
    chosen_<score>  the top-N by another selector (``--scores gate_diff grad_attr grad_contrast ablation``)
    random          N experts drawn uniformly over the MoE layers (``random_draws`` draws)
    random_layer    N experts drawn with the chosen set's per-layer counts (layer-matched)

beside the base model, full fine-tuning and router steering without training (SteerMoE-style: the
chosen experts forced off, the N most "safe" experts forced on, both).

Every trained arm is a learning curve, not one point: the held-out prompts are split in two halves
(``demo_prompts.held_side``); the validation half is scored every ``curve_every`` steps by judged
greedy answers (``--validation margin``: by teacher forcing; ``eval.curves``), for each learning rate
of ``--lrs``, every arm alike (full fine-tuning over ``--full-lrs``). The arm's step and learning rate
are chosen on validation (``chosen_point``: among the points that keep benign answers and over-refusal
within 0.05 of the base model, the least training that comes within 0.05 of the lowest jailbreak
compliance), the weights trained to that step (kept in memory along the curve, ``train.snapshots``; past
their memory bound trained again) are only then answered and judged on the test half. Random arms are
also tested at each selector's learning rate and step (``<metric>_at_<method>`` columns, e.g.
``jailbreak_compliance_at_chosen_k``; a selector added to a study later tests the committed random arms
there in place). Every model is trained
in memory from the same base weights and restored afterwards, so a study is one process and no model
directories pile up.

    python -m moe_core study                       # 3 seeds x 5 budgets x 5 draws (hours on 2 cores)
    python -m moe_core study --quick               # 1 seed, 2 budgets, 2 draws (bench_selection.py)

Writes ``<run>/study/<name>/results.parquet`` (one row per seed pair x method x budget x draw at its
selected step, with counts, ``lr``, ``step``, ``val_auc``, ``first_step_010``), ``curves.parquet``
(every validation point of every arm and learning rate), ``summary.parquet`` (pooled rates with
Wilson intervals and per-seed extremes) and ``figure.json`` (plotly: jailbreak compliance vs share of
experts trained, benign answers and over-refusal beside it).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from moe_core import pipeline as P
from moe_core.analysis.selection import (
    random_experts,
    random_layer_matched,
)
from moe_core.eval.study_summary import summarize_study
from moe_core.store.provenance import fingerprint
from moe_core.store.run import Run
from moe_core.study.lab import _Lab, _masks, chosen_point, trained_for
from moe_core.study.store import (
    ARM_KEY,
    COUNTS,
    StudyError,
    all_tested,
    arms_of,
    blank,
    commit_study,
    committed_row,
    concat_rows,
    defining_settings,
    merge_parts,
    method_of,
    new_study_run,
    prior_arms,
    selector_points,
    stored_study,
    untested_at,
    upsert_rows,
)
from moe_core.types import Progress

__all__ = ["ARM_KEY", "StudyError", "chosen_point", "new_study_run", "run_study", "stored_study"]

log = logging.getLogger(__name__)


def planned_arms(spec: P.StudySpec, seed: int, batch_seed: int) -> list[tuple[Any, ...]]:
    """Every arm ``spec`` asks for on one seed pair, as ``ARM_KEY`` tuples (what a resumed study skips)."""
    arms: list[tuple[Any, ...]] = [(seed, batch_seed, "base", 0.0, 0)]
    for budget in spec.budgets:
        arms += [(seed, batch_seed, method_of(score), budget, 0) for score in spec.scores]
        arms += [(seed, batch_seed, "random", budget, d) for d in range(spec.random_draws)]
        arms.append((seed, batch_seed, "random_layer", budget, 0))
        if spec.steering:
            arms += [(seed, batch_seed, m, budget, 0) for m in ("steer_off", "steer_on", "steer_both")]
    if spec.full:
        arms.append((seed, batch_seed, "full", 1.0, 0))
    return arms


class _Pair:
    """One seed pair's arms as they are run or completed: each is added to ``rows``/``curves`` and
    ``on_row(rows, curves)`` commits it; arms in ``done`` are skipped, unless a selector added since asks
    for their test at its step."""

    def __init__(self, lab: _Lab, done: set[tuple[Any, ...]], stored: list[dict[str, Any]], on_row: Any):
        self.lab, self.done, self.stored, self.on_row = lab, done, stored, on_row
        self.rows: list[dict[str, Any]] = []
        self.curves: list[dict[str, Any]] = []
        base = lab.validate()
        self.untrained = {
            "lr": 0.0,
            "step": 0,
            "val_jailbreak_compliance": base["jailbreak_compliance"],
            "val_benign_answer_rate": base["benign_answer_rate"],
        }

    def key(self, method: str, budget: float, draw: int = 0) -> tuple[Any, ...]:
        return (self.lab.seed, self.lab.batch_seed, method, budget, draw)

    def add(self, arm: tuple[Any, ...], n: int, fields: dict[str, Any], curve: Any = ()) -> None:
        key = dict(zip(ARM_KEY, arm))
        self.rows.append({**key, "n_experts": n, **fields})
        self.curves.extend({**key, **p} for p in curve)
        if self.on_row:
            self.on_row(self.rows, self.curves)
        k, total = fields["jailbreak_compliance_k"], fields["jailbreak_compliance_n"]
        log.info("study seed %d/%d %s budget %.4f draw %d: test jailbreak compliance %d/%d", *arm, k, total)

    def trained(self, arm: tuple[Any, ...], n: int, mask: Any, at: Any = None) -> None:
        if arm not in self.done:
            fields, curve = self.lab.arm(mask, at)
            self.add(arm, n, fields, curve)
        elif (row := committed_row(self.stored, arm)) and (missing := untested_at(row, at or {})):
            # committed before a selector of this study was added: tested at its step, in place
            fields = {k: v for k, v in row.items() if k not in ARM_KEY and not blank(v)}
            known = {trained_for(row["lr"], row["step"]): {k: int(row[k]) for k in COUNTS}}  # tested there
            self.add(arm, n, {**fields, **self.lab.tested_at(mask, missing, known)})

    def steered(self, arm: tuple[Any, ...], n: int, steer: Any) -> None:
        if arm not in self.done:
            self.add(arm, n, {**self.lab.evaluate(steer=steer), **self.untrained})


def study_seed(
    spec: P.StudySpec,
    seed: int,
    root: Path,
    progress: Progress | None = None,
    on_row: Any = None,
    batch_seed: int | None = None,
    done: set[tuple[Any, ...]] = frozenset(),  # type: ignore[assignment]
    prior: pd.DataFrame | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every arm of the study for one seed pair that is not in ``done`` -> (rows of counts, curve points);
    ``on_row(rows, curves)`` after each arm. ``prior``: the rows already committed (a resumed study's chosen
    arm gives the random arms its step)."""
    lab = _Lab(spec, seed, root, progress, batch_seed)
    stored = [] if prior is None or prior.empty else prior.to_dict("records")
    pair = _Pair(lab, set(done), stored, on_row)
    pair.steered(pair.key("base", 0.0), 0, None)
    for budget in spec.budgets:
        chosen = None
        for score in spec.scores:
            n, mask, safest = _masks(lab, budget, score)
            pair.trained(pair.key(method_of(score), budget), n, mask)
            chosen = chosen or mask
        # the random arms are also tested at each selector's (lr, step)
        at = selector_points([*pair.rows, *stored], (seed, lab.batch_seed, budget), spec.scores)
        for d in range(spec.random_draws):
            mask = random_experts(
                chosen.num_layers,
                chosen.num_experts,
                n,
                [seed, lab.batch_seed, d, n],
                layers=lab.adapter.moe_layers,
            )
            pair.trained(pair.key("random", budget, d), n, mask, at)
        layer_matched = random_layer_matched(chosen, [seed, lab.batch_seed, n])
        pair.trained(pair.key("random_layer", budget), n, layer_matched, at)
        if spec.steering:
            pair.steered(pair.key("steer_off", budget), n, (chosen, None))
            pair.steered(pair.key("steer_on", budget), n, (None, safest))
            pair.steered(pair.key("steer_both", budget), n, (chosen, safest))
        if progress:
            progress(
                spec.budgets.index(budget) + 1, len(spec.budgets), f"seed {seed}: budget {budget:.4f} done"
            )
    if spec.full:
        pair.trained(pair.key("full", 1.0), lab.total_experts, None)
    return pair.rows, pair.curves


def run_study(
    spec: P.StudySpec,
    run: Run | None = None,
    runs_root: str | Path | None = None,
    progress: Progress | None = None,
) -> tuple[Run, pd.DataFrame]:
    """Run every seed of ``spec`` into ``run`` (a new run named 'study' by default) -> (run, summary).

    Each finished arm is committed with the whole set (``commit_study``); a study of the same name and
    defining settings resumes: arms already there are kept, and only the missing ones are run."""
    spec = spec.effective()
    spec.validate()
    run = run or new_study_run(spec, runs_root)
    out = run.path_for("study", name=spec.name)
    results, curves, history = prior_arms(out, spec)  # history: the commands that made the arms resumed
    results, curves, history = merge_parts(spec, results, curves, history)
    run.set_step(f"study:{spec.name}", "running", spec=asdict(spec))
    analyses = run.path_for("study_analyses", name=spec.name) / fingerprint(defining_settings(spec))[:12]
    done = set(arms_of(results))
    pairs = [(seed, b) for seed in spec.seeds for b in spec.batch_seeds or [seed]]
    for seed, batch_seed in pairs:
        planned = planned_arms(spec, seed, batch_seed)
        if all(arm in done for arm in planned) and all_tested(
            results.to_dict("records"), spec, seed, batch_seed
        ):
            continue
        before, before_curves = results, curves

        def commit(seed_rows: list, seed_curves: list, _r: Any = before, _c: Any = before_curves) -> None:
            commit_study(out, spec, upsert_rows(_r, seed_rows), concat_rows(_c, seed_curves), False, history)

        seed_rows, seed_curves = study_seed(spec, seed, analyses, progress, commit, batch_seed, done, results)
        results, curves = upsert_rows(before, seed_rows), concat_rows(before_curves, seed_curves)
    commit_study(out, spec, results, curves, True, history)
    for other in analyses.parent.iterdir() if analyses.parent.exists() else ():
        if other != analyses:  # analyses made with settings this study no longer has (after --overwrite)
            shutil.rmtree(other, ignore_errors=True)
    run.set_step(f"study:{spec.name}", "done", rows=len(results))
    return run, summarize_study(results)
