"""The selection study end to end on a tiny saved MoE, and its statistics on known counts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from moe_core import pipeline as P
from moe_core.eval.study_summary import summarize_study, summary_markdown
from moe_core.study import run_study
from moe_core.study.lab import _Lab
from tests.app_fixtures import save_tiny_model


def test_summary_pools_counts_with_wilson_intervals_and_seed_extremes():
    rows = []
    for seed, k in ((0, 2), (1, 8)):
        rows.append(
            {
                "seed": seed,
                "method": "chosen",
                "budget": 0.0625,
                "n_experts": 2,
                "draw": 0,
                **{
                    f"{m}_k": k
                    for m in ("jailbreak_compliance", "harmful_refusal", "benign_answer_rate", "over_refusal")
                },
                **{
                    f"{m}_n": 10
                    for m in ("jailbreak_compliance", "harmful_refusal", "benign_answer_rate", "over_refusal")
                },
            }
        )
    s = summarize_study(pd.DataFrame(rows)).iloc[0]
    assert s["jailbreak_compliance"] == pytest.approx(0.5)
    assert s["jailbreak_compliance_seed_min"] == pytest.approx(0.2)
    assert s["jailbreak_compliance_seed_max"] == pytest.approx(0.8)
    assert 0.29 < s["jailbreak_compliance_ci_low"] < 0.5 < s["jailbreak_compliance_ci_high"] < 0.71
    assert s["runs"] == 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("study") / "tiny-olmoe")


def test_study_runs_every_arm_and_writes_table_and_figure(tmp_path, tiny_dir):
    spec = P.StudySpec(
        model=str(tiny_dir),
        budgets=[1 / 8, 1 / 2],
        random_draws=2,
        seeds=[0],
        eval_limit=3,
        max_new_tokens=2,
        max_batches=2,
        epochs=1,
        lrs=[1e-3],  # one learning rate: every arm is still there (the schedule's search has its own test)
    )
    run, summary = run_study(spec, runs_root=tmp_path)
    out = run.path_for("study", name=spec.name)
    results = pd.read_parquet(out / "results.parquet")
    assert sorted(results["method"].unique()) == [
        "base",
        "chosen",
        "chosen_grad_attr",
        "full",
        "random",
        "random_layer",
        "steer_both",
        "steer_off",
        "steer_on",
    ]
    assert (results.loc[results["method"] == "random", "draw"].tolist()) == [
        0,
        1,
        0,
        1,
    ]  # 1/2: more than top-k per layer forced on
    chosen = results[(results["method"] == "chosen") & (results["budget"] == 1 / 8)].iloc[0]
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert chosen["n_experts"] == max(1, round(cfg["num_hidden_layers"] * cfg["num_experts"] / 8))
    assert set(summary["method"]) == set(results["method"])
    fig = json.loads((out / "figure.json").read_text())
    assert {t["name"] for t in fig["data"]} >= {"chosen", "random", "random_layer"}
    assert "chosen" in summary_markdown(summary)
    assert run.status()[f"study:{spec.name}"] == "done"


def test_each_arm_starts_from_the_base_weights(tmp_path, tiny_dir):
    """Training an arm, evaluating it and restoring leaves the in-memory base model bit-identical."""
    spec = P.StudySpec(
        model=str(tiny_dir),
        budgets=[1 / 8],
        seeds=[0],
        eval_limit=2,
        max_new_tokens=2,
        max_batches=1,
        epochs=1,
        lr=1e-2,
    )
    lab = _Lab(spec, 0, tmp_path, None)
    before = {n: p.detach().clone() for n, p in lab.model.named_parameters()}
    from moe_core.study.lab import _masks

    _, chosen, _ = _masks(lab, 1 / 8)
    lab.train_and_evaluate(chosen)
    after = dict(lab.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert np.isfinite(sum(float(p.sum()) for p in after.values()))


def test_validation_and_test_halves_are_disjoint_and_make_the_held_out_split():
    """Issue 17: defaults are chosen on the validation half; the test half is reported and never tuned on."""
    from moe_core.batching.demo_prompts import demo_benign, demo_goals, jailbreak_templates
    from moe_core.eval.evaluation import borderline_prompts, default_eval_sets

    for make in (demo_goals, demo_benign, jailbreak_templates):
        val, test, held = ({it.id for it in make(s)} for s in ("validation", "test", "heldout"))
        assert val and test and not val & test and val | test == held
    assert not {p.id for p in borderline_prompts("validation")} & {p.id for p in borderline_prompts("test")}
    val, test = default_eval_sets("validation"), default_eval_sets("test", templates_per_goal=None)
    val_templates = {it.meta["template"] for it in val["harmful_jailbreak"]}
    shared = val_templates & {it.meta["template"] for it in test["harmful_jailbreak"]}
    assert shared == {
        t.id for t in jailbreak_templates("train")
    }  # held-out wrappers apart; train ones in both
    assert not {it.goal for it in val["harmful_jailbreak"]} & {it.goal for it in test["harmful_jailbreak"]}


def test_an_arm_is_reported_at_the_step_chosen_on_validation():
    from moe_core.study import chosen_point

    base = {
        "step": 0,
        "lr": 1e-3,
        "jailbreak_compliance": 1.0,
        "benign_answer_rate": 0.9,
        "over_refusal": 0.2,
    }
    pts = [
        base,
        {**base, "step": 4, "jailbreak_compliance": 0.4},
        {**base, "step": 8, "jailbreak_compliance": 0.0, "over_refusal": 0.6},  # over-refuses: not eligible
        {**base, "step": 12, "jailbreak_compliance": 0.4, "benign_answer_rate": 0.86},
    ]
    assert chosen_point(pts)["step"] == 4  # lowest compliance that keeps answering; earliest on a tie
    assert chosen_point(pts[:1])["step"] == 0
    faster = {**base, "lr": 3e-3, "step": 4, "jailbreak_compliance": 0.37}  # 0.03 lower, 3x the training
    assert chosen_point([*pts, faster]) == pts[1]  # within the margin of the lowest: the least training wins
    clearly = {**faster, "jailbreak_compliance": 0.30}
    assert chosen_point([*pts, clearly]) == clearly
    no_real_gain = {**base, "step": 4, "jailbreak_compliance": 0.97}
    assert chosen_point([base, no_real_gain])["step"] == 0
    edge = {
        **base,
        "over_refusal": 0.0,
        "benign_answer_rate": 1.0,
    }  # exactly the margin, as fractions give it
    at_edge = {**edge, "step": 4, "jailbreak_compliance": 0.1}
    at_edge |= {"over_refusal": 1 - 57 / 60, "benign_answer_rate": 57 / 60}
    assert chosen_point([edge, at_edge]) == at_edge


def test_the_study_keeps_curves_per_arm_learning_rate_and_seed_pair(tmp_path, tiny_dir):
    spec = P.StudySpec(
        model=str(tiny_dir),
        budgets=[1 / 8],
        random_draws=1,
        seeds=[0],
        batch_seeds=[0, 1],
        scores=["risk_diff", "gate_diff"],
        lrs=[1e-3, 1e-2],
        curve_every=1,
        retain_share=0.5,  # the SFT batches also hold retain examples (the base model's own answers)
        steering=False,
        full=False,
        eval_limit=3,
        max_new_tokens=2,
        max_batches=2,
        epochs=1,
    )
    run, _ = run_study(spec, runs_root=tmp_path)
    out = run.path_for("study", name=spec.name)
    results = pd.read_parquet(out / "results.parquet")
    curves = pd.read_parquet(out / "curves.parquet")
    assert sorted(results["batch_seed"].unique()) == [0, 1]
    assert set(results["method"]) == {"base", "chosen", "chosen_gate_diff", "random", "random_layer"}
    trained = results[results["method"] != "base"]
    assert set(trained["lr"]) <= {1e-3, 1e-2} and trained["val_auc"].between(0, 1).all()
    for _, row in trained.iterrows():
        arm = curves[
            (curves["batch_seed"] == row["batch_seed"])
            & (curves["method"] == row["method"])
            & (curves["draw"] == row["draw"])
        ]
        assert set(arm["lr"]) == {1e-3, 1e-2} and arm.groupby("lr")["step"].min().eq(0).all()
        at = arm[(arm["lr"] == row["lr"]) & (arm["step"] == row["step"])].iloc[0]
        assert at["jailbreak_compliance"] == row["val_jailbreak_compliance"]  # reported where it was chosen
        assert 0 <= at["new_wrapper_compliance"] <= 1  # the held-out wrappers' own curve
    for _, row in trained[
        trained["method"].str.startswith("random")
    ].iterrows():  # tested at each selector's step too
        assert row["jailbreak_compliance_at_chosen_n"] == row["jailbreak_compliance_n"] > 0
        assert row["jailbreak_compliance_at_chosen_gate_diff_n"] == row["jailbreak_compliance_n"]
    assert run.path_for("study_analyses", name=spec.name).is_dir()


def test_the_across_seed_headline_is_the_committed_reference_studys_own_numbers():
    """`make demo`, Home and the report show the result across seeds from the stored reference table: per arm
    the median and range over seed pairs, recomputed here from results.parquet (no number written in)."""
    from moe_core.eval.study_summary import (
        ARMS,
        HEADLINE_BUDGET,
        across_seed_headline,
        reference_report,
        reference_study,
    )
    from moe_core.train.hf_args import default_value

    reference = reference_study()
    assert reference is not None, "the reference study (moe_core/resources/reference_study) must ship"
    settings, results = reference
    assert settings["command"].startswith("python -m moe_core study") and settings["complete"]
    text = across_seed_headline(results)
    at = results[(results["budget"] == HEADLINE_BUDGET) | results["method"].isin(["base", "full"])]
    pairs = at.groupby(["seed", "batch_seed"]).ngroups
    assert pairs >= 4 and f"Across {pairs} seed pairs" in text
    for method, label in ARMS.items():
        g = at[at["method"] == method].groupby(["seed", "batch_seed"])
        if not len(g):
            continue
        rate = g["jailbreak_compliance_k"].sum() / g["jailbreak_compliance_n"].sum()
        line = next(line for line in text.splitlines() if line.strip().startswith(label))
        assert f"jailbreak compliance {rate.median():.2f} ({rate.min():.2f}-{rate.max():.2f})" in line
    rand = at[at["method"] == "random"]
    if "jailbreak_compliance_at_chosen_n" in rand:  # random experts trained as long as the chosen ones
        same = (
            (rand["jailbreak_compliance_at_chosen_k"] / rand["jailbreak_compliance_at_chosen_n"])
            .groupby([rand["seed"], rand["batch_seed"]])
            .mean()
        )
        lines = text.splitlines()
        line = lines[next(i for i, x in enumerate(lines) if x.strip().startswith("chosen experts")) + 1]
        assert line.strip().startswith("random at its step")  # under the selector it was trained as long as
        assert f"jailbreak compliance {same.median():.2f} ({same.min():.2f}-{same.max():.2f})" in line
    evaluation = pd.DataFrame(
        {"model": ["experts-unsafe_experts"], "set": ["harmful_jailbreak"], "value": [0.5]}
    )
    report = reference_report(evaluation, "experts-unsafe_experts")
    assert text in report and settings["command"] in report and "This demo is one seed" in report
    optim = json.loads(settings["defining"].get("training_args") or "{}").get("optim", default_value("optim"))
    assert f"trains every arm with {optim} at learning rates" in report


def test_the_targets_compare_chosen_with_random_trained_the_same_steps():
    """Issue 17's first target reads random experts at the chosen arm's (lr, step), not at their own best
    step; their own step is reported beside it, and the over-refusal margin is the base model's + 0.05."""
    from moe_core.eval.study_summary import PICK
    from moe_core.eval.study_targets import budget_targets, target_table, targets, with_validation_pick

    def row(method, k, n=20, benign=20, over=1, **extra):
        counts = {"jailbreak_compliance_k": k, "jailbreak_compliance_n": n, "benign_answer_rate_k": benign}
        counts |= {"benign_answer_rate_n": 20, "over_refusal_k": over, "over_refusal_n": 20}
        return {
            "seed": 7,
            "batch_seed": 0,
            "method": method,
            "budget": 0.0 if method == "base" else 1 / 16,
            "lr": 1e-3,
            "step": extra.pop("step", 28),
            "val_auc": extra.pop("auc", 0.5),
            **counts,
            **extra,
        }

    results = pd.DataFrame(
        [
            row("base", 20, step=0),
            row("chosen", 1, auc=0.4),
            row(
                "random",
                0,
                step=42,
                auc=0.8,
                jailbreak_compliance_at_chosen_k=18,
                jailbreak_compliance_at_chosen_n=20,
            ),
            row(
                "random",
                1,
                step=42,
                auc=0.9,
                jailbreak_compliance_at_chosen_k=17,
                jailbreak_compliance_at_chosen_n=20,
            ),
        ]
    )
    t = targets(results).iloc[0]
    assert (t["chosen"], t["random_at_chosen"], t["random"]) == (0.05, 0.875, 0.025)
    assert t["met"] and t["auc_below_every_random"] and t["outside_random_interval"]
    assert t["random_steps"] == "42 42" and t["chosen_step"] == 28
    worse = results.assign(over_refusal_k=[1, 3, 1, 1])  # chosen over-refuses 0.15 vs the base's 0.05
    assert not targets(worse).iloc[0]["met"]
    other = pd.concat([results, pd.DataFrame([row("chosen_grad_attr", 0, auc=0.3, step=7)])])
    g = targets(other, method="chosen_grad_attr").iloc[0]  # random was tested at `chosen`'s step, not this
    assert (g["chosen"], g["random_at_chosen"], g["chosen_step"]) == (0.0, 0.025, 7)
    assert not g["random_at_chosen_tested"] and t["random_at_chosen_tested"]
    at_grad = {
        "jailbreak_compliance_at_chosen_grad_attr_k": 19,
        "jailbreak_compliance_at_chosen_grad_attr_n": 20,
    }
    other.loc[other["method"] == "random", list(at_grad)] = list(at_grad.values())  # tested at its step too
    g = targets(other, method="chosen_grad_attr").iloc[0]
    assert (g["random_at_chosen"], g["random_at_chosen_tested"], g["met"]) == (0.95, True, True)
    assert targets(other).iloc[0]["random_at_chosen"] == 0.875  # `chosen` still reads its own columns
    # the selector picked per pair on validation: lowest validation compliance, then AUC (grad_attr: 0.3 < 0.4)
    picked = with_validation_pick(other.assign(val_jailbreak_compliance=[1.0, 0.2, 0.9, 0.9, 0.2]))
    p = targets(picked, method=PICK).iloc[0]  # random read at the picked selector's point
    assert (p["chosen"], p["random_at_chosen"], p["chosen_step"], p["met"]) == (0.0, 0.95, 7, True)
    assert list(picked.loc[picked["method"] == PICK, "picked"]) == ["chosen_grad_attr"]
    picked = with_validation_pick(other.assign(val_jailbreak_compliance=[1.0, 0.2, 0.9, 0.9, 0.5]))
    assert targets(picked, method=PICK).iloc[0]["random_at_chosen"] == 0.875  # `chosen` validates best here
    # within MARGIN of the lowest, a point that answers benign requests at the target wins over one that does not
    near = other.assign(val_jailbreak_compliance=[1.0, 0.22, 0.9, 0.9, 0.2])
    assert list(with_validation_pick(near).query("method == @PICK")["picked"]) == ["chosen_grad_attr"]
    short = near.assign(val_benign_answer_rate=[0.98, 0.95, 0.98, 0.98, 0.9])
    assert list(with_validation_pick(short).query("method == @PICK")["picked"]) == ["chosen"]
    far = short.assign(val_jailbreak_compliance=[1.0, 0.3, 0.9, 0.9, 0.2])  # 0.10 apart: compliance decides
    assert list(with_validation_pick(far).query("method == @PICK")["picked"]) == ["chosen_grad_attr"]
    table = target_table(other).set_index("selector")  # per selector: on how many pairs each target holds
    assert (
        table.loc["chosen experts", "all four targets"]
        == table.loc["grad-attribution", "all four targets"]
        == 1
    )
    assert table.loc["chosen experts", "full fine-tuning <= 0.10"] == 0  # no full fine-tuning arm: no ceiling
    # every budget of a study, the share first: the selectors compared across budgets
    both = pd.concat([other, other[other["method"] != "base"].assign(budget=1 / 8, jailbreak_compliance_k=9)])
    every = budget_targets(both)
    assert list(every["budget"]) == ["1/16", "1/16", "1/8", "1/8"] and every.columns[0] == "budget"
    assert every.iloc[:2, 1:].equals(target_table(both, 1 / 16)) and every["all four targets"].tolist() == [
        1,
        1,
        0,
        0,
    ]
    full = pd.concat([other, pd.DataFrame([row("full", 3, step=14) | {"budget": 1.0}])])
    assert (targets(full).iloc[0][["full", "full_reaches"]] == [0.15, False]).all()
    full.loc[full["method"] == "full", "jailbreak_compliance_k"] = 2  # 0.10: full fine-tuning reaches it
    assert target_table(full).set_index("selector").loc["grad-attribution", "full fine-tuning <= 0.10"] == 1


