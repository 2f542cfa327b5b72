"""Command line, generated from the pipeline's specs: every step headless, on the run store the app uses.

    python -m moe_core demo                      # organism -> analysis -> experts -> training -> evaluation
    python -m moe_core analyze --model DIR --safe safe.csv --unsafe unsafe.csv
    python -m moe_core select --run runs/<id> --method top_n --n 8
    python -m moe_core train --run runs/<id> --mask-mode per_batch
    python -m moe_core evaluate --run runs/<id> --steer-mask unsafe_experts
    python -m moe_core atlas --run runs/<id> --layer 3 --expert 7   # the expert atlas: build, a card, --token WORD
    python -m moe_core runs                      # list runs

Each step's flags and defaults come from its dataclass in ``pipeline.py`` (``HfArgumentParser``).
A problem the user can fix (a ``MoELabError``) prints one ``error: ...`` line and exits 2;
anything else is a bug: its traceback is printed and the exit status is 1.

long module: one short handler per subcommand (ten of them) and the error boundary they share; split by
command it would scatter one table of handlers over as many files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from moe_core import pipeline as P
from moe_core.analysis.analyse import finalize_analysis
from moe_core.analysis.atlas_query import Atlas, atlas_answer
from moe_core.demo import Stage, run_demo
from moe_core.doctor import diagnose
from moe_core.errors import MoELabError
from moe_core.eval.evaluation import load_evaluation, to_markdown
from moe_core.eval.study_summary import (
    headline,
    load_curves,
    load_study,
    reference_report,
    share_label,
    summary_markdown,
)
from moe_core.eval.study_targets import (
    budget_targets,
    nearest_budget,
    target_markdown,
    wrapper_split,
)
from moe_core.model.adapter import apply_cpu_thread_policy, load_model
from moe_core.model.loading import load_tokenizer_of, model_dir
from moe_core.store.atomic import as_os_error
from moe_core.store.checks import json_object
from moe_core.store.events import JobStopped
from moe_core.store.files import os_error_message, read_parquet
from moe_core.store.lease import RunBusyError, holder, secondary_rank
from moe_core.store.manifest import default_runs_root, list_runs
from moe_core.store.run import Run
from moe_core.store.steps import step_outcome
from moe_core.study import new_study_run, run_study
from moe_core.train.expert_rows import apply_expert_delta, save_merged
from moe_core.train.hf_args import LOCKED, changed, cli_dataclass

log = logging.getLogger("moe_core")
HF_TRAINING_ARGS = cli_dataclass()  # every open TrainingArguments field as a flag of `train`


class CLIError(MoELabError):
    """A usage problem reported as one line, exit status 2."""


# -- progress ---------------------------------------------------------------------------------
class TqdmProgress:
    """A ``progress(done, total, message)`` callable drawing a tqdm bar on stderr."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar: Any = None
        self.finished = False  # a closing "done" call after the bar completed draws no second bar

    def __call__(self, done: int, total: int, message: str = "") -> None:
        from tqdm.auto import tqdm

        if self.bar is None and self.finished and done >= total:
            return
        self.finished = False
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.bar.total = total
        self.bar.n = done
        if message:
            self.bar.set_postfix_str(message[:60])
        self.bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.finished = self.bar.n >= (self.bar.total or 0)
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def job_progress(
    run: Any, job_name: str | None, desc: str
) -> Iterator[tuple[Callable[..., None], Callable[[], bool]]]:
    """Progress callable + stop check; with ``--job NAME`` also job events/status in the run.

    The app launches CLI commands with ``--job`` and polls what this writes, so a browser refresh
    never touches the work itself.
    """
    bar = TqdmProgress(desc)
    try:
        if not job_name or secondary_rank():  # rank 0 of `accelerate launch` reports the job
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


def _sub_job(job: str | None, stage: str) -> str | None:
    """Job name of a later stage of a job (``demo`` -> ``demo-train-full``), so the app can show each."""
    return None if job is None else f"{job}-{stage}"


def _stopping(progress: Callable[..., None], should_stop: Callable[[], bool]) -> Callable[..., None]:
    """A progress callable that ends the step (``JobStopped``) once a stop was requested."""

    def wrapped(done: int, total: int, message: str = "") -> None:
        progress(done, total, message)
        if should_stop():
            raise JobStopped(f"stopped on request after {done} of {total} steps")

    return wrapped


def _was_stopped(run: Any, job: str | None) -> bool:
    """Whether the job ended on a stop request (``Job.running`` records it and swallows ``JobStopped``)."""
    return bool(job) and (run.job(job).read_status() or {}).get("state") == "stopped"


