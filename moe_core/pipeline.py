"""The pipeline, one typed spec per step: the single home of every default.

    analyse -> select -> train -> evaluate      (demo = all four on the organism; study = many of them)

Each step is a dataclass spec plus a function ``step(spec, run, ...)``. The CLI is generated from
these dataclasses (``cli.py``, with ``HfArgumentParser``), the app's pages build the same specs
and launch them as jobs (``jobs.start_step``), and :func:`to_argv` turns a spec back into the
command line that reproduces it. So a default changes in exactly one place::

    from moe_core import pipeline as P
    run = P.analyse(P.AnalyseSpec(model="organism", scope="prompt"))
    P.select(P.SelectSpec(n=16), run)
    P.train(P.TrainSpec(baseline="experts"), run)
    P.evaluate(P.EvaluateSpec(eval_limit=20), run)

Steps take ``progress(done, total, message)`` and ``should_stop()`` callables, never UI objects.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from .analysis import AnalysisConfig
from .errors import MoELabError
from .runs import JobStopped, Run, RunError, default_runs_root
from .selection import METHODS, SelectionConfig

log = logging.getLogger(__name__)

ORGANISM = "organism"  # model name that means "the offline model organism, built on demand"
Progress = Callable[..., None]
ShouldStop = Callable[[], bool]

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


# -- specs -------------------------------------------------------------------------------------
@dataclass
class AnalyseSpec:
    """Prompts -> mixed batches -> routing -> per-batch risk differences."""

    # prompts and batches
    safe: Optional[str] = opt(None, "safe prompt file (CSV, JSON, JSONL, Parquet) or HF dataset name")
    unsafe: Optional[str] = opt(None, "unsafe prompt file or HF dataset name")
    safe_column: Optional[str] = opt(None, "column holding the safe prompts (auto-detected if omitted)")
    unsafe_column: Optional[str] = opt(None, "column holding the unsafe prompts (auto-detected if omitted)")
    pair_by_row: bool = opt(False, "pair safe row i with unsafe row i")
    demo_sets: bool = opt(False, "use the built-in demo prompt sets (the default when no files are given)")
    demo_mode: Literal["paired", "unpaired"] = opt("paired", "demo sets: plain vs jailbroken goals (paired) or benign vs harmful")
    limit: Optional[int] = opt(None, "read at most this many prompts per file")
    batch_size: int = opt(16, "prompts per analysis (= training) batch")
    safe_ratio: float = opt(0.5, "share of safe prompts in each batch (safe first, then unsafe)")
    seed: int = opt(0, "seed for batch composition")
    max_batches: Optional[int] = opt(None, "analyse only the first N batches")
    # analysis
    model: Optional[str] = opt(None, "'organism' (default for a new run), a local model directory, or a HF id")
    scope: Scope = same_as(AnalysisConfig, "scope", help="tokens whose routing counts: prompt, generated answer, teacher-forced response")
    max_new_tokens: int = same_as(AnalysisConfig, "max_new_tokens", help="answer length per prompt")
    quality_filter: bool = same_as(AnalysisConfig, "quality_filter", help="keep a pair only if safe was refused and unsafe complied")
    judge: str = same_as(AnalysisConfig, "judge", help="refusal judge: keyword | http:<url>?model=<model> | hf:<dir>")
    name: Optional[str] = opt(None, "run name")
    top: int = opt(10, "how many top experts to print")

    def analysis_config(self) -> AnalysisConfig:
        return AnalysisConfig(scope=self.scope, max_new_tokens=self.max_new_tokens,
                              quality_filter=self.quality_filter, judge=self.judge)


@dataclass
class SelectSpec:
    """Risk table -> expert mask."""

    method: Method = same_as(SelectionConfig, "method", help="selection rule")
    n: int = same_as(SelectionConfig, "n", help="top_n / random: number of experts")
    budget: Optional[float] = opt(None, "top_n / random: share of all routed experts, e.g. 0.0625 (overrides n; 0 = use n)")
    threshold: float = same_as(SelectionConfig, "threshold", help="minimum score (risk difference) of a candidate")
    per_layer_k: int = same_as(SelectionConfig, "per_layer_k", help="per_layer: experts per MoE layer")
    top_p: float = same_as(SelectionConfig, "top_p", help="top_p: cumulative share of positive risk")
    min_sign_consistency: Optional[float] = same_as(SelectionConfig, "min_sign_consistency",
                                                    help="keep experts whose sign consistency across batches is >= this")
    score: str = same_as(SelectionConfig, "score", help="column to rank by: risk_diff, t_score, pos_frac")
    per_batch: bool = opt(False, "one mask per analysis batch instead of one global mask")
    seed: int = opt(0, "seed of the random baseline")
    name: str = opt("unsafe_experts", "mask name in the run")

    def selection_config(self, total_experts: int | None = None) -> SelectionConfig:
        """The library config; ``budget`` becomes ``n`` given the model's number of routed experts."""
        keys = {f.name for f in fields(SelectionConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in keys}
        if self.budget:
            if not 0 < self.budget <= 1 or not total_experts:
                raise MoELabError(f"budget must be a share in (0, 1] of the routed experts (got {self.budget})")
            values["n"] = max(1, round(self.budget * total_experts))
        return SelectionConfig(**values)


@dataclass
class TrainSpec:
    """SFT set from the analysis batches -> train only the chosen experts."""

    mask: str = opt("unsafe_experts", "mask name in the run (from `select`)")
    mask_mode: MaskMode = opt("union", "one mask for every step, or each analysis batch's own mask")
    baseline: Baseline = opt("experts", "what to train: the chosen experts, everything, or as many random experts")
    lr: float = opt(1e-3, "learning rate")
    epochs: float = opt(3.0, "epochs over the analysis batches")
    weight_decay: float = opt(0.0, "AdamW weight decay (frozen experts never move)")
    train_router: bool = opt(False, "train the routers too")
    router_consistency: Consistency = opt("none", "KL between a batch's mean safe and unsafe routing")
    router_consistency_weight: float = opt(0.1, "weight of that loss")
    max_length: int = opt(512, "max tokens per training example")
    monitor_batches: bool = opt(False, "print the seed's per-step line 'Current training batch contains samples "
                                       "from batches: [k]' (the app's live batch monitor reads it)")
    seed: int = opt(0, "training seed (batch order, random baseline draw)")
    name: Optional[str] = opt(None, "name of this training in the run (default from mask/baseline)")
    model: Optional[str] = opt(None, "model to train (default: the run's model)")

    def training_name(self) -> str:
        return self.name or (f"experts-{self.mask}" if self.baseline == "experts" else self.baseline)


@dataclass
class EvaluateSpec:
    """Base vs every trained model of the run (and steering) on held-out prompts."""

    steer_mask: Optional[str] = opt(None, "also evaluate the base model with this mask's experts steered off")
    eval_limit: Optional[int] = opt(None, "at most this many prompts per evaluation set")
    templates_per_goal: int = opt(4, "jailbreak wrappers per held-out goal, drawn from all templates (0 = every one)")
    max_new_tokens: int = opt(48, "answer length", aliases=["--eval-max-new-tokens"])
    judge: str = opt("keyword", "refusal judge (see analyze --judge)", aliases=["--eval-judge"])
    shift: bool = opt(False, "also re-run the analysis on each trained model (routing shift)")
    name: str = opt("comparison", "name of this evaluation in the run")
    model: Optional[str] = opt(None, "base model (default: the run's model)")


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

    def select_spec(self) -> SelectSpec:
        return SelectSpec(method=self.method, n=self.n, budget=self.budget, per_layer_k=self.per_layer_k,
                          per_batch=self.per_batch, seed=self.seed, name=self.mask_name)

    def train_spec(self, baseline: str) -> TrainSpec:
        return TrainSpec(mask=self.mask_name, mask_mode=self.mask_mode if baseline != "full" else "union",
                         baseline=baseline, lr=self.lr, epochs=self.epochs, weight_decay=self.weight_decay,
                         router_consistency=self.router_consistency,
                         router_consistency_weight=self.router_consistency_weight, seed=self.seed)


BUDGETS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4)  # shares of all routed experts the study trains


