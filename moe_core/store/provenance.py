"""Provenance: what a run was made from, recorded once and checked before anything is written again.

Why: resuming a run with another model (or other settings, or after a kill before ``plan.json``
existed) silently mixed two experiments in one folder. The run's manifest records, under
``provenance``, the model (name + a fingerprint of its weights), the tokenizer (fingerprint) and
where the batch plan came from (prompt files and batch settings); a resume or a later step whose
model, tokenizer or settings differ is refused with ``ProvenanceError`` naming each difference and
how to start a new run instead. Fingerprints are sha256 over every tensor's name, shape, dtype and a
fixed sample of its values: a same-shaped model with other weights differs; cost is milliseconds.

    check_resume(run, spec)                       # before analysis_run touches the run
    check_model(run, model, tokenizer)            # before the first byte of a batch is written
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moe_core.errors import MoELabError

# AnalyseSpec fields that decide the batch plan (its prompts and batches)
PLAN_FIELDS = (
    "safe",
    "unsafe",
    "safe_column",
    "unsafe_column",
    "pair_by_row",
    "demo_sets",
    "demo_mode",
    "limit",
    "batch_size",
    "safe_ratio",
    "seed",
    "max_batches",
    "composed_share",
)
# plan fields added later, at the value that plans as they did before: left out of a plan source there (runs
# stored before them resume), and out of a study's defining settings (its analyses keep their folder)
ADDED_LATER = {"composed_share": 0.0}


def settings_of(spec: Any, fields: Sequence[str]) -> dict[str, Any]:
    """``spec``'s ``fields`` by name, but those at their ``ADDED_LATER`` value."""
    return {k: getattr(spec, k) for k in fields if ADDED_LATER.get(k, ...) != getattr(spec, k)}


_SAMPLES = 64  # values hashed per tensor (per expert of a fused expert tensor), evenly spaced


class ProvenanceError(MoELabError, ValueError):
    """A resume or step would mix this run with another model, tokenizer or settings."""


def model_fingerprint(model: Any) -> str:
    """sha256 of every tensor's name, shape, dtype and evenly spaced values (16 hex digits).

    Exact values, not sums, so the print does not depend on the device; ``_SAMPLES`` per expert of a
    fused ``[experts, ...]`` tensor, so a model that differs only in a few trained experts differs here.
    """
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            if t.device.type == "meta" or t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            per = t.shape[0] if t.dim() >= 3 else 1  # fused experts: dim 0 is the expert
            idx = (
                torch.linspace(0, flat.numel() - 1, min(_SAMPLES * per, flat.numel())).long().to(flat.device)
            )
            h.update(flat[idx].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the vocabulary, special tokens and chat template (16 hex digits)."""
    import json

    vocab = sorted(tokenizer.get_vocab().items())
    parts = [
        vocab,
        getattr(tokenizer, "chat_template", None),
        sorted(map(str, tokenizer.all_special_tokens)),
        getattr(tokenizer, "padding_side", None),
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def plan_source(spec: Any) -> dict[str, Any]:
    """The spec's plan-deciding settings; prompt files as absolute paths (a cwd change keeps them)."""
    out = settings_of(spec, PLAN_FIELDS)
    for k in ("safe", "unsafe"):
        if out[k] and Path(out[k]).expanduser().exists():
            out[k] = str(Path(out[k]).expanduser().resolve())
    return out


def differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``["scope: 'prompt' (run) vs 'generated' (now)", ...]`` for every key whose value differs."""
    return [
        f"{k}: {recorded.get(k)!r} (run) vs {now.get(k)!r} (now)"
        for k in sorted(set(recorded) | set(now))
        if recorded.get(k) != now.get(k)
    ]


def _new_run_hint(run: Any) -> str:
    return (
        f"to analyse with these settings start a new run (the same command without --run), or resume "
        f"run {run.id} with its own settings (`python -m moe_core analyze --run {run.path}` plus the flags "
        "shown in its manifest)"
    )


def recorded(run: Any) -> dict[str, Any]:
    return dict(run.manifest.get("provenance") or {})


def check_model(run: Any, model: Any, tokenizer: Any, what: str = "analysed") -> dict[str, str]:
    """Refuse a model or tokenizer other than the one the run recorded; returns the fingerprints now.

    A run with no recorded fingerprint yet (new, or made by an older version) accepts any model.
    """
    now = {
        "model_fingerprint": model_fingerprint(model),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
    }
    prov = recorded(run)
    diff = [
        f"{k.split('_')[0]} {prov[k]} (run) vs {v} (now)"
        for k, v in now.items()
        if prov.get(k) not in (None, v)
    ]
    if diff:
        raise ProvenanceError(
            f"run {run.id} was {what} with another {' and '.join(d.split()[0] for d in diff)} "
            f"(fingerprint {'; '.join(diff)}): the model {run.manifest.get('model')!r} changed since, or another "
            "one was given; its results would be mixed with the run's. Start a new run for this model, or restore "
            "the model the run was made with"
        )
    return now


def record(run: Any, replace: bool = False, **fields: Any) -> None:
    """Add ``fields`` to the run's provenance; values already recorded are kept unless ``replace``
    (allowed while no batch is finished: nothing yet depends on them)."""
    prov = recorded(run)
    new = {
        k: v
        for k, v in fields.items()
        if (replace or prov.get(k) is None) and v is not None and prov.get(k) != v
    }
    if new:
        run.update(provenance={**prov, **new})


def check_step_model(run: Any, model: str | None) -> None:
    """A later step (train, evaluate) given ``--model`` other than the run's analysed model is refused:
    the masks and batches of the run came from that model."""
    current = run.manifest.get("model")
    if (
        model
        and current
        and model != current
        and (recorded(run).get("model_fingerprint") or run.completed_batches())
    ):
        raise ProvenanceError(
            f"run {run.id} was analysed with model {current!r}; --model {model!r} would mix that "
            f"model's experts and batches with another model. Omit --model, or analyse {model!r} "
            "in a new run (`python -m moe_core analyze --model ...` without --run)"
        )


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able data (plans, masks, training batches): equal data, equal print."""
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def spec_fingerprint(spec: Any) -> str:
    """The print of a step's settings (a spec dataclass, ``overwrite`` aside): recorded with the step's result,
    so that a resumed sequence (``demo --run``) can tell a finished step of the same settings from another."""
    import dataclasses

    return fingerprint({k: v for k, v in dataclasses.asdict(spec).items() if k != "overwrite"})


def plan_fingerprint(plan: Any) -> str:
    return fingerprint(plan.to_json_dict())


def check_plan(run: Any, plan: Any) -> str:
    """Refuse a plan other than the one the run's finished batches came from (e.g. re-saved on the Data page)."""
    now = plan_fingerprint(plan)
    before = recorded(run).get("plan_fingerprint")
    if before not in (None, now) and run.completed_batches():
        raise ProvenanceError(
            f"run {run.id}'s batch plan changed after batches were analysed with the earlier one "
            f"(fingerprint {before} then, {now} now); analyse the new plan in a new run, or restore "
            "the earlier plan.json"
        )
    return now


def model_info_of(run: Any) -> dict[str, Any]:  # a store.run.Run (this module sits below it)
    """num_layers, num_experts, top_k, moe_layers... of the model the run analysed (step record, else provenance)."""
    return dict(
        (run.step("analysis") or {}).get("model_info")
        or (run.manifest.get("provenance") or {}).get("model_info")
        or {}
    )
