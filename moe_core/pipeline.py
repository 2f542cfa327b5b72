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
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

from moe_core.analysis.analyse import (
    AnalysisConfig,
    analysis_config_of,
    check_resume,
    run_analysis,
)
from moe_core.analysis.masks import ExpertMask, check_mask_fits, save_batch_masks
from moe_core.analysis.selection import (
    METHODS,
    SelectionConfig,
    select_experts,
    select_per_batch,
)
from moe_core.batching.batches import compose_batches
from moe_core.batching.demo_prompts import demo_sets
from moe_core.batching.plan import save_plan
from moe_core.batching.prompts import load_prompts, pair_by_row
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
from moe_core.eval.study_summary import STUDY_NAME
from moe_core.model.adapter import load_model
from moe_core.model.backends import Backend, open_backend
from moe_core.model.loading import ORGANISM, load_any_model, model_dir, model_of
from moe_core.store.checks import (
    AT_LEAST_1,
    JSON_OBJECT,
    NON_NEGATIVE,
    POSITIVE,
    SHARE,
    check_free,
    check_names,
    check_range,
    json_object,
)
from moe_core.store.events import JobStopped
from moe_core.store.files import RunError, read_parquet
from moe_core.store.lease import step_outcome, writes_run
from moe_core.store.manifest import default_runs_root
from moe_core.store.provenance import model_info_of, plan_source, record
from moe_core.store.run import Run
from moe_core.train.step import run_train
from moe_core.types import Progress, ShouldStop

log = logging.getLogger(__name__)


Scope = Literal["prompt", "generated", "response"]
Method = Literal["top_n", "threshold", "per_layer", "top_p", "random"]
MaskMode = Literal["union", "per_batch"]
Baseline = Literal["experts", "full", "random_experts"]
Consistency = Literal["none", "forward", "reverse", "symmetric", "js"]
assert set(Method.__args__) == set(METHODS), "selection methods and the spec's choices drifted apart"


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A spec field: its default and its CLI help in one place (``aliases`` adds old flag names)."""
    return field(default=default, metadata={"help": help, **extra})


def same_as(cls: type, name: str, **override: Any) -> Any:
    """Reuse another dataclass's field default (and help): a default is defined only once."""
    f = cls.__dataclass_fields__[name]
    meta = {**f.metadata, **override}
    return field(default=getattr(cls, name, f.default), metadata=meta)


def _only_with_vllm(spec: Any) -> tuple[Callable[[Any], bool], str]:
    """The rule of ``--vllm-url``: it names a vLLM server, so it goes with ``--backend vllm`` only."""
    return (lambda v: spec.backend == "vllm", "given only with --backend vllm")


