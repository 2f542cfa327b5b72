"""The selection study's tables: the summary across seeds with intervals, loading a stored study, its headline.

Why apart from moe_core.study (which runs the study through the pipeline's steps): the report,
the pages and the demo read a study's tables without pulling in the steps that made them."""

from __future__ import annotations

from typing import Any

import pandas as pd

from moe_core.eval.evaluation import METRICS, wilson_interval
from moe_core.store.files import read_parquet
from moe_core.store.run import Run

STUDY_NAME = "selection"  # the study's default name in a run (``study --name``)


# -- the whole study ---------------------------------------------------------------------------
def summarize_study(results: pd.DataFrame) -> pd.DataFrame:
    """Pooled rates per (method, budget) with Wilson intervals, plus the worst and best seed."""

    out = []
    for (method, budget), g in results.groupby(["method", "budget"], sort=False):
        row: dict[str, Any] = {
            "method": method,
            "budget": budget,
            "n_experts": int(g["n_experts"].iloc[0]),
            "runs": len(g),
        }
        for metric, _, _ in METRICS.values():
            k, n = g[f"{metric}_k"].sum(), g[f"{metric}_n"].sum()
            lo, hi = wilson_interval(k, n)
            per_seed = g.groupby("seed")[f"{metric}_k"].sum() / g.groupby("seed")[f"{metric}_n"].sum()
            row.update(
                {
                    metric: k / n,
                    f"{metric}_ci_low": float(lo),
                    f"{metric}_ci_high": float(hi),
                    f"{metric}_seed_min": float(per_seed.min()),
                    f"{metric}_seed_max": float(per_seed.max()),
                }
            )
        out.append(row)
    return pd.DataFrame(out)


def load_study(run: Run, name: str = STUDY_NAME) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(results, summary) of a finished study in ``run``, or None."""

    out = run.path_for("study", name=name)
    if not (out / "summary.parquet").exists():
        return None
    return read_parquet(out / "results.parquet"), read_parquet(out / "summary.parquet")


def load_curves(run: Run, name: str = STUDY_NAME) -> pd.DataFrame | None:
    """The validation learning curves of a study in ``run`` (every arm, learning rate and step), or None."""
    path = run.path_for("study", name=name) / "curves.parquet"
    return read_parquet(path) if path.exists() else None


def headline(summary: pd.DataFrame, budget: float) -> str:
    """One line per arm at ``budget``: compliance [CI], benign answers, over-refusal."""
    lines = []
    for _, r in summary[(summary["budget"] == budget) | summary["method"].isin(["base", "full"])].iterrows():
        lines.append(
            f"{r['method']:>13} {r['n_experts']:>4} experts: jailbreak compliance {r['jailbreak_compliance']:.2f} "
            f"[{r['jailbreak_compliance_ci_low']:.2f}, {r['jailbreak_compliance_ci_high']:.2f}], "
            f"benign answered {r['benign_answer_rate']:.2f}, over-refusal {r['over_refusal']:.2f}"
        )
    return "\n".join(lines)


def summary_markdown(summary: pd.DataFrame) -> str:
    """The study table (budgets x methods) with intervals, as in the README."""
    head = "| method | budget | experts | jailbreak compliance [95% CI] (seed min-max) | benign answered | over-refusal |"
    lines = [head, "|---|---:|---:|---|---:|---:|"]
    for _, r in summary.sort_values(["budget", "method"]).iterrows():
        lines.append(
            f"| {r['method']} | {r['budget']:.4f} | {r['n_experts']} | {r['jailbreak_compliance']:.2f} "
            f"[{r['jailbreak_compliance_ci_low']:.2f}, {r['jailbreak_compliance_ci_high']:.2f}] "
            f"({r['jailbreak_compliance_seed_min']:.2f}-{r['jailbreak_compliance_seed_max']:.2f}) "
            f"| {r['benign_answer_rate']:.2f} | {r['over_refusal']:.2f} |"
        )
    return "\n".join(lines)
