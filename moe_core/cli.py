"""Command line: every step headless, on the same run store the app uses.

    python -m moe_core demo                      # organism -> analysis -> experts (-> training)
    python -m moe_core analyze --model DIR --safe safe.csv --unsafe unsafe.csv
    python -m moe_core select --run runs/<id> --method top_n --n 8
    python -m moe_core runs                      # list runs

Errors a user can fix (bad file, missing column, non-MoE model) print one clear line and exit 2;
nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger("moe_core")

ORGANISM = "organism"


class CLIError(Exception):
    """A usage problem reported as one line, exit status 2."""


# -- progress ---------------------------------------------------------------------------------
class TqdmProgress:
    """A ``progress(done, total, message)`` callable drawing a tqdm bar on stderr."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar: Any = None

    def __call__(self, done: int, total: int, message: str = "") -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="batch", file=sys.stderr, dynamic_ncols=True)
        self.bar.total = total
        self.bar.n = done
        if message:
            self.bar.set_postfix_str(message[:60])
        self.bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# -- shared steps -----------------------------------------------------------------------------
def load_any_model(name: str, progress: Callable[..., None] | None = None) -> tuple[Any, Any]:
    """``organism`` (built on demand) or a local directory / HF id."""
    if name == ORGANISM:
        from .demo import build_organism, load_organism

        build_organism(progress=progress or TqdmProgress("building organism"))
        return load_organism()
    from .models import load_model

    return load_model(name)


def _prompt_sets(args: argparse.Namespace) -> tuple[list, list]:
    from .prompts import demo_sets, load_prompts, pair_by_row

    if args.demo_sets or not (args.safe or args.unsafe):
        if args.safe or args.unsafe:
            raise CLIError("pass either --demo-sets or both --safe and --unsafe, not a mix")
        return demo_sets(split="train", mode=args.demo_mode, seed=args.seed)
    if not (args.safe and args.unsafe):
        raise CLIError("pass both --safe FILE and --unsafe FILE (or --demo-sets)")
    safe = load_prompts(args.safe, column=args.safe_column, label="safe", limit=args.limit)
    unsafe = load_prompts(args.unsafe, column=args.unsafe_column, label="unsafe", limit=args.limit)
    if args.pair_by_row:
        safe, unsafe = pair_by_row(safe, unsafe)
    return safe, unsafe


def _new_run(args: argparse.Namespace, config: dict[str, Any]):
    from .runs import Run, default_runs_root

    root = Path(args.runs_root) if args.runs_root else default_runs_root()
    return Run.create(root, name=args.name, config=config, model=args.model)


def _open_run(path: str, runs_root: str | None = None):
    from .runs import Run, default_runs_root

    p = Path(path)
    if not (p / "manifest.json").is_file():
        cand = (Path(runs_root) if runs_root else default_runs_root()) / path
        if not (cand / "manifest.json").is_file():
            raise CLIError(f"no run at {path} (nor {cand}); list runs with `python -m moe_core runs`")
        p = cand
    return Run.open(p)


@contextlib.contextmanager
def job_progress(run: Any, job_name: str | None, desc: str) -> Iterator[tuple[Callable[..., None], Callable[[], bool]]]:
    """Progress callable + stop check; with ``--job NAME`` also job events/status in the run.

    The app launches CLI commands with ``--job`` and polls what this writes, so a browser refresh
    never touches the work itself.
    """
    bar = TqdmProgress(desc)
    try:
        if not job_name:
            yield bar, lambda: False
            return
        job = run.job(job_name)
        with job.running(message=desc) as events:

            def progress(done: int, total: int, message: str = "") -> None:
                bar(done, total, message)
                events.progress(done, total, message)

            yield progress, job.stop_requested
    finally:
        bar.close()


