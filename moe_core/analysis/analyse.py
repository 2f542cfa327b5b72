"""The analysis job: BatchPlan -> per-batch generation + routing -> judged outputs -> risk tables.

Each analysis batch is run through the model as ONE padded batch (the same composition the
training step will see), its routing captured, its answers judged, and its risk table computed
from that batch alone. Every batch writes routing, risk and (last) outputs into the run
directory atomically, so a killed job resumes at the first unfinished batch and loses nothing.

    run = Run.create(default_runs_root(), name="demo", config={...})
    result = run_analysis(run, model, tokenizer, plan, AnalysisConfig(scope="generated"))

``process_mixed_batches`` keeps the reference implementation's in-memory API (a list of batch
dicts with safe_routings/unsafe_routings) for users porting notebooks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from moe_core.analysis.batch_files import intact_batches
from moe_core.analysis.risk import aggregate_batch_risk_diffs, risk_table
from moe_core.batching.batches import compose_batches
from moe_core.batching.plan import Batch, BatchPlan, load_plan, save_plan
from moe_core.errors import MoELabError
from moe_core.judge.judges import DEFAULT_JUDGE, make_judge
from moe_core.judge.verdicts import RefusalJudge
from moe_core.model.adapter import MoEAdapter
from moe_core.model.backends import route_generated
from moe_core.model.generation import MAX_NEW_TOKENS, fit_context, generation_ticks, use_chat_template_kwargs
from moe_core.model.routing import (
    SPAN_GENERATED,
    SPAN_PROMPT,
    SPAN_RESPONSE,
    RoutedSample,
    load_batch_routing,
    route_batch,
    save_batch_routing,
)
from moe_core.store.events import JobStopped
from moe_core.store.files import read_json, read_parquet, write_json, write_parquet
from moe_core.store.provenance import (
    PLAN_FIELDS,
    ProvenanceError,
    _new_run_hint,
    check_model,
    check_plan,
    differences,
    plan_source,
    record,
    recorded,
)
from moe_core.store.run import Run
from moe_core.types import Progress, PromptItem

log = logging.getLogger(__name__)

Scope = Literal["prompt", "generated", "response"]
SCOPE_SPAN = {"prompt": SPAN_PROMPT, "generated": SPAN_GENERATED, "response": SPAN_RESPONSE}


class AnalysisError(MoELabError, ValueError):
    """The analysis cannot run as configured; the message says what to change."""


@dataclass
class AnalysisConfig:
    """How the model is run on each analysis batch."""

    scope: Scope = "generated"  # which tokens count: prompt, generated answer, or teacher-forced response
    max_new_tokens: int = MAX_NEW_TOKENS  # answer length (the judge needs an answer in every scope)
    quality_filter: bool = False  # RASA filter: keep a pair only if safe was refused and unsafe complied
    judge: str = DEFAULT_JUDGE  # refusal judge spec for moe_core.judge.judges.make_judge
    system_prompt: str | None = None  # optional system turn before every prompt
    # chat template options for every rendering of the run (analysis, SFT, evaluation), e.g. {"enable_thinking": False}
    chat_template_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.chat_template_kwargs is not None and not (
            isinstance(self.chat_template_kwargs, dict)
            and all(isinstance(k, str) for k in self.chat_template_kwargs)
        ):
            raise AnalysisError(
                'chat_template_kwargs must be a JSON object of options, e.g. {"enable_thinking": false}'
            )
        self.chat_template_kwargs = self.chat_template_kwargs or None  # {} and None mean the same: no options
        if self.scope not in SCOPE_SPAN:
            raise AnalysisError(f"scope must be one of {sorted(SCOPE_SPAN)}, not {self.scope!r}")
        if self.max_new_tokens < 0:
            raise AnalysisError("max_new_tokens must be >= 0")
        if self.scope == "generated" and self.max_new_tokens == 0:
            raise AnalysisError("scope 'generated' needs max_new_tokens > 0")


@dataclass
class AnalysisResult:
    per_batch: pd.DataFrame  # one risk row per (batch, layer, expert)
    aggregated: pd.DataFrame  # one row per (layer, expert) across batches
    dropped: dict[str, int] = field(default_factory=dict)  # quality-filter counts


# -- one batch ----------------------------------------------------------------------------------
def _responses_for(batch: Batch, scope: Scope) -> list[str] | None:
    if scope != "response":
        return None
    missing = [it.id for it in batch.items if not it.target]
    if missing:
        raise AnalysisError(
            f"scope 'response' teacher-forces each item's target response, but batch {batch.batch_idx} has "
            f"{len(missing)} item(s) without one (e.g. {missing[0]}); load a target column or use scope "
            "'generated'"
        )
    return [it.target or "" for it in batch.items]


def quality_filter(items: Sequence[PromptItem], refused: Sequence[bool]) -> list[bool]:
    """RASA filter: which items to keep.

    A pair (shared pair_id) is kept only when its safe item was refused and its unsafe item
    complied. Without pairs, unsafe items are kept when they complied and safe items always.
    """
    keep = [True] * len(items)
    by_pair: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if it.pair_id:
            by_pair.setdefault(it.pair_id, []).append(i)
        elif it.label == "unsafe":
            keep[i] = not refused[i]
    for idx in by_pair.values():
        ok = all(refused[i] if items[i].label == "safe" else not refused[i] for i in idx)
        for i in idx:
            keep[i] = ok
    return keep


def analyse_batch(
    model: Any,
    tokenizer: Any,
    batch: Batch,
    config: AnalysisConfig,
    judge: RefusalJudge,
    adapter: MoEAdapter,
    generator: Any = None,
) -> tuple[list[RoutedSample], dict[str, Any], pd.DataFrame]:
    """Run one analysis batch: routing, answers, verdicts, filter, risk table.

    ``generator`` (``backends.open_backend``): another engine (vLLM) writes the answers (``backends.route_generated``).
    """
    items = batch.items
    messages = [it.messages(config.system_prompt) for it in items]
    if generator is not None and config.scope != "response" and config.max_new_tokens > 0:
        samples, source = route_generated(
            model, tokenizer, messages, config.max_new_tokens, generator, adapter
        )
    else:
        samples = route_batch(
            model,
            tokenizer,
            messages,
            scope=config.scope,
            max_new_tokens=config.max_new_tokens,
            responses=_responses_for(batch, config.scope),
            adapter=adapter,
        )
        source = (
            "hf-teacher-forced" if config.scope == "response" or not config.max_new_tokens else "hf-generate"
        )
    texts = [s.generation.text for s in samples]
    verdicts = judge.judge([it.text for it in items], texts)
    refused = [v.refusal for v in verdicts]
    keep = quality_filter(items, refused) if config.quality_filter else [True] * len(items)

    span = SCOPE_SPAN[config.scope]
    ids = {
        lab: [s.routing.select(span)[0] for s, it, k in zip(samples, items, keep) if k and it.label == lab]
        for lab in ("safe", "unsafe")
    }
    table = batch_risk_table(
        batch.batch_idx, ids["safe"], ids["unsafe"], adapter.num_experts, adapter.moe_layers, adapter.top_k
    )
    outputs = {
        "batch_idx": batch.batch_idx,
        "scope": config.scope,
        "generation": {"backend": getattr(generator, "name", "hf"), "routing_source": source},
        "samples": [
            {
                "in_batch_idx": i,
                "id": it.id,
                "label": it.label,
                "prompt": it.text,
                "goal": it.goal,
                "pair_id": it.pair_id,
                "source": it.source,
                "category": it.category,
                "target": it.target,
                "messages": it.messages(config.system_prompt),
                "generated_text": s.generation.text,
                "refusal": v.refusal,
                "judge_reason": v.reason,
                "kept": kp,
                "n_prompt_tokens": len(s.generation.prompt_ids),
                "n_generated_tokens": len(s.generation.new_ids),
                "n_scope_tokens": int(s.routing.select(span)[0].shape[1]),
            }
            for i, (it, s, v, kp) in enumerate(zip(items, samples, verdicts, keep))
        ],
    }
    return samples, outputs, table


def batch_risk_table(
    batch_idx: int,
    safe: list[np.ndarray],
    unsafe: list[np.ndarray],
    num_experts: int,
    moe_layers: Sequence[int],
    top_k: int,
) -> pd.DataFrame:
    """A batch's risk table from the routed expert ids ([moe layers, tokens, k] each) of its kept safe and
    unsafe samples; the analysis and the doctor's recompute share it, so both give the same values."""

    def cat(arrs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrs, axis=1) if arrs else np.zeros((len(moe_layers), 0, top_k), dtype=np.int16)

    return risk_table(batch_idx, cat(safe), cat(unsafe), num_experts, layers=moe_layers)


