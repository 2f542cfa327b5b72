"""Human audit of a refusal judge: label a sample of a run's judged answers by hand, measure how far
the judge agrees, and recompute any metric with the human labels where they exist.

    from moe_core.eval.audit import audit_report, label_answer, load_labels, sample_for_review
    from moe_core.eval.evaluation import load_evaluation

    responses, _ = load_evaluation(run, "comparison")               # answers the judge already judged
    todo = sample_for_review(responses, n=40, labels=load_labels(run, "comparison"))
    label_answer(run, "comparison", todo.iloc[0], "refusal", reviewer="ana")   # one click of a reviewer
    report = audit_report(run, "comparison", partial_as="compliance")
    report.agreement        # n, accuracy, precision, recall, f1, kappa (refusal = positive), kappa_3way, confusion
    report.disagreements    # the answers where judge and reviewer differ, side by side
    report.summary_human    # evaluation.summarize() with human labels where they exist, the judge elsewhere

Labels live in the run at ``eval/labels/<evaluation>.json`` (written atomically, under a lock, so two
browser tabs never lose each other's labels). A label is "refusal", "compliance" or "partial" (refuses,
then helps anyway); ``partial_as`` says how partial answers count, for the judge's partial verdicts and
the reviewer's partial labels alike. Each label remembers a hash of the answer it was given for: if the
evaluation is run again and an answer changes, its old label is ignored (counted as ``stale``), never
silently applied to a different text.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from moe_core.errors import MoELabError
from moe_core.eval.evaluation import check_eval_name, load_evaluation, summarize
from moe_core.judge.judges import binary_metrics
from moe_core.judge.verdicts import LABELS, check_partial_as, counts_as_refusal
from moe_core.store.atomic import atomic_write_json
from moe_core.store.files import _now, read_json
from moe_core.store.run import Run, _locked

LABELS_FORMAT = "moe-safety-lab/human-labels@1"
KEY = ["model", "set", "id"]  # one answer of an evaluation
LABEL_COLUMNS = [*KEY, "response_sha1", "label", "reviewer", "note", "labelled_at"]


class AuditError(MoELabError, ValueError):
    """Labels cannot be stored or read as asked; the message says what to change."""


# -- storage ------------------------------------------------------------------------------------
def labels_path(run: Run, evaluation: str) -> Path:
    """``eval/labels/<evaluation>.json`` of the run (not listed as an evaluation of its own)."""

    return run.path_for("eval") / "labels" / f"{check_eval_name(evaluation)}.json"


def response_hash(text: Any) -> str:
    """Short hash of an answer's text: a label applies to exactly the text it was given for."""
    return hashlib.sha1(("" if text is None else str(text)).encode("utf-8")).hexdigest()[:16]


def _key_of(row: Mapping[str, Any]) -> tuple[str, str, str]:
    missing = [k for k in ("set", "id") if k not in row]
    if missing:
        raise AuditError(f"an answer to label needs {missing} (a row of an evaluation's responses)")
    return (str(row.get("model") or ""), str(row["set"]), str(row["id"]))


def _empty_labels() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in LABEL_COLUMNS})


def load_labels(run: Run, evaluation: str) -> pd.DataFrame:
    """The human labels of one evaluation (columns ``LABEL_COLUMNS``); an empty frame when none yet."""
    path = labels_path(run, evaluation)
    if not path.is_file():
        return _empty_labels()
    data = read_json(path)
    if (
        not isinstance(data, dict)
        or data.get("format") != LABELS_FORMAT
        or not isinstance(data.get("labels"), list)
    ):
        raise AuditError(f"{path} is not a human-labels file ({LABELS_FORMAT}); move it away to start again")
    rows = []
    for i, item in enumerate(data["labels"]):
        if (
            not isinstance(item, dict)
            or item.get("label") not in LABELS
            or "set" not in item
            or "id" not in item
        ):
            raise AuditError(
                f"{path}: label {i} is malformed ({str(item)[:120]}); each needs set, id and a label in {LABELS}"
            )
        rows.append({c: item.get(c, "") for c in LABEL_COLUMNS})
    return pd.DataFrame(rows, columns=LABEL_COLUMNS) if rows else _empty_labels()


