"""BatchPlan: compose, edit and validate the mixed safe/unsafe batches of an analysis.

The risk difference of an expert is measured *inside* a batch (unsafe rate minus safe rate), and
training later replays exactly the same batches, so the plan is the contract between analysis
and training. Each batch holds its safe block first, then its unsafe block::

    from moe_core.batches import compose_batches, move, check, save_plan, load_plan
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
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

from .runs import atomic_write_json
from .types import LABELS, Label, PromptItem

log = logging.getLogger(__name__)

PLAN_FORMAT = "moe-safety-lab/batch-plan@1"
FRAME_COLUMNS = ["batch_idx", "in_batch_idx", "label", "id", "text", "goal", "pair_id", "source", "category"]


class BatchPlanError(ValueError):
    """A batch plan cannot be built or used; the message says what to change.

    ``issues`` holds the validation errors behind it (empty for composition errors).
    """

    def __init__(self, message: str, issues: Sequence["Issue"] = ()) -> None:
        super().__init__(message)
        self.issues = list(issues)


@dataclass(frozen=True)
class Issue:
    """One finding of ``validate``: errors block analysis/training, warnings are shown."""

    severity: Literal["error", "warning"]
    batch_idx: int | None  # None for plan-wide findings
    message: str
    code: str = ""  # stable machine-readable kind, e.g. "duplicate_text", "uneven_size"

    def __str__(self) -> str:
        where = "plan" if self.batch_idx is None else f"batch {self.batch_idx}"
        return f"{self.severity} ({where}): {self.message}"


@dataclass
class Batch:
    """One analysis (and later training) batch: its safe block, then its unsafe block."""

    batch_idx: int
    safe: list[PromptItem] = field(default_factory=list)
    unsafe: list[PromptItem] = field(default_factory=list)

    @property
    def items(self) -> list[PromptItem]:
        return [*self.safe, *self.unsafe]

    @property
    def labels(self) -> list[Label]:
        return ["safe"] * len(self.safe) + ["unsafe"] * len(self.unsafe)

    @property
    def size(self) -> int:
        return len(self.safe) + len(self.unsafe)

    def block(self, label: Label) -> list[PromptItem]:
        return self.safe if label == "safe" else self.unsafe


@dataclass
class BatchPlan:
    """The ordered batches of one analysis plus the settings that made them."""

    batches: list[Batch]
    batch_size: int = 16  # intended items per batch
    safe_ratio: float = 0.5  # intended share of safe items per batch
    seed: int = 0  # seed of the shuffle that composed the plan
    paired: bool = False  # pairs were placed together (and separation is warned about)
    meta: dict[str, Any] = field(default_factory=dict)  # composition notes: counts, unused items

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def num_items(self) -> int:
        return sum(b.size for b in self.batches)

    @property
    def batch_indices(self) -> list[int]:
        return [b.batch_idx for b in self.batches]

    def items(self) -> list[PromptItem]:
        return [it for b in self.batches for it in b.items]

    def batch(self, batch_idx: int) -> Batch:
        return self.batches[_batch_pos(self, batch_idx)]

    def locate(self, item_id: str) -> tuple[int, Label, int]:
        """(batch_idx, label, position inside its label block) of an item."""
        for b in self.batches:
            for label in LABELS:
                for i, it in enumerate(b.block(label)):
                    if it.id == item_id:
                        return b.batch_idx, label, i
        raise BatchPlanError(f"no item with id {item_id!r} in the batch plan")

    # -- tables and JSON --------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """One row per item in plan order (batch, then safe block, then unsafe block)."""
        rows = [
            {
                "batch_idx": b.batch_idx,
                "in_batch_idx": j,
                "label": it.label,
                "id": it.id,
                "text": it.text,
                "goal": it.goal,
                "pair_id": it.pair_id,
                "source": it.source,
                "category": it.category,
            }
            for b in self.batches
            for j, it in enumerate(b.items)
        ]
        df = pd.DataFrame(rows, columns=FRAME_COLUMNS)
        return df.astype({"batch_idx": "int64", "in_batch_idx": "int64"})

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "batch_size": self.batch_size,
            "safe_ratio": self.safe_ratio,
            "seed": self.seed,
            "paired": self.paired,
            "meta": self.meta,
            "batches": [
                {
                    "batch_idx": b.batch_idx,
                    "safe": [it.to_dict() for it in b.safe],
                    "unsafe": [it.to_dict() for it in b.unsafe],
                }
                for b in self.batches
            ],
        }

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> "BatchPlan":
        if not isinstance(d, Mapping) or not isinstance(d.get("batches"), list):
            raise BatchPlanError("not a batch-plan file: it needs a 'batches' list")
        if d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise BatchPlanError(f"unsupported batch-plan format {d.get('format')!r}; expected {PLAN_FORMAT!r}")
        batches = []
        for k, bd in enumerate(d["batches"]):
            try:
                blocks = {label: [_item_from_dict(x, label) for x in bd.get(label, [])] for label in LABELS}
                batches.append(Batch(int(bd["batch_idx"]), blocks["safe"], blocks["unsafe"]))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise BatchPlanError(f"batch entry #{k} of the plan is malformed: {e}") from e
        try:
            return cls(
                batches=batches,
                batch_size=int(d.get("batch_size", 16)),
                safe_ratio=float(d.get("safe_ratio", 0.5)),
                seed=int(d.get("seed", 0)),
                paired=bool(d.get("paired", False)),
                meta=dict(d.get("meta") or {}),
            )
        except (TypeError, ValueError) as e:
            raise BatchPlanError(f"batch-plan settings are malformed: {e}") from e


def _item_from_dict(x: Mapping[str, Any], label: Label) -> PromptItem:
    try:
        item = PromptItem.from_dict(x)
    except TypeError as e:  # a required field (id, text, label) is missing
        raise ValueError(f"item {x.get('id', '?')!r} lacks a required field (id, text, label): {e}") from e
    if item.label != label:
        raise ValueError(f"item {item.id!r} has label {item.label!r} but sits in the {label} block")
    return item


def save_plan(path: str | Path, plan: BatchPlan) -> Path:
    """Write the plan as readable JSON, atomically (a crash never leaves half a plan)."""
    return atomic_write_json(path, plan.to_json_dict())


def load_plan(path: str | Path) -> BatchPlan:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no batch plan at {path}; compose and save one first")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BatchPlanError(f"{path} is not valid JSON ({e}); re-save the plan or delete the file") from e
    try:
        return BatchPlan.from_json_dict(d)
    except BatchPlanError as e:
        raise BatchPlanError(f"{path}: {e}") from e


# -- composition ----------------------------------------------------------------------------
def split_counts(batch_size: int, safe_ratio: float) -> tuple[int, int]:
    """(n_safe, n_unsafe) per batch; half rounds up. Raises if either would be 0."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
        raise BatchPlanError(f"batch_size must be an integer >= 2 (one safe and one unsafe item); got {batch_size!r}")
    if not isinstance(safe_ratio, (int, float)) or not 0.0 < float(safe_ratio) < 1.0:
        raise BatchPlanError(
            f"safe_ratio must be strictly between 0 and 1 (0.5 = half safe); got {safe_ratio!r}"
        )
    n_safe = _round_half_up(batch_size * safe_ratio)
    n_unsafe = batch_size - n_safe
    if n_safe == 0 or n_unsafe == 0:
        which = "safe" if n_safe == 0 else "unsafe"
        raise BatchPlanError(
            f"safe_ratio={safe_ratio} with batch_size={batch_size} gives {n_safe} safe and {n_unsafe} "
            f"unsafe items per batch: a batch needs both labels to measure a risk difference. "
            f"Use a safe_ratio between {1 / batch_size:.3g} and {1 - 1 / batch_size:.3g}, "
            f"or a larger batch_size (no {which} items now)"
        )
    return n_safe, n_unsafe


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


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


