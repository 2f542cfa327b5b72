"""Fine-tune an MoE model one whole analysis batch per step: only chosen experts, or a baseline.

What trains what (trl style: a Trainer subclass + a config dataclass each):

* ``BatchPreservingTrainer`` + ``BatchPreservingConfig`` (``moe_core.train.batch_trainer``): one
  analysis batch per step, batch monitor, router-consistency loss; trains every parameter
  (the full fine-tuning baseline);
* ``ExpertMaskingTrainer`` + ``ExpertMaskingConfig`` (``moe_core.train.expert_trainer``): adds exact
  expert-row training with union or per-batch masks (``moe_core.train.expert_rows``).

The random-experts baseline is an ``ExpertMaskingTrainer`` given a mask drawn by
``moe_core.analysis.selection.random_like``. This module is the high-level entry: it picks the trainer
from the baseline, trains, and writes the run's artifacts::

    result = train_model(model, tok, sft_dataset, expert_mask, output_dir=run_dir / "training",
                         learning_rate=1e-4, num_train_epochs=1)       # masks None = full fine-tuning
    # run_dir/training: expert_delta.safetensors (+ .json), training_metadata.json, batch_monitor.jsonl,
    #                   merged_model/

    cfg = ExpertMaskingConfig(output_dir="ckpt", per_device_train_batch_size=16, baseline="random_experts")
    result = train_experts(model, tok, sft_dataset, chosen_mask, cfg, run_dir / "training")

Every name of the former single ``training`` module is still importable from here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from moe_core.analysis.masks import ExpertMask
from moe_core.analysis.selection import random_like
from moe_core.model.adapter import MoEAdapter
from moe_core.store.atomic import atomic_write_json, atomic_write_text
from moe_core.train.batch_trainer import (
    BatchPreservingTrainer,
)
from moe_core.train.config import (
    ExpertMaskingConfig,
    TrainingConfigError,
    as_config,
)
from moe_core.train.expert_rows import (
    DELTA_NAME,
    merge_trained_experts,
    save_expert_delta,
    save_merged,
)
from moe_core.train.expert_trainer import (
    ExpertMaskingTrainer,
    is_random_draw,
    normalize_batch_masks,
)
from moe_core.train.hf_args import OUR_DEFAULTS
from moe_core.train.sampler import AnalysisBatchSampler
from moe_core.train.sft import MAX_LENGTH, create_batch_aware_dataset

log = logging.getLogger(__name__)

METADATA_FORMAT = "moe-safety-lab/expert-training@1"
ProgressFn = Callable[..., None]


@dataclass
class TrainingResult:
    """Paths and numbers of one finished training run."""

    output_dir: Path  # where everything below lives
    metadata_path: Path  # training_metadata.json
    delta_path: Path | None  # expert_delta.safetensors (None for the full baseline)
    merged_path: Path | None  # saved merged model directory, if requested (always for "full")
    metrics: dict[str, Any]  # the Trainer's train metrics (loss, runtime, ...)
    report: dict[str, Any]  # trainable_report(): parameters and optimizer-state bytes


class _ProgressCallback(TrainerCallback):
    def __init__(self, progress: ProgressFn):
        self.progress = progress

    def on_step_end(self, args, state, control, **kwargs):
        loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
        self.progress(state.global_step, state.max_steps, "" if loss is None else f"loss {loss:.4f}")


def training_metadata(
    trainer: BatchPreservingTrainer, report: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything needed to understand a run: masks, args, counts, loss history, batch monitor log.

    ``report``: the trainable report taken before merging (afterwards the trained rows are gone).
    """
    report = report or trainer.trainable_report()
    union = getattr(trainer, "union_mask", None)
    batch_masks = getattr(trainer, "batch_masks", {})
    return {
        "format": METADATA_FORMAT,
        "baseline": report["baseline"],
        "mask_mode": report["mask_mode"],
        "expert_mask": union.to_json_dict() if union is not None else None,
        "batch_masks": {
            str(b): {str(l): es for l, es in m.by_layer().items()} for b, m in sorted(batch_masks.items())
        },
        "report": report,
        "args": json.loads(trainer.args.to_json_string()),
        "loss_history": trainer.state.log_history,
        "batch_monitor": trainer.batch_log,
    }


def _is_per_batch(masks: Any) -> bool:
    """Per-batch masks (dict, list of masks, [B, L, E] array) versus one union mask ([L, E])."""
    if isinstance(masks, Mapping):
        return True
    if isinstance(masks, ExpertMask):
        return False
    if isinstance(masks, (list, tuple)) and masks and isinstance(masks[0], ExpertMask):
        return True
    ndim = np.asarray(masks).ndim
    if ndim not in (2, 3):
        raise TrainingConfigError(
            f"a mask is [layers, experts] and per-batch masks are [batches, layers, experts]; got {ndim}-D"
        )
    return ndim == 3