@dataclass
class StudySpec:
    """Chosen vs random experts over expert budgets and seeds, with full fine-tuning and steering."""

    budgets: list[float] = field(default_factory=lambda: list(BUDGETS),
                                 metadata={"help": "shares of all routed experts to train"})
    random_draws: int = opt(5, "uniform random draws per budget and seed")
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2],
                             metadata={"help": "organism training seed = batch seed = random-draw seed"})
    model: Optional[str] = opt(None, "a model directory to study (default: the organism built with each seed)")
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
    name: str = opt("selection", "name of this study in the run")

    def effective(self) -> "StudySpec":
        """The spec with ``quick`` applied."""
        if not self.quick:
            return self
        return StudySpec(**{**dataclasses.asdict(self), "budgets": [1 / 32, 1 / 16], "random_draws": 2, "seeds": self.seeds[:1],
                            "quick": False})

    def validate(self) -> None:
        if not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
            raise MoELabError(f"budgets must be shares in (0, 1]; got {self.budgets}")
        if self.random_draws < 1 or not self.seeds:
            raise MoELabError("random_draws must be >= 1 and seeds non-empty")
        if self.epochs <= 0 or self.lr <= 0 or self.max_new_tokens < 1:
            raise MoELabError("epochs, lr and max_new_tokens must be > 0")