# -- specs -------------------------------------------------------------------------------------
@dataclass
class AnalyseSpec:
    """Prompts -> mixed batches -> routing -> per-batch risk differences."""

    # prompts and batches
    safe: Optional[str] = opt(
        None, "safe prompt file (CSV, TSV, JSON, JSONL, Parquet, .txt one per line) or HF dataset name"
    )
    unsafe: Optional[str] = opt(None, "unsafe prompt file or HF dataset name")
    safe_column: Optional[str] = opt(None, "column holding the safe prompts (auto-detected if omitted)")
    unsafe_column: Optional[str] = opt(None, "column holding the unsafe prompts (auto-detected if omitted)")
    pair_by_row: bool = opt(False, "pair safe row i with unsafe row i")
    demo_sets: bool = opt(False, "use the built-in demo prompt sets (the default when no files are given)")
    demo_mode: Literal["paired", "unpaired"] = opt(
        "paired", "demo sets: plain vs jailbroken goals (paired) or benign vs harmful"
    )
    limit: Optional[int] = opt(None, "read at most this many prompts per file")
    batch_size: int = opt(16, "prompts per analysis (= training) batch")
    safe_ratio: float = opt(0.5, "share of safe prompts in each batch (safe first, then unsafe)")
    seed: int = opt(0, "seed for batch composition")
    max_batches: Optional[int] = opt(None, "analyse only the first N batches")
    # analysis
    model: Optional[str] = opt(
        None, "'organism' (default for a new run), a local model directory, or a HF id"
    )
    scope: Scope = same_as(
        AnalysisConfig,
        "scope",
        help="tokens whose routing counts: prompt, generated answer, teacher-forced response",
    )
    max_new_tokens: int = same_as(AnalysisConfig, "max_new_tokens", help="answer length per prompt")
    quality_filter: bool = same_as(
        AnalysisConfig, "quality_filter", help="keep a pair only if safe was refused and unsafe complied"
    )
    judge: str = same_as(
        AnalysisConfig, "judge", help="refusal judge: keyword | http:<url>?model=<model> | hf:<dir>"
    )
    chat_template_kwargs: Optional[str] = opt(
        None,
        "chat template options as JSON, e.g. '{\"enable_thinking\": false}' "
        '(Qwen3) or \'{"reasoning_effort": "low"}\' (gpt-oss); kept for training and evaluation',
    )
    system_prompt: Optional[str] = same_as(
        AnalysisConfig,
        "system_prompt",
        help="a system turn before every prompt; kept for training and evaluation",
    )
    backend: Backend = opt(
        "hf", "generation: hf (model.generate here) or vllm (a `vllm serve` process; `make vllm`)"
    )
    vllm_url: Optional[str] = opt(
        None, "with --backend vllm: use the server at this URL (.../v1) instead of starting one"
    )
    name: Optional[str] = opt(None, "run name")
    top: int = opt(10, "how many top experts to print")

    def __post_init__(self) -> None:
        check_range(
            self,
            limit=AT_LEAST_1,
            batch_size=(lambda v: v >= 2, "a whole number >= 2 (safe and unsafe rows)"),
            safe_ratio=(lambda v: 0 < v < 1, "a share strictly between 0 and 1"),
            max_batches=(lambda v: v >= 1, ">= 1 (omit it to analyse every batch)"),
            max_new_tokens=AT_LEAST_1,
            top=NON_NEGATIVE,
            vllm_url=_only_with_vllm(self),
            chat_template_kwargs=JSON_OBJECT,
        )

    def analysis_config(self) -> AnalysisConfig:
        return AnalysisConfig(
            scope=self.scope,
            max_new_tokens=self.max_new_tokens,
            quality_filter=self.quality_filter,
            judge=self.judge,
            system_prompt=self.system_prompt or None,
            chat_template_kwargs=json_object(self.chat_template_kwargs),
        )