def draw_random_masks(masks: Any, seed: int, adapter: MoEAdapter) -> Any:
    """The random-experts baseline of ``masks``: as many experts per mask, drawn by ``selection.random_like``.

    One mask -> ``random_like(mask, seed)``; per-batch masks -> ``random_like(m, [seed, batch_idx])``
    for every non-empty one (empty ones stay empty). Only MoE layers are drawn from.
    """

    if _is_per_batch(masks):
        return {
            b: random_like(m, [seed, b], layers=adapter.moe_layers) if m.count() else m
            for b, m in normalize_batch_masks(masks).items()
        }
    mask = masks if isinstance(masks, ExpertMask) else ExpertMask.from_array(np.asarray(masks))
    return random_like(mask, seed, layers=adapter.moe_layers)


def make_trainer(
    model: nn.Module, tokenizer: Any, dataset: Any, masks: Any, config: ExpertMaskingConfig, **kwargs: Any
) -> BatchPreservingTrainer:
    """The trainer ``config.baseline`` asks for, over ``masks`` as given (draw random ones first).

    ``"full"``: a BatchPreservingTrainer with every parameter trainable (``masks`` ignored);
    otherwise an ExpertMaskingTrainer with ``masks`` as the union mask or per-batch masks.
    """
    if config.baseline == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return BatchPreservingTrainer(model, config, dataset, processing_class=tokenizer, **kwargs)
    if masks is None:
        raise TrainingConfigError(
            f"baseline={config.baseline!r} needs expert masks (None means full fine-tuning)"
        )
    per_batch = _is_per_batch(masks)
    return ExpertMaskingTrainer(
        model,
        config,
        dataset,
        expert_mask=None if per_batch else masks,
        batch_expert_masks=masks if per_batch else None,
        processing_class=tokenizer,
        **kwargs,
    )


def train_experts(
    model: nn.Module,
    tokenizer: Any,
    dataset: Any,
    mask_or_batch_masks: Any,
    config: ExpertMaskingConfig | None = None,
    output_dir: str | Path = "training",
    progress: ProgressFn | None = None,
    save_merged_model: bool = False,
    resume_from_checkpoint: str | bool | None = None,
    max_length: int = MAX_LENGTH,
) -> TrainingResult:
    """Train, then write the delta, metadata and batch log into ``output_dir``; the model ends merged.

    ``dataset``: a tokenised batch-aware ``datasets.Dataset`` or structured batches
    (``list[list[dict]]``, tokenised here). ``mask_or_batch_masks``: an ExpertMask / 2-D array
    or per-batch masks (dict / list / 3-D array; applied per step unless ``config.mask_mode=
    "union"``). ``config.baseline``: ``"experts"`` trains them; ``"random_experts"`` trains as
    many experts drawn with ``config.random_seed`` (:func:`draw_random_masks`); ``"full"`` trains
    every parameter (masks ignored). Without ``config``, defaults are used with
    ``per_device_train_batch_size`` set to the largest analysis batch.
    """
    out = Path(output_dir)
    if isinstance(dataset, (list, tuple)):
        dataset = create_batch_aware_dataset(dataset, tokenizer, max_length)
    if config is None:
        config = ExpertMaskingConfig(
            output_dir=str(out / "checkpoints"),
            save_strategy="no",
            logging_steps=1,
            report_to="none",
            per_device_train_batch_size=_largest_batch(dataset),
        )
    elif config.output_dir in (
        None,
        "trainer_output",
    ):  # TrainingArguments' default: keep checkpoints in the run
        config.output_dir = str(out / "checkpoints")
    masks = mask_or_batch_masks
    if config.baseline == "random_experts" and masks is not None:
        masks = draw_random_masks(masks, config.random_seed, MoEAdapter.for_model(model))
    callbacks = [_ProgressCallback(progress)] if progress else None
    trainer = make_trainer(model, tokenizer, dataset, masks, config, callbacks=callbacks)
    return _run(trainer, model, tokenizer, out, progress, save_merged_model, resume_from_checkpoint)


