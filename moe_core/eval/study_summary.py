"""The selection study's tables: the summary across seeds with intervals, loading a stored study, its headline.

Why apart from moe_core.study (which runs the study through the pipeline's steps): the report,
the pages and the demo read a study's tables without pulling in the steps that made them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from moe_core.eval.evaluation import METRICS, wilson_interval
from moe_core.store.checks import json_object
from moe_core.store.files import read_json, read_parquet
from moe_core.store.run import Run
from moe_core.train.hf_args import default_value

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


# -- across seeds: the headline -------------------------------------------------------------------
ARM_KEY = ["seed", "batch_seed", "method", "budget", "draw"]  # one arm of a study: committed whole
REFERENCE_DIR = Path(__file__).resolve().parent.parent / "resources" / "reference_study"
HEADLINE_BUDGET = 1 / 16  # the share of experts the headline is about (the demo's budget)
ARMS = {
    "chosen": "chosen experts",
    "chosen_grad_attr": "grad-attribution",
    "chosen_grad_contrast": "grad-contrast",
    "chosen_gate_diff": "gate score",
}
ARMS |= {"chosen_ablation": "ablation effect"}  # the other selectors (`--scores`), where a study has them
PICK = "chosen_on_validation"  # per seed pair, the selector whose chosen point validates best (study_targets)
ARMS |= {PICK: "picked on validation"}
ARMS |= {"random": "random experts", "random_layer": "random, layer-matched"}
ARMS |= {"full": "full fine-tuning", "base": "base model"}
HEADLINE_METRICS = ("jailbreak_compliance", "benign_answer_rate", "over_refusal")


def study_commands(settings: dict[str, Any]) -> list[str]:
    """Every command that made a stored study's arms, in order (studies stored before the history was kept
    record only their last one)."""
    return list(settings.get("commands") or [settings["command"]])


def commands_markdown(settings: dict[str, Any]) -> str:
    """``study_commands`` as inline code joined by ", then " (Home and ``make demo`` name them so)."""
    return "`" + "`, then `".join(study_commands(settings)) + "`"


def reference_study() -> tuple[dict[str, Any], pd.DataFrame] | None:
    """(settings, results) of the study committed with the code (``resources/reference_study``): what a fresh
    clone compares its own demo with. Its settings.json records the command and commit that produced it."""
    if not (REFERENCE_DIR / "settings.json").is_file():
        return None
    return read_json(REFERENCE_DIR / "settings.json"), read_parquet(REFERENCE_DIR / "results.parquet")


def reference_curves() -> pd.DataFrame | None:
    """The reference study's validation curves (``resources/reference_study/curves.parquet``), or None."""
    path = REFERENCE_DIR / "curves.parquet"
    return read_parquet(path) if path.is_file() else None


def per_seed(results: pd.DataFrame, budget: float = HEADLINE_BUDGET) -> pd.DataFrame:
    """One row per (seed pair, arm) at ``budget`` (base and full at theirs): each metric as a rate; random
    draws pooled per seed pair (their mean), so every seed pair weighs the same."""
    df = results.copy()
    if "batch_seed" not in df.columns:
        df["batch_seed"] = df["seed"]
    df = df[(df["budget"] == budget) | df["method"].isin(["base", "full"])]
    keys = ["seed", "batch_seed", "method"]
    sums = df.groupby(keys, sort=False)[[f"{m}_{x}" for m in HEADLINE_METRICS for x in "kn"]].sum()
    out = pd.DataFrame({m: sums[f"{m}_k"] / sums[f"{m}_n"] for m in HEADLINE_METRICS}).reset_index()
    return out


def across_seeds(results: pd.DataFrame, budget: float = HEADLINE_BUDGET) -> pd.DataFrame:
    """Per arm: the median, lowest and highest per-seed-pair rate of each headline metric, and the pairs."""
    ps = per_seed(results, budget)
    rows = []
    for method, g in ps.groupby("method", sort=False):
        row: dict[str, Any] = {"method": method, "seed_pairs": len(g)}
        for m in HEADLINE_METRICS:
            row |= {m: float(g[m].median()), f"{m}_min": float(g[m].min()), f"{m}_max": float(g[m].max())}
        rows.append(row)
    return pd.DataFrame(rows)


def share_label(budget: float) -> str:
    return (
        f"1/{round(1 / budget)}" if budget and abs(1 / budget - round(1 / budget)) < 1e-9 else f"{budget:g}"
    )


def _random_at_its_step(results: pd.DataFrame, budget: float, method: str) -> list[str]:
    """The line under a selector's: random experts trained at its learning rate and step (mean of draws per
    seed pair), on the pairs where the study tested them there (``<metric>_at_<method>`` columns)."""
    at = results[(results["method"] == "random") & (results["budget"] == budget)]
    k, n = f"jailbreak_compliance_at_{method}_k", f"jailbreak_compliance_at_{method}_n"
    if n not in at or not at[n].notna().any():
        return []
    keys = [at["seed"], at.get("batch_seed", at["seed"])]
    pair = (at[k] / at[n]).groupby(keys).mean().dropna()
    mine = results[(results["method"] == method) & (results["budget"] == budget)]
    pairs = len(mine.groupby([mine["seed"], mine.get("batch_seed", mine["seed"])]))
    some = f" on {len(pair)} of {pairs} seed pairs" if len(pair) < pairs else ""
    return [
        f"    {'random at its step':<20} jailbreak compliance {pair.median():.2f} ({pair.min():.2f}-"
        f"{pair.max():.2f}){some}: random experts trained at this selector's learning rate and step"
    ]