@dataclass
class SelectSpec:
    """Risk table -> expert mask."""

    method: Method = same_as(SelectionConfig, "method", help="selection rule")
    n: int = same_as(SelectionConfig, "n", help="top_n / random: number of experts")
    budget: Optional[float] = opt(
        None, "top_n / random: share of all routed experts, e.g. 0.0625 (overrides n; 0 = use n)"
    )
    threshold: float = same_as(
        SelectionConfig, "threshold", help="minimum score (risk difference) of a candidate"
    )
    per_layer_k: int = same_as(SelectionConfig, "per_layer_k", help="per_layer: experts per MoE layer")
    top_p: float = same_as(SelectionConfig, "top_p", help="top_p: cumulative share of positive risk")
    min_sign_consistency: Optional[float] = same_as(
        SelectionConfig,
        "min_sign_consistency",
        help="keep experts whose sign consistency across batches is >= this",
    )
    score: str = same_as(SelectionConfig, "score", help="column to rank by: risk_diff, t_score, pos_frac")
    per_batch: bool = opt(False, "one mask per analysis batch instead of one global mask")
    seed: int = opt(0, "seed of the random baseline")
    name: str = opt("unsafe_experts", "mask name in the run")
    overwrite: bool = opt(False, "replace a mask of the same name (otherwise an existing name is refused)")

    def __post_init__(self) -> None:
        check_range(
            self,
            n=AT_LEAST_1,
            budget=(lambda v: 0 <= v <= 1, "a share in (0, 1] (0 = use --n)"),
            per_layer_k=AT_LEAST_1,
            top_p=SHARE,
            min_sign_consistency=(lambda v: 0 <= v <= 1, "in [0, 1]"),
        )
        check_names(self, "name")

    def selection_config(self, total_experts: int | None = None) -> SelectionConfig:
        """The library config; ``budget`` becomes ``n`` given the model's number of routed experts."""
        keys = {f.name for f in fields(SelectionConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in keys}
        if self.budget:
            if not 0 < self.budget <= 1 or not total_experts:
                raise MoELabError(
                    f"budget must be a share in (0, 1] of the routed experts (got {self.budget})"
                )
            values["n"] = max(1, round(self.budget * total_experts))
        return SelectionConfig(**values)


@dataclass
class TrainSpec:
    """SFT set from the analysis batches -> train only the chosen experts."""

    mask: str = opt("unsafe_experts", "mask name in the run (from `select`)")
    mask_mode: MaskMode = opt("union", "one mask for every step, or each analysis batch's own mask")
    baseline: Baseline = opt(
        "experts", "what to train: the chosen experts, everything, or as many random experts"
    )
    lr: float = opt(1e-3, "learning rate")
    epochs: float = opt(3.0, "epochs over the analysis batches")
    weight_decay: float = opt(0.0, "AdamW weight decay (frozen experts never move)")
    train_router: bool = opt(False, "train the routers too")
    router_consistency: Consistency = opt("none", "KL between a batch's mean safe and unsafe routing")
    router_consistency_weight: float = opt(0.1, "weight of that loss")
    max_length: int = opt(512, "max tokens per training example")
    monitor_batches: bool = opt(
        False,
        "print the seed's per-step line 'Current training batch contains samples "
        "from batches: [k]' (the app's live batch monitor reads it)",
    )
    seed: int = opt(0, "training seed (batch order, random baseline draw)")
    name: Optional[str] = opt(None, "name of this training in the run (default from mask/baseline)")
    model: Optional[str] = opt(None, "model to train (default: the run's model)")
    checkpoint_every: int = opt(
        10, "save a resumable checkpoint every N steps (a killed training resumes from it)"
    )
    overwrite: bool = opt(
        False,
        "replace a finished training of the same name, or discard an unfinished one "
        "with other settings (otherwise refused; an unfinished one with the same settings resumes)",
    )

    def __post_init__(self) -> None:
        check_range(
            self,
            lr=POSITIVE,
            epochs=POSITIVE,
            weight_decay=NON_NEGATIVE,
            router_consistency_weight=NON_NEGATIVE,
            max_length=(lambda v: v >= 8, "a whole number >= 8"),
            checkpoint_every=AT_LEAST_1,
            mask_mode=(
                lambda v: v == "union" or self.baseline != "full",
                "union with --baseline full (it trains every parameter)",
            ),
        )
        check_names(self, "mask", "name")

    def training_name(self) -> str:
        return self.name or (f"experts-{self.mask}" if self.baseline == "experts" else self.baseline)


@dataclass
class EvaluateSpec:
    """Base vs every trained model of the run (and steering) on held-out prompts."""

    steer_mask: Optional[str] = opt(None, "also evaluate the base model with this mask's experts steered off")
    eval_limit: Optional[int] = opt(None, "at most this many prompts per evaluation set")
    templates_per_goal: int = opt(
        4, "jailbreak wrappers per held-out goal, drawn from all templates (0 = every one)"
    )
    max_new_tokens: int = opt(48, "answer length", aliases=["--eval-max-new-tokens"])
    judge: str = opt("keyword", "refusal judge (see analyze --judge)", aliases=["--eval-judge"])
    shift: bool = opt(False, "also re-run the analysis on each trained model (routing shift)")
    name: str = opt("comparison", "name of this evaluation in the run")
    model: Optional[str] = opt(None, "base model (default: the run's model)")
    overwrite: bool = opt(
        False, "replace an evaluation of the same name (otherwise an existing name is refused)"
    )
    backend: Backend = same_as(
        AnalyseSpec, "backend", help="generation of unsteered models: hf or vllm (steering: always hf)"
    )
    vllm_url: Optional[str] = same_as(
        AnalyseSpec, "vllm_url", help="with --backend vllm: a server of the base model"
    )

    def __post_init__(self) -> None:
        check_range(
            self,
            eval_limit=AT_LEAST_1,
            templates_per_goal=(lambda v: v >= 0, "a whole number >= 0"),
            max_new_tokens=AT_LEAST_1,
            vllm_url=_only_with_vllm(self),
        )
        check_names(self, "name", "steer_mask")


@dataclass
class DemoSpec(AnalyseSpec):
    """The whole pipeline on the organism: analyse, select, train + baselines, evaluate."""

    name: Optional[str] = opt("demo", "run name")
    mask_name: str = same_as(SelectSpec, "name", help="mask name in the run")
    method: Method = same_as(SelectSpec, "method")
    n: int = same_as(SelectSpec, "n")
    # 1/16 of all routed experts: the budget target; on the organism (6 x 64, top-8) that is
    # 24 experts, where chosen experts fix held-out jailbreaks and random ones do not (README, study).
    budget: Optional[float] = opt(1 / 16, SelectSpec.__dataclass_fields__["budget"].metadata["help"])
    per_layer_k: int = same_as(SelectSpec, "per_layer_k")
    per_batch: bool = same_as(SelectSpec, "per_batch")
    mask_mode: MaskMode = same_as(TrainSpec, "mask_mode")
    lr: float = same_as(TrainSpec, "lr")
    epochs: float = same_as(TrainSpec, "epochs")
    weight_decay: float = same_as(TrainSpec, "weight_decay")
    router_consistency: Consistency = same_as(TrainSpec, "router_consistency")
    router_consistency_weight: float = same_as(TrainSpec, "router_consistency_weight")
    eval_limit: Optional[int] = same_as(EvaluateSpec, "eval_limit")
    skip_training: bool = opt(False, "stop after expert selection")
    overwrite: bool = opt(
        False, "re-running the demo on a run (--run): replace its mask, trainings and evaluation"
    )

    def __post_init__(self) -> None:
        """Every setting checked now, by the specs of the steps it feeds (each rule is written once)."""
        super().__post_init__()
        self.select_spec(), self.train_spec("experts"), self.evaluate_spec()

    def select_spec(self) -> SelectSpec:
        return SelectSpec(
            method=self.method,
            n=self.n,
            budget=self.budget,
            per_layer_k=self.per_layer_k,
            per_batch=self.per_batch,
            seed=self.seed,
            name=self.mask_name,
            overwrite=self.overwrite,
        )

    def train_spec(self, baseline: str) -> TrainSpec:
        return TrainSpec(
            mask=self.mask_name,
            mask_mode=self.mask_mode if baseline != "full" else "union",
            baseline=baseline,
            lr=self.lr,
            epochs=self.epochs,
            weight_decay=self.weight_decay,
            router_consistency=self.router_consistency,
            router_consistency_weight=self.router_consistency_weight,
            seed=self.seed,
            overwrite=self.overwrite,
        )

    def evaluate_spec(self) -> EvaluateSpec:
        return EvaluateSpec(
            steer_mask=self.mask_name,
            eval_limit=self.eval_limit,
            overwrite=self.overwrite,
            backend=self.backend,
            vllm_url=self.vllm_url,
        )


BUDGETS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4)  # shares of all routed experts the study trains