COMMANDS: dict[str, type] = {"analyze": AnalyseSpec, "select": SelectSpec, "train": TrainSpec,
                             "evaluate": EvaluateSpec, "demo": DemoSpec, "study": StudySpec}


def command_of(spec: Any) -> str:
    """The CLI subcommand that runs ``spec``."""
    for name, cls in COMMANDS.items():
        if type(spec) is cls:
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


def model_of(run: Run, override: str | None = None) -> str:
    """The model a step works on: an explicit override, else the run's model, else the organism."""
    return override or run.manifest.get("model") or ORGANISM


def model_dir(name: str) -> str:
    """A loadable directory (or hub id) for a model name; builds the organism on demand."""
    if name == ORGANISM:
        from .demo import build_organism

        return str(build_organism())
    return name


def load_any_model(name: str, progress: Progress | None = None) -> tuple[Any, Any]:
    """``organism`` (built on demand) or a local directory / HF id -> (model, tokenizer)."""
    if name == ORGANISM:
        from .demo import build_organism, load_organism

        build_organism(progress=progress)
        return load_organism()
    from .models import load_model

    return load_model(name)


# -- analyse -----------------------------------------------------------------------------------
def prompt_sets(spec: AnalyseSpec) -> tuple[list, list]:
    """The safe and unsafe prompt sets a spec names (built-in demo sets when no file is given)."""
    from .prompts import demo_sets, load_prompts, pair_by_row

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
    from .batches import compose_batches

    if spec.max_batches is not None and spec.max_batches < 1:
        raise MoELabError(f"max_batches must be >= 1 (got {spec.max_batches}); omit it to analyse every batch")
    safe, unsafe = prompt_sets(spec)
    plan = compose_batches(safe, unsafe, batch_size=spec.batch_size, safe_ratio=spec.safe_ratio, seed=spec.seed)
    if spec.max_batches:
        plan = dataclasses.replace(plan, batches=plan.batches[: spec.max_batches])
    return plan


def analysis_run(spec: AnalyseSpec, run: str | Path | Run | None = None,
                 runs_root: str | Path | None = None) -> tuple[Run, Any]:
    """Open the run to resume (its saved plan) or create one for ``spec`` with its plan -> (run, plan | None).

    The plan is composed before the run is created, so a bad prompt file leaves no empty run.
    """
    if run is not None:
        r = run if isinstance(run, Run) else open_run(run, runs_root)
        plan = None if r.path_for("plan").exists() else compose(spec)
        current = r.manifest.get("model")
        if spec.model and current not in (None, spec.model):
            if r.completed_batches():  # never mix two models' routing in one run
                raise MoELabError(
                    f"run {r.id} was analysed with model {current!r}, not {spec.model!r}; "
                    "resume without --model or start a new run")
            r.update(model=spec.model)
        elif current is None:
            r.update(model=spec.model or ORGANISM)
        return r, plan
    plan = compose(spec)
    r = Run.create(Path(runs_root or default_runs_root()), name=spec.name, model=spec.model or ORGANISM,
                   config={"batch_size": spec.batch_size, "safe_ratio": spec.safe_ratio, "seed": spec.seed})
    return r, plan