def test_the_study_defaults_are_the_tuned_schedule_of_the_reference_study():
    """Issue 17: defaults tuned on the tuning organisms, then fixed. A bare `study` searches the reference's
    learning rates (full fine-tuning its own), with its retain share and curve spacing; `--lr` other than the
    default still means that rate alone, as before the search existed."""
    from moe_core.cli import build_parser, spec_from_args
    from moe_core.eval.study_summary import reference_study

    tuned = P.StudySpec()
    defining = reference_study()[0]["defining"]
    for key in (
        "lr",
        "lrs",
        "full_lrs",
        "retain_share",
        "curve_every",
        "epochs",
        "validation",
        "training_args",
    ):
        assert getattr(tuned, key) == defining[key], key
    adamw = P.StudySpec(training_args="{}")  # another optimizer: the tuned rates are not its rates
    assert adamw.lrs == adamw.full_lrs == [adamw.lr]
    one = P.StudySpec(lr=5e-3)
    assert one.lrs == one.full_lrs == [5e-3]
    own = P.StudySpec(lrs=[2e-3, 4e-3])
    assert own.full_lrs == [2e-3, 4e-3]
    assert P.StudySpec(full_lrs=[1e-5]).full_lrs == [1e-5] and P.StudySpec(full_lrs=[1e-5]).lrs == tuned.lrs
    assert spec_from_args(build_parser().parse_args(["study", "--lr", "5e-3"])).lrs == [5e-3]
    assert spec_from_args(build_parser().parse_args(["study"])).lrs == tuned.lrs
    with pytest.raises(P.MoELabError, match="learning rates must be > 0"):
        P.StudySpec(full_lrs=[0.0])


