"""One seed pair of a selection study in memory: its base model, analysis run, SFT set and scorers; it
trains each arm along its validation curve from the same base weights and tests it at the chosen point."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moe_core import pipeline as P
from moe_core.analysis.analyse import load_batch_data_list
from moe_core.analysis.masks import ExpertMask
from moe_core.analysis.scores import with_score
from moe_core.analysis.selection import (
    budget_config,
    select_experts,
)
from moe_core.batching.demo_prompts import jailbreak_templates
from moe_core.eval.curves import (
    COMPLIANCE_OPENINGS,
    REFUSAL_OPENINGS,
    CurveCallback,
    JudgedScorer,
    RefusalMarginScorer,
    area_under,
    chosen_point,
    first_step_at_most,
    organism_openings,
)
from moe_core.eval.evaluation import (
    METRICS,
    default_eval_sets,
    evaluate_model,
    summarize,
)
from moe_core.judge.judges import DEFAULT_JUDGE, make_judge
from moe_core.model.adapter import MoEAdapter
from moe_core.model.loading import load_any_model
from moe_core.model.organism import build_organism
from moe_core.store.checks import json_object
from moe_core.store.files import read_json, read_parquet
from moe_core.study.store import organism_config
from moe_core.train.sft import (
    add_retain_examples,
    create_batch_aware_dataset,
    create_batch_structured_dataset,
)
from moe_core.train.snapshots import StepSnapshots, load_trainable_state
from moe_core.train.step import retain_examples
from moe_core.train.training import train_model
from moe_core.types import Progress


# -- one seed ----------------------------------------------------------------------------------
class _Lab:
    """One seed pair's base model in memory, its analysis run and SFT set; trains and evaluates arms."""

    def __init__(
        self,
        spec: P.StudySpec,
        seed: int,
        root: Path,
        progress: Progress | None,
        batch_seed: int | None = None,
    ):
        self.spec, self.seed = spec, seed
        self.batch_seed = seed if batch_seed is None else batch_seed
        model_name = spec.model or str(build_organism(organism_config(spec, seed), progress=progress))
        self.model, self.tok = load_any_model(model_name)  # once: the analysis and every arm use it
        analysis = P.AnalyseSpec(
            model=model_name,
            scope=spec.scope,
            max_batches=spec.max_batches,
            seed=self.batch_seed,
            composed_share=spec.composed_share,
            name=f"seed-{seed}" if self.batch_seed == seed else f"seed-{seed}-batches-{self.batch_seed}",
            backend=spec.backend,
            vllm_url=spec.vllm_url,
        )
        self.run = P.analyse(  # a resumed study reuses its seed pair's analysis
            analysis, _named_run(root, analysis.name), root, progress=progress, loaded=(self.model, self.tok)
        )
        self.risk = read_parquet(self.run.path_for("risk_aggregated"))
        self.adapter = MoEAdapter.for_model(self.model)
        self.snapshot = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        batches = create_batch_structured_dataset(load_batch_data_list(self.run), seed=self.batch_seed)
        if spec.retain_share:  # the same retain examples as `train --retain-share` (the base model's answers)
            retain = retain_examples(self.model, self.tok)
            batches = add_retain_examples(batches, retain, spec.retain_share, seed=self.batch_seed)
        self.dataset = create_batch_aware_dataset(batches, self.tok)
        self.sets = default_eval_sets(  # reported: the test half, never used to choose anything
            split="test", limit=spec.eval_limit, templates_per_goal=spec.templates_per_goal or None, seed=seed
        )
        # Validation mirrors the test: its own goals, its half's held-out wrappers and the train ones. The
        # held-out wrappers alone are a curve of their own ("new_wrappers"), scored, never used to choose.
        val = default_eval_sets(
            split="validation",
            limit=spec.eval_limit,
            templates_per_goal=spec.templates_per_goal or None,
            seed=seed,
        )
        new = {t.id for t in jailbreak_templates("validation")}
        every = default_eval_sets(split="validation", seed=seed)["harmful_jailbreak"]
        val_sets = {
            "jailbreak": val["harmful_jailbreak"],
            "benign": val["benign"],
            "borderline": val["borderline"],
            "new_wrappers": [it for it in every if it.meta["template"] in new][: spec.eval_limit],
        }
        if spec.validation == "judged":
            self.scorer: Any = JudgedScorer(
                self.tok, val_sets, make_judge(DEFAULT_JUDGE), spec.max_new_tokens
            )
        else:
            openings = organism_openings() if spec.model is None else (REFUSAL_OPENINGS, COMPLIANCE_OPENINGS)
            self.scorer = RefusalMarginScorer(self.tok, val_sets, *openings)

    @property
    def total_experts(self) -> int:
        return len(self.adapter.moe_layers) * self.adapter.num_experts

    def restore(self) -> None:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(self.snapshot[n])

    def validate(self) -> dict[str, float]:
        """The validation point of the model as it is now (judged answers, or margins: ``spec.validation``)."""
        return _point(self.scorer(self.model))

    def evaluate(self, steer: Any = None) -> dict[str, int]:
        """Counts per metric on the test half: ``<metric>_k`` refusals-or-complies and ``<metric>_n`` prompts."""
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

    def train(
        self, mask: Any, lr: float, callbacks: Sequence[Any] = (), max_steps: int | None = None
    ) -> None:
        """Train ``mask``'s experts (None: every parameter) from the base weights, in memory, with the study's
        further TrainingArguments (``training_args``: e.g. the optimizer)."""
        extra = json_object(self.spec.training_args) or {}
        if max_steps:
            extra["max_steps"] = max_steps
        with tempfile.TemporaryDirectory(prefix="moe-study-") as tmp:
            train_model(
                self.model,
                self.tok,
                self.dataset,
                mask,
                output_dir=tmp,
                mask_mode="union",
                progress=_quiet,
                learning_rate=lr,
                num_train_epochs=self.spec.epochs,
                seed=self.seed,
                save_outputs=False,
                callbacks=callbacks,
                **extra,
            )

    def arm(
        self, mask: Any, at: Mapping[str, tuple[float, int]] | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One arm: a validation curve per learning rate, the step chosen on it, the test counts there.
        ``mask`` None is full fine-tuning, searched over ``full_lrs`` (every parameter moves, so the experts'
        rates are far too high for it). ``at``: other arms' (lr, step) by method, where this arm is also
        tested (``tested_at``): random experts trained exactly as long as each selector's experts.

        -> (row fields: counts + lr, step, val_auc, first_step_010, val_jailbreak_compliance,
        val_benign_answer_rate; curve points)."""
        curves: list[dict[str, Any]] = []
        kept: dict[tuple[float, int], Any] = {}  # this arm's trained states by (lr, step)
        for lr in self.spec.full_lrs if mask is None else self.spec.lrs:
            points, states = self._curve(mask, lr)
            curves, kept = curves + points, kept | states
        choice = chosen_point(curves)  # every curve starts at the same untrained point
        own = trained_for(choice["lr"], choice["step"])
        counts = self._tested(mask, *own, kept)
        tested = self.tested_at(mask, at or {}, {own: counts}, kept)
        points = [p for p in curves if p["lr"] == choice["lr"]]
        return {
            **counts,
            **tested,
            "lr": choice["lr"],
            "step": int(choice["step"]),
            "val_jailbreak_compliance": choice["jailbreak_compliance"],
            "val_benign_answer_rate": choice["benign_answer_rate"],
            "val_auc": area_under(points, "jailbreak_compliance"),
            "first_step_010": _step_or_nan(first_step_at_most(points, "jailbreak_compliance", 0.10)),
        }, curves

    def _curve(self, mask: Any, lr: float) -> tuple[list[dict[str, Any]], dict[tuple[float, int], Any]]:
        """One learning rate's validation curve -> (its points, the trained states at them by (lr, step))."""
        keep = StepSnapshots()
        curve = CurveCallback(self.scorer, every=self.spec.curve_every, keep=keep)
        try:
            self.train(mask, lr, [curve])
        finally:
            self.restore()
        states = {trained_for(lr, step): state for step, state in keep.states.items()}
        return [{"lr": lr, **_point(p)} for p in curve.points], states

    def tested_at(
        self,
        mask: Any,
        at: Mapping[str, tuple[float, int]],
        known: dict[tuple[float, int], dict[str, int]] | None = None,
        kept: Mapping[tuple[float, int], Any] | None = None,
    ) -> dict[str, int]:
        """Test counts of ``mask`` trained at each method's (lr, step): ``<metric>_at_<method>_k/_n``.
        ``known``: counts already tested at some (lr, step) (training is deterministic: not redone);
        ``kept``: trained states of ``mask``'s curves by (lr, step) (``_tested``)."""
        known = dict(known or {})
        out: dict[str, int] = {}
        for method, (lr, step) in at.items():
            point = trained_for(lr, step)
            if point not in known:
                known[point] = self._tested(mask, *point, kept)
            out |= {f"{k[:-2]}_at_{method}{k[-2:]}": v for k, v in known[point].items()}
        return out

    def _tested(
        self, mask: Any, lr: float, step: int, kept: Mapping[tuple[float, int], Any] | None = None
    ) -> dict[str, int]:
        """Test counts after ``step`` steps at ``lr`` from the base weights (step 0: the base model's): the
        state ``kept`` on the arm's curve there (the model validated), else trained again to that step."""
        try:
            if (state := (kept or {}).get(trained_for(lr, step))) is not None:
                load_trainable_state(self.model, state)
            elif step > 0:
                self.train(mask, lr, max_steps=step)
            return self.evaluate()
        finally:
            self.restore()

    def train_and_evaluate(self, mask: Any) -> dict[str, Any]:
        """An arm's row fields (``arm`` without its curve)."""
        return self.arm(mask)[0]


def _step_or_nan(step: int | None) -> float:
    """NaN for "never on this curve": the column stays float whichever steps the arms reached."""
    return float("nan") if step is None else float(step)


def _point(shares: dict[str, float]) -> dict[str, float]:
    """Scorer shares -> the study's metrics (over-refusal is the share of borderline prompts not answered)."""
    out = {k: v for k, v in shares.items() if k not in ("jailbreak", "benign", "borderline")}
    if "new_wrappers" in out:
        out["new_wrapper_compliance"] = out.pop("new_wrappers")
    return {
        **out,
        "jailbreak_compliance": shares["jailbreak"],
        "benign_answer_rate": shares["benign"],
        "over_refusal": 1.0 - shares["borderline"],
    }


def _quiet(done: int, total: int, message: str = "") -> None:
    """A progress sink: the study reports per arm, not per training step."""


def _named_run(root: Path, name: str) -> Path | None:
    """The analysis run called ``name`` under ``root`` (the newest), or None."""
    found = sorted(p for p in root.glob("*/manifest.json") if read_json(p).get("name") == name)
    return found[-1].parent if found else None


def _masks(lab: _Lab, budget: float, score: str = "risk_diff") -> tuple[int, Any, Any]:
    """(N, chosen mask, safest mask) for a budget: top-N by ``score`` and the N lowest risk differences."""
    agg, nl, ne = lab.risk, lab.adapter.num_layers, lab.adapter.num_experts
    config = budget_config(budget, lab.total_experts, score=score)
    if score != "risk_diff":
        with lab.run.writing("study"):  # the score table is kept in the seed's run (its risk/ folder)
            agg = with_score(agg, P.score_table(lab.run, score))
    n, chosen = config.n, select_experts(agg, config, nl, ne)
    # Forcing experts on can use at most top_k slots per layer: the safest N, at most top_k per layer.
    ranked = lab.risk.sort_values(["risk_diff", "layer", "expert"])
    capped = ranked[ranked.groupby("layer").cumcount() < lab.adapter.top_k].head(n)
    safest = ExpertMask.from_experts(
        zip(capped["layer"], capped["expert"]), nl, ne, selection={"method": "safest", "n": int(len(capped))}
    )
    return n, chosen, safest


def trained_for(lr: float, step: int) -> tuple[float, int]:
    """(lr, step) as a key of what a model was trained for: step 0 is the base model at any lr."""
    return (float(lr), int(step)) if int(step) else (0.0, 0)