def train_model(
    model: nn.Module,
    tokenizer: Any,
    dataset: Any,
    masks: Any,
    *,
    output_dir: str | Path,
    progress: ProgressFn | None = None,
    baseline: str | None = None,
    save_merged_model: bool = True,
    save_outputs: bool = True,
    resume_from_checkpoint: str | bool | None = None,
    max_length: int = MAX_LENGTH,
    callbacks: Sequence[TrainerCallback] = (),
    **config_fields: Any,
) -> TrainingResult:
    """Train exactly ``masks`` (None = full fine-tuning) with ``ExpertMaskingConfig`` fields given as keywords.

    ``masks``: an ExpertMask / per-batch masks, already what should be trained (draw a random
    baseline with ``moe_core.analysis.selection.random_like`` first), or None for full fine-tuning.
    ``baseline`` only labels the run ("experts" / "random_experts" / "full"); by default it is
    inferred (None -> "full", masks drawn at random -> "random_experts", else "experts").
    Defaults differing from ``TrainingArguments``: ``per_device_train_batch_size`` = the
    largest analysis batch, a constant learning rate, no intermediate checkpoints, loss logged
    every step, no external loggers; checkpoints (if asked for) go to ``output_dir/checkpoints``.
    ``save_outputs=False`` writes nothing (no delta, merged model or metadata): the trained,
    merged model is the result (e.g. a study that evaluates and restores it). ``callbacks``: more
    ``TrainerCallback``s (a learning curve: ``moe_core.eval.curves.CurveCallback``).
    """
    out = Path(output_dir)
    if isinstance(dataset, (list, tuple)):
        dataset = create_batch_aware_dataset(dataset, tokenizer, max_length)
    label = baseline or _infer_baseline(masks)
    if label == "random_experts" and masks is not None and not _all_random(masks):
        raise TrainingConfigError(
            "baseline='random_experts' but the masks were not drawn at random: draw them with "
            "moe_core.analysis.selection.random_like (or use train_experts, which draws them)"
        )
    fields = dict(
        **OUR_DEFAULTS,
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=_largest_batch(dataset),
        use_cpu=not torch.cuda.is_available(),  # on CPU, `accelerate launch` ranks join over gloo
    )
    config = as_config(None, ExpertMaskingConfig, **{**fields, **config_fields, "baseline": label})
    callbacks = [
        *([_ProgressCallback(progress)] if progress else []),
        *callbacks,
    ] or None  # e.g. a CurveCallback
    trainer = make_trainer(
        model, tokenizer, dataset, None if label == "full" else masks, config, callbacks=callbacks
    )
    return _run(
        trainer, model, tokenizer, out, progress, save_merged_model, resume_from_checkpoint, save_outputs
    )


def _largest_batch(dataset: Any) -> int:
    return AnalysisBatchSampler(dataset, shuffle_batches=False).max_batch_size


def _infer_baseline(masks: Any) -> str:
    if masks is None:
        return "full"
    return "random_experts" if _all_random(masks) else "experts"


def _all_random(masks: Any) -> bool:
    if _is_per_batch(masks):
        drawn = [m for m in normalize_batch_masks(masks).values() if m.count()]
        return bool(drawn) and all(is_random_draw(m) for m in drawn)
    return isinstance(masks, ExpertMask) and is_random_draw(masks)


def _run(
    trainer: BatchPreservingTrainer,
    model: nn.Module,
    tokenizer: Any,
    out: Path,
    progress: ProgressFn | None,
    save_merged_model: bool,
    resume_from_checkpoint: str | bool | None,
    save_outputs: bool = True,
) -> TrainingResult:
    """Train, merge (always, also after an error), write the artifacts (unless ``save_outputs`` is False)."""
    if progress:  # the caller draws progress; the Trainer's own bar and printed log dicts would repeat it
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        report = trainer.trainable_report()  # before merging: afterwards the trained rows are gone
    finally:
        merge_trained_experts(model)  # also after an error: never leave rows spliced into the caller's model
    full = trainer.trains == "full"
    delta = merged = meta_path = None
    if save_outputs and trainer.args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        if not full:
            delta = save_expert_delta(trainer, out / DELTA_NAME)
        if save_merged_model or full:
            merged = save_merged(model, tokenizer, out / "merged_model")
        meta_path = atomic_write_json(out / "training_metadata.json", training_metadata(trainer, report))
        atomic_write_text(
            out / "batch_monitor.jsonl", "".join(json.dumps(r) + "\n" for r in trainer.batch_log)
        )
    if progress:
        progress(trainer.state.global_step, trainer.state.global_step, "done")
    metrics = dict(result.metrics)
    if resume_from_checkpoint:  # the Trainer averages only this session's steps (0.0 when none were left)
        metrics["train_loss"] = logged_loss(trainer.state.log_history)
    return TrainingResult(out, meta_path or out / "training_metadata.json", delta, merged, metrics, report)


def logged_loss(log_history: list[dict[str, Any]]) -> float | None:
    """Mean training loss over every step logged so far (a resumed run included), from the loss log."""
    total = steps = last = 0
    for h in log_history:
        if "loss" in h and "step" in h:
            total += h["loss"] * (h["step"] - last)
            steps += h["step"] - last
            last = h["step"]
    return total / steps if steps else None