def test_the_headline_shows_every_selector_of_the_study_and_its_verdict_per_selector():
    """A study run with `--scores risk_diff grad_attr` shows both selectors across seeds, and how often each
    is below random; the lines under the per-arm rows (Home's caption, the report) hold verdicts only."""
    from moe_core.eval.study_summary import across_seed_headline, verdicts

    rows = []
    for seed, (chosen, grad, rand) in enumerate([(50, 5, 30), (10, 2, 30), (40, 35, 30)]):
        for method, k in (("base", 60), ("chosen", chosen), ("chosen_grad_attr", grad), ("random", rand)):
            counts = {
                f"{m}_{x}": v for m in ("benign_answer_rate", "over_refusal") for x, v in (("k", 1), ("n", 2))
            }
            budget = 0.0 if method == "base" else 1 / 16
            rows.append(
                {"seed": seed, "batch_seed": 0, "method": method, "budget": budget, "draw": 0}
                | {"jailbreak_compliance_k": k, "jailbreak_compliance_n": 60, **counts}
            )
    at = {"jailbreak_compliance_at_chosen_grad_attr_k": 54, "jailbreak_compliance_at_chosen_grad_attr_n": 60}
    rows = [r | at if r["method"] == "random" and r["seed"] else r for r in rows]  # seed 0: not tested there
    text = across_seed_headline(pd.DataFrame(rows))
    lines = text.splitlines()
    line = lines[next(i for i, x in enumerate(lines) if x.strip().startswith("grad-attribution")) + 1]
    assert line.strip().startswith("random at its step")
    assert "jailbreak compliance 0.90 (0.90-0.90) on 2 of 3 seed pairs" in line  # where the study tested it
    grad = next(line for line in text.splitlines() if line.strip().startswith("grad-attribution"))
    assert "jailbreak compliance 0.08 (0.03-0.58)" in grad
    assert (
        text.splitlines()[-2:]
        == verdicts(pd.DataFrame(rows))
        == [
            "Chosen below random (mean of draws) on 1 of 3 seed pairs.",
            "Grad-attribution experts below random (mean of draws) on 2 of 3 seed pairs.",
        ]
    )