@dataclass
class StudySpec:
    """Chosen vs random experts over expert budgets and seeds, with full fine-tuning and steering."""

    budgets: list[float] = field(
        default_factory=lambda: list(BUDGETS), metadata={"help": "shares of all routed experts to train"}
    )
    random_draws: int = opt(5, "uniform random draws per budget and seed")
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "organism training seed = batch seed = random-draw seed"},
    )
    model: Optional[str] = opt(
        None, "a model directory to study (default: the organism built with each seed)"
    )
    steering: bool = opt(True, "also steer the chosen experts off / the safest on at the router, untrained")
    full: bool = opt(True, "also fine-tune every parameter (budget 1.0)")
    quick: bool = opt(False, "1 seed, budgets 1/32 and 1/16, 2 draws: a few minutes")
    scope: Scope = same_as(DemoSpec, "scope")
    max_batches: Optional[int] = same_as(DemoSpec, "max_batches")
    lr: float = same_as(DemoSpec, "lr")
    epochs: float = same_as(DemoSpec, "epochs")
    eval_limit: Optional[int] = same_as(EvaluateSpec, "eval_limit")
    templates_per_goal: int = same_as(EvaluateSpec, "templates_per_goal")
    max_new_tokens: int = opt(16, "answer length in the evaluation (the judge reads how an answer opens)")
    name: str = opt(STUDY_NAME, "name of this study in the run")
    backend: Backend = same_as(DemoSpec, "backend", help="generation in each seed's analysis: hf or vllm")
    vllm_url: Optional[str] = same_as(DemoSpec, "vllm_url")

    def __post_init__(self) -> None:
        self.validate()

    def effective(self) -> StudySpec:
        """The spec with ``quick`` applied."""
        if not self.quick:
            return self
        return StudySpec(
            **{
                **dataclasses.asdict(self),
                "budgets": [1 / 32, 1 / 16],
                "random_draws": 2,
                "seeds": self.seeds[:1],
                "quick": False,
            }
        )

    def validate(self) -> None:
        if not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
            raise MoELabError(f"budgets must be shares in (0, 1]; got {self.budgets}")
        check_range(
            self,
            seeds=(len, "at least one seed"),
            random_draws=AT_LEAST_1,
            lr=POSITIVE,
            epochs=POSITIVE,
            max_new_tokens=AT_LEAST_1,
            eval_limit=AT_LEAST_1,
            max_batches=AT_LEAST_1,
            templates_per_goal=NON_NEGATIVE,
        )


