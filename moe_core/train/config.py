"""Typed training configuration (trl style: dataclasses extending ``TrainingArguments``).

* :class:`BatchPreservingConfig`: what every batch-preserving training needs (one analysis batch
  per step, router-consistency loss, batch monitor); used by ``BatchPreservingTrainer``
  (full fine-tuning).
* :class:`ExpertMaskingConfig`: adds what expert-masked training needs (mask mode, routers);
  used by ``ExpertMaskingTrainer``. Its ``baseline`` / ``random_seed`` fields are read only by
  ``moe_core.train.training.train_experts`` to pick the trainer and draw a random mask; the trainers
  never branch on them.

Both validate at construction (:class:`TrainingConfigError`) the settings that would break the
batch structure. :func:`as_config` turns a plain ``TrainingArguments`` into either, keeping its
values (the seed passes ``args=TrainingArguments(...)``).

    cfg = ExpertMaskingConfig(output_dir="ckpt", per_device_train_batch_size=16, weight_decay=0.1)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from transformers import TrainingArguments

from moe_core.errors import MoELabError

MASK_MODES = ("union", "per_batch")
# KL between the batch's mean safe and mean unsafe routing distributions (the safe side is the
# detached target): forward = KL(safe || unsafe), reverse = KL(unsafe || safe), symmetric = mean
# of both, js = Jensen-Shannon divergence
CONSISTENCY_LOSSES = ("none", "forward", "reverse", "symmetric", "js")
CONSISTENCY_LAYERS = ("all", "masked")  # or explicit decoder-layer indices, "0,3,5"
BASELINES = ("experts", "full", "random_experts")


class TrainingConfigError(MoELabError, ValueError):
    """Training arguments or inputs that would break the batch structure or the expert masking."""


class BatchStructureError(MoELabError, ValueError):
    """A training step did not hold exactly one analysis batch in its original order."""


@dataclass
class BatchPreservingConfig(TrainingArguments):
    """TrainingArguments plus what batch-preserving training needs: one whole analysis batch per step."""

    # reshuffle the order of analysis batches every epoch (in-batch order never changes)
    shuffle_batches: bool = field(default=True, metadata={"help": "shuffle batch order per epoch"})
    # the analysis batch size; must equal per_device_train_batch_size when given
    analysis_batch_size: int | None = field(default=None, metadata={"help": "analysis batch size (checked)"})
    # gradient accumulation merges several analysis batches into one update: off unless allowed
    allow_gradient_accumulation: bool = field(
        default=False, metadata={"help": "permit grad accumulation > 1"}
    )
    # log "Current training batch contains samples from batches: [k]" at INFO every step (the seed's monitor)
    monitor_batches: bool = field(default=False, metadata={"help": "log the analysis batch of every step"})
    # router-consistency term added to the LM loss (see CONSISTENCY_LOSSES)
    router_consistency_loss: str = field(
        default="none", metadata={"help": "none | forward | reverse | symmetric | js"}
    )
    # weight of that term added to the LM loss
    router_consistency_weight: float = field(default=0.1, metadata={"help": "weight of the consistency loss"})
    # routers it is computed on: every MoE layer, only layers with chosen experts, or "0,3,5"
    router_consistency_layers: str = field(
        default="all", metadata={"help": "all | masked | comma-separated layers"}
    )
    # legacy TrainingArguments flag, accepted only to reject True with a clear message
    group_by_length: bool = field(default=False, metadata={"help": "must stay False"})
    # keep batch_idx/in_batch_idx/label in the batches (the trainer strips them before forward)
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep structure columns"})

    def __post_init__(self) -> None:
        if isinstance(self.router_consistency_layers, (list, tuple)):
            self.router_consistency_layers = ",".join(str(int(l)) for l in self.router_consistency_layers)
        super().__post_init__()
        self.validate()

    def consistency_layer_list(self) -> list[int] | None:
        """Explicit layers of ``router_consistency_layers`` ("0,3"), or None for "all"/"masked"."""
        v = str(self.router_consistency_layers).strip()
        return None if v in CONSISTENCY_LAYERS else [int(x) for x in v.split(",") if x.strip()]

    def validate(self) -> None:
        """Raise TrainingConfigError for choices that are unknown or would break batch structure."""
        if self.router_consistency_loss not in CONSISTENCY_LOSSES:
            raise TrainingConfigError(
                f"router_consistency_loss={self.router_consistency_loss!r}; "
                f"choose one of {', '.join(CONSISTENCY_LOSSES)}"
            )
        try:
            self.consistency_layer_list()
        except ValueError:
            raise TrainingConfigError(
                f"router_consistency_layers={self.router_consistency_layers!r}; choose all, "
                "masked or a list of layer indices"
            ) from None
        problems = self._structure_problems()
        if problems:
            raise TrainingConfigError("; ".join(problems))

    def _structure_problems(self) -> list[str]:
        problems = []
        if self.group_by_length or self.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
            problems.append(
                "grouping by length regroups samples across analysis batches; leave group_by_length False "
                "and train_sampling_strategy at its default (the batch sampler decides)"
            )
        if self.dataloader_drop_last:
            problems.append("dataloader_drop_last=True would drop a short analysis batch; set it False")
        if self.gradient_accumulation_steps > 1 and not self.allow_gradient_accumulation:
            problems.append(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} merges analysis batches "
                "into one update; set it to 1 or allow_gradient_accumulation=True"
            )
        if (
            self.analysis_batch_size is not None
            and self.analysis_batch_size != self.per_device_train_batch_size
        ):
            problems.append(
                f"per_device_train_batch_size={self.per_device_train_batch_size} differs from "
                f"analysis_batch_size={self.analysis_batch_size}; set them equal"
            )
        if self.auto_find_batch_size:
            problems.append("auto_find_batch_size would change the batch size; the analysis batches fix it")
        if self.router_consistency_weight < 0:
            problems.append("router_consistency_weight must be >= 0")
        return problems


@dataclass
class ExpertMaskingConfig(BatchPreservingConfig):
    """BatchPreservingConfig plus what expert-masked training needs."""

    # which experts a step may update: "union" = every chosen expert on every step; "per_batch" =
    # only the experts chosen for that step's analysis batch; None = per_batch when per-batch
    # masks are given, else union (the union of per-batch masks is trained only when asked for)
    mask_mode: str | None = field(
        default=None, metadata={"help": "union | per_batch (default: from the masks)"}
    )
    # also train the routers of all MoE layers (their own learning rate below)
    train_router: bool = field(default=False, metadata={"help": "train router weights too"})
    # router learning rate; None = learning_rate
    router_learning_rate: float | None = field(
        default=None, metadata={"help": "router lr (default: learning_rate)"}
    )
    # read by train_experts only: "experts" = the given mask(s); "full" = every parameter
    # (BatchPreservingTrainer); "random_experts" = as many experts drawn by moe_core.analysis.selection
    baseline: str = field(default="experts", metadata={"help": "experts | full | random_experts"})
    # seed of the random_experts draw (train_experts)
    random_seed: int = field(default=0, metadata={"help": "seed for random_experts"})

    def validate(self) -> None:
        for name, allowed in (("mask_mode", (None, *MASK_MODES)), ("baseline", BASELINES)):
            if getattr(self, name) not in allowed:
                raise TrainingConfigError(
                    f"{name}={getattr(self, name)!r}; choose one of "
                    f"{', '.join(str(a) for a in allowed if a is not None)}"
                )
        super().validate()
        if self.baseline == "full" and self.mask_mode == "per_batch":
            raise TrainingConfigError(
                "baseline='full' trains every parameter; per-batch masks do not apply (use mask_mode='union')"
            )
        if (self.router_learning_rate or 0) < 0:
            raise TrainingConfigError("router_learning_rate must be >= 0")


C = TypeVar("C", bound=BatchPreservingConfig)


def as_config(args: Any, cls: type[C], **overrides: Any) -> C:
    """``args`` as a ``cls`` (a new object when converted or overridden; the caller's is never changed).

    A plain ``TrainingArguments`` (or a config of another class) keeps every value it has;
    fields it lacks take ``cls``'s defaults, except ``remove_unused_columns``, kept as given
    (the trainers keep the structure columns either way). None -> ``cls()`` defaults.
    """
    if args is None:
        args = cls()
    if not isinstance(args, TrainingArguments):
        raise TrainingConfigError(
            f"args must be TrainingArguments or {cls.__name__} (got {type(args).__name__})"
        )
    if isinstance(args, cls) and not overrides:
        return args
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TrainingConfigError(f"{cls.__name__} has no settings {unknown}")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and f.name in names}
    return cls(**{**values, **overrides})
