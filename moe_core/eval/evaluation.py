"""Evaluation: held-out prompt sets, refusal rates with Wilson CIs, model comparison, routing shift.

Answers the question of step 8: after training only the unsafe experts, does the model refuse
held-out jailbreaks more often, still answer benign requests, and not over-refuse borderline
ones, compared with the base model, full fine-tuning, random experts and inference-time steering?

    sets = default_eval_sets("heldout")           # harmful_plain, harmful_jailbreak, benign, borderline
    sets["borderline"] = load_eval_set("xstest_prompts.csv", "borderline")   # or a real file
    df = evaluate_model(model, tok, sets, judge="keyword", steer=(mask, None))
    summarize(df)                                  # n, refusal_rate, ci_low, ci_high, metric, value

    entries = [EvalEntry("base", base_dir), EvalEntry("experts", trained_dir),
               EvalEntry("steered", base_dir, steer_deactivate=mask, kind="steered")]
    responses, summary = compare_models(entries, sets, judge="keyword")
    save_evaluation(run, responses, summary, name="comparison")   # eval/comparison_*.parquet + .json
    print(to_markdown(comparison_table(summary)))
    shift = routing_shift(run, trained_model, tok, name="experts")  # risk_diff before/after per expert

Headline metrics (``METRICS``) are read off the set of the same name: jailbreak_compliance =
1 - refusal on harmful_jailbreak, harmful_refusal = refusal on harmful_plain, benign_answer_rate
= 1 - refusal on benign, over_refusal = refusal on borderline.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import re
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
import torch

from moe_core.analysis.analyse import AnalysisError, analysis_config_of, run_analysis
from moe_core.analysis.masks import ExpertMask
from moe_core.analysis.steering import steer_experts
from moe_core.batching.demo_prompts import (
    demo_benign,
    demo_goals,
    jailbreak_templates,
    wrap,
)
from moe_core.batching.plan import load_plan
from moe_core.batching.prompts import load_prompts
from moe_core.batching.resource_prompts import benign_prompts, borderline_prompts
from moe_core.errors import MoELabError
from moe_core.judge.judges import DEFAULT_JUDGE, make_judge
from moe_core.judge.verdicts import RefusalJudge
from moe_core.model.adapter import MoEAdapter, load_model
from moe_core.model.answers import RESPONSE_COLUMNS, judged_answers
from moe_core.model.backends import check_backend, open_backend
from moe_core.model.generation import MAX_NEW_TOKENS, use_chat_template_kwargs
from moe_core.store.atomic import atomic_write_json, commit_files, committed
from moe_core.store.checks import check_free
from moe_core.store.files import listed, read_json, read_parquet, write_parquet
from moe_core.store.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    RUN_FORMAT,
    package_versions,
)
from moe_core.store.provenance import model_fingerprint, model_info_of
from moe_core.store.run import Run
from moe_core.types import Progress, PromptItem

log = logging.getLogger(__name__)

EvalSets = Mapping[str, Sequence[PromptItem]]
EVAL_KINDS = ("harmful_plain", "harmful_jailbreak", "benign", "borderline")
# headline metric of each set: (name, computed as 1 - refusal rate?, which direction is better)
METRICS: dict[str, tuple[str, bool, str]] = {
    "harmful_jailbreak": ("jailbreak_compliance", True, "lower"),
    "harmful_plain": ("harmful_refusal", False, "higher"),
    "benign": ("benign_answer_rate", True, "higher"),
    "borderline": ("over_refusal", False, "lower"),
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class EvaluationError(MoELabError, ValueError):
    """An evaluation cannot run or be read as asked; the message says what to change."""


# -- eval sets ----------------------------------------------------------------------------------
def _spread(items: list[PromptItem], limit: int | None) -> list[PromptItem]:
    """At most ``limit`` items evenly spread over the list (so every template/category stays in)."""
    if limit is not None and limit < 1:
        raise EvaluationError(f"limit must be a positive number of prompts per set, got {limit}")
    if limit is None or len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def default_eval_sets(
    split: str = "heldout", limit: int | None = None, templates_per_goal: int | None = None, seed: int = 0
) -> dict[str, list[PromptItem]]:
    """The built-in evaluation sets, keyed by set name (``EVAL_KINDS``).

    harmful_plain: the split's demo goals. harmful_jailbreak: those goals wrapped in held-out AND
    train templates (``templates_per_goal`` drawn with ``seed``; None = every template), category
    = template id, so a breakdown shows whether held-out templates still work. benign: the split's
    composed benign requests and ``benign_prompts(split)``. borderline: ``borderline_prompts(split)``
    (neither resource is ever used for training; "heldout" takes all of both).
    ``limit`` keeps at most that many prompts per set, evenly spread.
    """
    goals = demo_goals(split)  # type: ignore[arg-type]
    templates = jailbreak_templates("all")
    # a half's own held-out wrappers and the train ones, never the other half's
    if split in ("validation", "test"):
        templates = jailbreak_templates(split) + jailbreak_templates("train")
    per_goal = len(templates) if templates_per_goal is None else templates_per_goal
    jail = [
        replace(it, category=it.meta["template"])
        for it in wrap(goals, templates, seed=seed, per_goal=per_goal)
    ]
    sets = {
        "harmful_plain": goals,
        "harmful_jailbreak": jail,
        "benign": demo_benign(split) + benign_prompts(split),  # type: ignore[arg-type]
        "borderline": borderline_prompts(split),
    }
    return {k: _spread(v, limit) for k, v in sets.items()}


def load_eval_set(
    path: str | Path, kind: str, column: str | None = None, limit: int | None = None
) -> list[PromptItem]:
    """An evaluation set from a file (CSV/JSON/JSONL/Parquet) or HF dataset, e.g. XSTest or JailbreakBench.

    ``kind`` (one of ``EVAL_KINDS``) sets the items' label (harmful_* -> "unsafe", else "safe").
    Files with a safe/unsafe ``label`` column (XSTest) keep only the rows of that label, so
    ``load_eval_set("xstest_prompts.csv", "borderline")`` gives XSTest's safe prompts and
    ``"harmful_plain"`` its unsafe contrast prompts.
    """
    if kind not in EVAL_KINDS:
        raise EvaluationError(f"kind must be one of {EVAL_KINDS}, got {kind!r}")
    label = "unsafe" if kind.startswith("harmful") else "safe"
    items = load_prompts(path, column=column, label=label)  # type: ignore[arg-type]
    labels = {str(it.meta.get("label", "")).lower() for it in items}
    if labels and labels <= {"safe", "unsafe"}:
        kept = [it for it in items if str(it.meta["label"]).lower() == label]
        log.info(
            "%s: kept %d of %d rows labelled %r for set kind %s", path, len(kept), len(items), label, kind
        )
        if not kept:
            raise EvaluationError(f"{path} has no rows labelled {label!r}, which set kind {kind!r} needs")
        items = kept
    return items[:limit] if limit is not None else items


# -- one model ----------------------------------------------------------------------------------
def _steer_pair(steer: Any) -> tuple[Any, Any]:
    if steer is None:
        return None, None
    if isinstance(steer, ExpertMask):
        return steer, None
    if isinstance(steer, tuple) and len(steer) == 2:
        return steer
    raise EvaluationError(
        "steer must be (deactivate, activate) (either may be None) or one ExpertMask to deactivate"
    )


def evaluate_model(
    model: Any,
    tokenizer: Any,
    sets: EvalSets,
    judge: str | RefusalJudge = DEFAULT_JUDGE,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 16,
    steer: tuple[Any, Any] | ExpertMask | None = None,
    system_prompt: str | None = None,
    progress: Progress | None = None,
    generator: Any = None,
) -> pd.DataFrame:
    """Greedy answers to every prompt of every set, judged: one row per (set, prompt).

    Columns ``RESPONSE_COLUMNS``. ``steer`` = (deactivate, activate) expert masks applied with
    ``steering.steer_experts`` around generation only (removed afterwards, also on error).
    ``generator`` (``backends.open_backend``): answers from vLLM; steering always runs here (HF).
    """
    if not sets:
        raise EvaluationError("no evaluation sets given: pass e.g. default_eval_sets()")
    empty = [k for k, v in sets.items() if not v]
    if empty:
        raise EvaluationError(f"evaluation set(s) {empty} are empty; drop them or load prompts into them")
    deactivate, activate = _steer_pair(steer)
    steered = deactivate is not None or activate is not None
    around = (
        (lambda: steer_experts(model, deactivate=deactivate, activate=activate)) if steered else nullcontext
    )
    return judged_answers(
        model,
        tokenizer,
        sets,
        make_judge(judge),
        max_new_tokens,
        batch_size,
        progress,
        None if steered else generator,  # steering runs here (HF), never in another engine
        system_prompt,
        around,
    )


# -- statistics ---------------------------------------------------------------------------------
def wilson_interval(successes: Any, n: Any, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (vectorised); unlike the normal approximation it stays inside [0, 1]
    and is not zero-width at 0/n or n/n, which is exactly where refusal rates live. n = 0 -> NaN."""
    k, n = np.asarray(successes, dtype=np.float64), np.asarray(n, dtype=np.float64)
    if np.any(k < 0) or np.any(k > n):
        raise EvaluationError("successes must lie between 0 and n")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def summarize(responses: pd.DataFrame, by_category: bool = False, confidence: float = 0.95) -> pd.DataFrame:
    """Per model (when a ``model`` column exists) and set: n, refusals, refusal_rate, Wilson CI,
    empty answers, and the set's headline metric (``metric``, ``value``, ``value_ci_low/high``,
    ``better``); with ``by_category`` one row per category as well (``category`` column)."""
    missing = {"set", "refusal", "reason"} - set(responses.columns)
    if missing:
        raise EvaluationError(
            f"responses lack columns {sorted(missing)}; make them with evaluate_model or compare_models"
        )
    if by_category and "category" not in responses.columns:
        raise EvaluationError("by_category=True needs a 'category' column in the responses")
    keys = (
        (["model"] if "model" in responses.columns else []) + ["set"] + (["category"] if by_category else [])
    )
    df = responses.assign(_r=responses["refusal"].astype(bool), _e=responses["reason"].eq("empty"))
    if by_category:
        df["category"] = df["category"].fillna("(none)")
    out = (
        df.groupby(keys, sort=False)
        .agg(n=("_r", "size"), refusals=("_r", "sum"), empty=("_e", "sum"))
        .reset_index()
    )
    out["refusal_rate"] = out["refusals"] / out["n"]
    out["ci_low"], out["ci_high"] = wilson_interval(out["refusals"], out["n"], confidence)
    spec = [METRICS.get(s) for s in out["set"]]
    inverted = np.array([bool(s and s[1]) for s in spec], dtype=bool)
    out["metric"] = [s[0] if s else None for s in spec]
    out["better"] = [s[2] if s else None for s in spec]
    out["value"] = np.where(inverted, 1 - out["refusal_rate"], out["refusal_rate"])
    out["value_ci_low"] = np.where(inverted, 1 - out["ci_high"], out["ci_low"])
    out["value_ci_high"] = np.where(inverted, 1 - out["ci_low"], out["ci_high"])
    has = out["metric"].notna()
    out.loc[~has, ["value", "value_ci_low", "value_ci_high"]] = np.nan
    return out


