"""The pipeline, one typed spec per step: the single home of every default.

    analyse -> select -> train -> evaluate      (demo = all four on the organism; study = many of them)

Each step is a dataclass spec plus a function ``step(spec, run, ...)``. The CLI is generated from these
dataclasses (``cli.py``, ``HfArgumentParser``), the pages build the same specs and launch them as jobs
(``jobs.start_step``), :func:`to_argv` gives a spec's command line. A default changes in one place::

    from moe_core import pipeline as P
    run = P.analyse(P.AnalyseSpec(model="organism", scope="prompt"))
    P.select(P.SelectSpec(n=16), run)
    P.train(P.TrainSpec(baseline="experts"), run)
    P.evaluate(P.EvaluateSpec(eval_limit=20), run)

Steps take ``progress(done, total, message)`` and ``should_stop()`` callables, never UI objects.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moe_core.analysis.analyse import (
    AnalysisConfig,
    analysis_config_of,
    chat_template_kwargs_of,
    check_resume,
    load_batch_data_list,
    run_analysis,
)
from moe_core.analysis.atlas import atlas_dir, build_atlas, writes_path
from moe_core.analysis.atlas_query import add_present_expert, present_experts
from moe_core.analysis.expert_writes import WRITES_BATCHES, expert_writes
from moe_core.analysis.masks import (
    ExpertMask,
    MaskError,
    apply_toggles,
    check_mask_fits,
    parse_toggles,
    save_batch_masks,
)
from moe_core.analysis.scores import (
    FROM_ROUTING,
    SCORES,
    ablation_effect,
    gate_diff_table,
    gradient_attribution,
    gradient_contrast,
    with_score,
)
from moe_core.analysis.selection import (
    random_like,
    select_experts,
    select_per_batch,
)
from moe_core.batching.batches import compose_batches
from moe_core.batching.demo_prompts import demo_sets
from moe_core.batching.plan import BatchPlan, BatchPlanError, load_plan, save_plan
from moe_core.batching.prompts import load_prompts, pair_by_row
from moe_core.batching.validation import Issue, check
from moe_core.errors import MoELabError
from moe_core.eval.evaluation import (
    EvalEntry,
    check_evaluation_free,
    compare_models,
    comparison_table,
    default_eval_sets,
    routing_shift,
    save_evaluation,
)
from moe_core.model.adapter import load_model
from moe_core.model.backends import open_backend
from moe_core.model.generation import cut_to_fit, use_chat_template_kwargs
from moe_core.model.loading import ORGANISM, load_any_model, model_dir, model_of
from moe_core.specs import (  # the face: a page or script builds a spec and runs its step from here
    COMMANDS,
    AnalyseSpec,
    AtlasSpec,
    DemoSpec,
    EvaluateSpec,
    Scope,
    SelectSpec,
    StudySpec,
    TrainSpec,
    command_of,
    to_argv,
)
from moe_core.store.atomic import atomic_write, atomic_write_bytes, atomic_write_json, commit_files
from moe_core.store.checks import (
    check_free,
    json_object,
)
from moe_core.store.events import JobStopped
from moe_core.store.files import RunError, read_json, read_parquet, write_parquet
from moe_core.store.manifest import default_runs_root
from moe_core.store.provenance import model_info_of, plan_source, record, spec_fingerprint
from moe_core.store.run import Run
from moe_core.store.steps import step_outcome, writes_run
from moe_core.train.sampler import AnalysisBatchSampler, BatchCollator
from moe_core.train.sft import (
    MAX_LENGTH,
    add_retain_examples,
    create_batch_aware_dataset,
    create_batch_structured_dataset,
)
from moe_core.train.step import retain_examples, run_train
from moe_core.train.training import TrainingResult
from moe_core.types import Progress, PromptItem, ShouldStop

__all__ = [  # the specs (defined in moe_core.specs) and the steps: what README's Python section uses
    "COMMANDS",
    "AnalyseSpec",
    "AtlasSpec",
    "DemoSpec",
    "EvaluateSpec",
    "Scope",
    "SelectSpec",
    "StudySpec",
    "TrainSpec",
    "command_of",
    "to_argv",
    "open_run",
    "prompt_sets",
    "compose",
    "analysis_run",
    "analyse",
    "atlas",
    "present_experts",
    "add_present_expert",
    "select",
    "train",
    "eval_entries",
    "evaluate",
    "routing_shifts",
]
log = logging.getLogger(__name__)


# -- runs --------------------------------------------------------------------------------------
def open_run(path: str | Path, runs_root: str | Path | None = None) -> Run:
    """A run by directory or by id under ``runs_root``; a clear error when there is none."""
    p = Path(path)
    if not (p / "manifest.json").is_file():
        cand = Path(runs_root or default_runs_root()) / str(path)
        if not (cand / "manifest.json").is_file():
            raise RunError(f"no run at {path} (nor {cand}); list runs with `python -m moe_core runs`")
        p = cand
    return Run.open(p)


# -- analyse -----------------------------------------------------------------------------------
def prompt_sets(spec: AnalyseSpec) -> tuple[list[PromptItem], list[PromptItem]]:
    """The safe and unsafe prompt sets a spec names (built-in demo sets when no file is given)."""

    if spec.demo_sets or not (spec.safe or spec.unsafe):
        if spec.safe or spec.unsafe:
            raise MoELabError("pass either --demo-sets or both --safe and --unsafe, not a mix")
        return demo_sets(
            split="train", mode=spec.demo_mode, seed=spec.seed, composed_share=spec.composed_share
        )
    if not (spec.safe and spec.unsafe):
        raise MoELabError("pass both --safe FILE and --unsafe FILE (or --demo-sets)")
    safe = load_prompts(spec.safe, column=spec.safe_column, label="safe", limit=spec.limit)
    unsafe = load_prompts(spec.unsafe, column=spec.unsafe_column, label="unsafe", limit=spec.limit)
    if spec.pair_by_row:
        safe, unsafe = pair_by_row(safe, unsafe)
    return safe, unsafe


def cut_long_prompts(spec: AnalyseSpec, items: list[PromptItem]) -> list[PromptItem]:
    """``items`` cut to the context of ``spec.model`` (its tokenizer and config only; no weights loaded)."""
    from transformers import AutoConfig, AutoTokenizer

    source = model_dir(spec.model or ORGANISM)
    context = getattr(AutoConfig.from_pretrained(source), "max_position_embeddings", None)
    if not context:
        return items  # the model states no context: nothing to cut to
    return cut_to_fit(items, AutoTokenizer.from_pretrained(source), int(context), spec.max_new_tokens)


def compose(spec: AnalyseSpec) -> BatchPlan:
    """The spec's batch plan (``max_batches`` keeps the first N batches)."""

    if spec.max_batches is not None and spec.max_batches < 1:
        raise MoELabError(
            f"max_batches must be >= 1 (got {spec.max_batches}); omit it to analyse every batch"
        )
    safe, unsafe = prompt_sets(spec)
    if spec.long_prompts == "cut":  # cut to the model's context here, so the plan holds what is analysed
        safe, unsafe = cut_long_prompts(spec, safe), cut_long_prompts(spec, unsafe)
    plan = compose_batches(
        safe, unsafe, batch_size=spec.batch_size, safe_ratio=spec.safe_ratio, seed=spec.seed
    )
    if spec.max_batches:
        plan = dataclasses.replace(plan, batches=plan.batches[: spec.max_batches])
    return plan


