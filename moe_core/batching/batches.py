"""BatchPlan: compose, edit and validate the mixed safe/unsafe batches of an analysis.

The risk difference of an expert is measured *inside* a batch (unsafe rate minus safe rate), and
training later replays exactly the same batches, so the plan is the contract between analysis
and training. Each batch holds its safe block first, then its unsafe block::

    from moe_core.batching.batches import compose_batches; from moe_core.batching.edits import move; from moe_core.batching.validation import check; from moe_core.batching.plan import save_plan, load_plan
    plan = compose_batches(safe_items, unsafe_items, batch_size=16, safe_ratio=0.5, seed=0)
    plan.batches[0].labels        # ['safe'] * 8 + ['unsafe'] * 8
    plan = move(plan, "advbench-12", to_batch=3)    # edits return a NEW plan (undo = keep the old)
    warnings = check(plan)        # raises BatchPlanError on errors, returns the warnings
    save_plan(run.path_for("plan"), plan); plan = load_plan(path)
    plan.to_frame()               # one row per item, for tables

Rounding: a batch holds ``n_safe = floor(batch_size * safe_ratio + 0.5)`` safe items (half rounds
up: 10 x 0.25 -> 3) and ``batch_size - n_safe`` unsafe items; see ``split_counts``.

Paired mode (automatic when every item has a ``pair_id``): the safe and unsafe items of one pair
sit in the same batch at the same position of their blocks, so batch-level differences are not
differences of topic. When the ratio is not 0.5, the extra positions of the larger block take
items of that label that have no twin.

Where the rest lives: ``batching.plan`` (BatchPlan, Batch, Issue, BatchPlanError,
save_plan/load_plan, split_counts), ``batching.edits`` (move, swap, replace, drop, add, drop_batch,
renumber), ``batching.validation`` (validate, check); this module composes plans (``compose_batches``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

# What moved to the modules below is re-exported: ``from moe_core.batching.batches import X`` keeps working.
from moe_core.batching.plan import (
    Batch,
    BatchPlan,
    BatchPlanError,
    _too_few_message,
    split_counts,
)
from moe_core.batching.validation import _duplicate_issues, check
from moe_core.types import LABELS, Label, PromptItem

log = logging.getLogger(__name__)


# -- composition ----------------------------------------------------------------------------
def compose_batches(
    safe: Sequence[PromptItem],
    unsafe: Sequence[PromptItem],
    batch_size: int = 16,
    safe_ratio: float = 0.5,
    seed: int = 0,
    shuffle: bool = True,
    paired: bool | None = None,
    drop_incomplete: bool = True,
) -> BatchPlan:
    """Split safe and unsafe prompts into mixed batches (safe block, then unsafe block).

    ``paired=None`` pairs automatically when every item has a ``pair_id``. The last incomplete
    batch is dropped (and logged) unless ``drop_incomplete=False``; it is kept only if it still
    holds both labels. Raises ``BatchPlanError`` with what to change when no batch can be made.
    """
    n_safe, n_unsafe = split_counts(batch_size, safe_ratio)
    safe, unsafe = list(safe), list(unsafe)
    _check_inputs(safe, unsafe)
    if paired is None:
        paired = bool(safe) and bool(unsafe) and all(it.pair_id for it in (*safe, *unsafe))
    rng = np.random.default_rng(seed)
    compose = _compose_paired if paired else _compose_unpaired
    blocks = compose(safe, unsafe, n_safe, n_unsafe, rng, shuffle, drop_incomplete)
    if not blocks:
        raise BatchPlanError(_too_few_message(len(safe), len(unsafe), n_safe, n_unsafe, batch_size))
    batches = [Batch(i, s, u) for i, (s, u) in enumerate(blocks)]
    incomplete = batches[-1].size < batch_size
    unused = {
        "safe": len(safe) - sum(len(b.safe) for b in batches),
        "unsafe": len(unsafe) - sum(len(b.unsafe) for b in batches),
    }
    if any(unused.values()):
        log.info("batch plan leaves %d safe and %d unsafe prompts unused", unused["safe"], unused["unsafe"])
    plan = BatchPlan(
        batches=batches,
        batch_size=int(batch_size),
        safe_ratio=float(safe_ratio),
        seed=int(seed),
        paired=bool(paired),
        meta={
            "n_safe_per_batch": n_safe,
            "n_unsafe_per_batch": n_unsafe,
            "n_safe_input": len(safe),
            "n_unsafe_input": len(unsafe),
            "shuffle": bool(shuffle),
            "drop_incomplete": bool(drop_incomplete),
            "kept_incomplete_batch": bool(incomplete),
            "unused": unused,
        },
    )
    check(plan)
    return plan


def _check_inputs(safe: list[PromptItem], unsafe: list[PromptItem]) -> None:
    for label, items in (("safe", safe), ("unsafe", unsafe)):
        wrong = [it.id for it in items if it.label != label]
        if wrong:
            raise BatchPlanError(
                f"{len(wrong)} item(s) passed as {label} carry another label (e.g. {wrong[:3]}); "
                f"pass each item in the list of its own label"
            )
    issues = _duplicate_issues([(None, it) for it in (*safe, *unsafe)])
    if issues:
        raise BatchPlanError(
            "the prompt sets contain duplicates; remove them before composing batches:\n"
            + "\n".join(f"- {i.message}" for i in issues),
            issues,
        )


def _order(items: list[Any], rng: np.random.Generator, shuffle: bool) -> list[Any]:
    if not shuffle or len(items) < 2:
        return list(items)
    return [items[i] for i in rng.permutation(len(items))]


_Blocks = list[tuple[list[PromptItem], list[PromptItem]]]


def _compose_unpaired(
    safe: list[PromptItem],
    unsafe: list[PromptItem],
    n_s: int,
    n_u: int,
    rng: np.random.Generator,
    shuffle: bool,
    drop_incomplete: bool,
) -> _Blocks:
    safe, unsafe = _order(safe, rng, shuffle), _order(unsafe, rng, shuffle)
    n_full = min(len(safe) // n_s, len(unsafe) // n_u)
    blocks = [(safe[i * n_s : (i + 1) * n_s], unsafe[i * n_u : (i + 1) * n_u]) for i in range(n_full)]
    return _maybe_last(blocks, safe[n_full * n_s :][:n_s], unsafe[n_full * n_u :][:n_u], drop_incomplete)


def _maybe_last(
    blocks: _Blocks, last_s: list[PromptItem], last_u: list[PromptItem], drop_incomplete: bool
) -> _Blocks:
    """Append the incomplete last batch if asked and it holds both labels (else log the drop)."""
    if not (last_s or last_u):
        return blocks
    if drop_incomplete or not (last_s and last_u):
        log.info(
            "dropped the incomplete last batch (%d safe, %d unsafe)%s",
            len(last_s),
            len(last_u),
            "" if drop_incomplete else ": it lacks one label",
        )
        return blocks
    return [*blocks, (list(last_s), list(last_u))]


def _compose_paired(
    safe: list[PromptItem],
    unsafe: list[PromptItem],
    n_s: int,
    n_u: int,
    rng: np.random.Generator,
    shuffle: bool,
    drop_incomplete: bool,
) -> _Blocks:
    by_pair: dict[str, dict[str, list[PromptItem]]] = defaultdict(lambda: {"safe": [], "unsafe": []})
    for it in (*safe, *unsafe):
        if it.pair_id:
            by_pair[it.pair_id][it.label].append(it)
    for pid, sides in by_pair.items():
        for label in LABELS:
            if len(sides[label]) > 1:
                raise BatchPlanError(
                    f"pair_id {pid!r} has {len(sides[label])} {label} items "
                    f"({[it.id for it in sides[label]]}); a pair is one safe and one unsafe item"
                )
    pairs = [(s["safe"][0], s["unsafe"][0]) for s in by_pair.values() if s["safe"] and s["unsafe"]]
    if not pairs:
        raise BatchPlanError(
            "paired mode needs pairs, but no safe item shares a pair_id with an unsafe item; pass paired=False"
        )
    twinned = {it.id for p in pairs for it in p}
    big: Label = "safe" if n_s > n_u else "unsafe"
    n_pair, n_extra = min(n_s, n_u), abs(n_s - n_u)
    loose = {
        lab: [it for it in items if it.id not in twinned]
        for lab, items in (("safe", safe), ("unsafe", unsafe))
    }
    pairs, fillers = _order(pairs, rng, shuffle), _order(loose[big], rng, shuffle)
    n_full = len(pairs) // n_pair
    if n_extra:
        n_full = min(n_full, len(fillers) // n_extra)

    def block_of(ps: list[tuple[PromptItem, PromptItem]], fs: list[PromptItem]) -> tuple[list, list]:
        s, u = [p[0] for p in ps], [p[1] for p in ps]
        (s if big == "safe" else u).extend(fs)
        return s, u

    blocks = [
        block_of(pairs[i * n_pair : (i + 1) * n_pair], fillers[i * n_extra : (i + 1) * n_extra])
        for i in range(n_full)
    ]
    rest_p, rest_f = pairs[n_full * n_pair :], fillers[n_full * n_extra :]
    last_s, last_u = block_of(rest_p[:n_pair], rest_f[:n_extra])
    return _maybe_last(blocks, last_s, last_u, drop_incomplete)