# -- the job ------------------------------------------------------------------------------------
def _checked_plan(run: Run, plan: BatchPlan | None, config: AnalysisConfig) -> BatchPlan:
    """The plan to analyse (saved in the run on first use); another plan or other settings are refused first."""
    previous = analysis_config_of(run)
    if previous and asdict(previous) != asdict(config) and run.completed_batches():
        raise AnalysisError(
            f"run {run.id} was analysed with {asdict(previous)}; resuming with {asdict(config)} would mix results. "
            "Start a new run or resume with the same settings."
        )
    plan_path = run.path_for("plan")
    if plan is None:
        if not plan_path.exists():
            raise AnalysisError(f"run {run.id} has no batch plan; compose batches first")
        return load_plan(plan_path)
    if not plan_path.exists():
        save_plan(plan_path, plan)
    elif load_plan(plan_path).to_json_dict() != plan.to_json_dict():
        raise AnalysisError(
            f"run {run.id} already holds a different batch plan; start a new run to analyse this one"
        )
    return plan


def run_analysis(
    run: Run,
    model: Any,
    tokenizer: Any,
    plan: BatchPlan | None = None,
    config: AnalysisConfig | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    generator: Any = None,
) -> AnalysisResult:
    """Analyse every batch of ``plan`` into ``run``; batches already finished there are skipped.

    ``generator``: answers from another engine (vLLM; see ``analyse_batch``); each batch's outputs
    and routing file record which backend and routing source produced it.

    ``plan`` defaults to the plan saved in the run (resume). The run's config records the
    analysis config; resuming with a different one is refused rather than mixing results.
    """

    config = config or AnalysisConfig()
    fingerprints = check_model(run, model, tokenizer)  # another model or tokenizer: refused before any write
    use_chat_template_kwargs(tokenizer, config.chat_template_kwargs)
    plan = _checked_plan(run, plan, config)
    fingerprints["plan_fingerprint"] = check_plan(run, plan)
    adapter = MoEAdapter.for_model(model)
    judge = make_judge(config.judge)
    # every prompt of the plan fits the model's context: refused here, before a model call or a record
    fit_context(
        model, tokenizer, [it.messages(config.system_prompt) for it in plan.items()], config.max_new_tokens
    )
    record(
        run,
        replace=not run.completed_batches(),
        analysis=asdict(config),
        model_info=adapter.describe(),
        **fingerprints,
    )
    run.set_step(
        "analysis",
        "running",
        config=asdict(config),
        model_info=adapter.describe(),
        batches=len(plan.batches),
        backend=getattr(generator, "name", "hf"),
    )

    done = intact_batches(run)  # a damaged batch (truncated file, deleted risk table) is analysed again
    total = len(plan.batches)
    if progress:
        progress(len(done), total, f"{len(done)} of {total} batches already done" if done else "starting")
    for batch in plan.batches:
        if batch.batch_idx in done:
            continue
        if should_stop and should_stop():
            run.set_step("analysis", "stopped", done=len(done), total=total)
            raise JobStopped(f"stopped after {len(done)} of {total} batches; resume to continue")
        with generation_ticks(_batch_ticks(progress, len(done), total, batch)):  # progress inside a batch
            samples, outputs, table = analyse_batch(
                model, tokenizer, batch, config, judge, adapter, generator
            )
        # Order matters for resume: outputs (the completion marker) is written last.
        b = batch.batch_idx
        meta = {
            "batch_idx": b,
            "num_experts": adapter.num_experts,
            "top_k": adapter.top_k,
            **outputs["generation"],
        }
        weights = all(
            s.routing.weights is not None for s in samples
        )  # vLLM's routed experts carry no weights
        save_batch_routing(
            run.path_for("routing", batch_idx=b), samples, adapter.moe_layers, meta=meta, keep_weights=weights
        )
        write_parquet(run.path_for("risk", batch_idx=b), table)
        write_json(run.path_for("outputs", batch_idx=b), outputs)
        done.add(batch.batch_idx)
        if progress:
            n_kept = sum(s["kept"] for s in outputs["samples"])
            progress(
                len(done), total, f"batch {batch.batch_idx}: {n_kept}/{len(outputs['samples'])} samples kept"
            )
    result = finalize_analysis(run)
    run.set_step("analysis", "done", batches=total, dropped=result.dropped)
    return result