def analyse(spec: AnalyseSpec, run: str | Path | Run | None = None, runs_root: str | Path | None = None,
            progress: Progress | None = None, should_stop: ShouldStop | None = None, plan: Any = None,
            loaded: tuple[Any, Any] | None = None) -> Run:
    """Run (or resume) the analysis of ``spec``; returns the run holding its risk tables.

    ``loaded``: the (model, tokenizer) of ``spec.model`` when the caller already holds them.
    """
    from .analysis import run_analysis

    if not isinstance(run, Run) or plan is None:
        run, plan = analysis_run(spec, run, runs_root)
    model, tok = loaded or load_any_model(model_of(run), progress)
    run_analysis(run, model, tok, plan, spec.analysis_config(), progress=progress, should_stop=should_stop)
    return run


# -- select ------------------------------------------------------------------------------------
def select(spec: SelectSpec, run: Run) -> Any:
    """Choose experts from the run's risk table -> the saved ``ExpertMask`` (or per-batch masks)."""
    from .analysis import model_info_of
    from .masks import save_batch_masks
    from .runs import read_parquet
    from .selection import select_experts, select_per_batch

    if not run.path_for("risk_aggregated").exists():
        raise MoELabError(f"run {run.id} has no risk table yet; run `python -m moe_core analyze` first")
    info = model_info_of(run)
    nl, ne = info.get("num_layers"), info.get("num_experts")
    cfg = spec.selection_config(len(info.get("moe_layers") or range(nl or 0)) * (ne or 0))
    if spec.per_batch:
        masks = select_per_batch(read_parquet(run.path_for("risk_per_batch")), cfg, nl, ne)
        save_batch_masks(run.path_for("mask", name=spec.name), masks)
        return masks
    mask = select_experts(read_parquet(run.path_for("risk_aggregated")), cfg, nl, ne)
    mask.save(run.path_for("mask", name=spec.name))
    return mask


def load_masks(run: Run, name: str, per_batch: bool) -> Any:
    """A saved mask: per-batch masks ``{batch_idx: ExpertMask}`` or one global mask (union of per-batch ones)."""
    import json

    from .masks import ExpertMask, load_batch_masks

    path = run.path_for("mask", name=name)
    if not path.exists():
        have = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.exists() else []
        raise MoELabError(f"run {run.id} has no mask named {name!r} (masks: {have or 'none'}); "
                          "run `python -m moe_core select` first")
    if "batches" in json.loads(path.read_text()):
        masks = load_batch_masks(path)
        return masks if per_batch else functools.reduce(ExpertMask.union, masks.values())
    if per_batch:
        raise MoELabError(f"mask {name!r} is one global mask; --mask-mode per_batch needs a mask saved with "
                          "`select --per-batch`")
    return ExpertMask.load(path)


# -- train -------------------------------------------------------------------------------------
def training_masks(spec: TrainSpec, run: Run, adapter: Any) -> Any:
    """What the spec trains: the chosen mask(s), as many random experts drawn uniformly, or None (full)."""
    from .selection import random_like

    if spec.baseline == "full":
        return None
    masks = load_masks(run, spec.mask, spec.mask_mode == "per_batch")
    if spec.baseline == "random_experts":  # as many experts, drawn uniformly over the MoE layers by selection
        if isinstance(masks, dict):
            return {b: random_like(m, [spec.seed, b], layers=adapter.moe_layers) if m.count() else m
                    for b, m in masks.items()}
        return random_like(masks, spec.seed, layers=adapter.moe_layers)
    return masks


