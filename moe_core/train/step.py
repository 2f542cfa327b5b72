"""The train step of a run as a transaction: checked before the model loads, staged, resumable, committed whole.

    train/<name>/             a finished training: expert_delta.safetensors (+ .json), merged_model/,
                              training_metadata.json, batch_monitor.jsonl, all from one attempt
    train/.<name>.partial/    the attempt under way: attempt.json (its settings), checkpoints/checkpoint-N/
                              (HF Trainer checkpoints: trained rows, optimizer, RNG, batch log), then the
                              artifacts; renamed to train/<name>/ only once every artifact is written

Rules (``python -m moe_core train``; the app's Training page asks before it sets ``overwrite``):

* A finished training is replaced only with ``overwrite``; until the new one is complete the old
  one is untouched (a full disk or a kill at any point leaves it as it was).
* A killed or failed attempt is resumed by running the same ``train`` again: same settings (mask
  contents and training data included) -> it continues from its last complete checkpoint, and the
  result equals an uninterrupted run. Other settings -> refused, unless ``overwrite`` discards it.

    stage, checkpoint = begin_training(out, settings, overwrite=False)
    result = train_model(..., output_dir=stage, resume_from_checkpoint=checkpoint, **checkpointing(5))
    result = commit_training(result, stage, out)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from moe_core.analysis.analyse import chat_template_kwargs_of, load_batch_data_list
from moe_core.analysis.masks import check_mask_fits, load_run_masks
from moe_core.analysis.selection import random_like
from moe_core.batching.demo_prompts import demo_benign, demo_sharp_benign
from moe_core.batching.resource_prompts import train_requests
from moe_core.errors import MoELabError
from moe_core.model.adapter import MoEAdapter
from moe_core.model.generation import generate, use_chat_template_kwargs
from moe_core.model.loading import load_any_model, model_of
from moe_core.store.atomic import as_os_error, atomic_write_json
from moe_core.store.checks import check_free, json_object
from moe_core.store.lease import secondary_rank, world_size
from moe_core.store.provenance import fingerprint, spec_fingerprint
from moe_core.store.run import Run
from moe_core.train.sft import (
    add_retain_examples,
    create_batch_aware_dataset,
    create_batch_structured_dataset,
    save_structured_batches,
)
from moe_core.train.training import TrainingResult, train_model
from moe_core.types import Progress

log = logging.getLogger(__name__)

ATTEMPT = "attempt.json"  # the settings of the attempt in a stage folder
CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2  # the newest may be cut short by a kill: the one before it is still whole


class TrainingStepError(MoELabError):
    """A training of that name exists (finished, or unfinished with other settings) and was not replaced."""


def stage_of(out: Path) -> Path:
    """The hidden sibling an attempt at ``out`` is built in (readers of a run skip dot-folders)."""
    return out.parent / f".{out.name}.partial"


def checkpointing(every: int) -> dict[str, Any]:
    """Trainer settings that keep resumable checkpoints every ``every`` steps (the newest two)."""
    return dict(save_strategy="steps", save_steps=int(every), save_total_limit=KEEP_CHECKPOINTS)


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder``: its trainer_state.json (written last) parses."""
    numbered = [p for p in folder.glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()]
    for p in sorted(numbered, key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True):
        try:
            json.loads((p / "trainer_state.json").read_text())
            return p
        except (OSError, ValueError):
            continue  # cut short by a kill: fall back to the one before
    return None


def _read_attempt(stage: Path) -> dict[str, Any] | None:
    try:
        return json.loads((stage / ATTEMPT).read_text())
    except (OSError, ValueError):
        return None


