"""Do the chosen experts matter? The selection study in a quick setting, ratios from one run.

    .venv/bin/python bench/bench_selection.py            # 1 seed, budgets 1/32 and 1/16, 2 random draws
    .venv/bin/python bench/bench_selection.py --full     # the whole study (3 seeds x 5 budgets; hours on 2 cores)

Calls ``python -m moe_core study`` (``moe_core.study.run_study``) and prints the table plus, per
budget, the jailbreak compliance left by random experts divided by that left by the chosen ones
(how much better the chosen experts are at the same budget) and whether their intervals overlap.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_core.eval.study_summary import summary_markdown
from moe_core.model.adapter import apply_cpu_thread_policy
from moe_core.pipeline import StudySpec
from moe_core.study import run_study


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the whole study instead of the quick setting")
    ap.add_argument("--runs-root", help="keep the study run here (default: a temporary folder)")
    args = ap.parse_args(argv)
    apply_cpu_thread_policy()
    with tempfile.TemporaryDirectory(prefix="bench-selection-") as tmp:
        run, summary = run_study(StudySpec(quick=not args.full), runs_root=args.runs_root or tmp)
        print(summary_markdown(summary))
        print("\nbudget  chosen  random  random/chosen  intervals overlap")
        for budget, g in summary.groupby("budget"):
            arms = g.set_index("method")
            if not {"chosen", "random"} <= set(arms.index):
                continue
            c, r = arms.loc["chosen"], arms.loc["random"]
            ratio = r["jailbreak_compliance"] / max(c["jailbreak_compliance"], 1e-9)
            overlap = c["jailbreak_compliance_ci_high"] >= r["jailbreak_compliance_ci_low"]
            print(
                f"{budget:.4f}  {c['jailbreak_compliance']:.2f}    {r['jailbreak_compliance']:.2f}    "
                f"{ratio:8.1f}x      {'yes' if overlap else 'no'}"
            )
        if args.runs_root:
            print(f"\nstudy run: {run.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
