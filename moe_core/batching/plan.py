"""The batch plan itself: ``BatchPlan`` and ``Batch``, validation findings (``Issue``),
``BatchPlanError``, the plan's JSON file (``save_plan``/``load_plan``) and the per-batch counts
(``split_counts``). Plans are composed in ``batching.batches``; edits live in ``batching.edits`` and
the checks in ``batching.validation``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from moe_core.errors import MoELabError
from moe_core.store.atomic import atomic_write_json
from moe_core.store.files import read_json
from moe_core.types import LABELS, Label, PromptItem

PLAN_FORMAT = "moe-safety-lab/batch-plan@1"
FRAME_COLUMNS = ["batch_idx", "in_batch_idx", "label", "id", "text", "goal", "pair_id", "source", "category"]


class BatchPlanError(MoELabError, ValueError):
    """A batch plan cannot be built or used; the message says what to change.

    ``issues`` holds the validation errors behind it (empty for composition errors).
    """

    def __init__(self, message: str, issues: Sequence[Issue] = ()) -> None:
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
    def from_json_dict(cls, d: Mapping[str, Any]) -> BatchPlan:
        if not isinstance(d, Mapping) or not isinstance(d.get("batches"), list):
            raise BatchPlanError("not a batch-plan file: it needs a 'batches' list")
        if d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise BatchPlanError(
                f"unsupported batch-plan format {d.get('format')!r}; expected {PLAN_FORMAT!r}"
            )
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
        raise BatchPlanError(
            f"item {x.get('id', '?')!r} lacks a required field (id, text, label): {e}"
        ) from e
    if item.label != label:
        raise BatchPlanError(f"item {item.id!r} has label {item.label!r} but sits in the {label} block")
    return item


def save_plan(path: str | Path, plan: BatchPlan) -> Path:
    """Write the plan as readable JSON, atomically (a crash never leaves half a plan)."""
    return atomic_write_json(path, plan.to_json_dict())


def load_plan(path: str | Path) -> BatchPlan:
    d = read_json(
        path,
        "batch plan",
        missing="compose and save one first",
        damaged="re-save the plan or delete the file",
        error=BatchPlanError,
    )
    try:
        return BatchPlan.from_json_dict(d)
    except BatchPlanError as e:
        raise BatchPlanError(f"{path}: {e}") from e


# -- per-batch counts ----------------------------------------------------------------------
def split_counts(batch_size: int, safe_ratio: float) -> tuple[int, int]:
    """(n_safe, n_unsafe) per batch; half rounds up. Raises if either would be 0."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
        raise BatchPlanError(
            f"batch_size must be an integer >= 2 (one safe and one unsafe item); got {batch_size!r}"
        )
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


def _too_few_message(n_s: int, n_u: int, need_s: int, need_u: int, batch_size: int) -> str:
    short = [
        f"{need - have} more {lab}"
        for lab, have, need in (("safe", n_s, need_s), ("unsafe", n_u, need_u))
        if have < need
    ]
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


def _batch_pos(plan: BatchPlan, batch_idx: int) -> int:
    for pos, b in enumerate(plan.batches):
        if b.batch_idx == batch_idx:
            return pos
    raise BatchPlanError(f"no batch {batch_idx} in the plan (it has batches {plan.batch_indices})")
