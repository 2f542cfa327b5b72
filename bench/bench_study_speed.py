"""What keeping the trained states along each curve saves a study: the same study twice, ratios from one run.

    .venv/bin/python bench/bench_study_speed.py          # organism seed 0, 1 selector, 2 random draws, no full
    .venv/bin/python bench/bench_study_speed.py --seed 1

Once as the study runs (each arm's test at its chosen step, and each random arm's at every selector's step,
loads the state kept on its curve: ``train.snapshots``) and once with nothing kept (every test point trained
again from the base weights, as before). Prints both times, their ratio, and whether the two results tables
are identical row for row (they must be: the kept state is the model trained to that step).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from moe_core.model.adapter import apply_cpu_thread_policy
from moe_core.pipeline import StudySpec
from moe_core.study import run_study
from moe_core.study.lab import _Lab, _masks
from moe_core.train import snapshots


def timed_study(spec: StudySpec, root: str, keep_bytes: int) -> tuple[float, pd.DataFrame]:
    """(seconds, results table) of ``spec`` run into a new run under ``root`` with that memory bound."""
    saved, snapshots.KEEP_BYTES = snapshots.KEEP_BYTES, keep_bytes
    try:
        start = time.perf_counter()
        run, _ = run_study(spec, runs_root=root)
        seconds = time.perf_counter() - start
    finally:
        snapshots.KEEP_BYTES = saved
    results = pd.read_parquet(run.path_for("study", name=spec.name) / "results.parquet")
    return seconds, results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="organism seed (its organism is built once, first)")
    args = ap.parse_args(argv)
    apply_cpu_thread_policy()
    spec = StudySpec(
        seeds=[args.seed],
        budgets=[1 / 16],
        random_draws=2,
        scores=["risk_diff", "grad_attr"],
        steering=False,
        full=False,
        eval_limit=60,
    )
    with tempfile.TemporaryDirectory(prefix="bench-study-speed-") as tmp:
        lab = _Lab(spec.effective(), args.seed, Path(tmp), None)  # warm: organism, analysis, score tables
        for score in spec.scores:
            _masks(lab, 1 / 16, score)
        del lab
        kept_s, kept = timed_study(spec, tmp, snapshots.KEEP_BYTES)
        again_s, again = timed_study(spec, tmp, 0)
    same = kept.reset_index(drop=True).equals(again.reset_index(drop=True))
    print(f"kept states: {kept_s:.0f} s; trained again: {again_s:.0f} s; ratio {again_s / kept_s:.2f}x")
    print(f"results identical row for row: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