# -- commands ---------------------------------------------------------------------------------
def _print_top(aggregated: Any, n: int) -> None:
    cols = [
        c
        for c in ("Layer_Expert", "risk_diff", "risk_diff_std", "sign_consistency", "n_batches")
        if c in aggregated.columns
    ]
    print(f"\ntop {n} experts by risk difference (unsafe rate - safe rate):")
    print(aggregated.head(n)[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def analyze(spec: P.AnalyseSpec, args: argparse.Namespace) -> Any:
    """Analyse (or resume); returns the run, or None when the job was stopped."""

    run, plan = P.analysis_run(
        spec, args.run, args.runs_root
    )  # refuses another model/settings before writing
    print(f"run: {run.path}")
    try:
        with run.writing(args.job or "analysis"):
            with job_progress(run, args.job, "analysis") as (progress, should_stop):
                P.analyse(spec, run, progress=progress, should_stop=should_stop, plan=plan)
            if _was_stopped(run, args.job):
                print(f"analysis stopped; resume with `python -m moe_core analyze --run {run.path}`")
                return None
            result = finalize_analysis(run)
    except Exception:
        if args.run is None:  # this command made the run: a failure before any batch leaves no empty run
            run.discard_if_empty()
        raise
    _print_top(result.aggregated, spec.top)
    if spec.quality_filter:
        print(
            f"quality filter dropped: {result.dropped['safe']} safe, {result.dropped['unsafe']} unsafe samples"
        )
    return run


def select(spec: P.SelectSpec, args: argparse.Namespace) -> Any:
    run = P.open_run(args.run, args.runs_root)
    masks = P.select(spec, run)
    path = run.path_for("mask", name=spec.name)
    if isinstance(masks, dict):
        print(
            f"{len(masks)} per-batch masks, {sum(m.count() for m in masks.values())} experts in all -> {path}"
        )
    else:
        print(f"{masks.count()} experts: " + ", ".join(f"L{l}E{e}" for l, e in masks.experts()))
        print(f"mask -> {path}")
    return masks


def train(spec: P.TrainSpec, args: argparse.Namespace) -> Any:
    """Train; returns the TrainingResult, or None when the job was stopped."""
    run = P.open_run(args.run, args.runs_root)
    name = spec.training_name()
    result = None
    with job_progress(run, args.job, f"training {name}") as (progress, should_stop):
        result = P.train(spec, run, progress=_stopping(progress, should_stop))
    if result is None:
        print(f"training {name} stopped; run the same command again to resume it from its last checkpoint")
        return None
    if result.merged_path is None and secondary_rank():
        return result  # another rank of `accelerate launch`: rank 0 reports (and wrote) the result
    print(f"trained {name}: {result.report}")
    print(f"merged model -> {result.merged_path}")
    return result


def evaluate(spec: P.EvaluateSpec, args: argparse.Namespace) -> Any:
    """Evaluate; returns the comparison table, or None when the job was stopped."""

    run = P.open_run(args.run, args.runs_root)
    table = None
    with job_progress(run, args.job, "evaluation") as (progress, should_stop):
        table = P.evaluate(spec, run, progress=_stopping(progress, should_stop))
    if table is None:
        print("evaluation stopped")
        return None
    print(to_markdown(table))
    if spec.shift:  # the evaluate step computed them (eval/shift_<name>.parquet)
        for name in [n for n, info in run.trainings().items() if info.get("merged")]:
            df = read_parquet(run.path / "eval" / f"shift_{name}.parquet")
            print(f"\nrouting shift of {name} (largest |delta| first; eval/shift_{name}.parquet):")
            print(df.head(8).to_string(index=False, float_format=lambda v: f"{v:+.3f}"))
    return table


def demo(spec: P.DemoSpec, args: argparse.Namespace) -> Any:
    """The whole pipeline on the organism: analysis, experts, training + baselines, evaluation.

    With ``--job NAME`` each stage is its own job (``NAME``, ``NAME-train-<baseline>``,
    ``NAME-eval``); a stop request on any of them ends the demo there.
    """
    commands = {"analyze": analyze, "select": select, "train": train, "evaluate": evaluate}

    def run_stage(stage: Stage, run: Run | None) -> tuple[Run | None, Any]:
        job = args.job if stage.job_suffix is None else _sub_job(args.job, stage.job_suffix)
        stage_args = argparse.Namespace(**{**vars(args), "job": job})
        if run is not None:
            stage_args.run = str(run.path)
        result = commands[stage.command](stage.spec, stage_args)
        return (result if stage.command == "analyze" else run), result

    run = run_demo(spec, run_stage)
    if run is not None:
        print(f"\nrun directory: {run.path}")
        if not spec.skip_training:
            print_reference(run, spec)
    return run


def print_reference(run: Run, spec: P.DemoSpec) -> None:
    """The result across seeds (the committed reference study), and where this one run falls among them."""
    text = reference_report(load_evaluation(run, spec.evaluate_spec().name)[1], f"experts-{spec.mask_name}")
    if text:
        print("\n" + text)


def study(spec: P.StudySpec, args: argparse.Namespace) -> Any:
    """Chosen vs random experts over budgets and seeds (+ full fine-tuning, steering) -> table and figure."""

    run = P.open_run(args.run, args.runs_root) if args.run else new_study_run(spec, args.runs_root)
    print(f"run: {run.path}")
    summary = None
    with run.writing(args.job or "study"), step_outcome(run):  # one writer; never left "running" on an error
        with job_progress(run, args.job, "selection study") as (progress, should_stop):
            _, summary = run_study(spec, run, progress=_stopping(progress, should_stop))
    if summary is None:
        print("study stopped; partial results are in the run")
        return None
    print(summary_markdown(summary))
    budget = nearest_budget(summary)
    print("\n" + headline(summary, budget))
    results = load_study(run, spec.name)[0]
    every = budget_targets(results)  # the headline budget's rows are its target_table
    goals = every[every["budget"] == share_label(budget)].drop(columns="budget") if len(every) else every
    if len(goals):
        print(
            f"\nIssue 17's targets at {budget:g} of the experts, seed pairs meeting each:\n{target_markdown(goals)}"
        )
    if len(every) and every["budget"].nunique() > 1:
        print(f"\nThe same at every budget of the study:\n{target_markdown(every)}")
    if len(split := wrapper_split(results, load_curves(run, spec.name), budget)):
        print(f"\nCompliance left at the chosen points (median of seed pairs):\n{target_markdown(split)}")
    print(f"\nstudy -> {run.path_for('study', name=spec.name)}")
    return summary


def atlas(spec: P.AtlasSpec, args: argparse.Namespace) -> Any:
    """Build or update the run's expert atlas; then an expert's card (--layer/--expert) or a search (--token)."""
    run = P.open_run(args.run, args.runs_root)
    with job_progress(run, args.job, "expert atlas") as (progress, _):
        meta = P.atlas(spec, run, progress)
    print(
        f"atlas of run {run.id}: {len(meta['shards'])} batches, {meta['safe_tokens'] + meta['unsafe_tokens']} tokens"
    )
    if spec.layer is not None or spec.token is not None:
        print("\n" + atlas_answer(Atlas.open(run), spec, load_tokenizer_of(run)))
    return meta


def apply_delta(args: argparse.Namespace) -> Path:
    """Base model + expert_delta.safetensors -> a merged model directory (no training code needed)."""

    model, tok = load_model(model_dir(args.base), device="cpu", dtype="float32")
    n = apply_expert_delta(model, args.delta)
    out = save_merged(model, tok, args.out)
    print(f"applied {n} expert tensors from {args.delta} -> {out}")
    return out


def runs_cmd(args: argparse.Namespace) -> None:
    """One line per run: id, name, model, created, each step's status (a damaged run says why)."""

    root = Path(args.runs_root) if args.runs_root else default_runs_root()
    rows = list_runs(root)
    if not rows:
        print(f"no runs under {root}")
    for r in rows:
        if r.error:
            print(f"{r.id}  DAMAGED: {r.error}  (try `python -m moe_core doctor --run {r.path}`)")
            continue
        steps = ", ".join(f"{k} {v}" for k, v in r.steps.items()) or "no steps yet"
        print(
            f"{r.id}  {r.name!r}  model {r.model or '-'}  created {(r.created or '?')[:16].replace('T', ' ')}  {steps}"
        )


def doctor_cmd(args: argparse.Namespace) -> None:
    """List damaged or missing pieces of a run; repair what can be recomputed (unless --check-only)."""

    run = P.open_run(args.run, args.runs_root)
    found = diagnose(run, repair=not args.check_only)
    for f in found:
        print(f.line())
    left = [f for f in found if not f.repaired]
    if left:
        raise CLIError(
            f"{len(left)} problem(s) in run {run.id} "
            + (
                "(listed above; run without --check-only to repair what can be recomputed)"
                if args.check_only
                else "need the fix named above"
            )
        )
    print(f"run {run.id}: " + ("all repaired" if found else "no problems found"))


@contextlib.contextmanager
def holding(args: argparse.Namespace) -> Iterator[None]:
    """With ``--run``: this command is the run's one writer for its whole length (``RunBusyError`` otherwise).

    A refused job (``--job``) records the refusal in its own status, so the app shows it.
    """
    if not getattr(args, "run", None):
        yield
        return

    run = P.open_run(args.run, args.runs_root)
    try:
        with run.writing(args.job or args.command):
            yield
    except RunBusyError as e:
        if (
            args.job and (holder(run.path) or {}).get("job") != args.job
        ):  # never touch the live job's own files
            run.job(args.job).write_status("error", error=str(e))
        raise


STEPS: dict[str, Callable[..., Any]] = {
    "analyze": analyze,
    "select": select,
    "train": train,
    "evaluate": evaluate,
    "demo": demo,
    "study": study,
    "atlas": atlas,
}


# -- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """Top-level options + one subcommand per pipeline spec (flags, defaults and help from the dataclass)."""
    p = argparse.ArgumentParser(
        prog="python -m moe_core",
        description="MoE Safety Lab: find and fine-tune the unsafe experts of an MoE LLM.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--runs-root", help="where runs live (default: $MOE_LAB_RUNS or ./runs)")
    # the same two options after the command too (`runs --runs-root X`); SUPPRESS: absent there, the top-level value stays
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    common.add_argument(
        "--runs-root", default=argparse.SUPPRESS, help="where runs live (default: $MOE_LAB_RUNS or ./runs)"
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    add = partial(sub.add_parser, parents=[common])
    for command, cls in P.COMMANDS.items():
        sp = add(
            command,
            dataclass_types=[cls, HF_TRAINING_ARGS] if command == "train" else [cls],
            help=cls.__doc__.splitlines()[0],
            description=cls.__doc__.splitlines()[0],
        )
        needs_run = command in ("select", "train", "evaluate", "atlas")
        sp.add_argument(
            "--run",
            required=needs_run,
            help="run directory or id" + ("" if needs_run else " (default: a new run)"),
        )
        sp.add_argument(
            "--job", help="also write job events/status into the run under this name (used by the app)"
        )
        sp.set_defaults(spec_class=cls)
        if command == "train":
            for name, reason in LOCKED.items():  # refused with the reason, not "unrecognized arguments"
                flags = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])
                sp.add_argument(*flags, action=_Locked, nargs="?", help=argparse.SUPPRESS, reason=reason)
    x = add("apply-delta", help="apply a trained expert delta to a base model and save the merged model")
    x.add_argument("--base", required=True, help="base model directory (or 'organism')")
    x.add_argument("--delta", required=True, help="expert_delta.safetensors from a training")
    x.add_argument("--out", required=True, help="output model directory")
    x.set_defaults(func=apply_delta)
    r = add("runs", help="list runs")
    r.set_defaults(func=runs_cmd)
    d = add("doctor", help="check a run for damaged or missing pieces and repair what can be recomputed")
    d.add_argument("--run", required=True, help="run directory or id")
    d.add_argument("--check-only", action="store_true", help="only list the problems, change nothing")
    d.set_defaults(func=doctor_cmd)
    return p


class _Locked(argparse.Action):
    """A TrainingArguments flag the method fixes: using it is a one-line error saying why."""

    def __init__(self, *args: Any, reason: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reason = reason

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        parser.error(f"{self.option_strings[0]} is fixed by the method: {self.reason}")


def spec_from_args(args: argparse.Namespace) -> Any:
    """The step spec a parsed command line describes (``train``: Hugging Face flags into training_args)."""
    cls = args.spec_class
    values = {f.name: getattr(args, f.name) for f in fields(cls)}
    if cls is P.TrainSpec:
        given = {f.name: getattr(args, f.name) for f in fields(HF_TRAINING_ARGS)}
        unset = HfArgumentParser([HF_TRAINING_ARGS]).parse_args_into_dataclasses([])[0]
        flags = changed(HF_TRAINING_ARGS(**given), unset)
        if flags:  # flags win over the same keys in --training-args
            merged = {**(json_object(values["training_args"]) or {}), **flags}
            values["training_args"] = json.dumps(merged, sort_keys=True, default=str)
    return cls(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Oversubscribed cores slow small models several-fold when the app, a job and tests share a
    # small machine (see models.default_cpu_threads).

    apply_cpu_thread_policy()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if getattr(args, "spec_class", None) is not None:
            spec = spec_from_args(args)
            with holding(args):
                STEPS[args.command](spec, args)
        else:
            args.func(args)
    except MoELabError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished batches are saved, resume with --run RUN", file=sys.stderr)
        return 130
    except Exception as e:
        # a full disk or a read-only folder is the user's to fix, not a bug (also when a library wraps it)
        message = os_error_message(os_error) if (os_error := as_os_error(e)) is not None else None
        if message is not None and not args.verbose:
            print(f"error: {message}", file=sys.stderr)
            return 2
        if isinstance(e, OSError) and args.verbose:
            raise
        log.exception(
            "internal error (a bug in moe_core, not in your input); please report it with this traceback"
        )
        return 1
    return 0