def analysis_run(
    spec: AnalyseSpec, run: str | Path | Run | None = None, runs_root: str | Path | None = None
) -> tuple[Run, BatchPlan | None]:
    """Open the run to resume (its saved plan) or create one for ``spec`` with its plan -> (run, plan | None).

    The plan is composed before the run is created, so a bad prompt file leaves no empty run. A resume
    with another model or other settings is refused before anything is written (``provenance``).
    """

    if run is not None:
        r = run if isinstance(run, Run) else open_run(run, runs_root)
        with r.writing("analysis"):
            spec = check_resume(r, spec)
            plan = None if r.path_for("plan").exists() else compose(spec)
            if r.manifest.get("model") != (model := spec.model or r.manifest.get("model") or ORGANISM):
                r.update(model=model)
            if plan is not None:  # composed here from the spec (a plan saved by the app has no spec source)
                record(r, plan_source=plan_source(spec))
        return r, plan
    plan = compose(spec)
    r = Run.create(
        Path(runs_root or default_runs_root()),
        name=spec.name,
        model=spec.model or ORGANISM,
        config={"batch_size": spec.batch_size, "safe_ratio": spec.safe_ratio, "seed": spec.seed},
        provenance={"plan_source": plan_source(spec)},
    )
    save_plan(
        r.path_for("plan"), plan
    )  # at once: a resume after a kill reads the user's plan, never a default
    return r, plan


