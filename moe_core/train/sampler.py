"""Batch-preserving samplers and the collator: one training step = one whole analysis batch.

Two forms, one grouping (rows by ``batch_idx``, in-batch order by ``in_batch_idx``):

* :class:`AnalysisBatchSampler` (the main path) is a *batch* sampler: it yields one list of row
  indices per analysis batch, so batch sizes may differ freely (filtered pairs: 10 instead of
  16). It sets ``batch_size = None``, which makes accelerate's ``BatchSamplerShard``
  (``split_batches=False``) hand whole batches round-robin to the ranks and, with
  ``even_batches=True``, fill the last round with whole batches from the start of the epoch,
  never with loose indices. The trainers (``moe_core.train.training``) use it and still let
  accelerate prepare the DataLoader::

      sampler = AnalysisBatchSampler(dataset)          # dataset has batch_idx / in_batch_idx
      loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=BatchCollator(pad_token_id=0))

* :class:`BatchPreservingSampler` is the seed's class, exactly: a plain ``Sampler`` that yields
  the row indices flat, batch after batch, for ``DataLoader(ds, batch_size=16, sampler=...)``.
  That only keeps batches whole when every batch has exactly ``batch_size`` rows, so it checks
  this when it is built and points to the batch-sampler form otherwise::

      sampler = BatchPreservingSampler(dataset, 16, shuffle_batches=True)
      loader = DataLoader(dataset, batch_size=16, sampler=sampler, collate_fn=collator)
      loader = DataLoader(dataset, batch_sampler=sampler.batch_sampler(), collate_fn=collator)  # uneven sizes
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from moe_core.errors import MoELabError

log = logging.getLogger(__name__)


class BatchSamplerError(MoELabError, ValueError):
    """The batch structure of a dataset is not well defined, or does not fit the requested batch size."""


def _column(source: Any, name: str) -> np.ndarray | None:
    """A column of a ``datasets.Dataset`` / dict of columns, or None if absent."""
    names = getattr(source, "column_names", None)
    if names is not None:
        return np.asarray(source.with_format("numpy")[name]) if name in names else None
    if isinstance(source, Mapping):
        return np.asarray(source[name]) if name in source else None
    return None


class AnalysisBatchSampler(Sampler[list[int]]):
    """Yield one list of row indices per analysis batch; shuffle batch order per epoch only.

    ``dataset_or_batch_idx_column`` is a ``datasets.Dataset`` (or dict of columns) with a
    ``batch_idx`` column and optionally ``in_batch_idx``, or just the sequence of batch ids per
    row. Inside a batch, rows are ordered by ``in_batch_idx`` (or kept in row order, which then
    must be contiguous per batch); that order never changes. Unshuffled, batches come in
    ascending ``batch_idx``. Batch order is shuffled with a local ``torch.Generator`` seeded
    with ``seed + epoch`` (call :meth:`set_epoch`; the Trainer does), so every rank computes the
    same order. ``len()`` is the number of batches.

    Worked example (batch 1 was filtered to two rows)::

        >>> s = AnalysisBatchSampler([7, 7, 7, 1, 1, 4, 4, 4], shuffle_batches=False)
        >>> list(s)            # batches in batch_idx order: 1, 4, 7
        [[3, 4], [5, 6, 7], [0, 1, 2]]
        >>> len(s)
        3
        >>> s = AnalysisBatchSampler({"batch_idx": [0, 0, 1, 1], "in_batch_idx": [1, 0, 0, 1]},
        ...                          shuffle_batches=False)
        >>> list(s)            # in-batch order follows in_batch_idx, not row order
        [[1, 0], [2, 3]]
    """

    # accelerate's BatchSamplerShard reads these: batch_size=None means "batches of dynamic
    # length", so it never tops a short batch up with indices of another one.
    batch_size = None
    drop_last = False

    def __init__(
        self,
        dataset_or_batch_idx_column: Any,
        shuffle_batches: bool = True,
        seed: int = 0,
        in_batch_idx: Sequence[int] | None = None,
    ):
        src = dataset_or_batch_idx_column
        if isinstance(shuffle_batches, (int, np.integer)) and not isinstance(
            shuffle_batches, (bool, np.bool_)
        ):
            raise BatchSamplerError(
                f"shuffle_batches={shuffle_batches!r} is not a bool; AnalysisBatchSampler(dataset, shuffle_batches, "
                "seed) takes no batch size (for the seed's BatchPreservingSampler(dataset, batch_size, "
                "shuffle_batches) use that class)"
            )
        batch_idx = _column(src, "batch_idx")
        if batch_idx is None:
            if getattr(src, "column_names", None) is not None or isinstance(src, Mapping):
                raise BatchSamplerError(
                    "the dataset has no 'batch_idx' column; build it with moe_core.train.sft"
                )
            batch_idx = np.asarray(src)
        inner = np.asarray(in_batch_idx) if in_batch_idx is not None else _column(src, "in_batch_idx")
        self.shuffle_batches = bool(shuffle_batches)
        self.seed = int(seed)
        self.epoch = 0
        self.batch_ids, self._batches = _group(batch_idx, inner)

    def set_epoch(self, epoch: int) -> None:
        """Select the batch order of ``epoch`` (same on every rank)."""
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> list[int]:
        """Positions (into :attr:`batch_ids`) of the batches in the order of ``epoch``."""
        n = len(self._batches)
        if not self.shuffle_batches:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed + (self.epoch if epoch is None else int(epoch)))
        return torch.randperm(n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for i in self.order():
            yield list(self._batches[i])

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def batch_groups(self) -> dict[int, list[int]]:
        """Row indices of every analysis batch, in in-batch order, keyed by batch_idx (ascending)."""
        return {b: list(rows) for b, rows in zip(self.batch_ids, self._batches)}

    @property
    def batch_sizes(self) -> dict[int, int]:
        """Rows per analysis batch, keyed by batch_idx."""
        return {b: len(rows) for b, rows in zip(self.batch_ids, self._batches)}

    @property
    def max_batch_size(self) -> int:
        return max(len(rows) for rows in self._batches)


class BatchPreservingSampler(Sampler[int]):
    """The seed's sampler: row indices flat, one analysis batch after another, for a ``batch_size`` DataLoader.

    ``BatchPreservingSampler(dataset, batch_size, shuffle_batches=True, *, seed=0, in_batch_idx=None)``:
    rows are grouped by ``batch_idx`` into :attr:`batch_groups` (``{batch_idx: [row, ...]}``, in
    ``in_batch_idx`` order when the dataset has it); iteration yields the rows of each batch in
    that order, batch after batch, batch order shuffled per epoch when ``shuffle_batches`` (a
    local generator seeded with ``seed + epoch``; see :meth:`set_epoch`). ``len()`` is the
    number of rows. Used as ``DataLoader(ds, batch_size=16, sampler=BatchPreservingSampler(ds, 16))``.

    The DataLoader cuts this stream every ``batch_size`` rows, so every analysis batch must hold
    exactly ``batch_size`` rows: a larger batch cannot fit, and a smaller one (filtered pairs)
    would make the next training batch mix two analysis batches. Both raise
    :class:`BatchSamplerError` here, naming the batch; for uneven batches use the batch-sampler
    form, ``DataLoader(ds, batch_sampler=sampler.batch_sampler(), ...)``
    (:class:`AnalysisBatchSampler`). ``batch_size=None`` skips that check (only to inspect the
    grouping, e.g. :attr:`max_batch_size`).

        >>> s = BatchPreservingSampler({"batch_idx": [0, 0, 1, 1], "in_batch_idx": [1, 0, 0, 1]}, 2, False)
        >>> list(s), s.batch_groups, len(s)
        ([1, 0, 2, 3], {0: [1, 0], 1: [2, 3]}, 4)
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = None,
        shuffle_batches: bool = True,
        *,
        seed: int = 0,
        in_batch_idx: Sequence[int] | None = None,
    ):
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1
        ):
            raise BatchSamplerError(f"batch_size must be a positive int (got {batch_size!r})")
        if not isinstance(shuffle_batches, (bool, np.bool_)):
            raise BatchSamplerError(f"shuffle_batches must be True or False (got {shuffle_batches!r})")
        self._batches = AnalysisBatchSampler(dataset, bool(shuffle_batches), seed, in_batch_idx)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.shuffle_batches = bool(shuffle_batches)
        self.batch_groups: dict[int, list[int]] = self._batches.batch_groups
        if self.batch_size is not None:
            self._check_fits(self.batch_size)

    def _check_fits(self, batch_size: int) -> None:
        for b, n in self._batches.batch_sizes.items():
            if n > batch_size:
                raise BatchSamplerError(
                    f"analysis batch {b} has {n} rows but batch_size={batch_size}: it cannot fit one training batch; "
                    f"use batch_size={self._batches.max_batch_size} (the largest analysis batch)"
                )
            if n < batch_size:
                raise BatchSamplerError(
                    f"analysis batch {b} has {n} rows, fewer than batch_size={batch_size}: a DataLoader with "
                    f"batch_size={batch_size} over this flat sampler would mix it with the next batch. Use the batch "
                    "sampler instead: DataLoader(dataset, batch_sampler=sampler.batch_sampler(), collate_fn=...) "
                    "(no batch_size), or moe_core.train.sampler.AnalysisBatchSampler"
                )

    def batch_sampler(self) -> AnalysisBatchSampler:
        """The batch-sampler form of this grouping (same batches, same seeded order): any batch sizes."""
        return self._batches

    def set_epoch(self, epoch: int) -> None:
        """Select the batch order of ``epoch``."""
        self._batches.set_epoch(epoch)

    @property
    def seed(self) -> int:
        return self._batches.seed

    @property
    def epoch(self) -> int:
        return self._batches.epoch

    @property
    def batch_ids(self) -> list[int]:
        return list(self._batches.batch_ids)

    @property
    def batch_sizes(self) -> dict[int, int]:
        return self._batches.batch_sizes

    @property
    def max_batch_size(self) -> int:
        return self._batches.max_batch_size

    def order(self, epoch: int | None = None) -> list[int]:
        return self._batches.order(epoch)

    def __iter__(self) -> Iterator[int]:
        for rows in self._batches:
            yield from rows

    def __len__(self) -> int:
        return sum(len(rows) for rows in self.batch_groups.values())