COMMANDS: dict[str, type] = {
    "analyze": AnalyseSpec,
    "select": SelectSpec,
    "train": TrainSpec,
    "evaluate": EvaluateSpec,
    "demo": DemoSpec,
    "study": StudySpec,
}


def command_of(spec: Any) -> str:
    """The CLI subcommand that runs ``spec``."""
    for name in (n for n, cls in COMMANDS.items() if type(spec) is cls):
        return name
    raise MoELabError(f"{type(spec).__name__} is not a pipeline step spec")


def to_argv(spec: Any) -> list[str]:
    """The CLI flags that reproduce ``spec`` (only values that differ from the defaults)."""
    out: list[str] = []
    for f in fields(spec):
        value, default = getattr(spec, f.name), f.default
        if value == default or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else [flag, "false"]
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, repr(value) if isinstance(value, float) else str(value)]
    return out


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
def prompt_sets(spec: AnalyseSpec) -> tuple[list, list]:
    """The safe and unsafe prompt sets a spec names (built-in demo sets when no file is given)."""

    if spec.demo_sets or not (spec.safe or spec.unsafe):
        if spec.safe or spec.unsafe:
            raise MoELabError("pass either --demo-sets or both --safe and --unsafe, not a mix")
        return demo_sets(split="train", mode=spec.demo_mode, seed=spec.seed)
    if not (spec.safe and spec.unsafe):
        raise MoELabError("pass both --safe FILE and --unsafe FILE (or --demo-sets)")
    safe = load_prompts(spec.safe, column=spec.safe_column, label="safe", limit=spec.limit)
    unsafe = load_prompts(spec.unsafe, column=spec.unsafe_column, label="unsafe", limit=spec.limit)
    if spec.pair_by_row:
        safe, unsafe = pair_by_row(safe, unsafe)
    return safe, unsafe