def _batch_ticks(
    progress: Progress | None, done: int, total: int, batch: Batch
) -> Callable[[int, int], None]:
    """A generation tick that says how far the current batch is (at most once a second)."""
    last = [0.0]

    def tick(new: int, most: int) -> None:
        now = time.monotonic()
        if progress is not None and (now - last[0] >= 1.0 or new == 1):
            last[0] = now
            progress(done, total, f"batch {batch.batch_idx}: {new}/{most} new tokens ({batch.size} prompts)")

    return tick


def finalize_analysis(run: Run) -> AnalysisResult:
    """Concatenate per-batch risk tables and aggregate them (cheap; safe to re-run)."""
    idx = sorted(run.completed_batches())
    if not idx:
        raise AnalysisError(f"run {run.id} has no finished analysis batch")
    tables = [read_parquet(run.path_for("risk", batch_idx=i)) for i in idx]
    per_batch = pd.concat(tables, ignore_index=True)
    aggregated = aggregate_batch_risk_diffs(tables)
    write_parquet(run.path_for("risk_per_batch"), per_batch)
    write_parquet(run.path_for("risk_aggregated"), aggregated)
    dropped = {"safe": 0, "unsafe": 0}
    for i in idx:
        for s in read_json(run.path_for("outputs", batch_idx=i))["samples"]:
            if not s["kept"]:
                dropped[s["label"]] += 1
    return AnalysisResult(per_batch, aggregated, dropped)