def _group(batch_idx: np.ndarray, inner: np.ndarray | None) -> tuple[list[int], list[list[int]]]:
    """Group row indices by batch id (sorted), in-batch order by ``inner`` or row order."""
    if batch_idx.ndim != 1 or batch_idx.size == 0:
        raise BatchSamplerError(f"batch_idx must be a non-empty 1-D column (got shape {batch_idx.shape})")
    if not np.issubdtype(batch_idx.dtype, np.integer):
        raise BatchSamplerError(f"batch_idx must hold integers (got {batch_idx.dtype})")
    rows = np.arange(batch_idx.size)
    if inner is None:
        change = np.flatnonzero(batch_idx[1:] != batch_idx[:-1]) + 1
        runs, counts = np.unique(batch_idx[np.concatenate([[0], change])], return_counts=True)
        if (counts > 1).any():
            raise BatchSamplerError(
                f"rows of batch {int(runs[counts > 1][0])} are not contiguous and there is no in_batch_idx to order "
                "them; keep each analysis batch together (do not shuffle the dataset) or add an in_batch_idx column"
            )
        order = np.argsort(batch_idx, kind="stable")
    else:
        if inner.shape != batch_idx.shape:
            raise BatchSamplerError(f"in_batch_idx has {inner.size} rows but batch_idx has {batch_idx.size}")
        order = np.lexsort((inner, batch_idx))
        sb, si = batch_idx[order], inner[order]
        dup = np.flatnonzero((sb[1:] == sb[:-1]) & (si[1:] == si[:-1]))
        if dup.size:
            raise BatchSamplerError(
                f"batch {int(sb[dup[0]])} has two rows with in_batch_idx {int(si[dup[0]])}; "
                "the in-batch order is ambiguous"
            )
    ids, starts = np.unique(batch_idx[order], return_index=True)
    groups = np.split(rows[order], starts[1:])
    return [int(b) for b in ids], [g.tolist() for g in groups]