def begin_training(out: Path, settings: dict[str, Any], overwrite: bool) -> tuple[Path, Path | None]:
    """-> (stage folder to train in, checkpoint to resume from or None); refuses before any work.

    ``settings``: everything the result depends on (JSON-able). Equal settings resume the
    unfinished attempt; others are refused unless ``overwrite`` (which discards it).
    """
    out = Path(out)
    check_free(out, f"training {out.name!r}", overwrite)
    for old in out.parent.glob(f".{out.name}.old-*"):  # a commit killed between its two renames left it
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
        elif not stage_of(out).exists():
            os.replace(old, out)  # the previous training comes back; it is finished, so ask again
            check_free(out, f"training {out.name!r}", overwrite)
    stage = stage_of(out)
    if stage.exists():
        before = _read_attempt(stage)
        if before == settings:
            checkpoint = last_checkpoint(stage / CHECKPOINTS)
            if checkpoint is None:  # killed before its first checkpoint: nothing to keep
                shutil.rmtree(stage / CHECKPOINTS, ignore_errors=True)
            return stage, checkpoint
        if not overwrite:
            differs = sorted(
                k for k in {*(before or {}), *settings} if (before or {}).get(k) != settings.get(k)
            )
            raise TrainingStepError(
                f"an unfinished training {out.name!r} with other settings ({', '.join(differs)}) is in {stage}; "
                "run `train` again with its settings to resume it, or pass --overwrite to discard it"
            )
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    atomic_write_json(stage / ATTEMPT, settings)
    return stage, None


