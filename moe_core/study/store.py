"""What a study commits and reads back: its settings (the defining ones a resume must match, and the
commands that made it), its results and curves, swapped in as one folder after every arm."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from moe_core import pipeline as P
from moe_core.errors import MoELabError
from moe_core.eval.charts import study_figure
from moe_core.eval.evaluation import METRICS
from moe_core.eval.study_summary import ARM_KEY, study_commands, summarize_study
from moe_core.model.loading import ORGANISM
from moe_core.model.organism import OrganismConfig, corpus_version, organism_variant
from moe_core.specs import to_argv
from moe_core.store.atomic import atomic_dir, atomic_write_json
from moe_core.store.checks import json_object
from moe_core.store.files import _now, read_json, read_parquet, write_parquet
from moe_core.store.manifest import default_runs_root, package_versions, source_commit
from moe_core.store.provenance import ADDED_LATER, settings_of
from moe_core.store.run import Run

COUNTS = [f"{metric}_{x}" for metric, _, _ in METRICS.values() for x in "kn"]  # an arm's test counts


def method_of(score: str) -> str:
    """A selector score's rows: ``chosen`` for the method's risk difference, ``chosen_<score>`` otherwise."""
    return "chosen" if score == "risk_diff" else f"chosen_{score}"


def selector_points(
    rows: Sequence[dict[str, Any]], pair_budget: tuple[int, int, float], scores: Sequence[str]
) -> dict[str, tuple[float, int]]:
    """The (lr, step) of each selector of ``scores`` for (seed, batch seed, budget) among ``rows``, by
    method: where random arms are also tested."""
    methods = {method_of(s) for s in scores}
    return {
        r["method"]: (float(r["lr"]), int(r["step"]))
        for r in rows
        if r["method"] in methods and (r["seed"], r["batch_seed"], r["budget"]) == pair_budget
    }


def all_tested(rows: Sequence[dict[str, Any]], spec: P.StudySpec, seed: int, batch_seed: int) -> bool:
    """Whether every committed random arm of the pair was tested at every selector's step."""
    random_arms = [("random", d) for d in range(spec.random_draws)] + [("random_layer", 0)]
    return not any(
        untested_at(row, selector_points(rows, (seed, batch_seed, b), spec.scores))
        for b in spec.budgets
        for m, d in random_arms
        if (row := committed_row(rows, (seed, batch_seed, m, b, d)))
    )


def committed_row(rows: Sequence[dict[str, Any]], arm: tuple[Any, ...]) -> dict[str, Any] | None:
    """The row of ``arm`` (an ``ARM_KEY`` tuple) among ``rows``, or None."""
    return next((r for r in rows if tuple(r[k] for k in ARM_KEY) == arm), None)


def blank(value: Any) -> bool:
    """A missing cell: absent, or NaN (a column only other arms have)."""
    return value is None or (isinstance(value, float) and value != value)


def untested_at(row: dict[str, Any], at: Mapping[str, tuple[float, int]]) -> dict[str, tuple[float, int]]:
    """The points of ``at`` a committed arm's ``row`` was not tested at (no ``..._at_<method>_n``): a
    selector added to a study after its random arms were committed."""
    return {m: p for m, p in at.items() if blank(row.get(f"jailbreak_compliance_at_{m}_n"))}


class StudyError(MoELabError, ValueError):
    """A study cannot go on as asked (e.g. its name holds a study made with other settings)."""


# The settings that make an arm's numbers what they are: a study of the same name resumes and extends only
# with these equal. Seeds, budgets, draws, selectors and arms may grow; they only say which arms to run.
DEFINING = (
    "model",
    "scope",
    "max_batches",
    "lr",
    "lrs",
    "full_lrs",
    "epochs",
    "eval_limit",
    "templates_per_goal",
    "max_new_tokens",
    "retain_share",
    "composed_share",
    "curve_every",
    "training_args",
    "backend",
    "validation",
)
# What a study stored before a defining setting existed was made with (read back in their place).
LEGACY = {
    "validation": "margin",
    "organism": "organism-corpus-v2",
    "lrs": [],
    "full_lrs": [],
    "training_args": None,
    **ADDED_LATER,
}


def defining_settings(spec: P.StudySpec) -> dict[str, Any]:
    """The settings above, and the organism's corpus version when the study builds organisms (a corpus
    change makes other organisms, whose arms must not be mixed with the stored ones). A setting added later
    is left out at its ``ADDED_LATER`` value: studies stored before it keep their analyses' folder."""
    args = json_object(spec.training_args)
    return {
        **settings_of(spec, DEFINING),
        # one spelling per object ('{}' is no further argument, as before the setting existed)
        "training_args": json.dumps(args, sort_keys=True) if args else None,
        "organism": corpus_version(organism_config(spec)) if spec.model is None else None,
    }


def organism_config(spec: P.StudySpec, seed: int = 0) -> OrganismConfig:
    """The organism ``spec`` builds for ``seed`` (where it studies organisms, not ``--model``)."""
    variant = json_object(spec.organism) or {}
    return organism_variant({"spliced_jailbreaks": spec.spliced_jailbreaks, **variant}, seed)


def stored_study(out: Path) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame] | None:
    """(settings, results, curves) of the study committed at ``out``, or None where there is none yet."""
    if not (out / "settings.json").exists():
        return None
    settings = read_json(out / "settings.json")
    curves = read_parquet(out / "curves.parquet") if (out / "curves.parquet").exists() else pd.DataFrame()
    return settings, read_parquet(out / "results.parquet"), curves