def analyse(
    spec: AnalyseSpec,
    run: str | Path | Run | None = None,
    runs_root: str | Path | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    plan: BatchPlan | None = None,
    loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
) -> Run:
    """Run (or resume) the analysis of ``spec``; returns the run holding its risk tables.

    ``loaded``: the (model, tokenizer) of ``spec.model`` when the caller already holds them. A new run
    that fails before its first batch is finished is removed again.
    """

    created = run is None
    if not isinstance(run, Run) or plan is None:
        run, plan = analysis_run(spec, run, runs_root)
    try:
        with run.writing("analysis"), step_outcome(run):
            model, tok = loaded or load_any_model(model_of(run), progress)
            with open_backend(spec.backend, model_dir(model_of(run)), spec.vllm_url) as generator:
                run_analysis(
                    run,
                    model,
                    tok,
                    plan,
                    spec.analysis_config(),
                    progress=progress,
                    should_stop=should_stop,
                    generator=generator,
                )
    except Exception as e:
        if created and not isinstance(e, JobStopped):
            run.discard_if_empty()
        raise
    return run


def finished_with(run: Run, step: str, spec: object) -> bool:
    """Whether ``step`` ("select:<name>", "train:<name>", "evaluation:<name>") finished in ``run`` with the
    settings of ``spec`` (recorded by the step), so a resumed sequence can go past it."""
    info = run.reload().get("steps", {}).get(step) or {}
    return info.get("status") == "done" and info.get("settings") == spec_fingerprint(spec)


# -- atlas -------------------------------------------------------------------------------------
@writes_run("atlas")
def atlas(spec: AtlasSpec, run: Run, progress: Progress | None = None) -> dict[str, object]:
    """Bring the run's expert atlas up to date (``analysis.atlas``): index new batches, merge -> its meta."""
    index = atlas_dir(run) / "index" / "meta.json"
    fresh = index.is_file() and read_json(index).get("shards") == sorted(run.completed_batches())
    meta = read_json(index) if fresh else build_atlas(run, progress)  # fresh: every analysed batch is in
    if spec.writes and not writes_path(run).is_file():
        model, _ = load_any_model(model_of(run), progress)
        batches = sorted(run.completed_batches())[:WRITES_BATCHES]
        table = expert_writes(model, run, batches)
        atomic_write(writes_path(run), lambda p: table.to_parquet(p, index=False))
    return meta