@dataclass
class BatchCollator:
    """Pad a batch and keep its structure columns as int tensors.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (padded with ``label_pad_token_id``)
    and ``batch_idx``, ``in_batch_idx``, ``label`` (0 safe, 1 unsafe) as ``[B]`` long tensors.
    Other columns (``messages``, ``label_str``) are dropped. The trainer removes the structure
    columns before ``model.forward``.
    """

    pad_token_id: int  # id used to pad input_ids (the tokenizer's pad token)
    label_pad_token_id: int = -100  # ignored by the LM loss
    padding_side: str = "right"  # "right" (training) or "left"
    pad_to_multiple_of: int | None = None  # round the padded length up (kernel friendliness)

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise BatchSamplerError(f"padding_side must be 'right' or 'left' (got {self.padding_side!r})")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise BatchSamplerError("cannot collate an empty batch")
        ids = [list(f["input_ids"]) for f in features]
        n = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = {
            "input_ids": self._pad(ids, n, self.pad_token_id),
            "attention_mask": self._pad(
                [_get(f, "attention_mask", [1] * len(x)) for f, x in zip(features, ids)], n, 0
            ),
            "labels": self._pad(
                [_get(f, "labels", x) for f, x in zip(features, ids)], n, self.label_pad_token_id
            ),
        }
        for key in ("batch_idx", "in_batch_idx"):
            if key in features[0]:
                out[key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        if "label" in features[0]:
            out["label"] = torch.tensor([_label_id(f["label"]) for f in features], dtype=torch.long)
        return out

    def _pad(self, rows: list[list[int]], n: int, value: int) -> torch.Tensor:
        t = torch.full((len(rows), n), value, dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                if self.padding_side == "right":
                    t[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
                else:
                    t[i, n - len(r) :] = torch.as_tensor(r, dtype=torch.long)
        return t


def _get(feature: Mapping[str, Any], key: str, default: list[int]) -> list[int]:
    value = feature.get(key)
    return list(default) if value is None else [int(v) for v in value]


_LABEL_IDS = {"safe": 0, "unsafe": 1, "retain": 2}  # as moe_core.train.sft.LABEL_NAMES


def _label_id(value: Any) -> int:
    if isinstance(value, str):
        if value not in _LABEL_IDS:
            raise BatchSamplerError(f"label must be 'safe', 'unsafe' or 'retain' (got {value!r})")
        return _LABEL_IDS[value]
    v = int(value)
    if v not in _LABEL_IDS.values():
        raise BatchSamplerError(f"label must be 0 (safe), 1 (unsafe) or 2 (retain) (got {v})")
    return v
