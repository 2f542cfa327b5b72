"""The seed's names and signatures, mapped onto the typed main path (one module, so the main path stays clean).

The seed method note (``BATCH_STRUCTURE_EXPLAINED``) runs unchanged with only its imports changed::

    from moe_core.compat import (BatchPreservingSampler, ExpertMaskingTrainer,
                                 create_batch_aware_dataset, create_batch_structured_dataset)

    batches = create_batch_structured_dataset(sft_data, tokenizer, batch_size=16, safe_ratio=0.5)
    train_dataset = create_batch_aware_dataset(batches, tokenizer)          # + label_str, messages
    loader = DataLoader(train_dataset, batch_size=16, collate_fn=collator,
                        sampler=BatchPreservingSampler(train_dataset, 16, shuffle_batches=True))
    trainer = ExpertMaskingTrainer(batch_expert_masks=[...], use_router_consistency_loss=True,
                                   router_consistency_weight=0.1, router_consistency_type="kl",
                                   router_consistency_layers="all", model=model,
                                   args=TrainingArguments(...), train_dataset=train_dataset,
                                   tokenizer=tokenizer, data_collator=collator)

Every name here is the main-path object itself (also importable from ``moe_core.sampler``,
``moe_core.sft``, ``moe_core.training``); the only code is :func:`reference_trainer_arguments`,
which the trainers call to map the reference's keyword arguments onto their typed config:

* ``args=TrainingArguments(...)``: converted to the trainer's config class, values kept;
* ``tokenizer=`` -> ``processing_class=``;
* ``use_router_consistency_loss`` / ``router_consistency_type`` -> ``router_consistency_loss``:
  ``"kl"``/``"forward"``/``"forward_kl"`` -> forward KL(safe || unsafe); ``"reverse"``/
  ``"reverse_kl"`` -> KL(unsafe || safe); ``"symmetric"``/``"symmetric_kl"``/``"sym"`` -> the
  mean of both; ``"js"``/``"jsd"``/``"jensen_shannon"`` -> Jensen-Shannon. Flag on without a type
  means ``"kl"``; a type without the flag switches the loss on; flag False switches it off;
* ``router_consistency_weight`` -> the config field of the same name;
* ``router_consistency_layers``: ``"all"``, ``"masked"``, or a list of decoder-layer indices;
* ``monitor_batches=True``: the seed's per-step line "Current training batch contains samples
  from batches: [k]" (printed each step);
* ``mask_mode=``: ``"per_batch"`` (the default whenever ``batch_expert_masks`` is given) or an
  explicit ``"union"``.
"""

from __future__ import annotations

from typing import Any

from .batch_trainer import BatchPreservingTrainer
from .expert_trainer import ExpertMaskingTrainer
from .sampler import AnalysisBatchSampler, BatchPreservingSampler
from .sft import create_batch_aware_dataset, create_batch_structured_dataset, load_reference_pickle
from .training_config import BatchPreservingConfig, TrainingConfigError, as_config

__all__ = [
    "AnalysisBatchSampler", "BatchPreservingSampler", "BatchPreservingTrainer", "ExpertMaskingTrainer",
    "ROUTER_CONSISTENCY_TYPES", "create_batch_aware_dataset", "create_batch_structured_dataset",
    "load_reference_pickle", "reference_trainer_arguments",
]

ROUTER_CONSISTENCY_TYPES: dict[str, str] = {
    "kl": "forward", "forward": "forward", "forward_kl": "forward",
    "reverse": "reverse", "reverse_kl": "reverse",
    "symmetric": "symmetric", "symmetric_kl": "symmetric", "sym": "symmetric",
    "js": "js", "jsd": "js", "jensen_shannon": "js",
}
REFERENCE_KEYWORDS = ("tokenizer", "use_router_consistency_loss", "router_consistency_type",
                      "router_consistency_weight", "router_consistency_layers", "monitor_batches", "mask_mode")


def reference_trainer_arguments(
    config_class: type[BatchPreservingConfig], args: Any, processing_class: Any, kwargs: dict[str, Any]
) -> tuple[BatchPreservingConfig, Any, dict[str, Any]]:
    """(typed config, processing_class, remaining Trainer kwargs) from a trainer call in the reference's words."""
    kwargs = dict(kwargs)
    ref = {k: kwargs.pop(k) for k in REFERENCE_KEYWORDS if k in kwargs}
    tokenizer = ref.pop("tokenizer", None)
    if tokenizer is not None:
        if processing_class is not None and processing_class is not tokenizer:
            raise TrainingConfigError("give tokenizer= or processing_class=, not two different ones")
        processing_class = tokenizer
    overrides = {k: ref[k] for k in ("router_consistency_weight", "monitor_batches", "mask_mode") if k in ref}
    use, kind = ref.get("use_router_consistency_loss"), ref.get("router_consistency_type")
    if use is False:
        overrides["router_consistency_loss"] = "none"
    elif use or kind is not None:
        key = str(kind if kind is not None else "kl").lower()
        if key not in ROUTER_CONSISTENCY_TYPES:
            raise TrainingConfigError(f"router_consistency_type={kind!r}; choose one of "
                                      f"{', '.join(ROUTER_CONSISTENCY_TYPES)}")
        overrides["router_consistency_loss"] = ROUTER_CONSISTENCY_TYPES[key]
    layers = ref.get("router_consistency_layers")
    if layers is not None:
        overrides["router_consistency_layers"] = (
            ",".join(str(int(l)) for l in layers) if isinstance(layers, (list, tuple, range))
            else str(int(layers)) if isinstance(layers, int) else str(layers)
        )
    return as_config(args, config_class, **overrides), processing_class, kwargs
