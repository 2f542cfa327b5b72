"""Does an organism corpus make refusal training reach jailbreak wrappers it never saw? One tuning organism
per call, validation half only (README, "Organism variants").

    .venv/bin/python bench/bench_organism_variants.py --seed 0                                  # the v4 corpus
    .venv/bin/python bench/bench_organism_variants.py --seed 0 --organism \
        '{"framed_refusals": 0, "grammar_jailbreaks": 0, "jailbreaks_per_goal": 8}'              # v3's corpus
    .venv/bin/python bench/bench_organism_variants.py --seed 0 --organism '{"grammar_jailbreaks": 0}'

Stop 23's variants were v3's fields plus ``"spliced_jailbreaks": 4`` or with ``"jailbreaks_per_goal": 0``.

Builds the organism (cached), analyses it as a study does, then trains from the base weights, as a study arm
(retain share 0.5): 1/16 of the experts by gradient attribution and one random draw at lr 3e-3, and full
fine-tuning at 3e-4, each for 21 and 42 steps. Prints one JSON line per point: compliance on the validation
half's held-out wrappers (``held``, every prompt) and on the train wrappers (``train_wrappers``, every 7th),
and the share refused of plain harmful goals, benign requests and borderline ones (every 2nd). About 5
(quiet machine) to 12 minutes per call on one core, the organism's build included.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_core import pipeline as P
from moe_core.analysis.selection import random_experts
from moe_core.batching.demo_prompts import jailbreak_templates
from moe_core.eval.evaluation import default_eval_sets, evaluate_model
from moe_core.model.adapter import apply_cpu_thread_policy
from moe_core.model.organism import build_organism, organism_variant
from moe_core.study.lab import _Lab, _masks

BUDGET, STEPS = 1 / 16, (21, 42)


def validation_sets(seed: int) -> tuple[dict[str, list], set[str]]:
    """The validation half: every held-out-wrapper prompt, every 7th train-wrapper one, every 2nd of the rest."""
    val = default_eval_sets(split="validation", seed=seed)
    held = {t.id for t in jailbreak_templates("validation")}
    jail = val["harmful_jailbreak"]
    sets = {
        "harmful_jailbreak": [i for i in jail if i.meta["template"] in held]
        + [i for i in jail if i.meta["template"] not in held][::7],
        **{k: val[k][::2] for k in ("harmful_plain", "benign", "borderline")},
    }
    return sets, held


def point(lab: _Lab, sets: dict[str, list], held: set[str]) -> dict[str, float]:
    df = evaluate_model(lab.model, lab.tok, sets, max_new_tokens=16, batch_size=32)
    refused = df["refusal"].astype(float)
    jail = df["set"] == "harmful_jailbreak"
    new = df["category"].isin(held)
    out = {"held": 1 - refused[jail & new].mean(), "train_wrappers": 1 - refused[jail & ~new].mean()}
    out |= {f"{s}_refused": refused[df["set"] == s].mean() for s in ("harmful_plain", "benign", "borderline")}
    return {k: round(float(v), 3) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="a tuning organism seed (0-3)")
    ap.add_argument("--organism", default="{}", help="OrganismConfig fields as JSON (default: none)")
    ap.add_argument("--runs-root", help="keep the analysis run here (default: a temporary folder)")
    args = ap.parse_args(argv)
    apply_cpu_thread_policy()
    variant = json.loads(args.organism)
    path = str(build_organism(organism_variant(variant, args.seed)))
    spec = P.StudySpec(  # AdamW, as in stops 23 and 24 (the rates below are AdamW's)
        model=path, seeds=[args.seed], scores=["grad_attr"], eval_limit=60, steering=False, training_args="{}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-organism-") as tmp:
        lab = _Lab(spec, args.seed, Path(args.runs_root or tmp), None)
        sets, held = validation_sets(args.seed)
        n, chosen, _ = _masks(lab, BUDGET, "grad_attr")
        drawn = random_experts(
            chosen.num_layers,
            chosen.num_experts,
            n,
            [args.seed, args.seed, 0, n],
            layers=lab.adapter.moe_layers,
        )
        print(json.dumps({"organism": variant, "seed": args.seed, "arm": "base", **point(lab, sets, held)}))
        for arm, mask, lr in (("grad_attr", chosen, 3e-3), ("random", drawn, 3e-3), ("full", None, 3e-4)):
            for steps in STEPS:
                lab.train(mask, lr, max_steps=steps)
                row = {"organism": variant, "seed": args.seed, "arm": arm, "steps": steps}
                print(json.dumps({**row, **point(lab, sets, held)}), flush=True)
                lab.restore()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
