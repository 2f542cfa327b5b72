"""What keeping the trained states along each curve saves a study: the same study twice, ratios from one run.

    .venv/bin/python bench/bench_study_speed.py          # organism seed 0, 1 selector, 2 random draws, no full
    .venv/bin/python bench/bench_study_speed.py --seed 1

Once as the study runs (each arm's test at its chosen step, and each random arm's at every selector's step,
loads the state kept on its curve: ``train.snapshots``) and once with nothing kept (every test point trained
again from the base weights, as before). Prints the optimizer steps trained only to reach a test point in
each (counted: they do not depend on the machine's load), both times and their ratio (they do: run it on a
quiet machine), and whether the two results tables are identical row for row (they must be: the kept state
is the model trained to that step).
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


def timed_study(spec: StudySpec, root: str, keep_bytes: int) -> tuple[float, int, pd.DataFrame]:
    """(seconds, optimizer steps trained only to test a point, results table) of ``spec`` run into a new
    run under ``root`` with that memory bound. The steps are counted, so they do not depend on the load."""
    saved, snapshots.KEEP_BYTES = snapshots.KEEP_BYTES, keep_bytes
    train, steps = _Lab.train, [0]

    def counted(self: _Lab, mask: object, lr: float, callbacks: object = (), max_steps: int | None = None):
        steps[0] += max_steps or 0  # a curve trains its whole schedule; a test point, max_steps of it
        return train(self, mask, lr, callbacks, max_steps)

    _Lab.train = counted  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        run, _ = run_study(spec, runs_root=root)
        seconds = time.perf_counter() - start
    finally:
        snapshots.KEEP_BYTES, _Lab.train = saved, train  # type: ignore[method-assign]
    results = pd.read_parquet(run.path_for("study", name=spec.name) / "results.parquet")
    return seconds, steps[0], results


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
        kept_s, kept_steps, kept = timed_study(spec, tmp, snapshots.KEEP_BYTES)
        again_s, again_steps, again = timed_study(spec, tmp, 0)
    same = kept.reset_index(drop=True).equals(again.reset_index(drop=True))
    print(f"steps trained only to test a point: kept states {kept_steps}, trained again {again_steps}")
    print(f"kept states: {kept_s:.0f} s; trained again: {again_s:.0f} s; ratio {again_s / kept_s:.2f}x")
    print(f"results identical row for row: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