def analysis_config_of(run: Run) -> AnalysisConfig | None:
    """The analysis settings a run was (or is being) analysed with, if any."""
    cfg = (run.step("analysis") or {}).get("config") or (run.manifest.get("provenance") or {}).get("analysis")
    return AnalysisConfig(**cfg) if cfg else None


def chat_template_kwargs_of(run: Run) -> dict[str, Any] | None:
    """The chat template options the run was analysed with: training and evaluation render prompts the same way."""
    cfg = analysis_config_of(run)
    return cfg.chat_template_kwargs if cfg else None


def load_batch_data_list(run: Run, with_routing: bool = False) -> dict[str, Any]:
    """The run's analysis in the reference's ``sft_data`` dict layout (``{"batch_data_list": [...]}``).

    Each batch dict has batch_idx, batch_outputs (per-sample dicts: prompt, messages, label,
    generated_text, refusal, kept, batch_idx, in_batch_idx, target), safe_indices,
    unsafe_indices; with ``with_routing`` also safe_routings/unsafe_routings as top-k id arrays
    [moe_layers, tokens, k] of the analysed scope. Filtered-out samples are not included.
    """
    out = []
    cfg = analysis_config_of(run)
    scope = cfg.scope if cfg else "generated"
    for i in sorted(run.completed_batches()):
        o = read_json(run.path_for("outputs", batch_idx=i))
        kept = [s for s in o["samples"] if s["kept"]]
        outputs = [{**s, "batch_idx": i, "in_batch_idx": j} for j, s in enumerate(kept)]
        bd: dict[str, Any] = {
            "batch_idx": i,
            "batch_outputs": outputs,
            "safe_indices": [j for j, s in enumerate(outputs) if s["label"] == "safe"],
            "unsafe_indices": [j for j, s in enumerate(outputs) if s["label"] == "unsafe"],
        }
        if with_routing:
            routings = load_batch_routing(run.path_for("routing", batch_idx=i))
            by_pos = {s["in_batch_idx"]: routings[s["in_batch_idx"]] for s in kept}
            span = SCOPE_SPAN[scope]
            bd["safe_routings"] = [
                by_pos[s["in_batch_idx"]].select(span)[0] for s in kept if s["label"] == "safe"
            ]
            bd["unsafe_routings"] = [
                by_pos[s["in_batch_idx"]].select(span)[0] for s in kept if s["label"] == "unsafe"
            ]
        out.append(bd)
    return {"batch_data_list": out, "run_id": run.id}


