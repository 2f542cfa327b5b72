"""One typed spec per pipeline step: the single home of every default, and each spec's command line.

The CLI is generated from these dataclasses (``cli.py``, ``HfArgumentParser``); the pages build the
same specs and hand them to ``moe_core.pipeline``'s steps or launch them as jobs
(``moe_core.jobs.start_step``); :func:`to_argv` gives a spec's command line. A default changes here,
in one place, and every entry point follows."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, Optional

from moe_core.analysis.analyse import (
    AnalysisConfig,
)
from moe_core.analysis.masks import (
    parse_toggles,
)
from moe_core.analysis.scores import SCORES
from moe_core.analysis.selection import METHODS, SelectionConfig, budget_config, experts_for_budget
from moe_core.errors import MoELabError
from moe_core.eval.study_summary import STUDY_NAME
from moe_core.judge.judges import DEFAULT_JUDGE
from moe_core.model.backends import Backend
from moe_core.model.generation import MAX_NEW_TOKENS
from moe_core.model.organism import organism_variant
from moe_core.store.checks import (
    AT_LEAST_1,
    JSON_OBJECT,
    NON_NEGATIVE,
    POSITIVE,
    SHARE,
    SHARE_OR_ZERO,
    check_names,
    check_range,
    json_object,
)
from moe_core.train.hf_args import check_training_args
from moe_core.train.sft import MAX_LENGTH

LongPrompts = Literal["refuse", "cut"]
Scope = Literal["prompt", "generated", "response"]


Method = Literal["top_n", "threshold", "per_layer", "top_p", "random"]


MaskMode = Literal["union", "per_batch"]


Baseline = Literal["experts", "full", "random_experts"]


Consistency = Literal["none", "forward", "reverse", "symmetric", "js"]
Validation = Literal["judged", "margin"]


assert set(Method.__args__) == set(METHODS), "selection methods and the spec's choices drifted apart"


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A spec field: its default and its CLI help in one place (``aliases`` adds old flag names)."""
    return field(default=default, metadata={"help": help, **extra})