def commit_training(result: Any, stage: Path, out: Path) -> Any:
    """Swap the finished stage in as ``out`` (the previous ``out`` goes only now) -> result with moved paths."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)  # put the previous training back
        raise
    for stale in [old] if old is not None else out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # resuming is over; they are large
    (out / ATTEMPT).unlink(missing_ok=True)
    return moved(result, stage, out)


def moved(result: Any, stage: Path, out: Path) -> Any:
    """A TrainingResult whose paths under ``stage`` now point under ``out``."""

    def move(p: Any) -> Any:
        if isinstance(p, Path) and (p == stage or stage in p.parents):
            return out / p.relative_to(stage)
        return p

    return dataclasses.replace(
        result, **{f.name: move(getattr(result, f.name)) for f in dataclasses.fields(result)}
    )


def write_failure(out: Path, error: OSError) -> TrainingStepError:
    """A disk-full / permission error while writing a training, as a user error that says what is safe."""
    return TrainingStepError(
        f"could not write training {out.name!r}: {error.strerror or error} ({error.filename or out}); "
        f"the previous training of that name is unchanged and any unfinished attempt is kept in {stage_of(out)}: "
        "free space (or fix permissions) and run `train` again to resume it"
    )


# -- the step ----------------------------------------------------------------------------------
def launch_roles() -> tuple[bool, Any]:
    """-> (this process writes the run, barrier of the launch). One process: (True, no-op).

    Under ``accelerate launch`` every rank runs the step; only rank 0 stages, records and commits,
    the others wait for it and train in the same stage folder (the Trainer shards whole batches).
    """

    if world_size() <= 1:
        return True, lambda: None
    import torch
    from accelerate import (
        PartialState,  # joins the launch's process group (the Trainer's arguments reuse it)
    )

    PartialState(cpu=not torch.cuda.is_available())  # as the Trainer will: gloo on CPU, else nccl
    return not secondary_rank(), lambda: PartialState().wait_for_everyone()


def masks_content(masks: Any) -> Any:
    """What a mask (or per-batch masks) holds, as plain JSON: its fingerprint ties an attempt to it."""
    if masks is None:
        return None
    if isinstance(masks, dict):
        return {str(b): m.mask.astype(int).tolist() for b, m in sorted(masks.items())}
    return masks.mask.astype(int).tolist()


def random_baseline(spec: Any, chosen: Any, adapter: MoEAdapter) -> Any:
    """What the spec trains: the chosen mask(s), as many random experts drawn uniformly, or None (full)."""

    if spec.baseline != "random_experts":
        return chosen
    if isinstance(chosen, dict):  # per batch: batch b draws with seed [seed, b]
        return {
            b: random_like(m, [spec.seed, b], layers=adapter.moe_layers) if m.count() else m
            for b, m in chosen.items()
        }
    return random_like(chosen, spec.seed, layers=adapter.moe_layers)


def retain_examples(model: Any, tok: Any) -> list[tuple[str, str]]:
    """Benign requests of the built-in train split (composed plain and sharp-worded, and free-worded benign and
    borderline ones) with the base model's own greedy answers: what the model should keep doing after
    training. Free wording matters: without it, refusal training tipped free-worded requests into refusals."""
    items = [*demo_benign("train"), *demo_sharp_benign("train"), *train_requests()]
    answers = generate(model, tok, [it.messages() for it in items])
    return [(it.text, g.text) for it, g in zip(items, answers) if g.text.strip()]


def run_train(spec: Any, run: Run, progress: Progress | None = None) -> TrainingResult:
    # spec: a moe_core.specs.TrainSpec, defined a layer above this one (so it is not imported here)
    """``pipeline.train``: checks, then a staged (resumable) training committed whole as train/<name>/."""

    name, model_name = spec.training_name(), model_of(run, spec.model)
    out = run.path_for("train", name=name)
    chosen = (
        None if spec.baseline == "full" else load_run_masks(run, spec.mask, spec.mask_mode == "per_batch")
    )
    check_mask_fits(run, chosen, spec.mask)
    batches = create_batch_structured_dataset(load_batch_data_list(run), seed=spec.seed)
    skip = (
        "name",
        "overwrite",
        "monitor_batches",
        "checkpoint_every",
        "training_args",
    )  # training_args: below
    settings = {
        **{k: v for k, v in dataclasses.asdict(spec).items() if k not in skip},
        **({} if spec.training_args is None else {"training_args": json_object(spec.training_args)}),
        "model": model_name,
        "masks": fingerprint(masks_content(chosen)),
        "data": fingerprint(batches),
    }
    main, barrier = launch_roles()
    if main:
        try:
            stage, checkpoint = begin_training(out, settings, spec.overwrite)  # before the model is loaded
            save_structured_batches(batches, run.path_for("sft") / "batches")
        except Exception as e:
            if (os_error := as_os_error(e)) is None:
                raise
            raise write_failure(out, os_error) from e
    barrier()  # the other ranks of `accelerate launch` train in the stage rank 0 prepared (and resume alike)
    if not main:
        stage = stage_of(out)
        checkpoint = last_checkpoint(stage / CHECKPOINTS)
    if checkpoint is not None:
        log.info("training %s: resuming the unfinished attempt from %s", name, checkpoint.name)
    model, tok = load_any_model(model_name, progress)
    use_chat_template_kwargs(
        tok, chat_template_kwargs_of(run)
    )  # the SFT text rendered as the analysis rendered it
    masks = random_baseline(spec, chosen, MoEAdapter.for_model(model))
    if spec.retain_share:  # benign requests with the base model's own answers, in every batch
        batches = add_retain_examples(batches, retain_examples(model, tok), spec.retain_share, seed=spec.seed)
    dataset = create_batch_aware_dataset(batches, tok, max_length=spec.max_length)
    if main:
        run.set_step(
            f"train:{name}",
            "running",
            mask=spec.mask,
            baseline=spec.baseline,
            mask_mode=spec.mask_mode,
            resumed_from=checkpoint.name if checkpoint else None,
        )
    try:
        result = train_model(
            model,
            tok,
            dataset,
            masks,
            output_dir=stage,
            progress=progress,
            baseline=spec.baseline,
            mask_mode=spec.mask_mode,
            learning_rate=spec.lr,
            num_train_epochs=spec.epochs,
            weight_decay=spec.weight_decay,
            seed=spec.seed,
            train_router=spec.train_router,
            router_consistency_loss=spec.router_consistency,
            router_consistency_weight=spec.router_consistency_weight,
            monitor_batches=spec.monitor_batches,
            resume_from_checkpoint=str(checkpoint) if checkpoint else None,
            **(
                json_object(spec.training_args) or {}
            ),  # the user's other TrainingArguments (checked by the spec)
            **checkpointing(spec.checkpoint_every),
        )
        barrier()  # every rank is done with the stage before rank 0 renames it
        if not main:
            return result  # only rank 0 writes the run
        result = commit_training(result, stage, out)
    except Exception as e:  # disk full, permissions: nothing of the previous training was touched
        if (os_error := as_os_error(e)) is None:  # (a library may wrap it: safetensors, torch.save)
            raise
        raise write_failure(out, os_error) from e
    run.set_step(
        f"train:{name}",
        "done",
        merged=run.relative(result.merged_path),
        report=result.report,
        train_loss=result.metrics.get("train_loss"),
        resumed_from=checkpoint.name if checkpoint else None,
        settings=spec_fingerprint(spec),
    )
    return result
