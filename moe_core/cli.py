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


def demo(args: argparse.Namespace) -> Any:
    """The whole pipeline on the organism, for a first look (and the README's main command)."""
    from .demo import measure_behaviour

    args.model = ORGANISM
    args.demo_sets, args.safe, args.unsafe = True, None, None
    run = analyze(args)
    args.run = str(run.path)
    args.name = args.name_mask
    mask = select(args)
    model, tok = load_any_model(ORGANISM)
    before = measure_behaviour(model, tok, split="heldout")
    print("\norganism behaviour on held-out prompts:", _fmt_rates(before))
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
    g.add_argument(name_flag, dest="name" if name_flag == "--name" else "name_mask", default="unsafe_experts", help="mask name in the run")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_core", description="MoE Safety Lab: find and fine-tune the unsafe experts of an MoE LLM.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--runs-root", help="where runs live (default: $MOE_LAB_RUNS or ./runs)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="organism -> analysis -> expert selection, end to end")
    _add_analysis_args(d)
    _add_select_args(d, name_flag="--mask-name")
    d.add_argument("--name", default="demo", help="run name")
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

    r = sub.add_parser("runs", help="list runs")
    r.set_defaults(func=runs_cmd)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
