"""Which model a run uses, and loading it: a local directory, a hub id, or the offline organism by name.

Why one place: every step (analysis, training, evaluation, the study) resolves --model the same way."""

from __future__ import annotations

from typing import Any

from moe_core.model.adapter import load_model
from moe_core.model.organism import build_organism, load_organism
from moe_core.store.run import Run
from moe_core.types import Progress

ORGANISM = "organism"  # model name that means "the offline model organism, built on demand"


def model_of(run: Run, override: str | None = None) -> str:
    """The model a step works on: an explicit override, else the run's model, else the organism."""
    return override or run.manifest.get("model") or ORGANISM


def model_dir(name: str) -> str:
    """A loadable directory (or hub id) for a model name; builds the organism on demand."""
    if name == ORGANISM:
        return str(build_organism())
    return name


def load_any_model(name: str, progress: Progress | None = None) -> tuple[Any, Any]:
    """``organism`` (built on demand) or a local directory / HF id -> (model, tokenizer)."""
    if name == ORGANISM:
        build_organism(progress=progress)
        return load_organism()

    return load_model(name)


def load_tokenizer_of(run: Run) -> Any:
    """The tokenizer of the run's model (no weights loaded), or None where its directory is gone: what readers
    of token ids (the atlas) need to show text."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir(model_of(run)))
    except (OSError, ValueError):
        return None