# -- select ------------------------------------------------------------------------------------
@writes_run("select")
def select(spec: SelectSpec, run: Run) -> ExpertMask | dict[int, ExpertMask]:
    """Choose experts from the run's risk table -> the saved ``ExpertMask`` (or per-batch masks)."""

    if not run.path_for("risk_aggregated").exists():
        raise MoELabError(f"run {run.id} has no risk table yet; run `python -m moe_core analyze` first")
    check_free(run.path_for("mask", name=spec.name), f"mask {spec.name!r}", spec.overwrite)
    info = model_info_of(run)
    nl, ne = info.get("num_layers"), info.get("num_experts")
    if nl is None or ne is None:  # a manifest that lost its analysis step: refused, not a TypeError later
        raise RunError(f"run {run.id} does not record its model's shape; resume its analysis to record it")
    cfg = spec.selection_config(len(info.get("moe_layers") or range(nl or 0)) * (ne or 0))
    baseline = run.path_for("mask", name=f"{spec.name}_random")
    if spec.random_baseline:
        check_free(baseline, f"random baseline {baseline.stem!r}", spec.overwrite)
    if spec.per_batch:
        if spec.score in SCORES:
            raise MoELabError(
                f"--score {spec.score} is a score over the whole run: select it without --per-batch"
            )
        edits = json_object(spec.batch_toggles) or {}
        masks = {
            b: apply_toggles(m, edits.get(str(b), []))
            for b, m in select_per_batch(read_parquet(run.path_for("risk_per_batch")), cfg, nl, ne).items()
        }
        save_batch_masks(run.path_for("mask", name=spec.name), masks)
        run.set_step(f"select:{spec.name}", "done", settings=spec_fingerprint(spec))
        return masks
    aggregated = read_parquet(run.path_for("risk_aggregated"))
    if spec.score in SCORES:
        aggregated = with_score(aggregated, score_table(run, spec.score))
    mask = apply_toggles(select_experts(aggregated, cfg, nl, ne), parse_toggles(spec.toggles))
    if mask.count() == 0:
        raise MaskError(
            "every selected expert was toggled off by hand: toggle one back on or change the rule"
        )
    files = {run.path_for("mask", name=spec.name): mask}
    if spec.random_baseline:
        rnd = random_like(mask, spec.seed, exclude=mask)
        rnd.meta["baseline_for"] = spec.name
        files[baseline] = rnd
    commit_files(  # the mask and its random baseline are one set: a kill leaves both old or both new
        {
            path: (lambda tmp, m=m: tmp.write_text(json.dumps(m.to_json_dict(), indent=2) + "\n"))
            for path, m in files.items()
        }
    )
    run.set_step(f"select:{spec.name}", "done", settings=spec_fingerprint(spec))
    return mask


ABLATION_BATCHES = 4  # SFT batches the ablation score switches each expert off on (one forward each)


def score_path(run: Run, score: str) -> Path:
    return run.path_for("risk_aggregated").parent / f"score_{score}.parquet"


def score_table(run: Run, score: str, progress: Progress | None = None) -> pd.DataFrame:
    """A selector score of every expert (``analysis.scores``), computed once and kept in the run's risk/
    folder (call it from a step that holds the writer lease: ``select``)."""
    path = score_path(run, score)
    if path.is_file():
        return read_parquet(path)
    if score in FROM_ROUTING:
        table = gate_diff_table(run)
    else:
        model, tok = load_any_model(model_of(run), progress)
        use_chat_template_kwargs(tok, chat_template_kwargs_of(run))
        inputs = _sft_model_inputs(run, tok)
        if score == "grad_attr":
            table = gradient_attribution(model, inputs, progress)
        elif score == "grad_contrast":
            retain = _sft_model_inputs(run, tok, retain_examples(model, tok))
            table = gradient_contrast(model, inputs, retain, progress)
        else:
            table = ablation_effect(model, inputs[:ABLATION_BATCHES], progress)
    write_parquet(path, table)
    return table


def _sft_model_inputs(
    run: Run, tok: PreTrainedTokenizerBase, retain: list[tuple[str, str]] | None = None
) -> list[dict[str, torch.Tensor]]:
    """The refusal SFT batches of the run as model inputs, one analysis batch each (what training sees);
    with ``retain`` (prompt, answer) pairs: as many retain examples per batch instead, drawn as training
    draws them (``add_retain_examples``)."""
    batches = create_batch_structured_dataset(load_batch_data_list(run), seed=0)
    if retain is not None:
        batches = [
            [ex for ex in b if ex["label"] == "retain"] for b in add_retain_examples(batches, retain, 1.0)
        ]
    dataset = create_batch_aware_dataset(batches, tok, max_length=MAX_LENGTH)
    collate = BatchCollator(pad_token_id=tok.pad_token_id)
    return [
        collate([dataset[i] for i in idx]) for idx in AnalysisBatchSampler(dataset, shuffle_batches=False)
    ]


