"""AdamW or plain SGD for the study's arms? Issue 17's targets on the tuning organisms' validation curves under
each (README, "SGD instead of AdamW (stop 25)").

    .venv/bin/python bench/bench_study_optimizer.py                     # organisms 0-3, both optimizers
    .venv/bin/python bench/bench_study_optimizer.py --only sgd          # the study's default alone
    .venv/bin/python bench/bench_study_optimizer.py --only sgd-low      # stop 26: SGD at 0.3 and 1 (or sgd-momentum)
    .venv/bin/python bench/bench_study_optimizer.py --only sgd-composed # stop 27: composed jailbreaks in the batches
    .venv/bin/python bench/bench_study_optimizer.py --only sgd-l8       # stop 29: 8 layers (or sgd-e128: 128 experts)
    .venv/bin/python bench/bench_study_optimizer.py --only sgd-shared   # stop 30: a shared expert (Qwen2-MoE class)
    .venv/bin/python bench/bench_study_optimizer.py --studies DIR ...   # tables of studies already run

Runs ``python -m moe_core study`` on the tuning organisms (batch seed 0, 1/16 of the experts, 2 random draws, no
full fine-tuning or steering, validation every 3 steps), each variant in two processes of half the seeds
(side by side: one per core): AdamW at 1e-3 and 3e-3 (``--training-args '{}'``, the schedule before stop 25)
and the study's default, SGD at 3 and 10. Then prints, per variant, the targets read on the validation
curves alone (``study_targets.validation_targets``: the test split stays unread), on the grid of 3 steps and
of 6. About 40 minutes for both on 2 quiet cores (organism 0 alone under SGD: 11 minutes on one core).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from moe_core.eval.study_targets import validation_targets  # noqa: E402

NAME = "optimizer"
VARIANTS = {  # the study's training variants compared here: the optimizers, then later tries
    "adamw": ["--training-args", "{}", "--lrs", "0.001", "0.003"],
    "sgd": [],  # the study's defaults
    # tried in stop 26 (README, "Tried in stop 26"), run only with --only: SGD at lower rates, and with momentum
    "sgd-low": ["--lrs", "0.3", "1"],
    "sgd-momentum": [
        "--training-args",
        '{"optim": "sgd", "optim_args": "momentum=0.9"}',
        "--lrs",
        "0.3",
        "1",
    ],
    # tried in stop 27 (README, "Tried in stop 27"): half the analysis (= SFT) goals in composed jailbreaks
    "sgd-composed": ["--composed-share", "0.5"],
    # tried in stop 29 (README, "Tried in stop 29"): other organisms, the same corpus
    "sgd-l8": ["--organism", '{"num_layers": 8}'],
    "sgd-e128": ["--organism", '{"num_experts": 128, "expert_size": 32}'],
    # tried in stop 30 (README, "Tried in stop 30"): a shared expert of one expert's width (DeepSeek-V3's ratio)
    "sgd-shared": ["--organism", '{"shared_expert_size": 64}'],
}
DEFAULT_PAIR = ("adamw", "sgd")  # what a bare run compares
COMMON = "--budgets 0.0625 --random-draws 2 --steering false --full false --batch-seeds 0 --eval-limit 60"


def run(variant: str, seeds: list[int], root: Path) -> list[Path]:
    """The variant's study in two processes of half the seeds each -> their study folders."""
    half = (len(seeds) + 1) // 2
    procs = []
    for i, part in enumerate(p for p in (seeds[:half], seeds[half:]) if p):
        argv = [sys.executable, "-m", "moe_core", "study", "--runs-root", str(root / f"{variant}-{i}")]
        argv += [*COMMON.split(), "--curve-every", "3", "--name", NAME, "--seeds", *map(str, part)]
        log = (root / f"{variant}-{i}.log").open("w")
        procs.append((subprocess.Popen([*argv, *VARIANTS[variant]], cwd=ROOT, stdout=log, stderr=log), log))
    for p, log in procs:
        if p.wait(timeout=4 * 3600):
            tail = Path(log.name).read_text(errors="replace")[-3000:]
            raise SystemExit(f"a study of {variant} failed (exit {p.returncode}):\n{tail}")
        log.close()
    return sorted(root.glob(f"{variant}-*/*/study/{NAME}"))


def report(label: str, studies: list[Path]) -> None:
    curves = pd.concat([pd.read_parquet(s / "curves.parquet") for s in studies], ignore_index=True)
    for every in (3, 6):
        t = validation_targets(curves, every=every)
        print(f"\n== {label}: validation, a point every {every} steps")
        print(t.drop(columns=["batch_seed"]).to_string(index=False))
        counts = t.groupby("method")[["met", "compliance_met", "random_met", "benign_met"]].sum()
        print(counts.to_string())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--only", choices=sorted(VARIANTS))
    ap.add_argument("--studies", nargs="+", type=Path, help="study folders (with curves.parquet) to report")
    args = ap.parse_args()
    if args.studies:
        report("given studies", args.studies)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-optimizer-") as tmp:
        for variant in [args.only] if args.only else DEFAULT_PAIR:
            start = time.monotonic()
            studies = run(variant, args.seeds, Path(tmp))
            print(f"\n{variant}: {time.monotonic() - start:.0f} s for organisms {args.seeds}")
            report(variant, studies)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
