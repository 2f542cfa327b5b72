"""The transformers / accelerate internals our trainers rely on, all in this one place.

The trainers (``moe_core.train.batch_trainer``, ``moe_core.train.expert_trainer``) customise the
``Trainer`` through the extension points below. None of them is a promise of a stable API, so
:func:`check_internals` verifies each one, and ``tests/test_training.py::
test_transformers_internals_are_as_expected`` fails loudly, naming the item, when an upgrade
changes one. Written against transformers 5.24 / accelerate 1.15.

 1. ``Trainer.training_step(model, inputs, num_items_in_batch=None)``: overridden (batch monitor,
    per-batch gradient gating). transformers 5 passes ``num_items_in_batch``; a subclass written
    for 4.x (``training_step(self, model, inputs)``) fails with a TypeError.
 2. ``Trainer.compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None)``:
    overridden (structure columns stripped before forward, router-consistency term).
 3. ``Trainer._get_train_sampler(train_dataset=None)``: overridden to return the
    ``AnalysisBatchSampler``.
 4. ``Trainer.get_train_dataloader()``: overridden, because the stock ``_get_dataloader`` passes
    a sampler as ``batch_sampler`` only for its own ``BatchRebalanceSampler`` (which it also
    un-shards). :func:`build_train_dataloader` builds the DataLoader with the same parameters
    and still calls ``accelerator.prepare`` (sharding across processes, device placement).
 5. ``Trainer._remove_unused_columns(dataset, description=None)``,
    ``_set_signature_columns_if_needed()`` and ``self._signature_columns``: extended so that
    ``remove_unused_columns=True`` keeps ``batch_idx``/``in_batch_idx``/``label``.
 6. ``Trainer._save(output_dir=None, state_dict=None)`` and
    ``Trainer._load_from_checkpoint(resume_from_checkpoint, model=None)``: checkpoints without a
    pickled ``training_args.bin`` (and, for expert training, only the trained rows).
 7. ``Trainer.log(logs, start_time=None)``: adds the mean router-consistency term.
 8. ``Trainer.get_optimizer_cls_and_kwargs(args, model=None)`` (static): the optimizer class and
    its kwargs from ``args``, used over our own parameter groups.
 9. Attributes ``model_accepts_loss_kwargs`` and ``current_gradient_accumulation_steps``: the LM
    loss is already scaled for gradient accumulation when ``num_items_in_batch`` is given, so the
    extra router term is scaled the same way; ``accelerator.sync_gradients`` marks the step
    whose gradients reach the optimizer.
10. ``Trainer.__init__`` takes ``processing_class`` (``tokenizer=`` is gone in transformers 5):
    the seed's ``tokenizer=`` is mapped onto it.
11. accelerate's ``BatchSamplerShard`` with a batch sampler whose ``batch_size`` is None yields
    whole batches round-robin and pads the last round with whole batches (checked by running it).
12. The training loop calls ``set_epoch(epoch)`` on the batch sampler wrapped inside
    ``BatchSamplerShard`` (accelerate's ``DataLoaderShard.set_epoch`` does not reach it): that
    reshuffles the batch order per epoch with several processes (checked on the loop's source).
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import seed_worker

EXPECTED_SIGNATURES: dict[str, tuple[str, ...]] = {
    "training_step": ("self", "model", "inputs", "num_items_in_batch"),
    "compute_loss": ("self", "model", "inputs", "return_outputs", "num_items_in_batch"),
    "_get_train_sampler": ("self", "train_dataset"),
    "get_train_dataloader": ("self",),
    "_remove_unused_columns": ("self", "dataset", "description"),
    "_set_signature_columns_if_needed": ("self",),
    "_save": ("self", "output_dir", "state_dict"),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
    "log": ("self", "logs", "start_time"),
    "get_optimizer_cls_and_kwargs": ("args", "model"),
    "create_optimizer": ("self", "model"),
}
DATALOADER_ARGS = (
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
    "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context",
    "dataloader_in_order",
    "train_sampling_strategy",
    "dataloader_drop_last",
    "remove_unused_columns",
    "data_seed",
)


def build_train_dataloader(trainer: Trainer, dataset: Any, batch_sampler: Any) -> torch.utils.data.DataLoader:
    """The Trainer's training DataLoader with ``batch_sampler`` instead of ``batch_size``/``sampler`` (item 4).

    Same worker, pinning and seeding parameters as ``Trainer._get_dataloader``; prepared by
    accelerate, so several processes each get whole batches and batches land on the device.
    """
    a = trainer.args
    workers = a.dataloader_num_workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=trainer.data_collator,
        num_workers=workers,
        pin_memory=a.dataloader_pin_memory and a.device.type != "cpu",
        persistent_workers=a.dataloader_persistent_workers and workers > 0,
        prefetch_factor=a.dataloader_prefetch_factor if workers > 0 else None,
        multiprocessing_context=a.dataloader_multiprocessing_context if workers > 0 else None,
        in_order=a.dataloader_in_order,
        worker_init_fn=partial(seed_worker, num_workers=workers, rank=a.process_index),
    )
    return trainer.accelerator.prepare(loader)


def check_internals() -> list[str]:
    """Every item of the module docstring that no longer holds, as readable lines (empty = all good)."""
    problems = []
    for name, params in EXPECTED_SIGNATURES.items():
        fn = getattr(Trainer, name, None)
        if fn is None:
            problems.append(f"Trainer.{name} no longer exists")
            continue
        got = tuple(inspect.signature(fn).parameters)
        if got != params:
            problems.append(f"Trainer.{name}{got} changed (expected parameters {params})")
    init = inspect.signature(Trainer.__init__).parameters
    if "processing_class" not in init or "tokenizer" in init:
        problems.append("Trainer.__init__ no longer takes processing_class (and not tokenizer)")
    fields = TrainingArguments.__dataclass_fields__
    problems += [f"TrainingArguments.{f} is gone" for f in DATALOADER_ARGS if f not in fields]
    loop = inspect.getsource(Trainer)
    if "underlying_sampler.set_epoch" not in loop:
        problems.append(
            "the training loop no longer calls set_epoch on the batch sampler inside BatchSamplerShard"
        )
    if "model_accepts_loss_kwargs" not in loop or "current_gradient_accumulation_steps" not in loop:
        problems.append(
            "Trainer no longer sets model_accepts_loss_kwargs / current_gradient_accumulation_steps"
        )
    problems += _check_batch_sampler_shard()
    return problems


def _check_batch_sampler_shard() -> list[str]:
    """Item 11: run BatchSamplerShard over uneven batches with batch_size=None, on 2 ranks."""
    from accelerate.data_loader import BatchSamplerShard

    class Uneven(torch.utils.data.Sampler):
        batch_size = None
        drop_last = False

        def __iter__(self):
            return iter([[0, 1, 2], [3, 4], [5, 6, 7]])

        def __len__(self):
            return 3

    whole = {(0, 1, 2), (3, 4), (5, 6, 7)}
    shards = [
        [
            tuple(b)
            for b in BatchSamplerShard(
                Uneven(), num_processes=2, process_index=r, split_batches=False, even_batches=True
            )
        ]
        for r in range(2)
    ]
    if (
        any(b not in whole for s in shards for b in s)
        or len(shards[0]) != len(shards[1])
        or set(shards[0]) | set(shards[1]) != whole
    ):
        return [f"accelerate's BatchSamplerShard no longer keeps batch_size=None batches whole: {shards}"]
    return []
