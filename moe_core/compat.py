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

Every name here is the main-path object itself (also importable from ``moe_core.train.sampler``,
``moe_core.train.sft``, ``moe_core.train.training``); the only code is :func:`reference_trainer_arguments`,
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

from moe_core.train.batch_trainer import BatchPreservingTrainer
from moe_core.train.expert_trainer import ExpertMaskingTrainer
from moe_core.train.reference import (
    ROUTER_CONSISTENCY_TYPES,
    reference_trainer_arguments,
)
from moe_core.train.sampler import AnalysisBatchSampler, BatchPreservingSampler
from moe_core.train.sft import (
    create_batch_aware_dataset,
    create_batch_structured_dataset,
    load_reference_pickle,
)

__all__ = [
    "AnalysisBatchSampler",
    "BatchPreservingSampler",
    "BatchPreservingTrainer",
    "ExpertMaskingTrainer",
    "ROUTER_CONSISTENCY_TYPES",
    "create_batch_aware_dataset",
    "create_batch_structured_dataset",
    "load_reference_pickle",
    "reference_trainer_arguments",
]
