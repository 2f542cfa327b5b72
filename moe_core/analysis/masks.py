"""ExpertMask: which experts of which layers to train (or steer), as a readable JSON artifact.

Like ESFT's ``{layer: [experts]}`` files, a mask is meant to be inspected, diffed and
hand-edited. Layer indices are decoder-layer indices (``model.layers[i]``), so a dense layer
(DeepSeek's first layers) simply has no experts chosen.

File format (``*.json``)::

    {"format": "moe-safety-lab/expert-mask@1", "num_layers": 4, "num_experts": 8,
     "experts": {"0": [1, 5], "3": [2]}, "meta": {...}}

Per-batch masks are one file holding ``{"batches": {"<batch_idx>": {"<layer>": [experts]}}}``
beside the same ``format``/``num_layers``/``num_experts``. Both are checked field by field
(pydantic ``MaskFile``/``BatchMasksFile``) when read, so a hand edit such as
``"experts": {"0": "12"}`` is refused with a ``MaskError`` naming the file and the field, never
read as experts 1 and 2.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from moe_core.errors import MoELabError, describe_validation_error
from moe_core.store.atomic import atomic_write_json
from moe_core.store.files import listed, read_json
from moe_core.store.provenance import model_info_of

MASK_FORMAT = "moe-safety-lab/expert-mask@1"
BATCH_MASKS_FORMAT = "moe-safety-lab/batch-expert-masks@1"
_MASK_SHAPE_HINT = (
    'an expert-mask file looks like {"num_layers": L, "num_experts": E, '
    '"experts": {"<layer>": [expert, ...]}}'
)


class MaskError(MoELabError, ValueError):
    """An expert mask is malformed, does not fit the model, or its file is not a mask file."""


# -- file schemas ------------------------------------------------------------------------------
LayerExperts = dict[int, list[StrictInt]]  # {"<layer>": [expert, ...]}; JSON keys are strings of ints


MAX_LAYERS, MAX_EXPERTS = (
    4096,
    65536,
)  # far above any model; a file claiming more is refused before allocating


def _canonical_keys(value: Any, where: str) -> Any:
    """JSON object keys must be whole numbers written once: "1" and "01" both mean layer 1, so a file
    with both is refused instead of silently keeping one of them."""
    if not isinstance(value, Mapping):
        return value
    seen: dict[int, str] = {}
    for key in value:
        text = str(key).strip()
        if not text.lstrip("-").isdigit():
            raise ValueError(f"{where}key {key!r} is not a whole number")
        n = int(text)
        if n in seen:
            raise ValueError(f"{where}keys {seen[n]!r} and {key!r} both mean {n}; keep one")
        seen[n] = str(key)
    return value


class _MaskShape(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown keys (a note added by hand) are not an error

    num_layers: StrictInt = Field(ge=1, le=MAX_LAYERS)
    num_experts: StrictInt = Field(ge=1, le=MAX_EXPERTS)

    def _check_experts(self, experts: LayerExperts, where: str) -> None:
        for layer, es in experts.items():
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"{where}: layer {layer} is outside 0..{self.num_layers - 1}")
            bad = [e for e in es if not 0 <= e < self.num_experts]
            if bad:
                raise ValueError(f"{where}.{layer}: experts {bad} are outside 0..{self.num_experts - 1}")


class MaskFile(_MaskShape):
    """One global mask: ``{"format", "num_layers", "num_experts", "experts", "meta"}``."""

    format: str = MASK_FORMAT
    experts: LayerExperts
    meta: dict[str, Any] | None = None

    @field_validator("experts", mode="before")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        return _canonical_keys(value, "")

    @model_validator(mode="after")
    def _fits(self) -> MaskFile:
        if self.format != MASK_FORMAT:
            hint = (
                ": it holds per-batch masks, read it with load_batch_masks"
                if self.format == BATCH_MASKS_FORMAT
                else ""
            )
            raise ValueError(f"format is {self.format!r}, expected {MASK_FORMAT!r}{hint}")
        self._check_experts(self.experts, "experts")
        return self


class BatchMasksFile(_MaskShape):
    """One mask per analysis batch: ``{"format", "num_layers", "num_experts", "batches"}``."""

    format: str = BATCH_MASKS_FORMAT
    batches: dict[int, LayerExperts]

    @field_validator("batches", mode="before")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        _canonical_keys(value, "")
        if isinstance(value, Mapping):
            for b, experts in value.items():
                _canonical_keys(experts, f"batch {b}: ")
        return value

    @model_validator(mode="after")
    def _fits(self) -> BatchMasksFile:
        if self.format != BATCH_MASKS_FORMAT:
            raise ValueError(f"format is {self.format!r}, expected {BATCH_MASKS_FORMAT!r}")
        for b, experts in self.batches.items():
            if b < 0:
                raise ValueError(f"batches: batch index {b} is negative")
            self._check_experts(experts, f"batches.{b}")
        return self


def _validate(schema: type[BaseModel], data: Any, what: str) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise MaskError(describe_validation_error(e, what)) from None


def _read_json_file(path: str | Path) -> Any:

    return read_json(
        path,
        "mask file",
        missing="select experts and save a mask first",
        damaged="fix it by hand or save the mask again",
        error=MaskError,
    )


@dataclass
class ExpertMask:
    """Boolean [num_layers, num_experts] selection with a small JSON form."""

    mask: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = np.asarray(self.mask)
        if m.ndim != 2:
            raise MaskError(f"an expert mask is 2-D [layers, experts]; got shape {m.shape}")
        self.mask = m.astype(bool)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def empty(cls, num_layers: int, num_experts: int, **meta: Any) -> ExpertMask:
        return cls(np.zeros((num_layers, num_experts), dtype=bool), dict(meta))

    @classmethod
    def from_experts(
        cls, experts: Iterable[tuple[int, int]], num_layers: int, num_experts: int, **meta: Any
    ) -> ExpertMask:
        m = cls.empty(num_layers, num_experts, **meta)
        for layer, expert in experts:
            if not (0 <= layer < num_layers and 0 <= expert < num_experts):
                raise MaskError(
                    f"expert (layer {layer}, expert {expert}) is outside a model with "
                    f"{num_layers} layers x {num_experts} experts"
                )
            m.mask[layer, expert] = True
        return m

    @classmethod
    def from_array(cls, arr: Any, **meta: Any) -> ExpertMask:
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

    def union(self, other: ExpertMask) -> ExpertMask:
        _check_same_shape(self, other)
        return ExpertMask(self.mask | other.mask, {**self.meta})

    def toggled(self, layer: int, expert: int) -> ExpertMask:
        m = self.mask.copy()
        m[layer, expert] = not m[layer, expert]
        return ExpertMask(m, {**self.meta})

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ExpertMask)
            and self.shape == other.shape
            and bool((self.mask == other.mask).all())
        )

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
    def from_json_dict(cls, d: Mapping[str, Any], source: str = "expert mask") -> ExpertMask:
        """From the JSON form; ``MaskError`` naming ``source`` and the bad field otherwise."""
        if not isinstance(d, Mapping):
            raise MaskError(f"{source} is not an expert mask: {_MASK_SHAPE_HINT}")
        f: MaskFile = _validate(MaskFile, d, f"{source} is not a valid expert mask")
        pairs = [(layer, e) for layer, es in f.experts.items() for e in es]
        return cls.from_experts(pairs, f.num_layers, f.num_experts, **(f.meta or {}))

    def save(self, path: str | Path) -> Path:

        return atomic_write_json(path, self.to_json_dict())

    @classmethod
    def load(cls, path: str | Path) -> ExpertMask:
        d = _read_json_file(path)
        if isinstance(d, Mapping) and "experts" not in d:
            if "batches" in d:
                raise MaskError(f"{path} holds per-batch masks, not one mask: read it with load_batch_masks")
            raise MaskError(f"{path} is not an expert-mask file (no 'experts' field): {_MASK_SHAPE_HINT}")
        return cls.from_json_dict(d, source=str(path))


def _check_same_shape(a: ExpertMask, b: ExpertMask) -> None:
    if a.shape != b.shape:
        raise MaskError(f"expert masks differ in shape: {a.shape} vs {b.shape}")


def parse_toggles(text: str | Iterable[str] | None) -> list[str]:
    """Hand edits as ``layer:expert`` keys, from ``"3:7,1:2"`` or a list; refused when one is not two integers."""
    items = text.split(",") if isinstance(text, str) else list(text or [])
    keys = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
            raise MaskError(f"hand edit {item!r} is not layer:expert (two whole numbers, e.g. 3:7)")
        keys.append(f"{int(parts[0])}:{int(parts[1])}")
    return keys


def apply_toggles(mask: ExpertMask, keys: Iterable[str]) -> ExpertMask:
    """The rule's mask with each ``layer:expert`` flipped (on -> off, off -> on); the edits are kept in its meta
    (``hand_toggled``) so a reloaded mask says it was edited by hand."""
    keys = parse_toggles(keys)
    for key in keys:
        layer, expert = (int(x) for x in key.split(":"))
        if not (0 <= layer < mask.shape[0] and 0 <= expert < mask.shape[1]):
            raise MaskError(
                f"hand edit {key} is outside the model's {mask.shape[0]} layers x {mask.shape[1]} experts"
            )
        mask = mask.toggled(layer, expert)
    if keys:
        mask.meta["hand_toggled"] = keys
    return mask


def save_batch_masks(path: str | Path, masks: Mapping[int, ExpertMask]) -> Path:
    """Save one mask per analysis batch (keys: batch_idx) in one readable JSON file."""

    if not masks:
        raise MaskError("no per-batch masks to save")
    first = next(iter(masks.values()))
    for m in masks.values():
        _check_same_shape(first, m)
    return atomic_write_json(
        path,
        {
            "format": BATCH_MASKS_FORMAT,
            "num_layers": first.num_layers,
            "num_experts": first.num_experts,
            "batches": {
                str(b): {str(l): es for l, es in m.by_layer().items()} for b, m in sorted(masks.items())
            },
        },
    )


def load_batch_masks(path: str | Path) -> dict[int, ExpertMask]:
    """``{batch_idx: ExpertMask}`` of a file written by ``save_batch_masks``."""
    d = _read_json_file(path)
    if not isinstance(d, Mapping) or "batches" not in d:
        raise MaskError(f"{path} is not a per-batch mask file (no 'batches' field)")
    f: BatchMasksFile = _validate(BatchMasksFile, d, f"{path} is not a valid per-batch mask file")
    return {
        b: ExpertMask.from_experts(
            [(layer, e) for layer, es in ex.items() for e in es], f.num_layers, f.num_experts
        )
        for b, ex in sorted(f.batches.items())
    }


def load_run_masks(run: Any, name: str, per_batch: bool) -> Any:
    """A saved mask: per-batch masks ``{batch_idx: ExpertMask}`` or one global mask (union of per-batch ones)."""
    import functools

    path = run.path_for("mask", name=name)
    if not path.exists():
        have = [p.stem for p in listed(path.parent)]
        raise MaskError(
            f"run {run.id} has no mask named {name!r} (masks: {have or 'none'}); "
            "run `python -m moe_core select` first"
        )
    if "batches" in _read_json_file(path):
        masks = load_batch_masks(path)
        return masks if per_batch else functools.reduce(ExpertMask.union, masks.values())
    if per_batch:
        raise MaskError(
            f"mask {name!r} is one global mask; --mask-mode per_batch needs a mask saved with "
            "`select --per-batch`"
        )
    return ExpertMask.load(path)


def check_mask_fits(run: Any, masks: Any, name: str, what: str = "mask") -> None:
    """A mask (or per-batch masks) must have the analysed model's [layers, experts] shape: refused before
    a model loads or an evaluation runs, never after."""

    info = model_info_of(run)
    shape = (info.get("num_layers"), info.get("num_experts"))
    if masks is None or None in shape:
        return
    for m in masks.values() if isinstance(masks, dict) else [masks]:
        if tuple(m.shape) != shape:
            raise MaskError(
                f"{what} {name!r} is {tuple(m.shape)} but the run's model has {shape[0]} layers x "
                f"{shape[1]} experts; select experts again on this run"
            )