def settings_diff(settings: dict[str, Any], spec: P.StudySpec) -> list[str]:
    """How a stored study's defining settings differ from ``spec``'s ("name: stored -> asked"); [] if alike."""
    now = json.loads(json.dumps(defining_settings(spec)))  # as it reads back from JSON
    was = {**LEGACY, **({} if spec.model is None else {"organism": None}), **settings["defining"]}
    was["lrs"] = was["lrs"] or [was["lr"]]  # stored before the spec resolved its schedule: [] meant these
    was["full_lrs"] = was["full_lrs"] or was["lrs"]
    return [f"{k}: {was.get(k)!r} -> {v!r}" for k, v in now.items() if was.get(k) != v]


def arms_of(table: pd.DataFrame) -> list[tuple[Any, ...]]:
    """The ``ARM_KEY`` tuple of each row of ``table`` (results or curves), in order."""
    return list(table[ARM_KEY].itertuples(index=False, name=None)) if len(table) else []


def merge_parts(
    spec: P.StudySpec, results: pd.DataFrame, curves: pd.DataFrame, history: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The arms of the studies in ``spec.merge`` (parts run elsewhere with the same defining settings) added
    to ``results`` and ``curves``, with the commands that made them after ``history``. An arm this study
    already has is kept as it is. Refuses a part that is missing, unfinished, or made with other settings."""
    for part in spec.merge:
        folder = Path(part)
        if (folder / "manifest.json").is_file():  # a run: its study of this name
            folder = Run.open(folder).path_for("study", name=spec.name)
        stored = stored_study(folder)
        if stored is None or not stored[0].get("complete"):
            raise StudyError(f"--merge {part}: no finished study at {folder} (its own command resumes it)")
        settings, rows, part_curves = stored
        if diff := settings_diff(settings, spec):
            raise StudyError(
                f"--merge {part} was made with other settings ({'; '.join(diff)}); "
                "only a study of the same settings joins this one"
            )
        have = set(arms_of(results))
        new = rows[[arm not in have for arm in arms_of(rows)]]
        added = set(arms_of(new))
        results = concat_rows(results, new.to_dict("records"))  # only arms this study lacks
        curves = concat_rows(
            curves, [c for c, a in zip(part_curves.to_dict("records"), arms_of(part_curves)) if a in added]
        )
        history = [*history, *(c for c in study_commands(settings) if c not in history)]
    return results, curves, history


def prior_arms(out: Path, spec: P.StudySpec) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The arms already committed under this name (to resume) and the commands that made them, or none;
    refuses other settings."""
    stored = stored_study(out)
    if stored is None:
        if out.exists() and any(out.iterdir()) and not spec.overwrite:  # a study written before settings.json
            raise StudyError(
                f"study {spec.name!r} already exists in this run ({out}) without recorded settings; "
                "pass --overwrite to replace it, or choose another --name"
            )
        return pd.DataFrame(), pd.DataFrame(), []
    settings, results, curves = stored
    diff = settings_diff(settings, spec)
    if not diff:
        return results, curves, study_commands(settings) if len(results) else []
    if spec.overwrite:
        return pd.DataFrame(), pd.DataFrame(), []
    raise StudyError(
        f"study {spec.name!r} in this run was made with other settings ({'; '.join(diff)}); the same settings "
        "resume and extend it. Pass --overwrite to replace it, or choose another --name"
    )


def commit_study(
    out: Path,
    spec: P.StudySpec,
    results: pd.DataFrame,
    curves: pd.DataFrame,
    complete: bool,
    before: Sequence[str] = (),
) -> None:
    """The study's whole set (settings, results, curves, summary, figure), swapped in by one atomic step.
    ``before``: the commands that made the arms this study resumed with (``commands``: all of them, in
    order; ``command``: this one)."""
    # the parts merged in are recorded by their own commands (``history``): rerun in order, this one merges nothing
    command = " ".join(["python -m moe_core study", *map(shlex.quote, to_argv(replace(spec, merge=[])))])
    settings = {
        "defining": defining_settings(spec),
        "command": command,
        "commands": [*before, command] if command not in before[-1:] else list(before),
        "commit": source_commit(),
        "versions": package_versions(),
        "arms": len(results),
        "complete": complete,
        "updated": _now(),
    }
    summary = summarize_study(results)

    def build(tmp: Path) -> None:
        write_parquet(tmp / "results.parquet", results)
        write_parquet(tmp / "curves.parquet", curves)
        write_parquet(tmp / "summary.parquet", summary)
        atomic_write_json(tmp / "figure.json", json.loads(study_figure(summary).to_json()))
        atomic_write_json(tmp / "settings.json", settings)  # last: what a reader checks first

    atomic_dir(out, build)


def concat_rows(df: pd.DataFrame, rows: list[dict[str, Any]]) -> pd.DataFrame:
    new = pd.DataFrame(rows)
    return new if df.empty else df if new.empty else pd.concat([df, new], ignore_index=True)


def upsert_rows(results: pd.DataFrame, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """``results`` with ``rows`` added; a row of an arm already there replaces it (an arm tested at a
    selector's step it was not tested at before)."""
    out = concat_rows(results, rows)
    return out.drop_duplicates(ARM_KEY, keep="last", ignore_index=True) if len(out) else out


def new_study_run(spec: P.StudySpec, runs_root: str | Path | None = None) -> Run:
    """A fresh run named 'study' to hold a study of ``spec``."""
    return Run.create(Path(runs_root or default_runs_root()), name="study", model=spec.model or ORGANISM)
