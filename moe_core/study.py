"""Selection study: do the experts with the highest risk difference carry the unsafe behaviour?

For each seed (organism training seed = batch seed = draw seed) and each expert budget (a share
of all routed experts), it trains, through the same batch-preserving loop as ``train``:

    chosen          the top-N experts by mean risk difference (N = budget x all experts)
    random          N experts drawn uniformly over the MoE layers (``random_draws`` draws)
    random_layer    N experts drawn with the chosen set's per-layer counts (layer-matched)

and evaluates each on held-out prompts, beside the base model, full fine-tuning and router
steering without training (SteerMoE-style: the chosen experts forced off, the N most "safe"
experts forced on, both). Every model is trained in memory from the same base weights and
restored afterwards, so a study is one process and no model directories pile up.

    python -m moe_core study                       # 3 seeds x 5 budgets (about an hour on 2 cores)
    python -m moe_core study --quick               # 1 seed, 2 budgets, 2 draws (bench_selection.py)

Writes ``<run>/study/<name>/results.parquet`` (one row per seed x method x budget x draw, with
counts), ``summary.parquet`` (pooled rates with Wilson intervals and per-seed extremes) and
``figure.json`` (plotly: jailbreak compliance vs share of experts trained, benign answers and
over-refusal beside it).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from moe_core import pipeline as P
from moe_core.analysis.analyse import load_batch_data_list
from moe_core.analysis.masks import ExpertMask
from moe_core.analysis.selection import (
    budget_config,
    random_experts,
    random_layer_matched,
    select_experts,
)
from moe_core.eval.charts import study_figure
from moe_core.eval.evaluation import (
    METRICS,
    default_eval_sets,
    evaluate_model,
    summarize,
)
from moe_core.eval.study_summary import summarize_study
from moe_core.model.adapter import MoEAdapter
from moe_core.model.loading import ORGANISM, load_any_model
from moe_core.model.organism import OrganismConfig, build_organism
from moe_core.store.atomic import atomic_write_json
from moe_core.store.files import read_parquet, write_parquet
from moe_core.store.manifest import default_runs_root
from moe_core.store.run import Run
from moe_core.train.sft import (
    create_batch_aware_dataset,
    create_batch_structured_dataset,
)
from moe_core.train.training import train_model
from moe_core.types import Progress

log = logging.getLogger(__name__)


# -- one seed ----------------------------------------------------------------------------------
class _Lab:
    """One seed's base model in memory, its analysis run and SFT set; trains and evaluates arms."""

    def __init__(self, spec: P.StudySpec, seed: int, root: Path, progress: Progress | None):

        self.spec, self.seed = spec, seed
        model_name = spec.model or _organism(seed, progress)
        self.model, self.tok = load_any_model(model_name)  # once: the analysis and every arm use it
        analysis = P.AnalyseSpec(
            model=model_name,
            scope=spec.scope,
            max_batches=spec.max_batches,
            seed=seed,
            name=f"seed-{seed}",
            backend=spec.backend,
            vllm_url=spec.vllm_url,
        )
        self.run = P.analyse(analysis, runs_root=root, progress=progress, loaded=(self.model, self.tok))
        self.risk = read_parquet(self.run.path_for("risk_aggregated"))
        self.adapter = MoEAdapter.for_model(self.model)
        self.snapshot = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        batches = create_batch_structured_dataset(load_batch_data_list(self.run), seed=seed)
        self.dataset = create_batch_aware_dataset(batches, self.tok)

        self.sets = default_eval_sets(
            split="heldout",
            limit=spec.eval_limit,
            templates_per_goal=spec.templates_per_goal or None,
            seed=seed,
        )

    @property
    def total_experts(self) -> int:
        return len(self.adapter.moe_layers) * self.adapter.num_experts

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(self.snapshot[n])

    def evaluate(self, steer: Any = None) -> dict[str, int]:
        """Counts per metric: ``<metric>_k`` refusals-or-complies and ``<metric>_n`` prompts."""

        self.model.eval()
        df = evaluate_model(
            self.model,
            self.tok,
            self.sets,
            max_new_tokens=self.spec.max_new_tokens,
            steer=steer,
            batch_size=32,
        )
        s = summarize(df).set_index("set")
        out: dict[str, int] = {}
        for name, (metric, inverted, _) in METRICS.items():  # inverted: the metric counts non-refusals
            n, refusals = int(s.loc[name, "n"]), int(s.loc[name, "refusals"])
            out[f"{metric}_k"], out[f"{metric}_n"] = (n - refusals if inverted else refusals), n
        return out

    def train_and_evaluate(self, mask: Any) -> dict[str, int]:
        """Train ``mask``'s experts (None: every parameter) from the base weights, evaluate, restore."""

        with tempfile.TemporaryDirectory(prefix="moe-study-") as tmp:
            train_model(
                self.model,
                self.tok,
                self.dataset,
                mask,
                output_dir=tmp,
                mask_mode="union",
                progress=_quiet,
                learning_rate=self.spec.lr,
                num_train_epochs=self.spec.epochs,
                seed=self.seed,
                save_outputs=False,
            )
        try:
            return self.evaluate()
        finally:
            self.restore()


