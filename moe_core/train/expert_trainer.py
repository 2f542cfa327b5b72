"""ExpertMaskingTrainer: a BatchPreservingTrainer that updates only chosen experts, exactly.

Every fused expert tensor of a masked layer is frozen and each chosen (layer, expert) trains a
small copy of its rows (``moe_core.train.expert_rows``). The optimizer only ever sees those copies
(plus the routers if ``train_router``), so:

* frozen experts are bit-identical after training, whatever the weight decay;
* optimizer state is the size of the selection, not of the fused tensors;
* per-batch masks are exact: on a step whose analysis batch did not select (l, e), that row's
  ``.grad`` is set to ``None`` before ``optimizer.step`` and AdamW skips it entirely.

The trainer trains exactly the mask(s) it is given: random baselines are drawn by the caller
(``moe_core.analysis.selection.random_like``; ``train_experts(..., baseline="random_experts")`` does it).

    trainer = ExpertMaskingTrainer(model, ExpertMaskingConfig(output_dir="ckpt", per_device_train_batch_size=16),
                                   sft_dataset, batch_expert_masks={0: mask0, 1: mask1}, processing_class=tok)
    trainer.train(); merge_trained_experts(model)

The reference's call (``batch_expert_masks=[...]``, ``use_router_consistency_loss=``,
``args=TrainingArguments(...)``, ``tokenizer=``) works too, see ``moe_core.compat``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moe_core.analysis.masks import ExpertMask
from moe_core.model.adapter import MoEAdapter
from moe_core.train.batch_trainer import BatchPreservingTrainer
from moe_core.train.config import ExpertMaskingConfig, TrainingConfigError
from moe_core.train.expert_rows import (
    DELTA_NAME,
    TrainedRow,
    as_mask,
    check_mask,
    install_expert_rows,
    read_expert_delta,
    require_merged,
    save_expert_delta,
    unsplice_expert_rows,
)

log = logging.getLogger(__name__)


def normalize_batch_masks(batch_expert_masks: Any) -> dict[int, ExpertMask]:
    """Per-batch masks as ``{batch_idx: ExpertMask}`` from a dict, a list (position = batch_idx) or a 3-D array."""
    if isinstance(batch_expert_masks, Mapping):
        items = [(int(k), v) for k, v in batch_expert_masks.items()]
    elif isinstance(batch_expert_masks, (list, tuple)) or np.ndim(batch_expert_masks) == 3:
        items = list(enumerate(batch_expert_masks))
    else:
        raise TrainingConfigError(
            "batch_expert_masks must be a dict {batch_idx: mask}, a list of masks or a [B, L, E] array"
        )
    if not items:
        raise TrainingConfigError("batch_expert_masks is empty")
    return {b: as_mask(m) for b, m in items}


def is_random_draw(mask: ExpertMask) -> bool:
    """Whether ``mask`` was drawn at random by ``moe_core.analysis.selection`` (its metadata says so)."""
    sel = mask.meta.get("selection")
    return isinstance(sel, Mapping) and sel.get("method") == "random"


class ExpertMaskingTrainer(BatchPreservingTrainer):
    """Train only the chosen experts (exactly), one analysis batch per step.

    ``expert_mask`` (ExpertMask or [layers, experts] array) is the set of experts to train;
    ``batch_expert_masks`` (dict ``{batch_idx: mask}``, a list indexed by batch_idx as in the
    reference, or a [B, L, E] array) are per-batch masks. With per-batch masks each step updates
    only its batch's experts, unless ``args.mask_mode="union"`` explicitly asks to train their
    union on every step. The model is modified in place (rows spliced in): call
    ``merge_trained_experts(model)`` when done. A failed construction leaves the model as it was.
    """

    trains = "experts"
    config_class = ExpertMaskingConfig

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        train_dataset: Any = None,
        expert_mask: ExpertMask | np.ndarray | None = None,
        batch_expert_masks: Any = None,
        data_collator: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ):
        self._given_masks = (expert_mask, batch_expert_masks)
        self.rows: list[TrainedRow] = []
        self.router_params: dict[str, nn.Parameter] = {}
        self.union_mask: ExpertMask | None = None
        self.batch_masks: dict[int, ExpertMask] = {}
        self.mask_mode = "union"
        self._local_active: list[bool] | None = None
        self._row_active: dict[int, torch.Tensor] = {}
        super().__init__(model, args, train_dataset, data_collator, processing_class, **kwargs)

    # -- setup ---------------------------------------------------------------------
    def _check_baseline_label(self, args: ExpertMaskingConfig) -> None:
        if args.baseline == "full":
            raise TrainingConfigError(
                "args.baseline='full' trains every parameter: use BatchPreservingTrainer, or "
                "train_experts(...) which picks the trainer from the baseline"
            )

    def _adapter_for(self, model: nn.Module, args: Any) -> MoEAdapter:
        require_merged(model)  # before anything else: rows left from an earlier training are the caller's
        return MoEAdapter.for_model(model)

    def _prepare_model(self, model: nn.Module, args: ExpertMaskingConfig) -> None:
        """Check the masks, freeze everything, splice in the chosen rows (and open the routers)."""
        self.union_mask, self.batch_masks, self.mask_mode = self._resolve_masks(args, *self._given_masks)
        self._check_random_label(args)
        for p in model.parameters():
            p.requires_grad_(False)
        self.rows = install_expert_rows(model, self.union_mask, self.adapter)
        if args.train_router:
            for layer in self.adapter.moe_layers:
                for n, p in self.adapter.router_parameters(layer).items():
                    p.requires_grad_(True)
                    self.router_params[f"layers.{layer}.router.{n}"] = p
        if self.batch_masks:
            layer_ix = np.array([r.layer for r in self.rows])
            expert_ix = np.array([r.expert for r in self.rows])
            self._row_active = {
                b: torch.from_numpy(m.mask[layer_ix, expert_ix].copy()) for b, m in self.batch_masks.items()
            }
            for i, r in enumerate(self.rows):
                r.param.register_hook(functools.partial(self._gate_row_grad, i))
        self._window_active = torch.zeros(len(self.rows), dtype=torch.bool)

    def _undo_model_changes(self, model: nn.Module) -> None:
        """Remove the row copies spliced in by this construction (the fused tensors are untouched)."""
        if self.rows:
            unsplice_expert_rows(model)
        self.rows, self.router_params = [], {}

    def _resolve_masks(
        self, args, expert_mask, batch_expert_masks
    ) -> tuple[ExpertMask, dict[int, ExpertMask], str]:
        """(union mask, per-batch masks applied per step or {}, mask mode); TrainingConfigError if they do not fit."""
        batch_masks = normalize_batch_masks(batch_expert_masks) if batch_expert_masks is not None else {}
        union = as_mask(expert_mask) if expert_mask is not None else None
        if union is None and batch_masks:
            union = ExpertMask(np.logical_or.reduce([m.mask for m in batch_masks.values()]))
        if union is None:
            raise TrainingConfigError(
                "give expert_mask or batch_expert_masks (for full fine-tuning use BatchPreservingTrainer)"
            )
        mode = args.mask_mode or ("per_batch" if batch_masks else "union")
        if mode == "per_batch":
            self._check_batch_masks(batch_masks, union)
        elif batch_masks:
            log.info(
                "mask_mode='union': training the union of %d per-batch masks on every step", len(batch_masks)
            )
            batch_masks = {}
        check_mask(union, self.adapter)
        return union, batch_masks, mode

    def _check_batch_masks(self, batch_masks: dict[int, ExpertMask], union: ExpertMask) -> None:
        if not batch_masks:
            raise TrainingConfigError(
                "mask_mode='per_batch' needs batch_expert_masks (one mask per analysis batch)"
            )
        missing = sorted(set(self.batch_sampler.batch_ids) - set(batch_masks))
        if missing:
            raise TrainingConfigError(
                f"no per-batch mask for analysis batches {missing[:10]}; give one for each batch"
            )
        for b, m in batch_masks.items():
            if m.shape != union.shape:
                raise TrainingConfigError(f"the mask of batch {b} is {m.shape}, expert_mask is {union.shape}")
            if (m.mask & ~union.mask).any():
                raise TrainingConfigError(f"the mask of batch {b} selects experts outside expert_mask")

    def _check_random_label(self, args: ExpertMaskingConfig) -> None:
        """baseline='random_experts' only labels masks that really were drawn at random."""
        if args.baseline != "random_experts":
            return
        drawn = [m for m in self.batch_masks.values() if m.count()] or [self.union_mask]
        if not all(is_random_draw(m) for m in drawn):
            raise TrainingConfigError(
                "args.baseline='random_experts' but the mask was not drawn at random: this trainer trains exactly the "
                "mask it is given. Draw it with moe_core.analysis.selection.random_like (train_experts(...) does), or leave "
                "baseline='experts'"
            )

    def _gate_row_grad(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        """Zero this batch's contribution to a row its batch did not select (before DDP averages it)."""
        return grad if self._local_active is None or self._local_active[i] else torch.zeros_like(grad)

    def _consistency_layers(self, args: Any = None) -> list[int]:
        args = args or self.args
        if args.router_consistency_loss != "none" and args.router_consistency_layers == "masked":
            return sorted(self.union_mask.by_layer())
        return super()._consistency_layers(args)

    # -- optimizer -----------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Optimizer over the row copies (+ routers) only; the fused tensors never enter it."""
        if self.optimizer is None:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            wd, lr = self.args.weight_decay, self.args.learning_rate
            rlr = self.args.router_learning_rate if self.args.router_learning_rate is not None else lr
            router = list(self.router_params.items())
            groups = [
                {
                    "params": [r.param for r in self.rows if "bias" not in r.name],
                    "weight_decay": wd,
                    "lr": lr,
                },
                {"params": [r.param for r in self.rows if "bias" in r.name], "weight_decay": 0.0, "lr": lr},
                {"params": [p for k, p in router if not k.endswith("bias")], "weight_decay": wd, "lr": rlr},
                {"params": [p for k, p in router if k.endswith("bias")], "weight_decay": 0.0, "lr": rlr},
            ]
            self.optimizer = cls([g for g in groups if g["params"]], **kwargs)
        return self.optimizer

    def trainable_report(self) -> dict[str, Any]:
        """What is trained, counted honestly: rows actually trained, not whole fused tensors."""
        row_ids = {id(r.param) for r in self.rows}
        report = super().trainable_report()
        report.update(
            {
                "baseline": self.args.baseline,
                "mask_mode": self.mask_mode,
                "trained_experts": self.union_mask.count(),
                "expert_row_parameters": int(sum(r.param.numel() for r in self.rows)),
                "router_parameters": int(sum(p.numel() for p in self.router_params.values())),
                "model_parameters": int(
                    sum(p.numel() for p in self.model.parameters() if id(p) not in row_ids)
                ),
            }
        )
        return report

    # -- step: per-batch gating ----------------------------------------------------
    def _begin_step(self, batch_idx: int) -> None:
        if self._row_active and self.rows:
            active = self._row_active[batch_idx]
            self._local_active = active.tolist()
            self._window_active |= active

    def _end_step(self, ok: bool) -> None:
        self._local_active = None  # the gradient hooks act only inside a training step
        if not (ok and self._row_active and self.rows and self.accelerator.sync_gradients):
            return
        window = self._window_active
        if self.accelerator.num_processes > 1:  # a row moves if any rank's batch selected it
            gathered = self.accelerator.gather(window.to(self.args.device, torch.int32)[None])
            window = gathered.sum(0).cpu() > 0
        for r, keep in zip(self.rows, window.tolist()):
            if not keep:
                r.param.grad = None  # AdamW skips it: no weight decay, no momentum
        self._window_active = torch.zeros_like(self._window_active)

    # -- checkpoints ---------------------------------------------------------------
    def _save_weights(self, out: Path, state_dict: dict | None) -> None:
        """Only the trained rows (+ routers), as an expert delta."""
        save_expert_delta(self, out / DELTA_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        path = Path(resume_from_checkpoint) / DELTA_NAME
        if not path.exists():
            raise TrainingConfigError(
                f"{resume_from_checkpoint} has no {DELTA_NAME}; it is not a checkpoint of this trainer"
            )
        tensors, _ = read_expert_delta(path)
        wanted = {r.key: r.param for r in self.rows} | dict(self.router_params)
        missing = sorted(set(wanted) - set(tensors))
        if missing:
            raise TrainingConfigError(
                f"checkpoint {resume_from_checkpoint} lacks {missing[:5]}: it was trained on other experts"
            )
        with torch.no_grad():
            for k, p in wanted.items():
                p.copy_(tensors[k].to(p.dtype))
        self._restore_batch_log(resume_from_checkpoint)