def process_mixed_batches(
    model: Any,
    tokenizer: Any,
    safe_prompts: Sequence[str | PromptItem],
    unsafe_prompts: Sequence[str | PromptItem],
    batch_size: int = 16,
    safe_ratio: float = 0.5,
    scope: Scope = "generated",
    max_new_tokens: int = MAX_NEW_TOKENS,
    judge: str = DEFAULT_JUDGE,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Reference-compatible in-memory analysis: batches in input order, no run directory.

    Returns one dict per batch with batch_idx, batch_outputs, safe_indices, unsafe_indices,
    safe_routings and unsafe_routings (top-k id arrays [moe_layers, tokens, k] of ``scope``),
    plus num_experts and layers so ``calculate_risk_diff_per_batch`` can read them directly.
    """

    def as_items(prompts: Sequence[str | PromptItem], label: str) -> list[PromptItem]:
        return [
            p if isinstance(p, PromptItem) else PromptItem(id=f"{label}-{i}", text=str(p), label=label)
            for i, p in enumerate(prompts)
        ]  # type: ignore[arg-type]

    plan = compose_batches(
        as_items(safe_prompts, "safe"),
        as_items(unsafe_prompts, "unsafe"),
        batch_size=batch_size,
        safe_ratio=safe_ratio,
        shuffle=False,
    )
    config = AnalysisConfig(scope=scope, max_new_tokens=max_new_tokens, judge=judge)
    adapter = MoEAdapter.for_model(model)
    jd = make_judge(judge)
    span = SCOPE_SPAN[scope]
    out = []
    for n, batch in enumerate(plan.batches):
        samples, outputs, _ = analyse_batch(model, tokenizer, batch, config, jd, adapter)
        rows = [
            {**s, "batch_idx": batch.batch_idx, "routing": r.routing}
            for s, r in zip(outputs["samples"], samples)
        ]
        safe_idx = [i for i, s in enumerate(rows) if s["label"] == "safe"]
        unsafe_idx = [i for i, s in enumerate(rows) if s["label"] == "unsafe"]
        out.append(
            {
                "batch_idx": batch.batch_idx,
                "batch_outputs": rows,
                "safe_indices": safe_idx,
                "unsafe_indices": unsafe_idx,
                "safe_routings": [samples[i].routing.select(span)[0] for i in safe_idx],
                "unsafe_routings": [samples[i].routing.select(span)[0] for i in unsafe_idx],
                "num_experts": adapter.num_experts,
                "layers": adapter.moe_layers,
            }
        )
        if progress:
            progress(n + 1, len(plan.batches), f"batch {batch.batch_idx}")
    return out


def check_resume(run: Any, spec: Any) -> Any:
    """Refuse a resume of ``run`` with another model or settings; returns the spec to resume with.

    Writes nothing. When the plan was never saved (killed before it), the recorded plan source is
    used, so the resume analyses the user's own prompt files, not the demo set.
    """
    import dataclasses

    prov = recorded(run)
    started = bool(run.completed_batches()) or bool(prov.get("model_fingerprint"))
    current = run.manifest.get("model")
    if spec.model and current and spec.model != current and started:
        raise ProvenanceError(
            f"run {run.id} was analysed with model {current!r}, not {spec.model!r}: resuming "
            f"would mix two models' routing; {_new_run_hint(run)}"
        )
    previous = analysis_config_of(run)
    if previous is not None and run.completed_batches():
        diff = differences(asdict(previous), asdict(spec.analysis_config()))
        if diff:
            raise ProvenanceError(
                f"run {run.id} was analysed with other settings ({'; '.join(diff)}); resuming "
                f"would mix results; {_new_run_hint(run)}"
            )
    source = prov.get("plan_source")
    if not source:
        return spec
    defaults = {f.name: f.default for f in dataclasses.fields(spec)}
    given = {k: v for k, v in plan_source(spec).items() if v != defaults.get(k)}  # what the user typed
    diff = differences({k: source.get(k) for k in given}, given)
    if diff:
        raise ProvenanceError(
            f"run {run.id} was started from other prompts or batch settings "
            f"({'; '.join(diff)}); {_new_run_hint(run)}"
        )
    if not run.path_for("plan").exists():  # killed before the plan was saved: recompose the user's own
        spec = dataclasses.replace(spec, **{k: v for k, v in source.items() if k in PLAN_FIELDS})
    return spec