def compose(spec: AnalyseSpec) -> Any:
    """The spec's batch plan (``max_batches`` keeps the first N batches)."""

    if spec.max_batches is not None and spec.max_batches < 1:
        raise MoELabError(
            f"max_batches must be >= 1 (got {spec.max_batches}); omit it to analyse every batch"
        )
    safe, unsafe = prompt_sets(spec)
    plan = compose_batches(
        safe, unsafe, batch_size=spec.batch_size, safe_ratio=spec.safe_ratio, seed=spec.seed
    )
    if spec.max_batches:
        plan = dataclasses.replace(plan, batches=plan.batches[: spec.max_batches])
    return plan


def analysis_run(
    spec: AnalyseSpec, run: str | Path | Run | None = None, runs_root: str | Path | None = None
) -> tuple[Run, Any]:
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
    plan: Any = None,
    loaded: tuple[Any, Any] | None = None,
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


# -- select ------------------------------------------------------------------------------------
@writes_run("select")
def select(spec: SelectSpec, run: Run) -> Any:
    """Choose experts from the run's risk table -> the saved ``ExpertMask`` (or per-batch masks)."""

    if not run.path_for("risk_aggregated").exists():
        raise MoELabError(f"run {run.id} has no risk table yet; run `python -m moe_core analyze` first")
    check_free(run.path_for("mask", name=spec.name), f"mask {spec.name!r}", spec.overwrite)
    info = model_info_of(run)
    nl, ne = info.get("num_layers"), info.get("num_experts")
    if nl is None or ne is None:  # a manifest that lost its analysis step: refused, not a TypeError later
        raise RunError(f"run {run.id} does not record its model's shape; resume its analysis to record it")
    cfg = spec.selection_config(len(info.get("moe_layers") or range(nl or 0)) * (ne or 0))
    if spec.per_batch:
        masks = select_per_batch(read_parquet(run.path_for("risk_per_batch")), cfg, nl, ne)
        save_batch_masks(run.path_for("mask", name=spec.name), masks)
        return masks
    mask = select_experts(read_parquet(run.path_for("risk_aggregated")), cfg, nl, ne)
    mask.save(run.path_for("mask", name=spec.name))
    return mask


# -- train -------------------------------------------------------------------------------------
@writes_run("train")
def train(spec: TrainSpec, run: Run, progress: Progress | None = None) -> Any:
    """Train what ``spec`` names on the run's analysis batches into train/<name>/ (``moe_core.train.step``).

    Checked before the model loads; built in a stage folder with checkpoints and committed whole, so a
    failure never touches a previous training of that name; a killed attempt resumes when run again.
    """

    return run_train(spec, run, progress)


# -- evaluate ----------------------------------------------------------------------------------
def eval_entries(spec: EvaluateSpec, run: Run) -> list:
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
def evaluate(spec: EvaluateSpec, run: Run, progress: Progress | None = None) -> Any:
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
    run.set_step(f"evaluation:{spec.name}", "done", models=[e.name for e in entries])
    return comparison_table(summary)


def routing_shifts(run: Run, names: list[str], progress: Progress | None = None) -> dict[str, Any]:
    """Re-run the analysis on each named training: how each expert's risk difference moved."""

    out = {}
    for name in names:
        model, tok = load_model(run.trainings()[name]["merged"])
        out[name] = routing_shift(run, model, tok, name=name, progress=progress)
    return out
