"""The reference implementation's trainer keywords mapped onto our typed trainer config.

Why: the seed's ExpertMaskingTrainer(...) call (moe_core.compat) must keep working with its
original meaning; the trainers call :func:`reference_trainer_arguments` to translate it."""

from __future__ import annotations

from typing import Any

from moe_core.train.config import BatchPreservingConfig, TrainingConfigError, as_config

ROUTER_CONSISTENCY_TYPES: dict[str, str] = {
    "kl": "forward",
    "forward": "forward",
    "forward_kl": "forward",
    "reverse": "reverse",
    "reverse_kl": "reverse",
    "symmetric": "symmetric",
    "symmetric_kl": "symmetric",
    "sym": "symmetric",
    "js": "js",
    "jsd": "js",
    "jensen_shannon": "js",
}


REFERENCE_KEYWORDS = (
    "tokenizer",
    "use_router_consistency_loss",
    "router_consistency_type",
    "router_consistency_weight",
    "router_consistency_layers",
    "monitor_batches",
    "mask_mode",
)


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
            raise TrainingConfigError(
                f"router_consistency_type={kind!r}; choose one of {', '.join(ROUTER_CONSISTENCY_TYPES)}"
            )
        overrides["router_consistency_loss"] = ROUTER_CONSISTENCY_TYPES[key]
    layers = ref.get("router_consistency_layers")
    if layers is not None:
        overrides["router_consistency_layers"] = (
            ",".join(str(int(l)) for l in layers)
            if isinstance(layers, (list, tuple, range))
            else str(int(layers))
            if isinstance(layers, int)
            else str(layers)
        )
    return as_config(args, config_class, **overrides), processing_class, kwargs