def same_as(cls: type, name: str, default: Any = MISSING, **override: Any) -> Any:
    """Reuse another dataclass's field default (and help): a default is defined only once. ``default``:
    a step whose own default was tuned apart (e.g. the study's retain share) names it here instead."""
    f = cls.__dataclass_fields__[name]
    meta = {**f.metadata, **override}
    return field(default=getattr(cls, name, f.default) if default is MISSING else default, metadata=meta)


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
    composed_share: float = opt(
        0.0,
        "demo sets, paired: share of the jailbroken goals wrapped in a jailbreak composed of parts (persona, "
        "rules-off claim, demand, ask) instead of one of the 23 fixed train templates",
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
    long_prompts: LongPrompts = opt(
        "refuse",
        "a prompt longer than the model's context: refuse (naming it) or cut it to fit (its meta says so)",
    )
    name: Optional[str] = opt(None, "run name")
    top: int = opt(10, "how many top experts to print")

    def __post_init__(self) -> None:
        check_range(
            self,
            limit=AT_LEAST_1,
            batch_size=(lambda v: v >= 2, "a whole number >= 2 (safe and unsafe rows)"),
            safe_ratio=(lambda v: 0 < v < 1, "a share strictly between 0 and 1"),
            composed_share=SHARE_OR_ZERO,
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
        None,
        "share of all routed experts, e.g. 0.0625: exactly that many top experts whatever their score "
        "(top_n; overrides n and threshold) or that many random ones (random); 0 = use n",
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
    score: str = same_as(
        SelectionConfig,
        "score",
        help="what experts are ranked by: risk_diff (activation frequency), t_score, pos_frac, gate_diff "
        "(mean router weight), grad_attr (gradient of the refusal SFT loss), grad_contrast (its share minus the retain "
        "loss's share), ablation (refusal log-prob drop with the expert off); the last four are computed once "
        "per run and kept in risk/",
    )
    per_batch: bool = opt(False, "one mask per analysis batch instead of one global mask")
    seed: int = opt(0, "seed of the random baseline")
    name: str = opt("unsafe_experts", "mask name in the run")
    overwrite: bool = opt(False, "replace a mask of the same name (otherwise an existing name is refused)")
    toggles: Optional[str] = opt(
        None, "hand edits after the rule: layer:expert pairs to flip, e.g. '3:7,1:2'"
    )
    batch_toggles: Optional[str] = opt(
        None, 'with --per-batch: hand edits per batch as JSON, e.g. \'{"0": ["3:7"]}\''
    )
    random_baseline: bool = opt(
        False, "also save as many random experts (never the chosen ones) as <name>_random"
    )

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
        parse_toggles(self.toggles)  # a malformed edit is refused when the spec is built (CLI parse time)
        if self.batch_toggles is not None:
            check_range(self, batch_toggles=JSON_OBJECT)

    def selection_config(self, total_experts: int | None = None) -> SelectionConfig:
        """The library config; ``budget`` becomes ``n`` given the model's number of routed experts."""
        keys = {f.name for f in fields(SelectionConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in keys}
        if self.budget and self.method == "top_n":
            return budget_config(self.budget, total_experts or 0, **values)
        if self.budget:
            values["n"] = experts_for_budget(self.budget, total_experts or 0)
        return SelectionConfig(**values)


@dataclass
class TrainSpec:
    """SFT set from the analysis batches -> train only the chosen experts."""

    mask: str = opt("unsafe_experts", "mask name in the run (from `select`)")
    mask_mode: MaskMode = opt("union", "one mask for every step, or each analysis batch's own mask")
    baseline: Baseline = opt(
        "experts", "what to train: the chosen experts, everything, or as many random experts"
    )
    lr: float = opt(1e-3, "learning rate", aliases=["--learning-rate", "--learning_rate"])
    epochs: float = opt(
        3.0, "epochs over the analysis batches", aliases=["--num-train-epochs", "--num_train_epochs"]
    )
    weight_decay: float = opt(0.0, "AdamW weight decay (frozen experts never move)")
    train_router: bool = opt(False, "train the routers too")
    router_consistency: Consistency = opt("none", "KL between a batch's mean safe and unsafe routing")
    router_consistency_weight: float = opt(0.1, "weight of that loss")
    retain_share: float = opt(
        0.0,
        "retain examples added to each analysis batch, per example in it (0.25: 4 more rows in a batch of 16): "
        "benign requests with the base model's own answers, so training also says where to keep answering",
    )
    max_length: int = opt(MAX_LENGTH, "max tokens per training example")
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
    training_args: Optional[str] = opt(
        None,
        "more Hugging Face TrainingArguments as a JSON object, e.g. "
        '\'{"bf16": true, "warmup_steps": 0.1, "lr_scheduler_type": "cosine"}\' (each is also a flag of '
        "its own: --bf16, --warmup_steps 0.1, ...); settings that would break the method are refused",
    )

    def __post_init__(self) -> None:
        check_range(self, training_args=JSON_OBJECT)
        check_training_args(json_object(self.training_args))
        check_range(
            self,
            lr=POSITIVE,
            epochs=POSITIVE,
            weight_decay=NON_NEGATIVE,
            router_consistency_weight=NON_NEGATIVE,
            retain_share=(lambda v: 0 <= v <= 4, "a share in [0, 4] (retain examples per analysis example)"),
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

    def suggested_name(self, taken: Collection[str]) -> str:
        """A free name for this training: the default one, else one built from the settings that differ from
        the defaults (``experts-unsafe_experts-lr0.003-ep5``), numbered if that is taken too."""
        base = self.training_name()
        if base not in taken:
            return base
        d = TrainSpec()
        changed = [(k, getattr(self, f)) for f, k in SUGGEST_PARTS if getattr(self, f) != getattr(d, f)]
        parts = [(k if v else f"no-{k}") if isinstance(v, bool) else f"{k}{v}" for k, v in changed]
        built = "-".join([base, *parts])[:90]
        for n in range(1, 1000):
            name = built if n == 1 else f"{built}-{n}"
            if name not in taken:
                return name
        raise MoELabError(f"no free training name like {built!r}; type one")


SUGGEST_PARTS = (  # (TrainSpec field, short tag) in a suggested training name
    ("lr", "lr"),
    ("epochs", "ep"),
    ("mask_mode", ""),
    ("weight_decay", "wd"),
    ("router_consistency", "rc"),
    ("retain_share", "retain"),
    ("seed", "seed"),
    ("max_length", "len"),
)


@dataclass
class EvaluateSpec:
    """Base vs every trained model of the run (and steering) on held-out prompts."""

    steer_mask: Optional[str] = opt(None, "also evaluate the base model with this mask's experts steered off")
    eval_limit: Optional[int] = opt(None, "at most this many prompts per evaluation set")
    templates_per_goal: int = opt(
        4, "jailbreak wrappers per held-out goal, drawn from all templates (0 = every one)"
    )
    max_new_tokens: int = opt(MAX_NEW_TOKENS, "answer length", aliases=["--eval-max-new-tokens"])
    judge: str = opt(DEFAULT_JUDGE, "refusal judge (see analyze --judge)", aliases=["--eval-judge"])
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
# The study's schedule, chosen on the tuning organisms and the validation split only, then fixed for the
# reporting seeds: the reference study's settings. Its optimizer and rates: plain SGD (stop 25, organisms 0-3;
# README, "SGD instead of AdamW"): AdamW moves every trained weight by about the learning rate per step whatever
# its gradient, so random experts learned the refusal almost as fast as chosen ones; SGD moves each expert as
# far as its gradient says. The rest of the schedule: README, "What changed the organism (stop 19)".
STUDY_TRAINING_ARGS = '{"optim": "sgd"}'
STUDY_LRS = (3.0, 10.0)
STUDY_FULL_LRS = (0.3, 1.0)  # every parameter moves: a tenth of the experts' rates
STUDY_RETAIN_SHARE = 0.5  # without retain examples the learned refusal spread to benign prompts
# The method's selector, and the one that learned first on every tuning organism (0-3, stop 20).
STUDY_SCORES = ("risk_diff", "grad_attr")


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
    quick: bool = opt(False, "1 seed, budgets 1/32 and 1/16, 2 draws: about a tenth of the arms")
    batch_seeds: list[int] = field(
        default_factory=list,
        metadata={"help": "batch-composition seeds studied per organism seed (default: the organism seed)"},
    )
    scores: list[str] = field(
        default_factory=lambda: list(STUDY_SCORES),
        metadata={
            "help": "selectors compared: risk_diff (rows 'chosen'), gate_diff, grad_attr, grad_contrast, "
            "ablation (rows 'chosen_<score>'; grad_attr learned first on every tuning organism: README)"
        },
    )
    lrs: list[float] = field(
        default_factory=list,
        metadata={
            "help": "learning rates searched on the validation split, every arm alike (default: "
            f"{' '.join(map(str, STUDY_LRS))}, tuned on the organism; --lr alone where --lr is another rate)"
        },
    )
    full_lrs: list[float] = field(
        default_factory=list,
        metadata={
            "help": "learning rates searched for full fine-tuning (default: "
            f"{' '.join(map(str, STUDY_FULL_LRS))} with the default --lrs, else --lrs)"
        },
    )
    curve_every: int = opt(7, "score the validation split every N training steps (the learning curves)")
    validation: Validation = opt(
        "judged",
        "how a validation point is scored: judged greedy answers, as the test is, or 'margin' (teacher-forced "
        "refusal vs compliance openings: cheap for big models, but it misreads benign and borderline prompts)",
    )
    retain_share: float = same_as(TrainSpec, "retain_share", default=STUDY_RETAIN_SHARE)
    composed_share: float = same_as(
        AnalyseSpec,
        "composed_share",
        help="each seed pair's analysis (= SFT) batches: share of the goals in jailbreaks composed of parts "
        "(0: the 23 fixed train templates alone; README, 'Tried in stop 27')",
    )
    training_args: Optional[str] = same_as(
        TrainSpec,
        "training_args",
        default=STUDY_TRAINING_ARGS,
        help="more Hugging Face TrainingArguments for every arm, as a JSON object (default: plain SGD, the "
        "tuned schedule; '{}' trains with AdamW, as the train step does, and then --lr alone unless --lrs)",
    )
    spliced_jailbreaks: int = opt(
        0,
        "organisms whose corpus also has, per train goal, this many jailbreak wrappers spliced from two train "
        "templates' parts (0: the reference study's organisms; README, 'Organism variants')",
    )
    organism: Optional[str] = opt(
        None,
        "the organisms a study builds, as a JSON object of organism fields, e.g. '{\"num_layers\": 8}' (unset: "
        "the reference study's; a defining setting; README, 'Organism variants')",
    )
    scope: Scope = same_as(DemoSpec, "scope")
    max_batches: Optional[int] = same_as(DemoSpec, "max_batches")
    lr: float = same_as(DemoSpec, "lr")
    epochs: float = same_as(DemoSpec, "epochs")
    eval_limit: Optional[int] = same_as(EvaluateSpec, "eval_limit")
    templates_per_goal: int = same_as(EvaluateSpec, "templates_per_goal")
    max_new_tokens: int = opt(16, "answer length in the evaluation (the judge reads how an answer opens)")
    name: str = opt(STUDY_NAME, "name of this study in the run")
    overwrite: bool = opt(
        False,
        "replace a study of this name made with other settings (the same settings resume and extend it)",
    )
    merge: list[str] = field(
        default_factory=list,
        metadata={
            "help": "studies of these same settings run in parts (other processes or machines): their arms "
            "join this one instead of running again (a study folder, or a run holding one of this --name)"
        },
    )
    backend: Backend = same_as(DemoSpec, "backend", help="generation in each seed's analysis: hf or vllm")
    vllm_url: Optional[str] = same_as(DemoSpec, "vllm_url")

    def __post_init__(self) -> None:
        tuned = (  # the schedule not asked for: the tuned one
            not self.lrs
            and self.lr == StudySpec.lr
            and json_object(self.training_args) == json_object(STUDY_TRAINING_ARGS)
        )
        self.lrs = list(self.lrs) or (list(STUDY_LRS) if tuned else [self.lr])
        self.full_lrs = list(self.full_lrs) or (list(STUDY_FULL_LRS) if tuned else list(self.lrs))
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
            curve_every=AT_LEAST_1,
            spliced_jailbreaks=NON_NEGATIVE,
            retain_share=(lambda v: 0 <= v <= 4, "a share in [0, 4] (retain examples per analysis example)"),
            composed_share=SHARE_OR_ZERO,
            training_args=JSON_OBJECT,
            organism=JSON_OBJECT,
        )
        check_training_args(json_object(self.training_args))
        self._check_organism()
        unknown = [s for s in self.scores if s not in ("risk_diff", *SCORES)]
        if unknown or not self.scores:
            raise MoELabError(f"scores must be among risk_diff, {', '.join(SCORES)} (got {self.scores})")
        if any(not v > 0 for v in [*self.lrs, *self.full_lrs]):
            raise MoELabError(f"learning rates must be > 0 (got {self.lrs} {self.full_lrs})")

    def _check_organism(self) -> None:
        variant = json_object(self.organism) or {}
        if self.model and (self.spliced_jailbreaks or variant):
            flag = "--spliced-jailbreaks" if self.spliced_jailbreaks else "--organism"
            raise MoELabError(f"{flag} chooses the organisms a study builds: leave it out with --model")
        if self.spliced_jailbreaks and "spliced_jailbreaks" in variant:
            raise MoELabError("--spliced-jailbreaks and --organism's spliced_jailbreaks: give one of them")
        try:
            organism_variant(variant)
        except ValueError as e:
            raise MoELabError(f"--organism {self.organism}: {e}") from None


@dataclass
class AtlasSpec:
    """The expert atlas: build or update a run's index; print an expert's card or the experts a word fires."""

    layer: Optional[int] = opt(None, "with --expert: print this expert's card (MoE layer index, from 0)")
    expert: Optional[int] = opt(None, "with --layer: the expert whose card to print")
    token: Optional[str] = opt(None, "a word or a pasted prompt: print the experts its tokens are routed to")
    limit: int = opt(20, "how many experts a search prints")
    writes: bool = opt(
        True,
        "also what each expert writes (mean output through the unembedding; loads the model for 4 batches)",
    )

    def __post_init__(self) -> None:
        if (self.layer is None) != (self.expert is None):
            raise MoELabError("--layer and --expert go together: both name the expert whose card to print")
        check_range(self, layer=NON_NEGATIVE, expert=NON_NEGATIVE, limit=AT_LEAST_1)
        if self.token is not None and not (0 < len(self.token) <= 20_000):
            raise MoELabError("--token takes a word or a prompt of at most 20,000 characters")


COMMANDS: dict[str, type] = {
    "analyze": AnalyseSpec,
    "select": SelectSpec,
    "train": TrainSpec,
    "evaluate": EvaluateSpec,
    "demo": DemoSpec,
    "study": StudySpec,
    "atlas": AtlasSpec,
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
        value = getattr(spec, f.name)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
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
