"""ExpertMask: which experts of which layers to train (or steer), as a readable JSON artifact.

Like ESFT's ``{layer: [experts]}`` files, a mask is meant to be inspected, diffed and
hand-edited. Layer indices are decoder-layer indices (``model.layers[i]``), so a dense layer
(DeepSeek's first layers) simply has no experts chosen.

File format (``*.json``)::

    {"format": "moe-safety-lab/expert-mask@1", "num_layers": 4, "num_experts": 8,
     "experts": {"0": [1, 5], "3": [2]}, "meta": {...}}

Per-batch masks are one file holding ``{"batches": {"<batch_idx>": {"<layer>": [experts]}}}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

MASK_FORMAT = "moe-safety-lab/expert-mask@1"
BATCH_MASKS_FORMAT = "moe-safety-lab/batch-expert-masks@1"


@dataclass
class ExpertMask:
    """Boolean [num_layers, num_experts] selection with a small JSON form."""

    mask: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = np.asarray(self.mask)
        if m.ndim != 2:
            raise ValueError(f"an expert mask is 2-D [layers, experts]; got shape {m.shape}")
        self.mask = m.astype(bool)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def empty(cls, num_layers: int, num_experts: int, **meta: Any) -> "ExpertMask":
        return cls(np.zeros((num_layers, num_experts), dtype=bool), dict(meta))

    @classmethod
    def from_experts(
        cls, experts: Iterable[tuple[int, int]], num_layers: int, num_experts: int, **meta: Any
    ) -> "ExpertMask":
        m = cls.empty(num_layers, num_experts, **meta)
        for layer, expert in experts:
            if not (0 <= layer < num_layers and 0 <= expert < num_experts):
                raise ValueError(
                    f"expert (layer {layer}, expert {expert}) is outside a model with "
                    f"{num_layers} layers x {num_experts} experts"
                )
            m.mask[layer, expert] = True
        return m

    @classmethod
    def from_array(cls, arr: Any, **meta: Any) -> "ExpertMask":
        """From a 0/1 (or bool) [layers, experts] array, e.g. the reference's ``expert_mask``."""
        return cls(np.asarray(arr) > 0, dict(meta))

    # -- views --------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape  # type: ignore[return-value]

    @property
    def num_layers(self) -> int:
        return int(self.mask.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.mask.shape[1])

    def experts(self) -> list[tuple[int, int]]:
        """Chosen (layer, expert) pairs in layer-major order."""
        return [(int(l), int(e)) for l, e in zip(*np.nonzero(self.mask))]

    def by_layer(self) -> dict[int, list[int]]:
        return {int(l): [int(e) for e in np.nonzero(row)[0]] for l, row in enumerate(self.mask) if row.any()}

    def count(self) -> int:
        return int(self.mask.sum())

    def __len__(self) -> int:
        return self.count()

    def union(self, other: "ExpertMask") -> "ExpertMask":
        _check_same_shape(self, other)
        return ExpertMask(self.mask | other.mask, {**self.meta})

    def toggled(self, layer: int, expert: int) -> "ExpertMask":
        m = self.mask.copy()
        m[layer, expert] = not m[layer, expert]
        return ExpertMask(m, {**self.meta})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExpertMask) and self.shape == other.shape and bool((self.mask == other.mask).all())

    # -- JSON ---------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": MASK_FORMAT,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "experts": {str(l): es for l, es in self.by_layer().items()},
            "meta": self.meta,
        }

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> "ExpertMask":
        try:
            nl, ne, experts = int(d["num_layers"]), int(d["num_experts"]), d["experts"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                "not an expert-mask file: it needs num_layers, num_experts and "
                'experts ({"<layer>": [expert, ...]})'
            ) from e
        pairs = [(int(l), int(x)) for l, es in experts.items() for x in es]
        return cls.from_experts(pairs, nl, ne, **dict(d.get("meta") or {}))

    def save(self, path: str | Path) -> Path:
        from .runs import atomic_write_json

        return atomic_write_json(path, self.to_json_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ExpertMask":
        return cls.from_json_dict(json.loads(Path(path).read_text()))


def _check_same_shape(a: ExpertMask, b: ExpertMask) -> None:
    if a.shape != b.shape:
        raise ValueError(f"expert masks differ in shape: {a.shape} vs {b.shape}")


def save_batch_masks(path: str | Path, masks: Mapping[int, ExpertMask]) -> Path:
    """Save one mask per analysis batch (keys: batch_idx) in one readable JSON file."""
    from .runs import atomic_write_json

    if not masks:
        raise ValueError("no per-batch masks to save")
    first = next(iter(masks.values()))
    for m in masks.values():
        _check_same_shape(first, m)
    return atomic_write_json(
        path,
        {
            "format": BATCH_MASKS_FORMAT,
            "num_layers": first.num_layers,
            "num_experts": first.num_experts,
            "batches": {str(b): {str(l): es for l, es in m.by_layer().items()} for b, m in sorted(masks.items())},
        },
    )


def load_batch_masks(path: str | Path) -> dict[int, ExpertMask]:
    d = json.loads(Path(path).read_text())
    if "batches" not in d:
        raise ValueError(f"{path} is not a per-batch mask file (no 'batches' key)")
    return {
        int(b): ExpertMask.from_json_dict({"num_layers": d["num_layers"], "num_experts": d["num_experts"], "experts": ex})
        for b, ex in d["batches"].items()
    }
