"""Evaluation on tiny random OLMoE models: Wilson CIs, headline metrics, steering, comparison, files, shift."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moe_core.analysis.analyse import AnalysisConfig, run_analysis
from moe_core.analysis.masks import ExpertMask
from moe_core.batching.batches import compose_batches
from moe_core.eval import evaluation as ev
from moe_core.model.adapter import MoEAdapter, load_model
from moe_core.model.routing import capture_routing
from moe_core.store.files import read_parquet
from moe_core.store.run import Run
from moe_core.types import PromptItem
from tests.tiny import tiny_model, tiny_tokenizer

SHARED = Path(os.environ.get("MOE_LAB_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
DATASETS = SHARED / "datasets"


def _items(label: str, n: int, word: str) -> list[PromptItem]:
    return [
        PromptItem(
            id=f"{word}-{i}", text=f"Tell me about the {word} number {i}", label=label, category=f"c{i % 2}"
        )  # type: ignore[arg-type]
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    # initializer_range 0.1: experts matter enough that steering shows in greedy tokens
    return tiny_model("olmoe", seed=0, initializer_range=0.1)


@pytest.fixture(scope="module")
def sets():
    return {"harmful_plain": _items("unsafe", 3, "lock"), "benign": _items("safe", 3, "bread")}


# -- statistics --------------------------------------------------------------------------------
def test_wilson_interval_matches_hand_computed_values():
    lo, hi = ev.wilson_interval([0, 10, 5, 1], [10, 10, 10, 4])
    # z = 1.959964; 0/10: high = z^2 / (n + z^2); 10/10 mirrors it; 5/10 and 1/4 by the formula
    assert np.allclose(lo, [0.0, 0.72247, 0.23659, 0.04560], atol=1e-4)
    assert np.allclose(hi, [0.27753, 1.0, 0.76341, 0.69936], atol=1e-4)
    lo0, hi0 = ev.wilson_interval(0, 0)
    assert np.isnan(lo0) and np.isnan(hi0)
    with pytest.raises(ValueError, match="between 0 and n"):
        ev.wilson_interval(5, 4)


def test_summarize_headline_metrics_on_a_hand_built_frame():
    rows = []
    for model, jb_ref, plain_ref, benign_ref, border_ref in [("base", 1, 3, 4, 0), ("trained", 3, 4, 3, 2)]:
        for s, refused, n in [
            ("harmful_jailbreak", jb_ref, 4),
            ("harmful_plain", plain_ref, 4),
            ("benign", benign_ref, 4),
            ("borderline", border_ref, 4),
        ]:
            for i in range(n):
                rows.append(
                    {
                        "model": model,
                        "set": s,
                        "id": f"{s}{i}",
                        "category": "a" if i < 2 else "b",
                        "prompt": "p",
                        "response": "" if (s == "benign" and i == 3) else "r",
                        "refusal": i < refused,
                        "reason": "refusal" if i < refused else "comply",
                    }
                )
    df = pd.DataFrame(rows)
    df.loc[(df.set == "benign") & (df.response == ""), "reason"] = "empty"
    s = ev.summarize(df).set_index(["model", "set"])
    assert s.loc[("base", "harmful_jailbreak"), "metric"] == "jailbreak_compliance"
    assert s.loc[("base", "harmful_jailbreak"), "value"] == pytest.approx(0.75)
    assert s.loc[("trained", "harmful_plain"), "value"] == pytest.approx(1.0)
    assert s.loc[("trained", "benign"), "value"] == pytest.approx(0.25)
    assert s.loc[("trained", "borderline"), "value"] == pytest.approx(0.5)
    assert s.loc[("base", "benign"), "empty"] == 1
    # the metric's CI is the refusal CI flipped for "1 - refusal" metrics
    lo, hi = ev.wilson_interval(1, 4)
    assert s.loc[("base", "harmful_jailbreak"), "ci_low"] == pytest.approx(lo)
    assert s.loc[("base", "harmful_jailbreak"), "value_ci_high"] == pytest.approx(1 - lo)
    assert s.loc[("base", "harmful_jailbreak"), "value_ci_low"] == pytest.approx(1 - hi)

    cat = ev.summarize(df, by_category=True).set_index(["model", "set", "category"])
    assert cat.loc[("trained", "harmful_jailbreak", "a"), "refusal_rate"] == 1.0
    assert cat.loc[("trained", "harmful_jailbreak", "b"), "refusal_rate"] == 0.5

    table = ev.comparison_table(ev.summarize(df))
    assert list(table.index) == ["base", "trained"]
    assert list(table.columns) == [
        "jailbreak_compliance",
        "harmful_refusal",
        "benign_answer_rate",
        "over_refusal",
    ]
    assert table.loc["trained", "jailbreak_compliance"] == pytest.approx(0.25)
    md = ev.to_markdown(table)
    lines = md.strip().splitlines()
    assert (
        lines[0] == "| model | jailbreak_compliance | harmful_refusal | benign_answer_rate | over_refusal |"
    )
    assert lines[2] == "| base | 0.75 | 0.75 | 0.00 | 0.00 |"
    assert lines[3] == "| trained | 0.25 | 1.00 | 0.25 | 0.50 |"
    assert "[" in ev.comparison_table(ev.summarize(df), with_ci=True).loc["base", "harmful_refusal"]
    custom = ev.summarize(df.assign(set=df["set"].replace({"borderline": "xstest_custom"})))
    row = custom[(custom.model == "base") & (custom.set == "xstest_custom")].iloc[0]
    assert pd.isna(row["metric"]) and np.isnan(row["value"]) and row["refusal_rate"] == 0.0
    assert "over_refusal" not in ev.comparison_table(custom).columns
    with pytest.raises(ValueError, match="lack columns"):
        ev.summarize(df.drop(columns=["refusal"]))


# -- sets --------------------------------------------------------------------------------------
def test_default_eval_sets_are_heldout_and_cover_every_template():
    sets = ev.default_eval_sets("heldout")
    assert list(sets) == list(ev.EVAL_KINDS)
    assert all(it.meta["split"] == "heldout" for it in sets["harmful_plain"] + sets["benign"])
    cats = {it.category for it in sets["harmful_jailbreak"]}
    assert {"jb-hypothetical", "jb-authority", "jb-roleplay"} <= cats  # held-out and train templates
    assert len(sets["harmful_jailbreak"]) == len(sets["harmful_plain"]) * len(cats)
    assert len(sets["borderline"]) >= 30 and all(
        it.category and it.label == "safe" for it in sets["borderline"]
    )
    assert len({it.id for it in sets["borderline"]}) == len(sets["borderline"])
    small = ev.default_eval_sets("heldout", limit=5)
    assert all(len(v) == 5 for v in small.values())
    assert len({it.category for it in small["harmful_jailbreak"]}) > 1  # spread, not the first goal only


def test_load_eval_set_from_files(tmp_path):
    p = tmp_path / "x.csv"
    pd.DataFrame(
        {
            "prompt": ["kill a process", "hurt someone", "bake"],
            "type": ["homonyms", "contrast", "x"],
            "label": ["safe", "unsafe", "safe"],
        }
    ).to_csv(p, index=False)
    border = ev.load_eval_set(p, "borderline")
    assert [it.text for it in border] == ["kill a process", "bake"] and border[0].category == "homonyms"
    assert [it.text for it in ev.load_eval_set(p, "harmful_plain")] == ["hurt someone"]
    with pytest.raises(ValueError, match="kind must be one of"):
        ev.load_eval_set(p, "harmful")


@pytest.mark.skipif(not DATASETS.is_dir(), reason="shared datasets folder not present")
def test_load_eval_set_real_xstest_and_jailbreakbench():
    xs = DATASETS / "xstest" / "xstest_prompts.csv"
    if not xs.is_file():
        pytest.skip("XSTest not present")
    safe, unsafe = ev.load_eval_set(xs, "borderline"), ev.load_eval_set(xs, "harmful_plain")
    assert len(safe) == 250 and len(unsafe) == 200
    assert {it.label for it in safe} == {"safe"} and "homonyms" in {it.category for it in safe}
    jbb = DATASETS / "jailbreakbench" / "harmful_behaviors.csv"
    if jbb.is_file():
        items = ev.load_eval_set(jbb, "harmful_plain", limit=10)
        assert len(items) == 10 and all(it.label == "unsafe" and it.text for it in items)


# -- one model ---------------------------------------------------------------------------------
def test_evaluate_model_rows_and_columns(model, tok, sets):
    calls = []
    df = ev.evaluate_model(
        model, tok, sets, max_new_tokens=4, batch_size=2, progress=lambda d, t, m="": calls.append((d, t))
    )
    assert list(df.columns) == ev.RESPONSE_COLUMNS
    assert len(df) == 6 and list(df["set"]) == ["harmful_plain"] * 3 + ["benign"] * 3
    assert list(df["id"]) == [it.id for v in sets.values() for it in v]
    assert df["refusal"].dtype == bool and set(df["reason"]) <= {
        "refusal",
        "partial",
        "empty",
        "comply",
        "apology_then_comply",
    }
    assert calls[-1] == (6, 6) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    with pytest.raises(ValueError, match="empty"):
        ev.evaluate_model(model, tok, {"benign": []})


def test_steering_inside_evaluate_model_blocks_an_expert_and_is_removed(model, tok, sets):
    ad = MoEAdapter.for_model(model)
    with capture_routing(model) as rec:
        plain = ev.evaluate_model(model, tok, sets, max_new_tokens=6)
    ids0 = np.concatenate([c.expert_ids[0].numpy().ravel() for c in rec.calls])
    busiest = int(np.bincount(ids0, minlength=ad.num_experts).argmax())
    # block the busiest expert (and 3 more) in every layer
    blocked = [busiest] + [e for e in range(ad.num_experts) if e != busiest][:3]
    mask = ExpertMask.from_experts(
        [(l, e) for l in ad.moe_layers for e in blocked], ad.num_layers, ad.num_experts
    )
    with capture_routing(model) as rec:
        steered = ev.evaluate_model(model, tok, sets, max_new_tokens=6, steer=(mask, None))
    for c in rec.calls:
        assert not np.isin(c.expert_ids.numpy(), blocked).any()
    assert (steered["response"] != plain["response"]).any()
    assert all(len(ad.router(l)._forward_hooks) == 0 for l in ad.moe_layers)
    again = ev.evaluate_model(model, tok, sets, max_new_tokens=6)
    assert again["response"].tolist() == plain["response"].tolist()


# -- several models, files ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("models")
    out = []
    for seed in (0, 1):
        d = root / f"m{seed}"
        tiny_model("olmoe", seed=seed, initializer_range=0.1).save_pretrained(d)
        tok.save_pretrained(d)
        out.append(str(d))
    return out


def test_compare_models_save_load_and_table(tmp_path, model_dirs, sets, monkeypatch):
    loads = []
    real = load_model
    monkeypatch.setattr(ev, "load_model", lambda d, **kw: loads.append(d) or real(d, **kw))
    base_model, _ = real(model_dirs[0], device="cpu")
    ad = MoEAdapter.for_model(base_model)
    mask = ExpertMask.from_experts(
        [(l, e) for l in ad.moe_layers for e in range(4)], ad.num_layers, ad.num_experts
    )
    entries = [
        ev.EvalEntry("base", model_dirs[0], kind="base"),
        ev.EvalEntry("steered", model_dirs[0], steer_deactivate=mask, kind="steered"),
        ev.EvalEntry("other", model_dirs[1]),
    ]
    seen = []
    responses, summary = ev.compare_models(
        entries, sets, max_new_tokens=5, device="cpu", progress=lambda d, t, m="": seen.append((d, t))
    )
    assert loads == [model_dirs[0], model_dirs[1]]  # base and its steered twin share one load
    assert list(responses.columns) == ["model"] + ev.RESPONSE_COLUMNS
    assert responses.groupby("model", sort=False).size().to_dict() == {"base": 6, "steered": 6, "other": 6}
    assert seen[-1] == (18, 18)
    direct = ev.evaluate_model(base_model, real(model_dirs[0], device="cpu")[1], sets, max_new_tokens=5)
    assert responses[responses.model == "base"]["response"].tolist() == direct["response"].tolist()
    steered = responses[responses.model == "steered"]["response"].tolist()
    assert steered != direct["response"].tolist()
    assert set(zip(summary["model"], summary["set"])) == {
        (m, s) for m in ("base", "steered", "other") for s in sets
    }

    run = Run.create(tmp_path, name="eval")
    j = ev.save_evaluation(run, responses, summary, name="cmp")
    assert j == run.path / "eval" / "cmp.json"
    assert (run.path / "eval" / "cmp_responses.parquet").is_file()
    assert ev.list_evaluations(run) == ["cmp"]
    r2, s2 = ev.load_evaluation(run, "cmp")
    pd.testing.assert_frame_equal(r2, ev._plain(responses))
    pd.testing.assert_frame_equal(s2, ev._plain(summary))
    info = r2.attrs["evaluation"]
    assert info["models"][1]["steer_deactivate"] == {str(l): [0, 1, 2, 3] for l in ad.moe_layers}
    assert info["settings"]["judge"] == "keyword" and info["settings"]["max_new_tokens"] == 5
    table = ev.comparison_table(s2)
    assert list(table.index) == ["base", "steered", "other"]
    assert list(table.columns) == ["harmful_refusal", "benign_answer_rate"]
    assert ev.to_markdown(table).count("\n") == 5
    with pytest.raises(ValueError, match="no evaluation named"):
        ev.load_evaluation(run, "nope")
    with pytest.raises(ValueError, match="invalid evaluation name"):
        ev.save_evaluation(run, responses, summary, name="../x")
    with pytest.raises(ValueError, match="unique"):
        ev.compare_models([entries[0], entries[0]], sets)


# -- routing shift -----------------------------------------------------------------------------
def test_routing_shift(tmp_path, model, tok):
    plan = compose_batches(
        _items("safe", 4, "sea"), _items("unsafe", 4, "lock"), batch_size=4, safe_ratio=0.5, seed=1
    )
    run = Run.create(tmp_path, name="shift")
    run_analysis(run, model, tok, plan, AnalysisConfig(scope="generated", max_new_tokens=4))
    same = ev.routing_shift(run, model, tok, name="same")
    assert list(same.columns) == ["layer", "expert", "risk_diff_before", "risk_diff_after", "delta"]
    ad = MoEAdapter.for_model(model)
    assert len(same) == len(ad.moe_layers) * ad.num_experts
    assert np.allclose(same["risk_diff_before"], same["risk_diff_after"]) and (same["delta"] == 0).all()
    assert (run.path / "eval" / "shift_same.parquet").is_file()
    sub = Run.open(run.path / "eval" / "shift_same")
    assert sub.completed_batches() == {0, 1}

    other = tiny_model("olmoe", seed=5, initializer_range=0.1)
    shifted = ev.routing_shift(run, other, tok, name="other")
    assert (shifted["delta"] != 0).any()
    d = shifted["delta"].abs().to_numpy()
    assert (d[:-1] >= d[1:]).all()
    pd.testing.assert_frame_equal(read_parquet(run.path / "eval" / "shift_other.parquet"), shifted)
    # resuming the same name with the same model reuses the sub-run; another model is refused
    assert ev.routing_shift(run, other, tok, name="other").equals(shifted)
    with pytest.raises(ValueError, match="another model"):
        ev.routing_shift(run, model, tok, name="other")
    empty = Run.create(tmp_path, name="nothing")
    with pytest.raises(ValueError, match="no finished analysis"):
        ev.routing_shift(empty, model, tok)
