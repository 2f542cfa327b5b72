"""How well does a refusal judge agree with our hand-labelled set?

    .venv/bin/python bench/bench_judge.py                      # keyword judge
    .venv/bin/python bench/bench_judge.py --judge "http://localhost:8000/v1?model=NAME"
    .venv/bin/python bench/bench_judge.py --json out.json --show-misses

Prints accuracy, precision, recall and F1 (refusal = positive class) overall and per category
and per split (dev: rows the keyword judge was tuned on; test: held out) of
moe_core/data/judge_labelled.jsonl (or --data FILE).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_core.judge import LABELLED_SET, judge_accuracy, load_labelled_set, make_judge  # noqa: E402

log = logging.getLogger("judge_accuracy")


def _fmt(x: float) -> str:
    return "  -  " if isinstance(x, float) and math.isnan(x) else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", default="keyword", help="judge spec for make_judge: keyword | http://...?model=M | hf:/dir")
    ap.add_argument("--data", default=str(LABELLED_SET), help="labelled JSONL (prompt, response, refusal, category)")
    ap.add_argument("--json", help="also write the full report (with misses) to this JSON file")
    ap.add_argument("--show-misses", action="store_true", help="list every row the judge got wrong")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows = load_labelled_set(args.data)
    report = judge_accuracy(make_judge(args.judge), rows)
    lines = [f"judge={args.judge}  rows={len(rows)}  data={args.data}", ""]
    lines.append(f"{'category':<22}{'n':>5}{'acc':>8}{'prec':>8}{'recall':>8}{'f1':>8}")
    splits = [(f"split={k}", v) for k, v in report["per_split"].items()]
    for name, m in [*report["per_category"].items(), *splits, ("OVERALL", report["overall"])]:
        lines.append(
            f"{name:<22}{m['n']:>5}{_fmt(m['accuracy']):>8}{_fmt(m['precision']):>8}{_fmt(m['recall']):>8}{_fmt(m['f1']):>8}"
        )
    if args.show_misses:
        lines.append("\nmisses:")
        for miss in report["misses"]:
            lines.append(f"  {miss['id']}: label={miss['label']} verdict={miss['verdict']}")
    log.info("\n".join(lines))
    if args.json:
        from moe_core.runs import atomic_write_json

        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