def _quiet(done: int, total: int, message: str = "") -> None:
    """A progress sink: the study reports per arm, not per training step."""


def _organism(seed: int, progress: Progress | None) -> str:

    return str(build_organism(OrganismConfig(seed=seed), progress=progress))


def _masks(lab: _Lab, budget: float) -> tuple[int, Any, Any]:
    """(N, chosen mask, safest mask) for a budget: top-N by risk difference and by its negative."""

    agg, nl, ne = lab.risk, lab.adapter.num_layers, lab.adapter.num_experts
    config = budget_config(budget, lab.total_experts)
    n, chosen = config.n, select_experts(agg, config, nl, ne)
    # Forcing experts on can use at most top_k slots per layer: the safest N, at most top_k per layer.
    ranked = agg.sort_values(["risk_diff", "layer", "expert"])
    capped = ranked[ranked.groupby("layer").cumcount() < lab.adapter.top_k].head(n)
    safest = ExpertMask.from_experts(
        zip(capped["layer"], capped["expert"]), nl, ne, selection={"method": "safest", "n": int(len(capped))}
    )
    return n, chosen, safest


def study_seed(
    spec: P.StudySpec, seed: int, root: Path, progress: Progress | None = None, on_row: Any = None
) -> list[dict[str, Any]]:
    """Every arm of the study for one seed -> rows of counts (``on_row(rows)`` after each arm)."""

    lab = _Lab(spec, seed, root, progress)
    rows: list[dict[str, Any]] = []

    def add(method: str, budget: float, n: int, draw: int, counts: dict[str, int]) -> None:
        rows.append(
            {"seed": seed, "method": method, "budget": budget, "n_experts": n, "draw": draw, **counts}
        )
        if on_row:
            on_row(rows)
        log.info(
            "study seed %d %s budget %.4f draw %d: jailbreak compliance %d/%d",
            seed,
            method,
            budget,
            draw,
            counts["jailbreak_compliance_k"],
            counts["jailbreak_compliance_n"],
        )

    add("base", 0.0, 0, 0, lab.evaluate())
    for budget in spec.budgets:
        n, chosen, safest = _masks(lab, budget)
        add("chosen", budget, n, 0, lab.train_and_evaluate(chosen))
        for d in range(spec.random_draws):
            mask = random_experts(
                chosen.num_layers, chosen.num_experts, n, [seed, d, n], layers=lab.adapter.moe_layers
            )
            add("random", budget, n, d, lab.train_and_evaluate(mask))
        add("random_layer", budget, n, 0, lab.train_and_evaluate(random_layer_matched(chosen, [seed, n])))
        if spec.steering:
            add("steer_off", budget, n, 0, lab.evaluate(steer=(chosen, None)))
            add("steer_on", budget, n, 0, lab.evaluate(steer=(None, safest)))
            add("steer_both", budget, n, 0, lab.evaluate(steer=(chosen, safest)))
        if progress:
            progress(
                spec.budgets.index(budget) + 1, len(spec.budgets), f"seed {seed}: budget {budget:.4f} done"
            )
    if spec.full:
        add("full", 1.0, lab.total_experts, 0, lab.train_and_evaluate(None))
    return rows


def run_study(
    spec: P.StudySpec,
    run: Run | None = None,
    runs_root: str | Path | None = None,
    progress: Progress | None = None,
) -> tuple[Run, pd.DataFrame]:
    """Run every seed of ``spec`` into ``run`` (a new run named 'study' by default) -> (run, summary)."""
    spec = spec.effective()
    spec.validate()
    run = run or new_study_run(spec, runs_root)
    out = run.path_for("study", name=spec.name)
    run.set_step(f"study:{spec.name}", "running", spec=asdict(spec))
    rows: list[dict[str, Any]] = []
    for seed in spec.seeds:
        done = list(rows)  # partial results (every arm so far) survive a kill
        rows += study_seed(
            spec,
            seed,
            out / "runs",
            progress,
            on_row=lambda seed_rows, _done=done: write_parquet(
                out / "results.parquet", pd.DataFrame(_done + seed_rows)
            ),
        )
    results = pd.DataFrame(rows)
    summary = summarize_study(results)
    write_parquet(out / "summary.parquet", summary)

    atomic_write_json(out / "figure.json", json.loads(study_figure(summary).to_json()))
    run.set_step(f"study:{spec.name}", "done", rows=len(rows))
    return run, summary


def new_study_run(spec: P.StudySpec, runs_root: str | Path | None = None) -> Run:
    """A fresh run named 'study' to hold a study of ``spec``."""
    return Run.create(Path(runs_root or default_runs_root()), name="study", model=spec.model or ORGANISM)