# -- train -------------------------------------------------------------------------------------
@writes_run("train")
def train(spec: TrainSpec, run: Run, progress: Progress | None = None) -> TrainingResult:
    """Train what ``spec`` names on the run's analysis batches into train/<name>/ (``moe_core.train.step``).

    Checked before the model loads; built in a stage folder with checkpoints and committed whole, so a
    failure never touches a previous training of that name; a killed attempt resumes when run again.
    """

    return run_train(spec, run, progress)


# -- evaluate ----------------------------------------------------------------------------------
def eval_entries(spec: EvaluateSpec, run: Run) -> list[EvalEntry]:
    """Base model, every finished training of the run, and the base model steered by ``steer_mask``."""

    base_dir = model_dir(model_of(run, spec.model))
    entries = [EvalEntry("base", base_dir)]
    entries += [
        EvalEntry(name, info["merged"]) for name, info in run.trainings().items() if info.get("merged")
    ]
    if spec.steer_mask:
        mask = ExpertMask.load(run.path_for("mask", name=spec.steer_mask))
        check_mask_fits(
            run, mask, spec.steer_mask, what="steer mask"
        )  # fail before the evaluation, not after it
        entries.append(EvalEntry(f"steer-off-{spec.steer_mask}", base_dir, steer_deactivate=mask))
    return entries


@writes_run("evaluate")
def evaluate(spec: EvaluateSpec, run: Run, progress: Progress | None = None) -> pd.DataFrame:
    """Evaluate base vs trained (vs steered) models; saves responses and summary into the run -> table."""

    check_evaluation_free(
        run, spec.name, spec.overwrite
    )  # name, overwrite and steer mask: before the evaluation runs
    entries = eval_entries(spec, run)
    sets = default_eval_sets(
        split="heldout", limit=spec.eval_limit, templates_per_goal=spec.templates_per_goal or None
    )
    r = (
        analysis_config_of(run) or AnalysisConfig()
    )  # prompts rendered as the run's analysis and training rendered them
    responses, summary = compare_models(
        entries,
        sets,
        judge=spec.judge,
        max_new_tokens=spec.max_new_tokens,
        progress=progress,
        backend=spec.backend,
        vllm_url=spec.vllm_url,
        system_prompt=r.system_prompt,
        chat_template_kwargs=r.chat_template_kwargs,
    )
    save_evaluation(run, responses, summary, name=spec.name)
    run.set_step(
        f"evaluation:{spec.name}", "done", models=[e.name for e in entries], settings=spec_fingerprint(spec)
    )
    if spec.shift:  # inside this step's lease: the sub-runs under eval/ are written by this writer only
        routing_shifts(run, [n for n, info in run.trainings().items() if info.get("merged")], progress)
    return comparison_table(summary)


def routing_shifts(run: Run, names: list[str], progress: Progress | None = None) -> dict[str, pd.DataFrame]:
    """Re-run the analysis on each named training: how each expert's risk difference moved (saved as
    eval/shift_<name>.parquet). Holds the run's writer lease (re-entrant inside ``evaluate``)."""
    out = {}
    with run.writing("routing-shift"), step_outcome(run):
        for name in names:
            model, tok = load_model(run.trainings()[name]["merged"])
            out[name] = routing_shift(run, model, tok, name=name, progress=progress)
    return out


# -- the batch plan (the Data page) -------------------------------------------------------------
def draft_plan_path(run: Run) -> Path:
    """The Data page's working plan: page state in the run's draft area, never read by a step."""
    return run.path / "plan.draft.json"


def _undo_path(run: Run) -> Path:
    return run.path / "plan.draft.prev.json"