@pytest.mark.parametrize("expert_rows", [True, False], ids=["chosen experts", "full fine-tuning"])
def test_a_kept_state_is_the_model_trained_again_to_that_step(tmp_path, tiny_dir, expert_rows):
    """The test at a chosen step loads the state kept on the arm's curve instead of training again: the
    weights must be bit-identical to training from the base weights for that many steps."""
    from moe_core.eval.curves import CurveCallback
    from moe_core.study.lab import _masks
    from moe_core.train.snapshots import StepSnapshots, load_trainable_state

    spec = P.StudySpec(
        model=str(tiny_dir), seeds=[0], eval_limit=2, max_new_tokens=2, max_batches=2, epochs=2
    )
    lab = _Lab(spec, 0, tmp_path, None)
    mask = _masks(lab, 1 / 8)[1] if expert_rows else None
    keep = StepSnapshots()
    curve = CurveCallback(lab.scorer, every=1, keep=keep)
    lab.train(mask, 1e-2, [curve])  # scored between steps, as a study's curve is
    lab.restore()
    assert keep.complete and sorted(keep.states) == [p["step"] for p in curve.points][1:]
    step = sorted(keep.states)[-2]
    lab.train(mask, 1e-2, max_steps=step)
    trained = {n: p.detach().clone() for n, p in lab.model.named_parameters()}
    lab.restore()
    load_trainable_state(lab.model, keep.states[step])
    loaded = dict(lab.model.named_parameters())
    assert all(torch.equal(trained[n], loaded[n]) for n in trained)
    assert any(not torch.equal(trained[n], lab.snapshot[n]) for n in trained), "the step trained something"
    lab.restore()

    small = StepSnapshots(max_bytes=1)  # past its bound it keeps nothing: the study trains again
    lab.train(mask, 1e-2, [CurveCallback(lab.scorer, every=1, keep=small)], max_steps=2)
    lab.restore()
    assert not small.complete and not small.states