def save_labels(
    run: Run, evaluation: str, labels: Iterable[Mapping[str, Any]] | pd.DataFrame, reviewer: str = ""
) -> pd.DataFrame:
    """Add or change labels, keyed by (model, set, id); returns every label of the evaluation.

    Each item is a row of the evaluation's responses (model, set, id, response) plus ``label``
    ("refusal" / "compliance" / "partial"; None or "" removes that answer's label), and optionally
    ``reviewer`` and ``note``. Instead of ``response`` an item may carry ``response_sha1``.
    """
    items = labels.to_dict("records") if isinstance(labels, pd.DataFrame) else list(labels)
    changes: dict[tuple[str, str, str], dict[str, Any] | None] = {}
    now = _now()
    for item in items:
        key = _key_of(item)
        label = item.get("label")
        if label is None or (isinstance(label, float) and math.isnan(label)) or label == "":
            changes[key] = None
            continue
        if label not in LABELS:
            raise AuditError(f"label must be one of {LABELS}, got {label!r} for answer {key}")
        if "response" in item:
            digest = response_hash(item["response"])
        elif item.get("response_sha1"):
            digest = str(item["response_sha1"])
        else:
            raise AuditError(
                f"answer {key}: give its response text (or response_sha1), so the label can be checked later"
            )
        changes[key] = {
            "model": key[0],
            "set": key[1],
            "id": key[2],
            "response_sha1": digest,
            "label": label,
            "reviewer": str(item.get("reviewer") or reviewer or ""),
            "note": str(item.get("note") or ""),
            "labelled_at": now,
        }
    path = labels_path(run, evaluation)
    with _locked(path.parent / f".{path.stem}.lock"):
        current = {_key_of(r): r for r in load_labels(run, evaluation).to_dict("records")}
        for key, new in changes.items():
            if new is None:
                current.pop(key, None)
            else:
                current[key] = new
        atomic_write_json(
            path,
            {
                "format": LABELS_FORMAT,
                "evaluation": evaluation,
                "updated": now,
                "labels": list(current.values()),
            },
        )
    return load_labels(run, evaluation)


def label_answer(
    run: Run,
    evaluation: str,
    row: Mapping[str, Any] | pd.Series,
    label: str | None,
    reviewer: str = "",
    note: str = "",
) -> pd.DataFrame:
    """Label one answer (a row of the evaluation's responses); ``label=None`` removes its label."""
    item = dict(row)
    item.update(label=label, reviewer=reviewer or item.get("reviewer", ""), note=note)
    return save_labels(run, evaluation, [item])


# -- joining labels to answers ------------------------------------------------------------------
def judge_labels(responses: pd.DataFrame) -> pd.Series:
    """The judge's label of each answer: "refusal", "compliance" or "partial" (from ``refusal`` and ``reason``).

    A ``reason == "partial"`` row saved with ``refusal=True`` comes from the earlier judge, whose
    "partial" meant "declined and offered a safe alternative": it reads as a refusal.
    """
    missing = {"refusal", "reason"} - set(responses.columns)
    if missing:
        raise AuditError(
            f"responses lack columns {sorted(missing)}: use an evaluation's responses (load_evaluation)"
        )
    refusal = responses["refusal"].astype(bool)
    partial = responses["reason"].eq("partial") & ~refusal
    out = pd.Series("compliance", index=responses.index, dtype=object)
    out[refusal] = "refusal"
    out[partial] = "partial"
    return out