def train(spec: TrainSpec, run: Run, progress: Progress | None = None) -> Any:
    """Train what ``spec`` names on the run's analysis batches; the merged model lands in the run."""
    from .analysis import load_batch_data_list
    from .models import MoEAdapter
    from .sft import create_batch_aware_dataset, create_batch_structured_dataset, save_structured_batches
    from .training import train_model

    if spec.epochs <= 0 or spec.lr <= 0 or spec.weight_decay < 0:
        raise MoELabError(f"epochs ({spec.epochs}) and lr ({spec.lr}) must be > 0 and weight_decay "
                          f"({spec.weight_decay}) >= 0")
    name = spec.training_name()
    out = run.path_for("train", name=name)
    model, tok = load_any_model(model_of(run, spec.model), progress)
    masks = training_masks(spec, run, MoEAdapter.for_model(model))
    batches = create_batch_structured_dataset(load_batch_data_list(run), seed=spec.seed)
    save_structured_batches(batches, run.path_for("sft") / "batches")
    dataset = create_batch_aware_dataset(batches, tok, max_length=spec.max_length)
    run.set_step(f"train:{name}", "running", mask=spec.mask, baseline=spec.baseline, mask_mode=spec.mask_mode)
    try:
        result = train_model(
            model, tok, dataset, masks, output_dir=out, progress=progress, baseline=spec.baseline, mask_mode=spec.mask_mode,
            learning_rate=spec.lr, num_train_epochs=spec.epochs, weight_decay=spec.weight_decay, seed=spec.seed,
            train_router=spec.train_router, router_consistency_loss=spec.router_consistency,
            router_consistency_weight=spec.router_consistency_weight, monitor_batches=spec.monitor_batches,
        )
    except JobStopped:
        run.set_step(f"train:{name}", "stopped")
        raise
    except BaseException as e:  # never leave a step "running" behind
        run.set_step(f"train:{name}", "error", error=f"{type(e).__name__}: {e}")
        raise
    run.set_step(f"train:{name}", "done", merged=str(result.merged_path), report=result.report,
                 train_loss=result.metrics.get("train_loss"))
    return result


# -- evaluate ----------------------------------------------------------------------------------
def eval_entries(spec: EvaluateSpec, run: Run) -> list:
    """Base model, every finished training of the run, and the base model steered by ``steer_mask``."""
    from .analysis import model_info_of
    from .evaluation import EvalEntry
    from .masks import ExpertMask

    base_dir = model_dir(model_of(run, spec.model))
    entries = [EvalEntry("base", base_dir)]
    entries += [EvalEntry(name, info["merged"]) for name, info in run.trainings().items() if info.get("merged")]
    if spec.steer_mask:
        mask = ExpertMask.load(run.path_for("mask", name=spec.steer_mask))
        info = model_info_of(run)
        shape = (info.get("num_layers"), info.get("num_experts"))
        if None not in shape and tuple(mask.shape) != shape:  # fail before the evaluation, not after it
            raise MoELabError(f"steer mask {spec.steer_mask!r} is {tuple(mask.shape)} but the run's model has "
                              f"{shape[0]} layers x {shape[1]} experts")
        entries.append(EvalEntry(f"steer-off-{spec.steer_mask}", base_dir, steer_deactivate=mask))
    return entries


def evaluate(spec: EvaluateSpec, run: Run, progress: Progress | None = None) -> Any:
    """Evaluate base vs trained (vs steered) models; saves responses and summary into the run -> table."""
    from .evaluation import check_eval_name, compare_models, comparison_table, default_eval_sets, save_evaluation

    if spec.max_new_tokens < 1 or (spec.eval_limit is not None and spec.eval_limit < 1):
        raise MoELabError("max_new_tokens and eval_limit must be >= 1")
    check_eval_name(spec.name)  # before the evaluation runs, not after
    entries = eval_entries(spec, run)
    sets = default_eval_sets(split="heldout", limit=spec.eval_limit, templates_per_goal=spec.templates_per_goal or None)
    responses, summary = compare_models(entries, sets, judge=spec.judge, max_new_tokens=spec.max_new_tokens,
                                        progress=progress)
    save_evaluation(run, responses, summary, name=spec.name)
    run.set_step(f"evaluation:{spec.name}", "done", models=[e.name for e in entries])
    return comparison_table(summary)


def routing_shifts(run: Run, names: list[str], progress: Progress | None = None) -> dict[str, Any]:
    """Re-run the analysis on each named training: how each expert's risk difference moved."""
    from .evaluation import routing_shift
    from .models import load_model

    out = {}
    for name in names:
        model, tok = load_model(run.trainings()[name]["merged"])
        out[name] = routing_shift(run, model, tok, name=name, progress=progress)
    return out