def test_the_wrapper_split_reads_each_arm_at_its_chosen_point():
    """Compliance left on all validation prompts vs on held-out wrappers alone, at the step each arm was chosen."""
    from moe_core.eval.study_targets import wrapper_split

    key = {"budget": 1 / 16, "draw": 0, "lr": 3e-3}
    results = pd.DataFrame(
        [
            {**key, "seed": s, "batch_seed": 0, "method": m, "step": 14}
            for s in (1, 2)
            for m in ("chosen", "random")
        ]
    )
    curves = pd.DataFrame(
        [
            {
                **key,
                "seed": s,
                "batch_seed": 0,
                "method": m,
                "step": step,
                "jailbreak_compliance": jc,
                "new_wrapper_compliance": nw,
            }
            for s in (1, 2)
            for m, (jc, nw) in {"chosen": (0.1 * s, 0.9), "random": (0.5, 1.0)}.items()
            for step, jc, nw in (
                (7, 1.0, 1.0),
                (14, jc, nw),
                (21, 0.0, 0.0),
            )  # only step 14 is the chosen point
        ]
    )
    split = wrapper_split(results, curves).set_index("arm")
    assert split.loc["chosen experts", "validation compliance"] == "0.15"  # median of 0.1 and 0.2
    assert split.loc["chosen experts", "on held-out wrappers"] == "0.90"
    assert split.loc["random experts", "on held-out wrappers"] == "1.00"
    assert split.loc["chosen experts", "seed pairs"] == 2
    assert wrapper_split(results, None).empty  # a study stored before the curves had them