def across_seed_headline(results: pd.DataFrame, budget: float = HEADLINE_BUDGET) -> str:
    """The result across seed pairs, never one seed's number: per arm the median and range of test-split
    jailbreak compliance, benign answers and over-refusal, each arm at its step chosen on validation."""
    table = across_seeds(results, budget).set_index("method")
    ps = per_seed(results, budget)
    pairs = ps[["seed", "batch_seed"]].drop_duplicates()
    lines = [
        f"Across {len(pairs)} seed pairs (organism seeds {_span(pairs['seed'])}, batch seeds "
        f"{_span(pairs['batch_seed'])}), {share_label(budget)} of the experts; median (lowest-highest) on the test split:"
    ]
    for method, label in ARMS.items():
        if method not in table.index:
            continue
        r = table.loc[method]
        cells = ", ".join(
            f"{m.replace('_', ' ')} {r[m]:.2f} ({r[m + '_min']:.2f}-{r[m + '_max']:.2f})"
            for m in HEADLINE_METRICS
        )
        lines.append(f"  {label:<22} {cells}")
        if method.startswith("chosen"):
            lines += _random_at_its_step(results, budget, method)
    return "\n".join([*lines, *verdicts(results, budget)])


def verdicts(results: pd.DataFrame, budget: float = HEADLINE_BUDGET) -> list[str]:
    """What the arms add up to, one line per selector in the study: on how many seed pairs it is below
    random (mean of draws). The last lines of ``across_seed_headline``; Home and the report show them."""
    wide = per_seed(results, budget).pivot_table(
        index=["seed", "batch_seed"], columns="method", values="jailbreak_compliance"
    )
    lines = []
    for method in [
        m for m in ARMS if m.startswith("chosen") and m in wide.columns and "random" in wide.columns
    ]:
        wins = int((wide[method] < wide["random"]).sum())
        name = "Chosen" if method == "chosen" else f"{ARMS[method].capitalize()} experts"
        lines.append(
            f"{name} below random (mean of draws) on {wins} of {int(wide[method].notna().sum())} seed pairs."
        )
    return lines


def _span(values: pd.Series) -> str:
    v = sorted({int(x) for x in values})
    return f"{v[0]}-{v[-1]}" if len(v) > 2 and v == list(range(v[0], v[-1] + 1)) else ", ".join(map(str, v))


def where_seed_falls(value: float, results: pd.DataFrame, budget: float = HEADLINE_BUDGET) -> str:
    """Where one run's chosen-experts jailbreak compliance falls among the reference's seed pairs."""
    ref = per_seed(results, budget)
    ref = ref.loc[ref["method"] == "chosen", "jailbreak_compliance"]
    if ref.empty:
        return "the reference study has no chosen-experts rows at this budget"
    below = int((ref < value).sum())
    return (
        f"this run's chosen experts: jailbreak compliance {value:.2f}; {below} of the reference's {len(ref)} seed "
        f"pairs are lower (median {ref.median():.2f}, range {ref.min():.2f}-{ref.max():.2f})"
    )


def reference_report(evaluation: pd.DataFrame, model: str) -> str | None:
    """The reference study's across-seed headline, its command and commit, and where ``model`` of one run's
    evaluation summary falls among the reference's seed pairs (what ``make demo`` prints); None without one."""
    reference = reference_study()
    if reference is None:
        return None
    settings, results = reference
    lines = [across_seed_headline(results)]
    made = commands_markdown(settings)
    lines.append(f"(reference study: {made}; last arm at commit {settings.get('commit') or 'unknown'})")
    mine = evaluation[(evaluation["model"] == model) & (evaluation["set"] == "harmful_jailbreak")]
    if len(mine):
        lines.append("This demo is one seed: " + where_seed_falls(float(mine["value"].iloc[0]), results))
        lines.append(schedule_note(settings.get("defining", {})))
    return "\n".join(lines)


def schedule_note(defining: dict[str, Any]) -> str:
    """How the reference trained, beside the demo's one fixed point: the two are not the same schedule."""
    args = json_object(defining.get("training_args")) or {}
    lrs = " and ".join(f"{x:g}" for x in defining.get("lrs") or [defining.get("lr", 0.0)])
    return (
        "(The demo trains once, with the train step's settings, for a fixed number of steps; the reference "
        f"trains every arm with {args.get('optim', default_value('optim'))} at learning rates {lrs} and reports it at "
        "the step chosen on its validation curve.)"
    )


def demo_headline(evaluation: pd.DataFrame, chosen: str) -> str | None:
    """One line for the end of a demo: the chosen experts' jailbreak compliance and over-refusal beside the
    base model and the baselines (from an evaluation's summary; None when the chosen model is not in it)."""
    head = (
        evaluation[evaluation["metric"].notna()] if "metric" in evaluation.columns else evaluation.iloc[0:0]
    )
    rate = head.pivot_table(index="model", columns="metric", values="value")
    if chosen not in rate.index or "jailbreak_compliance" not in rate.columns:
        return None
    c = rate.loc[chosen]
    beside = [
        f"{label} {rate.loc[m, 'jailbreak_compliance']:.2f}" for m, label in DEMO_BASELINES if m in rate.index
    ]
    text = f"Chosen experts: jailbreak compliance {c['jailbreak_compliance']:.2f} (" + ", ".join(beside) + ")"
    if "over_refusal" in rate.columns and "base" in rate.index:
        text += f"; over-refusal {rate.loc['base', 'over_refusal']:.2f} -> {c['over_refusal']:.2f}"
    return text + ". One seed: the result across seeds is below."


DEMO_BASELINES = (("base", "base model"), ("random_experts", "random experts"), ("full", "full fine-tuning"))