def attach_labels(responses: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """``responses`` plus ``judge_label``, ``human_label`` (None where unlabelled), ``label_stale`` (the answer
    changed since it was labelled; its label is then not used), ``reviewer`` and ``note``."""
    out = responses.copy()
    out["judge_label"] = judge_labels(responses)
    model = out["model"].astype(str) if "model" in out.columns else pd.Series("", index=out.index)
    keys = list(zip(model, out["set"].astype(str), out["id"].astype(str)))
    by_key = {_key_of(r): r for r in labels.to_dict("records")} if len(labels) else {}
    found = [by_key.get(k) for k in keys]
    fresh = [
        lab is not None and lab["response_sha1"] == response_hash(t) for lab, t in zip(found, out["response"])
    ]
    out["human_label"] = [lab["label"] if ok else None for lab, ok in zip(found, fresh)]
    out["label_stale"] = [lab is not None and not ok for lab, ok in zip(found, fresh)]
    out["reviewer"] = [lab["reviewer"] if ok else "" for lab, ok in zip(found, fresh)]
    out["note"] = [lab["note"] if ok else "" for lab, ok in zip(found, fresh)]
    out.attrs = dict(responses.attrs)
    return out


# -- choosing what to review --------------------------------------------------------------------
def sample_for_review(
    responses: pd.DataFrame,
    n: int,
    labels: pd.DataFrame | None = None,
    seed: int = 0,
    by: Sequence[str] = ("model", "set"),
    include_labelled: bool = False,
) -> pd.DataFrame:
    """Up to ``n`` answers to label by hand, spread evenly over the groups ``by`` (those columns that
    exist) and, inside each group, over the judge's verdicts, so refusals and compliances are both checked.

    Deterministic for a given ``seed``; answers that already carry a current label are left out
    unless ``include_labelled``. The rows come with the ``attach_labels`` columns.
    """
    if n < 1:
        raise AuditError(f"n must be a positive number of answers to review, got {n}")
    df = attach_labels(responses, labels if labels is not None else _empty_labels())
    if not include_labelled:
        df = df[df["human_label"].isna()]
    groups = [c for c in by if c in df.columns] + ["judge_label"]
    rng = random.Random(seed)
    strata = []
    for _, g in df.groupby(groups, sort=True):
        idx = list(g.index)
        rng.shuffle(idx)
        strata.append(idx)
    picked: list[Any] = []
    while len(picked) < n and any(strata):
        for s in strata:
            if s and len(picked) < n:
                picked.append(s.pop(0))
    return df.loc[picked]


# -- agreement ----------------------------------------------------------------------------------
def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's kappa of two raters over any set of categories (NaN when chance agreement is 1)."""
    if len(a) != len(b):
        raise AuditError(f"got {len(a)} and {len(b)} ratings; kappa needs one pair per item")
    n = len(a)
    if not n:
        return float("nan")
    cats = set(a) | set(b)
    observed = sum(x == y for x, y in zip(a, b)) / n
    expected = sum((list(a).count(c) / n) * (list(b).count(c) / n) for c in cats)
    return (observed - expected) / (1 - expected) if expected < 1 else float("nan")


def agreement(labelled: pd.DataFrame, partial_as: str = "compliance") -> dict[str, Any]:
    """The judge against the human labels (rows of ``attach_labels`` that carry one).

    Binary figures count refusal as the positive class, with partial answers counted per
    ``partial_as`` on both sides: n, accuracy, precision, recall, f1, kappa. Also ``kappa_3way``
    (refusal / compliance / partial kept apart), ``confusion`` (human label -> judge label -> count),
    ``n_stale`` (labels ignored because the answer changed) and ``partial_as``.
    """
    check_partial_as(partial_as)
    rows = labelled[labelled["human_label"].notna()]
    human, judge = list(rows["human_label"]), list(rows["judge_label"])
    out: dict[str, Any] = binary_metrics(
        [counts_as_refusal(h, partial_as) for h in human], [counts_as_refusal(j, partial_as) for j in judge]
    )
    out["kappa_3way"] = cohen_kappa(human, judge)
    out["confusion"] = {
        h: {j: sum(1 for x, y in zip(human, judge) if (x, y) == (h, j)) for j in LABELS} for h in LABELS
    }
    out["n_stale"] = int(labelled["label_stale"].sum()) if "label_stale" in labelled.columns else 0
    out["partial_as"] = partial_as
    return out


DISAGREEMENT_COLUMNS = [
    "model",
    "set",
    "id",
    "category",
    "prompt",
    "response",
    "human_label",
    "judge_label",
    "reason",
    "reviewer",
    "note",
]


def disagreements(
    labelled: pd.DataFrame, partial_as: str = "compliance", three_way: bool = False
) -> pd.DataFrame:
    """Answers where the reviewer and the judge differ, side by side (``DISAGREEMENT_COLUMNS`` that exist).

    By default a difference counts only when it changes the refusal count under ``partial_as``;
    ``three_way=True`` also lists partial vs refusal/compliance differences that do not.
    """
    check_partial_as(partial_as)
    rows = labelled[labelled["human_label"].notna()]
    differ = [
        h != j if three_way else counts_as_refusal(h, partial_as) != counts_as_refusal(j, partial_as)
        for h, j in zip(rows["human_label"], rows["judge_label"])
    ]
    return rows.loc[differ, [c for c in DISAGREEMENT_COLUMNS if c in rows.columns]]


# -- metrics with human labels ------------------------------------------------------------------
def apply_labels(
    responses: pd.DataFrame, labels: pd.DataFrame, partial_as: str = "compliance", use_human: bool = True
) -> pd.DataFrame:
    """The responses with ``refusal`` recomputed: the human label where a current one exists (when
    ``use_human``), the judge's verdict elsewhere, partial answers counted per ``partial_as`` on both
    sides; ``label_source`` says which ("human" / "judge"). Feed it to ``evaluation.summarize``."""
    check_partial_as(partial_as)
    df = attach_labels(responses, labels)
    human = df["human_label"].notna() & use_human
    final = df["human_label"].where(human, df["judge_label"])
    df["refusal"] = [counts_as_refusal(x, partial_as) for x in final]
    df["label_source"] = ["human" if h else "judge" for h in human]
    return df


def summarize_with_labels(
    responses: pd.DataFrame, labels: pd.DataFrame, partial_as: str = "compliance", by_category: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(judge-only summary, summary with human labels where they exist), both from ``evaluation.summarize``
    (n, refusal_rate, Wilson CI, headline metric per model and set); the second has ``n_human``, the
    answers of each group a person labelled."""

    judged = apply_labels(responses, labels, partial_as, use_human=False)
    human = apply_labels(responses, labels, partial_as, use_human=True)
    s_judge = summarize(judged, by_category=by_category)
    s_human = summarize(human, by_category=by_category)
    keys = [c for c in ("model", "set", "category") if c in s_human.columns]
    counts = human.assign(_h=human["label_source"].eq("human"))
    if by_category:
        counts["category"] = counts["category"].fillna("(none)")
    n_human = counts.groupby(keys, sort=False)["_h"].sum().rename("n_human").reset_index()
    s_human = s_human.merge(n_human, on=keys, how="left")
    return s_judge, s_human


@dataclass
class AuditReport:
    """Everything an audit page shows for one evaluation."""

    evaluation: str
    partial_as: str
    labelled: pd.DataFrame  # every answer, with judge_label / human_label / label_stale (attach_labels)
    agreement: dict[str, Any]  # see agreement()
    disagreements: pd.DataFrame  # see disagreements()
    summary_judge: pd.DataFrame  # evaluation.summarize() from the judge alone
    summary_human: pd.DataFrame  # ... with human labels where they exist (+ n_human)
    n_labels: int = 0  # labels stored, stale ones included
    orphaned: list[tuple[str, str, str]] = field(
        default_factory=list
    )  # labels of answers no longer in the evaluation


def audit_report(
    run: Run, evaluation: str = "comparison", partial_as: str = "compliance", by_category: bool = False
) -> AuditReport:
    """Load an evaluation and its labels and compute agreement, disagreements and both summaries."""

    check_partial_as(partial_as)
    responses, _ = load_evaluation(run, evaluation)
    labels = load_labels(run, evaluation)
    labelled = attach_labels(responses, labels)
    model = (
        labelled["model"].astype(str) if "model" in labelled.columns else pd.Series("", index=labelled.index)
    )
    present = set(zip(model, labelled["set"].astype(str), labelled["id"].astype(str)))
    orphaned = [k for k in (_key_of(r) for r in labels.to_dict("records")) if k not in present]
    s_judge, s_human = summarize_with_labels(responses, labels, partial_as, by_category)
    return AuditReport(
        evaluation,
        partial_as,
        labelled,
        agreement(labelled, partial_as),
        disagreements(labelled, partial_as),
        s_judge,
        s_human,
        len(labels),
        orphaned,
    )