def store_draft_plan(run: Run, plan: BatchPlan) -> None:
    """Write the edited draft, keeping the previous one for one undo. No writer lease: a draft is not a
    result (no step reads it), so a running job never blocks an edit."""
    draft = draft_plan_path(run)
    if draft.is_file():
        atomic_write_bytes(_undo_path(run), draft.read_bytes())
    save_plan(draft, plan)


def undo_draft_plan(run: Run) -> bool:
    """Put the previous draft back; False when there is nothing to undo."""
    undo = _undo_path(run)
    if not undo.is_file():
        return False
    atomic_write_bytes(draft_plan_path(run), undo.read_bytes())
    undo.unlink()
    return True


def can_undo_draft_plan(run: Run) -> bool:
    return _undo_path(run).is_file()


MAX_SOURCE_ITEMS = 200_000  # prompts kept per side in a run's draft sources (a bound on what a page stores)


def draft_sources_path(run: Run) -> Path:
    """The prompt sets the Data page composed from (uploads included): page state in the draft area."""
    return run.path / "sources.draft.json"


def store_draft_sources(run: Run, safe: list[PromptItem], unsafe: list[PromptItem], described: str) -> None:
    """Keep the prompt sets a plan is composed from in the run, so a reload or another machine shows them
    again (an upload lives only in the browser). No writer lease, like the draft plan."""
    if max(len(safe), len(unsafe)) > MAX_SOURCE_ITEMS:
        raise MoELabError(f"at most {MAX_SOURCE_ITEMS:,} prompts per side are kept with a run")
    atomic_write_json(
        draft_sources_path(run),
        {
            "described": described,
            "safe": [it.to_dict() for it in safe],
            "unsafe": [it.to_dict() for it in unsafe],
        },
    )


def compose_draft(
    run: Run,
    safe: list[PromptItem],
    unsafe: list[PromptItem],
    described: str,
    batch_size: int,
    safe_ratio: float,
    seed: int,
    shuffle: bool = True,
    progress: Progress | None = None,
) -> BatchPlan:
    """The Data page's "Compose batches" (``compose_batches``' settings), kept as the run's draft with the
    prompt sets they come from, in stages a progress bar follows (a 20 MB file makes thousands of batches:
    the page shows where it is instead of hanging)."""
    tell = progress or (lambda *a, **k: None)
    tell(0, 3, f"composing batches from {len(safe) + len(unsafe):,} prompts")
    plan = compose_batches(
        safe, unsafe, batch_size=batch_size, safe_ratio=safe_ratio, seed=seed, shuffle=shuffle
    )
    plan.meta["composed_from"] = described
    tell(1, 3, f"keeping the {len(safe) + len(unsafe):,} prompts with the run")
    store_draft_sources(run, safe, unsafe, described)
    tell(2, 3, f"saving {len(plan):,} batches")
    store_draft_plan(run, plan)
    tell(3, 3, f"composed {len(plan):,} batches")
    return plan


def draft_sources(run: Run) -> tuple[list[PromptItem], list[PromptItem], str] | None:
    """(safe, unsafe, description) the run's batches were composed from, or None."""
    path = draft_sources_path(run)
    if not path.is_file():
        return None
    d = read_json(path)
    return (
        [PromptItem.from_dict(x) for x in d["safe"]],
        [PromptItem.from_dict(x) for x in d["unsafe"]],
        d["described"],
    )


@writes_run("plan")
def commit_plan(plan: BatchPlan, run: Run) -> list[Issue]:
    """Save ``plan`` as the run's plan.json (the one the analysis reads); returns the plan's warnings.

    Refused once the run has analysed batches of another plan: their routing would no longer match."""
    analysed = run.completed_batches()
    saved = run.path_for("plan")
    if analysed and (not saved.is_file() or load_plan(saved).to_json_dict() != plan.to_json_dict()):
        raise BatchPlanError(
            f"this run already has {len(analysed)} analysed batches of another plan; create a new run "
            "to analyse this plan"
        )
    found = check(plan)
    save_plan(saved, plan)
    return found