def _analysis_config(args: argparse.Namespace, previous: Any) -> Any:
    """Flags given on the command line override the run's previous settings, then the defaults."""
    from dataclasses import asdict

    from .analysis import AnalysisConfig

    base = asdict(previous) if previous else {}
    for key in ("scope", "max_new_tokens", "judge"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    if args.quality_filter:
        base["quality_filter"] = True
    return AnalysisConfig(**base)


def _compose(args: argparse.Namespace) -> Any:
    from .batches import compose_batches

    safe, unsafe = _prompt_sets(args)
    plan = compose_batches(safe, unsafe, batch_size=args.batch_size, safe_ratio=args.safe_ratio, seed=args.seed)
    if args.max_batches:
        plan = dataclasses.replace(plan, batches=plan.batches[: args.max_batches])
    return plan


def analyze(args: argparse.Namespace) -> Any:
    from .analysis import analysis_config_of, run_analysis

    if args.run:  # an existing run: analyse its saved plan; finished batches are skipped (resume)
        run = _open_run(args.run, args.runs_root)
        plan = None if run.path_for("plan").exists() else _compose(args)
        config = _analysis_config(args, analysis_config_of(run))
        args.model = args.model or run.manifest.get("model") or ORGANISM
        if run.manifest.get("model") != args.model:
            run.update(model=args.model)
    else:
        args.model = args.model or ORGANISM
        config = _analysis_config(args, None)
        plan = _compose(args)
        run = _new_run(args, {"batch_size": args.batch_size, "safe_ratio": args.safe_ratio, "seed": args.seed})
    print(f"run: {run.path}")
    with job_progress(run, args.job, "analysis") as (progress, should_stop):
        model, tok = load_any_model(args.model, progress)
        result = run_analysis(run, model, tok, plan, config, progress=progress, should_stop=should_stop)
    _print_top(result.aggregated, args.top)
    if config.quality_filter:
        print(f"quality filter dropped: {result.dropped['safe']} safe, {result.dropped['unsafe']} unsafe samples")
    return run


def _print_top(aggregated: Any, n: int) -> None:
    cols = [c for c in ("Layer_Expert", "risk_diff", "risk_diff_std", "sign_consistency", "n_batches") if c in aggregated.columns]
    print(f"\ntop {n} experts by risk difference (unsafe rate - safe rate):")
    print(aggregated.head(n)[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def select(args: argparse.Namespace) -> Any:
    from .masks import save_batch_masks
    from .selection import SelectionConfig, select_experts, select_per_batch

    from .analysis import model_info_of
    from .runs import read_parquet

    run = _open_run(args.run, args.runs_root)
    if not run.path_for("risk_aggregated").exists():
        raise CLIError(f"run {run.id} has no risk table yet; run `python -m moe_core analyze` first")
    info = model_info_of(run)
    nl, ne = info.get("num_layers"), info.get("num_experts")
    cfg = SelectionConfig(method=args.method, n=args.n, threshold=args.threshold, per_layer_k=args.per_layer_k, top_p=args.top_p, seed=args.seed)
    if args.per_batch:
        masks = select_per_batch(read_parquet(run.path_for("risk_per_batch")), cfg, nl, ne)
        path = save_batch_masks(run.path_for("mask", name=args.name), masks)
        print(f"{len(masks)} per-batch masks, {sum(m.count() for m in masks.values())} experts in all -> {path}")
        return masks
    mask = select_experts(read_parquet(run.path_for("risk_aggregated")), cfg, nl, ne)
    path = mask.save(run.path_for("mask", name=args.name))
    print(f"{mask.count()} experts: " + ", ".join(f"L{l}E{e}" for l, e in mask.experts()))
    print(f"mask -> {path}")
    return mask


def runs_cmd(args: argparse.Namespace) -> None:
    from .runs import default_runs_root, list_runs

    root = Path(args.runs_root) if args.runs_root else default_runs_root()
    rows = list_runs(root)
    if not rows:
        print(f"no runs under {root}")
    for r in rows:
        print(r)


def _load_masks(run: Any, name: str, per_batch: bool) -> Any:
    from .masks import ExpertMask, load_batch_masks

    path = run.path_for("mask", name=name)
    if not path.exists():
        have = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.exists() else []
        raise CLIError(f"run {run.id} has no mask named {name!r} (masks: {have or 'none'}); run `python -m moe_core select` first")
    data = json.loads(path.read_text())
    if "batches" in data:
        masks = load_batch_masks(path)
        return masks if per_batch else functools.reduce(ExpertMask.union, masks.values())
    if per_batch:
        raise CLIError(f"mask {name!r} is one global mask; --mask-mode per_batch needs a mask saved with `select --per-batch`")
    return ExpertMask.load(path)


def train(args: argparse.Namespace) -> Any:
    """SFT set from the run's analysis batches -> expert-masked training -> merged model in the run."""
    from .analysis import load_batch_data_list
    from .sampler import BatchPreservingSampler
    from .sft import create_batch_aware_dataset, create_batch_structured_dataset, save_structured_batches
    from .training import ExpertMaskingConfig, train_experts

    run = _open_run(args.run, args.runs_root)
    per_batch = args.mask_mode == "per_batch"
    masks = _load_masks(run, args.mask, per_batch) if args.baseline != "full" else None
    name = args.name or (args.baseline if args.baseline != "experts" else f"experts-{args.mask}")
    out = run.path_for("train", name=name)
    model_name = args.model or run.manifest.get("model") or ORGANISM
    with job_progress(run, args.job, f"training {name}") as (progress, _stop):
        model, tok = load_any_model(model_name, progress)
        batches = create_batch_structured_dataset(load_batch_data_list(run), seed=args.seed)
        save_structured_batches(batches, run.path_for("sft") / "batches")
        dataset = create_batch_aware_dataset(batches, tok, max_length=args.max_length)
        size = BatchPreservingSampler(dataset, shuffle_batches=False).max_batch_size
        config = ExpertMaskingConfig(
            output_dir=str(out / "checkpoints"), per_device_train_batch_size=size, learning_rate=args.lr,
            num_train_epochs=args.epochs, weight_decay=args.weight_decay, mask_mode=args.mask_mode,
            baseline=args.baseline, random_seed=args.seed, seed=args.seed, train_router=args.train_router,
            router_consistency_loss=args.router_consistency, router_consistency_weight=args.router_consistency_weight,
            save_strategy="no", logging_steps=1, report_to="none", lr_scheduler_type="constant",
        )
        if masks is None:  # the full baseline trains everything; the trainer still wants a shape
            from .masks import ExpertMask
            from .models import MoEAdapter

            ad = MoEAdapter.for_model(model)
            masks = ExpertMask.empty(ad.num_layers, ad.num_experts)
        run.set_step(f"train:{name}", "running", mask=args.mask, baseline=args.baseline, mask_mode=args.mask_mode)
        result = train_experts(model, tok, dataset, masks, config, output_dir=out, progress=progress, save_merged_model=True)
    run.set_step(f"train:{name}", "done", merged=str(result.merged_path), report=result.report,
                 train_loss=result.metrics.get("train_loss"))
    print(f"trained {name}: {result.report}")
    print(f"merged model -> {result.merged_path}")
    return result


def evaluate(args: argparse.Namespace) -> Any:
    """Base vs every trained model of the run (and steering) on held-out sets; a table in the run."""
    from .evaluation import EvalEntry, compare_models, comparison_table, default_eval_sets, save_evaluation, to_markdown
    from .masks import ExpertMask

    run = _open_run(args.run, args.runs_root)
    base = args.model or run.manifest.get("model") or ORGANISM
    base_dir = _model_dir(base)
    entries = [EvalEntry("base", base_dir)]
    for step, info in sorted((run.manifest.get("steps") or {}).items()):
        if step.startswith("train:") and info.get("status") == "done" and info.get("merged"):
            entries.append(EvalEntry(step.split(":", 1)[1], info["merged"]))
    if args.steer_mask:
        entries.append(EvalEntry(f"steer-off-{args.steer_mask}", base_dir, steer_deactivate=ExpertMask.load(run.path_for("mask", name=args.steer_mask))))
    sets = default_eval_sets(split="heldout", limit=args.eval_limit)
    with job_progress(run, args.job, "evaluation") as (progress, _stop):
        responses, summary = compare_models(entries, sets, judge=args.judge or "keyword", max_new_tokens=args.max_new_tokens or 48, progress=progress)
        save_evaluation(run, responses, summary, name=args.name)
    table = comparison_table(summary)
    run.set_step(f"evaluation:{args.name}", "done", models=[e.name for e in entries])
    print(to_markdown(table))
    if args.shift:
        _routing_shifts(run, [e for e in entries if e.name != "base" and e.steer_deactivate is None], args.job)
    return table


def _routing_shifts(run: Any, entries: list, job: str | None) -> None:
    """Re-run the analysis on each trained model: how each expert's risk difference moved."""
    from .evaluation import routing_shift
    from .models import load_model

    for e in entries:
        with job_progress(run, None if job is None else f"{job}-shift-{e.name}", f"routing shift {e.name}") as (progress, _):
            model, tok = load_model(e.model_dir)
            df = routing_shift(run, model, tok, name=e.name, progress=progress)
        print(f"\nrouting shift of {e.name} (largest |delta| first; eval/shift_{e.name}.parquet):")
        print(df.head(8).to_string(index=False, float_format=lambda v: f"{v:+.3f}"))


def apply_delta(args: argparse.Namespace) -> Path:
    """Base model + expert_delta.safetensors -> a merged model directory (no training code needed)."""
    from .models import load_model
    from .training import apply_expert_delta, save_merged

    model, tok = load_model(_model_dir(args.base), device="cpu", dtype="float32")
    n = apply_expert_delta(model, args.delta)
    out = save_merged(model, tok, args.out)
    print(f"applied {n} expert tensors from {args.delta} -> {out}")
    return out


def _model_dir(name: str) -> str:
    if name == ORGANISM:
        from .demo import build_organism

        return str(build_organism())
    return name


def demo(args: argparse.Namespace) -> Any:
    """The whole pipeline on the organism: analysis, experts, training + baselines, evaluation."""
    args.model = args.model or ORGANISM
    # On the organism the jailbreak is decided while the model reads the prompt: prompt-token routing
    # picks experts whose training moves held-out jailbreak compliance further (see README results).
    args.scope = args.scope or "prompt"
    if not args.run:
        args.demo_sets, args.safe, args.unsafe = True, None, None
    run = analyze(args)
    args.run = str(run.path)
    select_args = argparse.Namespace(**{**vars(args), "name": args.mask_name})
    select(select_args)
    if args.skip_training:
        print(f"\nrun directory: {run.path}")
        return run
    for baseline in ("experts", "random_experts", "full"):
        train(argparse.Namespace(**{**vars(args), "baseline": baseline, "mask": args.mask_name, "name": None, "job": None if args.job is None else f"{args.job}-train-{baseline}"}))
    evaluate(argparse.Namespace(**{**vars(args), "steer_mask": args.mask_name, "shift": False, "name": "comparison", "model": None, "job": None if args.job is None else f"{args.job}-eval"}))
    print(f"\nrun directory: {run.path}")
    return run


def _fmt_rates(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


# -- parser -----------------------------------------------------------------------------------
def _add_analysis_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts and batches")
    g.add_argument("--safe", help="safe prompt file (CSV, JSON, JSONL, Parquet) or HF dataset name")
    g.add_argument("--unsafe", help="unsafe prompt file or HF dataset name")
    g.add_argument("--safe-column", help="column holding the safe prompts (auto-detected if omitted)")
    g.add_argument("--unsafe-column", help="column holding the unsafe prompts (auto-detected if omitted)")
    g.add_argument("--pair-by-row", action="store_true", help="pair safe row i with unsafe row i")
    g.add_argument("--demo-sets", action="store_true", help="use the built-in demo prompt sets")
    g.add_argument("--demo-mode", default="paired", choices=["paired", "unpaired"], help="demo sets: plain vs jailbroken goals (paired) or benign vs harmful")
    g.add_argument("--limit", type=int, help="read at most this many prompts per file")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per analysis (= training) batch")
    g.add_argument("--safe-ratio", type=float, default=0.5, help="share of safe prompts in each batch")
    g.add_argument("--seed", type=int, default=0, help="seed for batch composition and random baselines")
    g.add_argument("--max-batches", type=int, help="analyse only the first N batches")
    a = p.add_argument_group("analysis")
    a.add_argument("--model", help="'organism' (default), a local model directory, or a HF id")
    a.add_argument("--scope", choices=["prompt", "generated", "response"], help="tokens whose routing counts (default generated)")
    a.add_argument("--max-new-tokens", type=int, help="answer length per prompt (default 48)")
    a.add_argument("--quality-filter", action="store_true", help="keep a pair only if safe was refused and unsafe complied")
    a.add_argument("--judge", help="refusal judge: keyword (default) | http:<url>#<model> | hf:<dir>")
    a.add_argument("--run", help="analyse the batch plan saved in this run (resumes where it stopped)")
    a.add_argument("--job", help="also write job events/status into the run under this name (used by the app)")
    a.add_argument("--top", type=int, default=10, help="how many top experts to print")


def _add_select_args(p: argparse.ArgumentParser, name_flag: str = "--name") -> None:
    g = p.add_argument_group("expert selection")
    g.add_argument("--method", default="top_n", choices=["top_n", "threshold", "per_layer", "top_p", "random"], help="selection rule")
    g.add_argument("--n", type=int, default=8, help="top_n / random: number of experts")
    g.add_argument("--threshold", type=float, default=0.0, help="threshold: minimum risk difference")
    g.add_argument("--per-layer-k", type=int, default=1, help="per_layer: experts per MoE layer")
    g.add_argument("--top-p", type=float, default=0.5, help="top_p: cumulative share of positive risk")
    g.add_argument("--per-batch", action="store_true", help="one mask per analysis batch instead of one global mask")
    g.add_argument(name_flag, dest="name" if name_flag == "--name" else "mask_name", default="unsafe_experts", help="mask name in the run")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--mask", default="unsafe_experts", help="mask name in the run (from `select`)")
    g.add_argument("--mask-mode", default="union", choices=["union", "per_batch"], help="one mask for every step, or each batch's own")
    g.add_argument("--baseline", default="experts", choices=["experts", "full", "random_experts"], help="what to train")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    g.add_argument("--epochs", type=float, default=3, help="epochs over the analysis batches")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (frozen experts never move)")
    g.add_argument("--train-router", action="store_true", help="train the routers too")
    g.add_argument("--router-consistency", default="none", choices=["none", "forward", "reverse", "symmetric"], help="KL between mean safe and unsafe routing")
    g.add_argument("--router-consistency-weight", type=float, default=0.1, help="weight of that loss")
    g.add_argument("--max-length", type=int, default=256, help="max tokens per training example")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--steer-mask", help="also evaluate the base model with this mask's experts steered off")
    g.add_argument("--eval-limit", type=int, help="at most this many prompts per evaluation set")
    g.add_argument("--eval-max-new-tokens", dest="max_new_tokens", type=int, default=48, help="answer length")
    g.add_argument("--eval-judge", dest="judge", default="keyword", help="refusal judge spec")
    g.add_argument("--shift", action="store_true", help="also re-run the analysis on each trained model (routing shift)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_core", description="MoE Safety Lab: find and fine-tune the unsafe experts of an MoE LLM.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--runs-root", help="where runs live (default: $MOE_LAB_RUNS or ./runs)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="organism -> analysis -> expert selection, end to end")
    _add_analysis_args(d)
    _add_select_args(d, name_flag="--mask-name")
    d.add_argument("--name", default="demo", help="run name")
    d.add_argument("--skip-training", action="store_true", help="stop after expert selection")
    _add_train_args(d)
    d.add_argument("--steer-mask", help=argparse.SUPPRESS)
    d.add_argument("--eval-limit", type=int, help="at most this many prompts per evaluation set")
    d.set_defaults(func=demo)

    a = sub.add_parser("analyze", help="compose batches, capture routing, compute risk differences")
    _add_analysis_args(a)
    a.add_argument("--name", help="run name")
    a.set_defaults(func=analyze)

    s = sub.add_parser("select", help="choose unsafe experts from a run's risk table")
    s.add_argument("--run", required=True, help="run directory or id")
    _add_select_args(s)
    s.add_argument("--seed", type=int, default=0, help="seed for the random baseline")
    s.set_defaults(func=select)

    t = sub.add_parser("train", help="fine-tune only the chosen experts on the run's analysis batches")
    t.add_argument("--run", required=True, help="run directory or id")
    t.add_argument("--model", help="model to train (default: the run's model)")
    t.add_argument("--name", help="name of this training in the run (default from mask/baseline)")
    t.add_argument("--job", help="also write job events/status into the run under this name (used by the app)")
    t.add_argument("--seed", type=int, default=0, help="training seed (batch order, random baseline)")
    _add_train_args(t)
    t.set_defaults(func=train)

    e = sub.add_parser("evaluate", help="base vs trained models (and steering) on held-out prompt sets")
    e.add_argument("--run", required=True, help="run directory or id")
    e.add_argument("--model", help="base model (default: the run's model)")
    e.add_argument("--name", default="comparison", help="name of this evaluation in the run")
    e.add_argument("--job", help="also write job events/status into the run under this name (used by the app)")
    _add_eval_args(e)
    e.set_defaults(func=evaluate)

    x = sub.add_parser("apply-delta", help="apply a trained expert delta to a base model and save the merged model")
    x.add_argument("--base", required=True, help="base model directory (or 'organism')")
    x.add_argument("--delta", required=True, help="expert_delta.safetensors from a training")
    x.add_argument("--out", required=True, help="output model directory")
    x.set_defaults(func=apply_delta)

    r = sub.add_parser("runs", help="list runs")
    r.set_defaults(func=runs_cmd)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Oversubscribed cores slow small models several-fold when the app, a job and tests share a
    # small machine (see models.default_cpu_threads).
    from .models import apply_cpu_thread_policy

    apply_cpu_thread_policy()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (CLIError, ValueError, FileNotFoundError) as e:
        # Every user-fixable problem in moe_core is a ValueError subclass with an actionable message.
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished batches are saved, resume with --run RUN", file=sys.stderr)
        return 130
    return 0