def _too_few_message(n_s: int, n_u: int, need_s: int, need_u: int, batch_size: int) -> str:
    short = [f"{need - have} more {lab}" for lab, have, need in (("safe", n_s, need_s), ("unsafe", n_u, need_u)) if have < need]
    msg = (
        f"too few prompts to fill one batch of {batch_size} ({need_s} safe + {need_u} unsafe): "
        f"got {n_s} safe and {n_u} unsafe"
    )
    if short:
        return msg + f"; add {' and '.join(short)} prompt(s), or lower batch_size"
    return msg + (  # enough of each label, so what is missing is pairs (or twin-less fillers)
        " but not enough complete pairs (or, for a ratio other than 0.5, unpaired items of the larger "
        "label); add pairs, use safe_ratio=0.5, or pass paired=False"
    )


def _order(items: list[Any], rng: np.random.Generator, shuffle: bool) -> list[Any]:
    if not shuffle or len(items) < 2:
        return list(items)
    return [items[i] for i in rng.permutation(len(items))]


_Blocks = list[tuple[list[PromptItem], list[PromptItem]]]


def _compose_unpaired(
    safe: list[PromptItem], unsafe: list[PromptItem], n_s: int, n_u: int,
    rng: np.random.Generator, shuffle: bool, drop_incomplete: bool,
) -> _Blocks:
    safe, unsafe = _order(safe, rng, shuffle), _order(unsafe, rng, shuffle)
    n_full = min(len(safe) // n_s, len(unsafe) // n_u)
    blocks = [(safe[i * n_s:(i + 1) * n_s], unsafe[i * n_u:(i + 1) * n_u]) for i in range(n_full)]
    return _maybe_last(blocks, safe[n_full * n_s:][:n_s], unsafe[n_full * n_u:][:n_u], drop_incomplete)


def _maybe_last(
    blocks: _Blocks, last_s: list[PromptItem], last_u: list[PromptItem], drop_incomplete: bool
) -> _Blocks:
    """Append the incomplete last batch if asked and it holds both labels (else log the drop)."""
    if not (last_s or last_u):
        return blocks
    if drop_incomplete or not (last_s and last_u):
        log.info(
            "dropped the incomplete last batch (%d safe, %d unsafe)%s", len(last_s), len(last_u),
            "" if drop_incomplete else ": it lacks one label",
        )
        return blocks
    return [*blocks, (list(last_s), list(last_u))]


def _compose_paired(
    safe: list[PromptItem], unsafe: list[PromptItem], n_s: int, n_u: int,
    rng: np.random.Generator, shuffle: bool, drop_incomplete: bool,
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
    loose = {lab: [it for it in items if it.id not in twinned] for lab, items in (("safe", safe), ("unsafe", unsafe))}
    pairs, fillers = _order(pairs, rng, shuffle), _order(loose[big], rng, shuffle)
    n_full = len(pairs) // n_pair
    if n_extra:
        n_full = min(n_full, len(fillers) // n_extra)

    def block_of(ps: list[tuple[PromptItem, PromptItem]], fs: list[PromptItem]) -> tuple[list, list]:
        s, u = [p[0] for p in ps], [p[1] for p in ps]
        (s if big == "safe" else u).extend(fs)
        return s, u

    blocks = [
        block_of(pairs[i * n_pair:(i + 1) * n_pair], fillers[i * n_extra:(i + 1) * n_extra]) for i in range(n_full)
    ]
    rest_p, rest_f = pairs[n_full * n_pair:], fillers[n_full * n_extra:]
    last_s, last_u = block_of(rest_p[:n_pair], rest_f[:n_extra])
    return _maybe_last(blocks, last_s, last_u, drop_incomplete)


# -- edits: each returns a new plan --------------------------------------------------------
def _copy(plan: BatchPlan) -> BatchPlan:
    return BatchPlan(
        batches=[Batch(b.batch_idx, list(b.safe), list(b.unsafe)) for b in plan.batches],
        batch_size=plan.batch_size,
        safe_ratio=plan.safe_ratio,
        seed=plan.seed,
        paired=plan.paired,
        meta=copy.deepcopy(plan.meta),
    )


def _batch_pos(plan: BatchPlan, batch_idx: int) -> int:
    for pos, b in enumerate(plan.batches):
        if b.batch_idx == batch_idx:
            return pos
    raise BatchPlanError(f"no batch {batch_idx} in the plan (it has batches {plan.batch_indices})")


def _check_new_id(plan: BatchPlan, item: PromptItem, replacing: str | None = None) -> None:
    if item.label not in LABELS:
        raise BatchPlanError(f"item {item.id!r} has label {item.label!r}; expected 'safe' or 'unsafe'")
    if item.id != replacing and any(it.id == item.id for it in plan.items()):
        raise BatchPlanError(f"an item with id {item.id!r} is already in the plan; give the new item a unique id")


def _insert(block: list[PromptItem], item: PromptItem, position: int | None) -> None:
    block.insert(len(block) if position is None else max(0, min(position, len(block))), item)


def move(plan: BatchPlan, item_id: str, to_batch: int, position: int | None = None) -> BatchPlan:
    """Move an item into batch ``to_batch`` (its own label block; at ``position`` or the end)."""
    new = _copy(plan)
    src, label, i = new.locate(item_id)
    dst = new.batch(to_batch)
    item = new.batch(src).block(label).pop(i)
    _insert(dst.block(label), item, position)
    return new


def swap(plan: BatchPlan, item_id_a: str, item_id_b: str) -> BatchPlan:
    """Exchange the places of two items of the same label (batch ratios stay as they are)."""
    new = _copy(plan)
    ba, la, ia = new.locate(item_id_a)
    bb, lb, ib = new.locate(item_id_b)
    if la != lb:
        raise BatchPlanError(
            f"cannot swap {la} item {item_id_a!r} with {lb} item {item_id_b!r}: a swap keeps each batch's "
            "ratio; use move() to put an item into another batch"
        )
    blk_a, blk_b = new.batch(ba).block(la), new.batch(bb).block(lb)
    blk_a[ia], blk_b[ib] = blk_b[ib], blk_a[ia]
    return new


def replace(plan: BatchPlan, item_id: str, new_item: PromptItem) -> BatchPlan:
    """Put ``new_item`` in place of an item (same slot; its own label block if the label differs)."""
    new = _copy(plan)
    _check_new_id(new, new_item, replacing=item_id)
    b, label, i = new.locate(item_id)
    block = new.batch(b).block(label)
    if new_item.label == label:
        block[i] = new_item
    else:
        block.pop(i)
        new.batch(b).block(new_item.label).append(new_item)
    return new


def drop(plan: BatchPlan, item_id: str) -> BatchPlan:
    """Remove one item (its batch becomes smaller; ``validate`` says so)."""
    new = _copy(plan)
    b, label, i = new.locate(item_id)
    new.batch(b).block(label).pop(i)
    return new


def add(plan: BatchPlan, batch_idx: int, item: PromptItem, position: int | None = None) -> BatchPlan:
    """Add a new item to a batch, in its label block (at ``position`` or the end)."""
    new = _copy(plan)
    _check_new_id(new, item)
    _insert(new.batch(batch_idx).block(item.label), item, position)
    return new


def drop_batch(plan: BatchPlan, batch_idx: int) -> BatchPlan:
    """Remove a whole batch; the others keep their batch_idx (artifacts stay aligned)."""
    new = _copy(plan)
    del new.batches[_batch_pos(new, batch_idx)]
    return new


def renumber(plan: BatchPlan) -> BatchPlan:
    """Number batches 0..n-1 in their current order (do it before any analysis artifact exists)."""
    new = _copy(plan)
    for i, b in enumerate(new.batches):
        b.batch_idx = i
    return new


# -- validation ----------------------------------------------------------------------------
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
                issues.append(Issue(
                    "error", grp[0][0],
                    f"{len(grp)} items share the same {what} {shown!r}: "
                    + ", ".join(_where(b, it) for b, it in grp) + "; keep one of them",
                    code,
                ))
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
        issues.append(Issue("error", None, msg + ("" if plan.batches else " (the plan has no batches)"), "too_few"))
    seen: dict[int, int] = defaultdict(int)
    for b in plan.batches:
        seen[b.batch_idx] += 1
    for bi, n in seen.items():
        if n > 1:
            issues.append(Issue("error", bi, f"{n} batches share batch_idx {bi}; call renumber()", "duplicate_batch_idx"))
    issues += _duplicate_issues([(b.batch_idx, it) for b in plan.batches for it in b.items])
    warnings: list[Issue] = []
    for b in plan.batches:
        for label in LABELS:
            for it in b.block(label):
                if it.label != label:
                    issues.append(Issue("error", b.batch_idx, f"item {it.id!r} ({it.label}) sits in the {label} block", "wrong_block"))
        if b.size == 0:
            issues.append(Issue("error", b.batch_idx, f"batch {b.batch_idx} is empty; add items or drop_batch()", "empty_batch"))
            continue
        missing = [lab for lab in LABELS if not b.block(lab)]
        if missing:
            issues.append(Issue(
                "error", b.batch_idx,
                f"batch {b.batch_idx} has no {missing[0]} item, so its risk difference is undefined; "
                f"add or move a {missing[0]} item into it, or drop_batch()",
                "missing_label",
            ))
            continue
        if b.size != plan.batch_size:
            warnings.append(Issue(
                "warning", b.batch_idx,
                f"batch {b.batch_idx} has {b.size} items, not {plan.batch_size}: the training sampler keeps "
                f"it whole, so that step sees {b.size} examples",
                "uneven_size",
            ))
        # a full batch must match the plan exactly; a smaller one may round either way
        exact = b.size * plan.safe_ratio
        ok = {n_s} if b.size == plan.batch_size else {math.floor(exact + 1e-9), math.ceil(exact - 1e-9)}
        if len(b.safe) not in ok:
            warnings.append(Issue(
                "warning", b.batch_idx,
                f"batch {b.batch_idx} has {len(b.safe)} safe + {len(b.unsafe)} unsafe items "
                f"(ratio {len(b.safe) / b.size:.2f}); the plan's safe_ratio is {plan.safe_ratio:.2f}",
                "ratio",
            ))
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
            "warning", w["safe"],
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