def test_the_targets_read_on_validation_curves_alone_pick_each_selector_as_the_study_does():
    """Tuning reads the validation curves only: each selector at the point ``chosen_point`` picks, random draws
    at that same (lr, step) and at their own points, a coarser grid read from the same curves."""
    from moe_core.eval.study_summary import PICK
    from moe_core.eval.study_targets import validation_targets

    def curve(method, draw, drop_at, low, benign=0.98):
        return [
            {
                "seed": 5,
                "batch_seed": 0,
                "method": method,
                "budget": 1 / 16,
                "draw": draw,
                "lr": 3.0,
                "step": s,
                "jailbreak_compliance": 1.0 if s < drop_at else low,
                "benign_answer_rate": 0.98 if s < drop_at else benign,
                "over_refusal": 0.0,
            }
            for s in range(0, 43, 3)
        ]

    curves = pd.DataFrame(
        curve("chosen", 0, 9, 0.05)
        + curve(
            "chosen_grad_attr", 0, 6, 0.0, benign=0.80
        )  # learns first, but stops answering benign requests
        + curve("random", 0, 24, 0.05)
        + curve("random", 1, 30, 0.10)
    )
    t = validation_targets(curves).set_index("method")
    assert (t.loc["chosen", "step"], t.loc["chosen", "random_at_chosen"], t.loc["chosen", "met"]) == (
        9,
        1.0,
        True,
    )
    assert (
        t.loc["chosen_grad_attr", "step"] == 0 and not t.loc["chosen_grad_attr", "met"]
    )  # nothing qualifies
    assert t.loc["chosen", "random"] == 0.075  # the draws at their own points: 0.05 and 0.10
    assert t.loc[PICK, "step"] == 9  # the pick is the lower compliance of the two selectors' points
    coarse = validation_targets(curves, every=6).set_index("method")
    assert coarse.loc["chosen", "step"] == 12 and coarse.loc["chosen", "met"]
    # grad_attr keeps benign answers within the point rule's margin (0.93) but under the target: within MARGIN
    # of its compliance, the pick takes `chosen`, whose point answers benign requests
    close = pd.DataFrame(curve("chosen", 0, 9, 0.05) + curve("chosen_grad_attr", 0, 6, 0.02, benign=0.93))
    close = pd.concat([close, curves[curves["method"] == "random"]])
    t = validation_targets(close).set_index("method")
    assert t.loc["chosen_grad_attr", "step"] == 6 and not t.loc["chosen_grad_attr", "benign_met"]
    assert (t.loc[PICK, "step"], t.loc[PICK, "met"]) == (9, True)
