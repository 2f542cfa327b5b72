"""BatchPreservingTrainer: a Trainer whose every step is exactly one analysis batch (full fine-tuning).

The analysis measured expert activations per mixed batch (8 safe then 8 unsafe); training must
see the same batches, because the router's load-balancing loss and the router-consistency loss
depend on batch composition. This trainer:

* feeds one whole analysis batch per step through ``AnalysisBatchSampler`` (batch order shuffled
  per epoch, in-batch order never), in a DataLoader still prepared by accelerate;
* checks every step with a batch monitor (one batch_idx, original order) and logs it
  (``batch_log``; with ``monitor_batches=True`` also the seed's line "Current training batch
  contains samples from batches: [k]" printed on stdout);
* strips the structure columns (batch_idx, in_batch_idx, label) before ``model.forward``;
* adds an optional router-consistency term (:func:`router_consistency_loss`);
* checkpoints without pickles.

It trains the parameters that require grad (all of a freshly loaded model): full fine-tuning.
``ExpertMaskingTrainer`` (``moe_core.train.expert_trainer``) adds exact expert-row training. Every
transformers internal used here is listed in ``moe_core.train.internals``.

    trainer = BatchPreservingTrainer(model, BatchPreservingConfig(output_dir="ckpt",
                                     per_device_train_batch_size=16), sft_dataset, processing_class=tok)
    trainer.train()
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import Trainer

from moe_core.model.adapter import MoEAdapter
from moe_core.store.atomic import atomic_write_text
from moe_core.train.config import (
    CONSISTENCY_LOSSES,
    BatchPreservingConfig,
    BatchStructureError,
    TrainingConfigError,
)
from moe_core.train.expert_rows import optimizer_state_bytes
from moe_core.train.internals import build_train_dataloader
from moe_core.train.reference import reference_trainer_arguments
from moe_core.train.sampler import AnalysisBatchSampler, BatchCollator
from moe_core.train.sft import META_COLUMNS

log = logging.getLogger(__name__)

MONITOR_LINE = "Current training batch contains samples from batches: %s"  # the seed's words
BATCH_LOG = "batch_log.json"  # the batch monitor's rows, in each checkpoint


# -- router consistency ----------------------------------------------------------------
def router_consistency_loss(
    router_logits: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    is_unsafe: torch.Tensor,
    direction: str = "symmetric",
) -> torch.Tensor:
    """Divergence between the mean routing distribution of a batch's safe and unsafe samples, mean over layers.

    ``router_logits``: one ``[T, E]`` tensor per layer, T = batch*seq flattened (pads included);
    ``attention_mask [B, S]`` drops pads; ``is_unsafe [B]``: 1 unsafe, 0 safe (2, a retain example, is in
    neither group). Distributions are softmaxes of the
    logits averaged over a label's real tokens. The safe mean is the (detached) target.
    ``direction``: forward = KL(safe || unsafe), reverse = KL(unsafe || safe), symmetric = their
    mean, js = Jensen-Shannon. Returns 0 (still attached to the graph) when the batch lacks safe
    or unsafe tokens.
    """
    if direction not in CONSISTENCY_LOSSES[1:]:
        raise TrainingConfigError(
            f"direction={direction!r}; choose one of {', '.join(CONSISTENCY_LOSSES[1:])}"
        )
    if not router_logits:
        raise TrainingConfigError("no router logits were captured; is this an MoE model?")
    B, S = attention_mask.shape
    real = attention_mask.reshape(-1).bool()
    label = is_unsafe.long().to(real.device)[:, None].expand(B, S).reshape(-1)
    w_s, w_u = (real & (label == 0)).float(), (real & (label == 1)).float()
    if w_s.sum() == 0 or w_u.sum() == 0:
        return sum(l.sum() for l in router_logits) * 0.0
    terms = []
    for logits in router_logits:
        if logits.shape[0] != B * S:
            raise BatchStructureError(
                f"router logits have {logits.shape[0]} rows, expected batch*seq = {B * S}"
            )
        p = torch.softmax(logits.float(), dim=-1)
        p_s = ((w_s.to(p.device) @ p) / w_s.sum()).clamp_min(1e-9).detach()
        p_u = ((w_u.to(p.device) @ p) / w_u.sum()).clamp_min(1e-9)
        terms.append(_divergence(p_s, p_u, direction))
    return torch.stack(terms).mean()


def _divergence(p_s: torch.Tensor, p_u: torch.Tensor, direction: str) -> torch.Tensor:
    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (a.log() - b.log())).sum()

    if direction == "forward":
        return kl(p_s, p_u)
    if direction == "reverse":
        return kl(p_u, p_s)
    if direction == "symmetric":
        return 0.5 * (kl(p_s, p_u) + kl(p_u, p_s))
    m = 0.5 * (p_s + p_u)
    return 0.5 * (kl(p_s, m) + kl(p_u, m))


@contextlib.contextmanager
def capture_router_logits(adapter: MoEAdapter, layers: Sequence[int]) -> Iterator[list[torch.Tensor]]:
    """Collect each router's logits (its output's first element) during the block, layer by layer.

    An ``"observe"`` router hook (``MoEAdapter.router_hooks``): removed on exit, also on errors.
    """
    captured: list[torch.Tensor] = []

    def observe(_layer, _module, _args, output) -> None:
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    with adapter.router_hooks(observe, stage="observe", layers=layers):
        yield captured


# -- the trainer -----------------------------------------------------------------------
class BatchPreservingTrainer(Trainer):
    """A Trainer whose every step is one whole analysis batch; trains what requires grad (full fine-tuning).

    ``args``: a :class:`BatchPreservingConfig` (a plain ``TrainingArguments`` is converted,
    keeping its values). ``train_dataset``: a batch-aware dataset (``moe_core.train.sft``). The seed's
    keywords (``tokenizer=``, ``use_router_consistency_loss=``, ...) are mapped by
    ``moe_core.compat``. Construction either succeeds or leaves the model as it was (rows,
    parametrizations and requires_grad flags restored; a device move by ``Trainer`` is not undone).
    """

    trains = "full"  # what this class trains: the label written into reports and metadata
    config_class: type[BatchPreservingConfig] = BatchPreservingConfig

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        train_dataset: Any = None,
        data_collator: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ):

        args, processing_class, kwargs = reference_trainer_arguments(
            self.config_class, args, processing_class, kwargs
        )
        if model is None:
            raise TrainingConfigError("model is required")
        if train_dataset is None:
            raise TrainingConfigError(
                "train_dataset is required: build it with moe_core.train.sft.create_batch_aware_dataset"
            )
        self._check_baseline_label(args)
        seed = args.data_seed if args.data_seed is not None else args.seed
        self.batch_sampler = AnalysisBatchSampler(
            train_dataset, shuffle_batches=args.shuffle_batches, seed=seed
        )
        self._check_batch_size(args)
        self.adapter: MoEAdapter | None = self._adapter_for(model, args)
        self.batch_log: list[dict[str, Any]] = []
        self._consistency = [0.0, 0]  # running sum and count since the last log
        if data_collator is None:
            pad = getattr(processing_class, "pad_token_id", None)
            pad = pad if pad is not None else getattr(getattr(model, "config", None), "pad_token_id", None)
            data_collator = BatchCollator(pad_token_id=int(pad or 0))
        grad_flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            self._prepare_model(model, args)
            self._consistency_layers(args)  # validated now, not at the first step
            super().__init__(
                model=model,
                args=args,
                train_dataset=train_dataset,
                data_collator=data_collator,
                processing_class=processing_class,
                **kwargs,
            )
            self._check_processes()
        except BaseException:
            self._undo_model_changes(model)
            for p, flag in grad_flags:
                p.requires_grad_(flag)
            raise
        log.info("%s: %s", type(self).__name__, self.trainable_report())

    # -- setup (subclasses extend these) -------------------------------------------
    def _check_baseline_label(self, args: BatchPreservingConfig) -> None:
        label = getattr(args, "baseline", self.trains)
        if label != self.trains:
            raise TrainingConfigError(
                f"args.baseline={label!r} but {type(self).__name__} trains every parameter (baseline 'full'); "
                "use ExpertMaskingTrainer for experts, or train_experts(...) which picks the trainer from the baseline"
            )

    def _check_batch_size(self, args: BatchPreservingConfig) -> None:
        largest = self.batch_sampler.max_batch_size
        expected = args.analysis_batch_size or largest
        if args.per_device_train_batch_size != expected or largest > expected:
            raise TrainingConfigError(
                f"per_device_train_batch_size={args.per_device_train_batch_size} but the analysis batches hold up to "
                f"{largest} samples (analysis_batch_size={args.analysis_batch_size}); "
                f"set per_device_train_batch_size={largest}"
            )

    def _adapter_for(self, model: nn.Module, args: BatchPreservingConfig) -> MoEAdapter | None:
        """The MoE view of the model; only needed here for the router-consistency loss."""
        return MoEAdapter.for_model(model) if args.router_consistency_loss != "none" else None

    def _prepare_model(self, model: nn.Module, args: BatchPreservingConfig) -> None:
        """Set up what is trained (nothing to do for full fine-tuning)."""

    def _undo_model_changes(self, model: nn.Module) -> None:
        """Undo ``_prepare_model`` after a failed construction (requires_grad flags are restored by the caller)."""

    def _check_processes(self) -> None:
        acc = self.accelerator
        if acc.num_processes > 1 and (acc.split_batches or not acc.even_batches):
            raise TrainingConfigError(
                "with several processes, use split_batches=False and even_batches=True so each "
                "rank receives whole analysis batches in equal numbers"
            )

    def _consistency_layers(self, args: BatchPreservingConfig | None = None) -> list[int]:
        """MoE layers whose routers the consistency term uses (empty when the term is off)."""
        args = args or self.args
        if args.router_consistency_loss == "none":
            return []
        if args.router_consistency_layers == "masked":
            raise TrainingConfigError(
                "router_consistency_layers='masked' needs an expert mask (ExpertMaskingTrainer)"
            )
        explicit = args.consistency_layer_list()
        if explicit is None:
            return list(self.adapter.moe_layers)
        wrong = sorted(set(explicit) - set(self.adapter.moe_layers))
        if wrong:
            raise TrainingConfigError(
                f"router_consistency_layers {wrong} are not MoE layers ({self.adapter.moe_layers})"
            )
        return explicit

    def trainable_report(self) -> dict[str, Any]:
        """What is trained, counted honestly."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return {
            "baseline": self.trains,
            "mask_mode": None,
            "trained_experts": None,
            "trainable_parameters": int(sum(p.numel() for p in trainable)),
            "expert_row_parameters": 0,
            "router_parameters": 0,
            "model_parameters": int(sum(p.numel() for p in self.model.parameters())),
            "optimizer_state_bytes": optimizer_state_bytes(self.optimizer),
        }

    # -- data (trainer_internals items 3-5) ----------------------------------------
    def _get_train_sampler(self, train_dataset: Any = None) -> AnalysisBatchSampler:
        return self.batch_sampler

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """DataLoader with the analysis batch sampler, still prepared by accelerate (sharding, devices)."""
        dataset = self.train_dataset
        if hasattr(dataset, "column_names"):
            dataset = self._remove_unused_columns(dataset, description="Training")  # keeps META_COLUMNS
        return build_train_dataloader(self, dataset, self._get_train_sampler(dataset))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in META_COLUMNS if c not in self._signature_columns]

    # -- step ----------------------------------------------------------------------
    def _check_batch(self, inputs: Mapping[str, Any]) -> int:
        """Batch monitor: one analysis batch per step, in its original order; log it."""
        if "batch_idx" not in inputs:
            raise BatchStructureError(
                "the batch has no batch_idx; build the dataset with moe_core.train.sft and keep "
                "the structure columns (the trainer keeps them unless the collator drops them)"
            )
        ids = torch.unique(inputs["batch_idx"]).tolist()
        if self.args.monitor_batches:  # printed, as the seed does: the user asked to see it every step
            print(MONITOR_LINE % ids, flush=True)
        if len(ids) != 1:
            raise BatchStructureError(
                f"training step {self.state.global_step} mixes analysis batches {ids}; each step "
                "must hold exactly one (use the analysis batch sampler, no drop_last/grouping)"
            )
        if "in_batch_idx" in inputs and (inputs["in_batch_idx"].diff() <= 0).any():
            raise BatchStructureError(
                f"batch {ids[0]} arrived out of its in-batch order: {inputs['in_batch_idx'].tolist()}"
            )
        label = inputs.get("label")
        n_unsafe = int((label == 1).sum()) if label is not None else None
        self.batch_log.append(
            {
                "step": int(self.state.global_step),
                "epoch": float(self.state.epoch or 0.0),
                "rank": int(self.args.process_index),
                "batch_idx": int(ids[0]),
                "n_samples": int(inputs["batch_idx"].numel()),
                "n_safe": None if label is None else int((label == 0).sum()),
                "n_unsafe": n_unsafe,
                "n_tokens": int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else None,
                **({"n_retain": int((label == 2).sum())} if label is not None and (label == 2).any() else {}),
            }
        )
        return int(ids[0])

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        batch_idx = self._check_batch(inputs)
        self._begin_step(batch_idx)
        ok = False
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
            ok = True
        finally:
            self._end_step(ok)
        return loss

    def _begin_step(self, batch_idx: int) -> None:
        """Called before the forward/backward of a step of analysis batch ``batch_idx``."""

    def _end_step(self, ok: bool) -> None:
        """Called after it (``ok``: the backward ran)."""

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        """LM loss on the batch without its structure columns, plus the weighted router-consistency term."""
        meta = {k: inputs[k] for k in META_COLUMNS if k in inputs}
        inputs = {k: v for k, v in inputs.items() if k not in META_COLUMNS}
        direction = self.args.router_consistency_loss
        use_consistency = direction != "none" and self.args.router_consistency_weight > 0 and model.training
        layers = self._consistency_layers() if use_consistency else []
        capture = capture_router_logits(self.adapter, layers) if layers else contextlib.nullcontext([])
        with parametrize.cached(), capture as logits:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if use_consistency:
            if "label" not in meta:
                raise BatchStructureError(
                    "router consistency needs the 'label' column (0 safe, 1 unsafe) in each batch"
                )
            c = router_consistency_loss(logits, inputs["attention_mask"], meta["label"], direction)
            self._consistency[0] += float(c.detach())
            self._consistency[1] += 1
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                c = c / max(
                    1, getattr(self, "current_gradient_accumulation_steps", 1)
                )  # LM loss is already GA-scaled
            loss = loss + self.args.router_consistency_weight * c
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._consistency[1] and "loss" in logs:
            logs["router_consistency"] = self._consistency[0] / self._consistency[1]
            self._consistency = [0.0, 0]
        super().log(logs, start_time)

    # -- checkpoints (trainer_internals item 6) ------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoint = the trained weights (:meth:`_save_weights`) and the args as JSON; no pickle."""
        out = Path(output_dir or self.args.output_dir)
        if not self.args.should_save:
            return
        out.mkdir(parents=True, exist_ok=True)
        self._save_weights(out, state_dict)
        atomic_write_text(out / "training_args.json", self.args.to_json_string())
        atomic_write_text(out / BATCH_LOG, json.dumps(self.batch_log))  # a resume continues the batch monitor

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._restore_batch_log(resume_from_checkpoint)

    def _restore_batch_log(self, checkpoint: str) -> None:
        """The batch monitor's rows up to the checkpoint, so a resumed training logs every step once.

        Checkpoints are written by the main process only, so they hold its rows: other ranks start empty.
        """
        path = Path(checkpoint) / BATCH_LOG
        if path.is_file() and self.args.process_index == 0:
            self.batch_log = json.loads(path.read_text())

    def _save_weights(self, out: Path, state_dict: dict | None) -> None:
        self.accelerator.unwrap_model(self.model).save_pretrained(out, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(out)
