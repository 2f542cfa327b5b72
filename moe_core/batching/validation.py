"""Checks of a batch plan: ``validate`` lists every problem (errors first, then warnings) and
``check`` raises ``BatchPlanError`` on errors. Import them from ``moe_core.batching.batches``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

from moe_core.batching.plan import (
    BatchPlan,
    BatchPlanError,
    Issue,
    _too_few_message,
    split_counts,
)
from moe_core.types import LABELS, PromptItem

_WS = re.compile(r"\s+")


def _norm_text(text: str) -> str:
    return _WS.sub(" ", text).strip().casefold()


def _where(b: int | None, it: PromptItem) -> str:
    return f"{it.id!r}" if b is None else f"{it.id!r} (batch {b})"


def _duplicate_issues(located: list[tuple[int | None, PromptItem]]) -> list[Issue]:
    issues: list[Issue] = []
    for code, key, what in (
        ("duplicate_id", lambda it: it.id, "id"),
        ("duplicate_text", lambda it: _norm_text(it.text), "text (ignoring case and spacing)"),
    ):
        groups: dict[str, list[tuple[int | None, PromptItem]]] = defaultdict(list)
        for b, it in located:
            groups[key(it)].append((b, it))
        for k, grp in groups.items():
            if len(grp) > 1:
                shown = k if code == "duplicate_id" else (k[:60] + ("..." if len(k) > 60 else ""))
                issues.append(
                    Issue(
                        "error",
                        grp[0][0],
                        f"{len(grp)} items share the same {what} {shown!r}: "
                        + ", ".join(_where(b, it) for b, it in grp)
                        + "; keep one of them",
                        code,
                    )
                )
    return issues


def validate(plan: BatchPlan) -> list[Issue]:
    """Every problem of a plan, errors first; empty when the plan is clean."""
    try:
        n_s, n_u = split_counts(plan.batch_size, plan.safe_ratio)
    except BatchPlanError as e:
        return [Issue("error", None, str(e), "bad_ratio")]
    issues: list[Issue] = []
    tot_s = sum(len(b.safe) for b in plan.batches)
    tot_u = sum(len(b.unsafe) for b in plan.batches)
    if tot_s < n_s or tot_u < n_u:
        msg = _too_few_message(tot_s, tot_u, n_s, n_u, plan.batch_size)
        issues.append(
            Issue("error", None, msg + ("" if plan.batches else " (the plan has no batches)"), "too_few")
        )
    seen: dict[int, int] = defaultdict(int)
    for b in plan.batches:
        seen[b.batch_idx] += 1
    for bi, n in seen.items():
        if n > 1:
            issues.append(
                Issue(
                    "error", bi, f"{n} batches share batch_idx {bi}; call renumber()", "duplicate_batch_idx"
                )
            )
    issues += _duplicate_issues([(b.batch_idx, it) for b in plan.batches for it in b.items])
    warnings: list[Issue] = []
    for b in plan.batches:
        for label in LABELS:
            for it in b.block(label):
                if it.label != label:
                    issues.append(
                        Issue(
                            "error",
                            b.batch_idx,
                            f"item {it.id!r} ({it.label}) sits in the {label} block",
                            "wrong_block",
                        )
                    )
        if b.size == 0:
            issues.append(
                Issue(
                    "error",
                    b.batch_idx,
                    f"batch {b.batch_idx} is empty; add items or drop_batch()",
                    "empty_batch",
                )
            )
            continue
        missing = [lab for lab in LABELS if not b.block(lab)]
        if missing:
            issues.append(
                Issue(
                    "error",
                    b.batch_idx,
                    f"batch {b.batch_idx} has no {missing[0]} item, so its risk difference is undefined; "
                    f"add or move a {missing[0]} item into it, or drop_batch()",
                    "missing_label",
                )
            )
            continue
        if b.size != plan.batch_size:
            warnings.append(
                Issue(
                    "warning",
                    b.batch_idx,
                    f"batch {b.batch_idx} has {b.size} items, not {plan.batch_size}: the training sampler keeps "
                    f"it whole, so that step sees {b.size} examples",
                    "uneven_size",
                )
            )
        # a full batch must match the plan exactly; a smaller one may round either way
        exact = b.size * plan.safe_ratio
        ok = {n_s} if b.size == plan.batch_size else {math.floor(exact + 1e-9), math.ceil(exact - 1e-9)}
        if len(b.safe) not in ok:
            warnings.append(
                Issue(
                    "warning",
                    b.batch_idx,
                    f"batch {b.batch_idx} has {len(b.safe)} safe + {len(b.unsafe)} unsafe items "
                    f"(ratio {len(b.safe) / b.size:.2f}); the plan's safe_ratio is {plan.safe_ratio:.2f}",
                    "ratio",
                )
            )
    if plan.paired:
        warnings += _separated_pairs(plan)
    return issues + warnings


def _separated_pairs(plan: BatchPlan) -> list[Issue]:
    where: dict[str, dict[str, int]] = defaultdict(dict)
    for b in plan.batches:
        for it in b.items:
            if it.pair_id:
                where[it.pair_id][it.label] = b.batch_idx
    return [
        Issue(
            "warning",
            w["safe"],
            f"pair {pid!r} is split: its safe item is in batch {w['safe']}, its unsafe item in batch "
            f"{w['unsafe']}; move one so the pair shares a batch",
            "pair_separated",
        )
        for pid, w in where.items()
        if len(w) == 2 and w["safe"] != w["unsafe"]
    ]


def check(plan: BatchPlan) -> list[Issue]:
    """Raise ``BatchPlanError`` listing every error; return the warnings otherwise."""
    issues = validate(plan)
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        raise BatchPlanError(
            f"the batch plan has {len(errors)} error(s):\n" + "\n".join(f"- {e}" for e in errors), errors
        )
    return [i for i in issues if i.severity == "warning"]