def comparison_table(summary: pd.DataFrame, with_ci: bool = False, digits: int = 2) -> pd.DataFrame:
    """Models x headline metrics (the README table); ``with_ci`` gives "0.42 [0.30, 0.55]" strings."""
    df = summary[summary["metric"].notna()] if "metric" in summary.columns else summary.iloc[0:0]
    if "category" in df.columns:
        raise EvaluationError(
            "comparison_table needs the per-set summary: call summarize(..., by_category=False)"
        )
    if df.empty:
        raise EvaluationError(f"no headline metric in this summary: name sets {list(METRICS)}")
    df = df.assign(model=df["model"] if "model" in df.columns else "model")
    if with_ci:
        cell = df.apply(
            lambda r: f"{r.value:.{digits}f} [{r.value_ci_low:.{digits}f}, {r.value_ci_high:.{digits}f}]",
            axis=1,
        )
        df = df.assign(value=cell)
    order = [m for m, _, _ in METRICS.values() if m in set(df["metric"])]
    table = df.pivot(index="model", columns="metric", values="value")
    table = table.reindex(index=list(dict.fromkeys(df["model"])), columns=order)
    table.columns.name = None
    return table


def to_markdown(table: pd.DataFrame, digits: int = 2) -> str:
    """A GitHub markdown table (index as first column); floats with ``digits`` decimals, NaN as "-"."""

    def fmt(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "-" if np.isnan(v) else f"{v:.{digits}f}"
        return "-" if v is None else str(v).replace("|", "\\|")

    head = [str(table.index.name or "")] + [str(c) for c in table.columns]
    rows = [[fmt(i)] + [fmt(v) for v in r] for i, r in zip(table.index, table.itertuples(index=False))]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(table.columns)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


# -- several models -----------------------------------------------------------------------------
@dataclass
class EvalEntry:
    """One model to compare: a model directory, optionally steered at inference time."""

    name: str  # label in tables ("base", "experts", "full", "random", "steered")
    model_dir: str | None = (
        None  # HF model directory or hub id; None = the ``loaded`` model given to compare_models
    )
    steer_deactivate: ExpertMask | None = None  # experts forced off at the router (SteerMoE-style)
    steer_activate: ExpertMask | None = None  # experts forced on at the router
    kind: str = "model"  # free-form: base, experts, full, random, steered
    notes: str = ""  # shown in the evaluation JSON

    def describe(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("steer_")}
        d["steer_deactivate"] = (
            self.steer_deactivate.by_layer() if self.steer_deactivate is not None else None
        )
        d["steer_activate"] = self.steer_activate.by_layer() if self.steer_activate is not None else None
        return d


def _free_memory() -> None:
    """Run after dropping the last reference to a model, so the next one has room."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _backend_for(
    e: EvalEntry, entries: Sequence[EvalEntry], backend: str, url: str | None, steer: Any
) -> Any:
    """The generator for one entry: vLLM for a saved, unsteered model; HF (None) otherwise."""

    check_backend(backend, url)
    use = backend == "vllm" and steer is None and e.model_dir is not None
    return open_backend(
        "vllm" if use else "hf", e.model_dir, url if use and e.model_dir == entries[0].model_dir else None
    )


def compare_models(
    entries: Sequence[EvalEntry],
    sets: EvalSets,
    judge: str | RefusalJudge = DEFAULT_JUDGE,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto",
    system_prompt: str | None = None,
    loaded: tuple[Any, Any] | None = None,
    progress: Progress | None = None,
    backend: str = "hf",
    vllm_url: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate every entry on the same sets: (responses with a ``model`` column, summary).

    ``chat_template_kwargs``: the options the run's prompts were rendered with (``analysis.chat_template_kwargs_of``),
    so a reasoning model is evaluated as it was analysed and trained (e.g. with thinking off).

    ``backend="vllm"``: unsteered entries with a ``model_dir`` generate through a vLLM server of
    that directory (``vllm_url`` serves the first entry's model; the others get their own).

    Models are loaded with ``models.load_model`` one at a time; consecutive entries with the same
    ``model_dir`` (base, then base steered) reuse it, and each is freed before the next loads.
    Settings go to ``responses.attrs["evaluation"]`` for ``save_evaluation``.
    """
    if not entries:
        raise EvaluationError("no models to compare: pass at least one EvalEntry")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise EvaluationError(f"model names must be unique, got {names}")
    if any(e.model_dir is None for e in entries) and loaded is None:
        raise EvaluationError(
            "an entry has model_dir=None: pass loaded=(model, tokenizer) or give it a model_dir"
        )
    jd = make_judge(judge)
    per_model = sum(len(v) for v in sets.values())
    total = per_model * len(entries)
    frames, current_dir, model, tok = [], object(), None, None
    for i, e in enumerate(entries):
        if e.model_dir != current_dir:
            model = tok = None
            _free_memory()
            if e.model_dir is None:
                model, tok = loaded  # type: ignore[misc]
            else:
                log.info("loading %s for entry %s", e.model_dir, e.name)
                model, tok = load_model(e.model_dir, dtype=dtype, device=device)
            use_chat_template_kwargs(tok, chat_template_kwargs)
            current_dir = e.model_dir
        sub = (
            (lambda d, t, m="", _o=i * per_model, _n=e.name: progress(_o + d, total, f"{_n}: {m}"))
            if progress
            else None
        )
        steer = (
            (e.steer_deactivate, e.steer_activate)
            if (e.steer_deactivate is not None or e.steer_activate is not None)
            else None
        )
        with _backend_for(e, entries, backend, vllm_url, steer) as gen:
            df = evaluate_model(
                model, tok, sets, jd, max_new_tokens, batch_size, steer, system_prompt, sub, gen
            )
        frames.append(df.assign(model=e.name))
    model = tok = None
    _free_memory()
    responses = pd.concat(frames, ignore_index=True)[["model"] + RESPONSE_COLUMNS]
    responses.attrs["evaluation"] = {
        "judge": judge if isinstance(judge, (str, dict)) else jd.name,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "system_prompt": system_prompt,
        "backend": backend,
        "chat_template_kwargs": chat_template_kwargs,
        "models": [e.describe() for e in entries],
        "sets": {k: len(v) for k, v in sets.items()},
    }
    return responses, summarize(responses)


# -- files --------------------------------------------------------------------------------------
def check_eval_name(name: str) -> str:
    """An evaluation name usable as a file name, or a clear error."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise EvaluationError(f"invalid evaluation name {name!r}: use letters, digits, '.', '_' or '-'")
    return name


def _eval_paths(run: Run, name: str) -> tuple[Path, Path, Path]:
    check_eval_name(name)
    d = run.path_for("eval")
    return d / f"{name}_responses.parquet", d / f"{name}_summary.parquet", d / f"{name}.json"


def check_evaluation_free(run: Run, name: str, overwrite: bool) -> None:
    """No silent overwrite of any of an evaluation's three files (checked before the evaluation runs)."""

    r_path, s_path, j_path = _eval_paths(run, name)
    check_free(j_path, f"evaluation {name!r}", overwrite, r_path, s_path)


def save_evaluation(
    run: Run,
    responses: pd.DataFrame,
    summary: pd.DataFrame,
    name: str = "comparison",
    settings: dict[str, Any] | None = None,
) -> Path:
    """Write eval/<name>_responses.parquet, eval/<name>_summary.parquet and eval/<name>.json atomically.

    The JSON (settings, judge, models, time) is written last: its presence marks a complete save.
    """
    r_path, s_path, j_path = _eval_paths(run, name)
    info = {**responses.attrs.get("evaluation", {}), **(settings or {})}
    meta = {
        "name": name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "n_responses": len(responses),
        "models": info.pop("models", None),
        "settings": info,
    }
    commit_files(  # one transaction: a kill leaves the previous evaluation or this one, never a mix
        {
            r_path: lambda p: _plain(responses).to_parquet(p),
            s_path: lambda p: _plain(summary).to_parquet(p),
            j_path: lambda p: p.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8"),
        }
    )
    return j_path


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out.attrs = {}
    return out


def list_evaluations(run: Run) -> list[str]:
    """Names of the complete evaluations saved in a run (newest last)."""
    d = run.path_for("eval")
    if not d.is_dir():
        return []
    names = {p.stem for p in listed(d)} | {
        Path(n).stem for j in d.glob(".txn-*.json") for n in (read_json(j) or {}).get("files", ())
    }
    found = [committed(d / f"{n}.json") for n in names if not n.startswith(".")]
    found = [p for p in found if p.is_file() and committed(d / f"{Path(p).stem}_summary.parquet").is_file()]
    return [p.stem for p in sorted(found, key=lambda p: p.stat().st_mtime)]


def _saved_paths(run: Run, name: str) -> tuple[Path, Path, Path]:
    """The committed files of evaluation ``name``; an error naming the saved ones when it is not there."""
    r_path, s_path, j_path = (committed(p) for p in _eval_paths(run, name))
    if not j_path.is_file():
        raise EvaluationError(
            f"run {run.id} has no evaluation named {name!r}; saved ones: {list_evaluations(run)}"
        )
    return r_path, s_path, j_path


def load_evaluation(run: Run, name: str = "comparison") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(responses, summary) saved by save_evaluation; the JSON is in ``responses.attrs["evaluation"]``."""
    r_path, s_path, j_path = _saved_paths(run, name)
    responses, summary = read_parquet(r_path), read_parquet(s_path)
    responses.attrs["evaluation"] = read_json(j_path)
    return responses, summary


def compare_evaluations(run: Run, names: Sequence[str]) -> pd.DataFrame:
    """Several evaluations side by side: one row per (evaluation, model), headline metrics with intervals.

    Why: a researcher trains with other settings, evaluates again, and asks which did better."""
    if not names:
        raise EvaluationError("pick at least one evaluation to compare")
    parts = []
    for name in names:
        summary = read_parquet(_saved_paths(run, name)[1])  # the summary only: answers are not compared
        model = summary["model"].astype(str) if "model" in summary.columns else "model"
        parts.append(summary.assign(model=f"{name} · " + model))
    return comparison_table(pd.concat(parts, ignore_index=True), with_ci=True)


# -- routing shift ------------------------------------------------------------------------------
def _open_subrun(path: Path, parent: Run, name: str, fingerprint: str, overwrite: bool) -> Run:
    """The shift's own Run at ``path`` (created once, so a killed shift resumes there)."""
    if (path / MANIFEST).is_file():
        sub = Run.open(path)
        old = sub.manifest.get("config", {}).get("model_fingerprint")
        if old == fingerprint:
            return sub
        if sub.completed_batches() and not overwrite:
            raise EvaluationError(
                f"{path} holds a routing shift of another model; pick another name or pass overwrite=True"
            )
        import shutil

        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
    manifest = {
        "format": RUN_FORMAT,
        "format_version": FORMAT_VERSION,
        "id": path.name,
        "name": f"{parent.name} / shift {name}",
        "created": now,
        "updated": now,
        "model": None,
        "seeds": {},
        "versions": package_versions(),
        "steps": {},
        "config": {"parent_run": parent.id, "model_fingerprint": fingerprint},
        "notes": "routing shift sub-run",
    }
    atomic_write_json(path / MANIFEST, manifest)
    return Run.open(path)


def routing_shift(
    run: Run,
    model: Any,
    tokenizer: Any,
    name: str = "trained",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """How the risk difference of every (layer, expert) moved on another model (e.g. the trained one).

    Re-runs the run's analysis (same plan, same AnalysisConfig) on ``model`` into the sub-run
    ``eval/shift_<name>/`` (resumable) and returns layer, expert, risk_diff_before,
    risk_diff_after, delta (after - before), sorted by |delta|; also saved as eval/shift_<name>.parquet.
    With the quality filter on, the "after" pass filters pairs by the new model's behaviour.
    """
    out_path = _eval_paths(run, f"shift_{name}")[0].with_name(f"shift_{name}.parquet")
    config = analysis_config_of(run)
    if config is None or not run.path_for("risk_aggregated").is_file():
        raise EvaluationError(
            f"run {run.id} has no finished analysis: analyse it before measuring a routing shift"
        )
    info, adapter = model_info_of(run), MoEAdapter.for_model(model)
    for key in ("num_layers", "num_experts", "top_k"):
        if key in info and info[key] != getattr(adapter, key):
            raise EvaluationError(
                f"the model has {key}={getattr(adapter, key)} but run {run.id} analysed one with "
                f"{info[key]}: a routing shift compares the same architecture"
            )

    sub = _open_subrun(out_path.with_suffix(""), run, name, model_fingerprint(model), overwrite)
    try:
        after = run_analysis(
            sub, model, tokenizer, load_plan(run.path_for("plan")), config, progress
        ).aggregated
    except AnalysisError as e:
        raise EvaluationError(f"routing shift {name!r}: {e}") from None
    before = read_parquet(run.path_for("risk_aggregated"), columns=["layer", "expert", "risk_diff"])
    df = before.merge(
        after[["layer", "expert", "risk_diff"]],
        on=["layer", "expert"],
        how="outer",
        suffixes=("_before", "_after"),
    )
    df = df.sort_values(["layer", "expert"], ignore_index=True)
    df["delta"] = df["risk_diff_after"] - df["risk_diff_before"]
    df = df.iloc[np.argsort(-df["delta"].abs().to_numpy(), kind="stable")].reset_index(drop=True)
    write_parquet(out_path, df)
    return df
