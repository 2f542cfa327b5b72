"""Edits of a batch plan: ``move``, ``swap``, ``replace``, ``drop``, ``add``, ``drop_batch`` and
``renumber``. Each returns a NEW plan (undo = keep the old one); ``validate`` says what an edit
broke. Import them from ``moe_core.batching.batches``.
"""

from __future__ import annotations

import copy

from moe_core.batching.plan import Batch, BatchPlan, BatchPlanError, _batch_pos
from moe_core.types import LABELS, PromptItem


def _copy(plan: BatchPlan) -> BatchPlan:
    return BatchPlan(
        batches=[Batch(b.batch_idx, list(b.safe), list(b.unsafe)) for b in plan.batches],
        batch_size=plan.batch_size,
        safe_ratio=plan.safe_ratio,
        seed=plan.seed,
        paired=plan.paired,
        meta=copy.deepcopy(plan.meta),
    )


def _check_new_id(plan: BatchPlan, item: PromptItem, replacing: str | None = None) -> None:
    if item.label not in LABELS:
        raise BatchPlanError(f"item {item.id!r} has label {item.label!r}; expected 'safe' or 'unsafe'")
    if item.id != replacing and any(it.id == item.id for it in plan.items()):
        raise BatchPlanError(
            f"an item with id {item.id!r} is already in the plan; give the new item a unique id"
        )


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
