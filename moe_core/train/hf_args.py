"""Hugging Face ``TrainingArguments`` reachable from the train step, the CLI and the Training page.

Why: the train spec (``specs.TrainSpec``) holds the method's own settings; every other
``TrainingArguments`` field (bf16, warmup, the scheduler, max_grad_norm, optimizer, ...) travels in
``TrainSpec.training_args`` (a JSON object) into ``ExpertMaskingConfig``, with our defaults where
they differ from Hugging Face's. The CLI offers each of them as a flag of ``train``
(``--bf16``, ``--warmup_ratio 0.1``, ``--lr_scheduler_type cosine``), generated from this module.

Fields that would break the method are locked, each with a one-line reason; fields the spec
already names (``--lr`` = ``learning_rate``, ``--epochs`` = ``num_train_epochs``, ``--seed``,
``--weight-decay``) are set through the spec only, so one value never has two flags.

    check_training_args({"bf16": True, "warmup_ratio": 0.1})   # -> the same dict, validated
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from transformers import TrainingArguments

from moe_core.train.config import TrainingConfigError

# where our train step differs from TrainingArguments' defaults (and why, in train_model's docstring)
OUR_DEFAULTS: dict[str, Any] = {
    "lr_scheduler_type": "constant",
    "save_strategy": "no",
    "logging_steps": 1,
    "report_to": "none",
}
# TrainingArguments fields that the spec sets under its own (older) names
SPEC_FIELDS: dict[str, str] = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "weight_decay": "weight_decay",
    "seed": "seed",
}
_BATCHES = "each analysis batch is one training batch"
LOCKED: dict[str, str] = {
    "per_device_train_batch_size": f"{_BATCHES}: its size is the analysis batch's",
    "gradient_accumulation_steps": "accumulating would merge several analysis batches into one update",
    "auto_find_batch_size": f"{_BATCHES}: the batch size is not free to change",
    "group_by_length": "grouping by length would regroup samples across analysis batches",
    "train_sampling_strategy": "the batch sampler decides the order (whole analysis batches)",
    "dataloader_drop_last": "it would drop a short analysis batch",
    "remove_unused_columns": "it would drop batch_idx and in_batch_idx, which keep the batches whole",
    "output_dir": "the train step writes into the run (train/<name>/)",
    "overwrite_output_dir": "use --overwrite of the train step",
    "resume_from_checkpoint": "running the same train again resumes its last checkpoint",
    "save_strategy": "the train step checkpoints with --checkpoint-every",
    "save_steps": "the train step checkpoints with --checkpoint-every",
    "push_to_hub": "the trained experts stay in the run (push the merged model yourself)",
    "hub_token": "the trained experts stay in the run",
    "hub_model_id": "the trained experts stay in the run",
    "hub_strategy": "the trained experts stay in the run",
    "hub_private_repo": "the trained experts stay in the run",
    "hub_always_push": "the trained experts stay in the run",
    "hub_revision": "the trained experts stay in the run",
    "do_train": "the train step trains",
    "do_eval": "evaluation is its own step (evaluate)",
    "do_predict": "evaluation is its own step (evaluate)",
    "eval_strategy": "evaluation is its own step (evaluate)",
    "load_best_model_at_end": "evaluation is its own step (evaluate)",
    "local_rank": "set by the launcher (accelerate launch)",
    "use_cpu": "chosen from the machine (no CUDA -> CPU)",
}


def open_fields() -> list[dataclasses.Field]:
    """The TrainingArguments fields a user may set through ``training_args``, in their own order."""
    return [
        f
        for f in dataclasses.fields(TrainingArguments)
        if f.init and f.name not in LOCKED and f.name not in SPEC_FIELDS
    ]


def default_of(f: dataclasses.Field) -> Any:
    if f.name in OUR_DEFAULTS:
        return OUR_DEFAULTS[f.name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]


def default_value(name: str) -> Any:
    """What training argument ``name`` is when nobody sets it: ours (``OUR_DEFAULTS``) or Hugging Face's."""
    return default_of(next(f for f in dataclasses.fields(TrainingArguments) if f.name == name))


def check_training_args(values: dict[str, Any] | None) -> dict[str, Any]:
    """``values`` if every key is an open TrainingArguments field, else one line naming the problem."""
    values = dict(values or {})
    for key in values:
        if key in LOCKED:
            raise TrainingConfigError(f"training argument {key!r} is fixed by the method: {LOCKED[key]}")
        if key in SPEC_FIELDS:
            raise TrainingConfigError(
                f"training argument {key!r} is the train step's --{SPEC_FIELDS[key].replace('_', '-')}"
            )
    known = {f.name for f in open_fields()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TrainingConfigError(
            f"unknown training argument(s) {unknown}: use names of transformers' TrainingArguments"
        )
    return values


def cli_dataclass() -> type:
    """A dataclass of the open fields (our defaults, Hugging Face's help) for ``HfArgumentParser``."""
    hints = typing.get_type_hints(TrainingArguments)
    specs = []
    for f in open_fields():
        default = default_of(f)
        meta = {"help": (f.metadata or {}).get("help", "")}
        if isinstance(default, (list, dict)):
            factory = lambda d=default: type(d)(d)  # noqa: E731
            specs.append((f.name, hints[f.name], dataclasses.field(default_factory=factory, metadata=meta)))
        else:
            specs.append((f.name, hints[f.name], dataclasses.field(default=default, metadata=meta)))
    return dataclasses.make_dataclass("HFTrainingArguments", specs)


def changed(parsed: Any, unset: Any) -> dict[str, Any]:
    """The open fields whose value in ``parsed`` differs from ``unset`` (the same parser given no flags:
    the parser's own conversions, e.g. of list defaults, then compare equal)."""
    return {
        f.name: getattr(parsed, f.name)
        for f in open_fields()
        if getattr(parsed, f.name) != getattr(unset, f.name)
    }
