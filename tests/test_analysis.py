"""The analysis job end to end on a tiny random OLMoE: files, resume, seed-compatible API, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from moe_core.analysis.analyse import (
    AnalysisConfig,
    AnalysisError,
    load_batch_data_list,
    process_mixed_batches,
    quality_filter,
    run_analysis,
)
from moe_core.analysis.risk import calculate_risk_diff_per_batch
from moe_core.batching.batches import compose_batches
from moe_core.store.files import read_parquet
from moe_core.store.run import Run
from moe_core.types import PromptItem
from tests.tiny import tiny_model, tiny_tokenizer


def _items(label: str, n: int) -> list[PromptItem]:
    words = [
        "bread",
        "sea",
        "lock",
        "bicycle",
        "poem",
        "wind",
        "sky",
        "France",
        "dough",
        "chain",
        "wheel",
        "salt",
    ]
    return [
        PromptItem(
            id=f"{label}-{i}",
            text=f"Tell me about the {words[i % len(words)]} number {i} ({label})",
            label=label,
        )
        for i in range(n)
    ]  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("olmoe", seed=1), tiny_tokenizer()


@pytest.fixture
def plan():
    return compose_batches(_items("safe", 6), _items("unsafe", 6), batch_size=4, safe_ratio=0.5, seed=3)


def test_run_analysis_writes_every_artifact(tmp_path, tiny, plan):
    model, tok = tiny
    run = Run.create(tmp_path, name="t")
    res = run_analysis(run, model, tok, plan, AnalysisConfig(scope="generated", max_new_tokens=5))
    assert run.completed_batches() == {0, 1, 2}
    for b in range(3):
        assert run.path_for("routing", batch_idx=b).exists()
        out = json.loads(run.path_for("outputs", batch_idx=b).read_text())
        assert [s["label"] for s in out["samples"]] == ["safe", "safe", "unsafe", "unsafe"]
        # a generated token is routed when fed back: all of an answer cut at EOS, all but the last otherwise
        assert all(
            s["n_generated_tokens"] - 1 <= s["n_scope_tokens"] <= s["n_generated_tokens"]
            for s in out["samples"]
        )
    per_batch = read_parquet(run.path_for("risk_per_batch"))
    assert len(per_batch) == 3 * 2 * 8  # batches x layers x experts
    assert set(res.aggregated["n_batches"]) == {3}
    # rates are rates: the k chosen experts of every token sum to k per layer
    one = per_batch[per_batch.batch_idx == 0]
    sums = one.groupby("layer")["a_unsafe_n"].sum()
    assert np.allclose(sums[sums > 0], 2.0)
    assert run.step("analysis")["status"] == "done"


def test_resume_after_stop_gives_identical_tables(tmp_path, tiny, plan):
    model, tok = tiny
    cfg = AnalysisConfig(scope="prompt", max_new_tokens=2)
    full = run_analysis(Run.create(tmp_path, name="full"), model, tok, plan, cfg)

    run = Run.create(tmp_path, name="stopped")
    calls = {"n": 0}

    def stop_after_one() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    from moe_core.store.events import JobStopped

    with pytest.raises(JobStopped):
        run_analysis(run, model, tok, plan, cfg, should_stop=stop_after_one)
    assert run.completed_batches() == {0}
    before = run.path_for("outputs", batch_idx=0).stat().st_mtime_ns
    resumed = run_analysis(Run.open(run.path), model, tok, None, cfg)  # plan comes from the run
    assert run.path_for("outputs", batch_idx=0).stat().st_mtime_ns == before  # batch 0 not redone
    pd.testing.assert_frame_equal(resumed.per_batch, full.per_batch)
    pd.testing.assert_frame_equal(resumed.aggregated, full.aggregated)


def test_resume_with_other_settings_is_refused(tmp_path, tiny, plan):
    model, tok = tiny
    run = Run.create(tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - the config check or the model, whichever refuses first
        run_analysis(
            run,
            model,
            tok,
            plan,
            AnalysisConfig(scope="prompt", max_new_tokens=0),
            should_stop=iter([False, True]).__next__,
        )
    with pytest.raises(AnalysisError, match="would mix results"):
        run_analysis(run, model, tok, None, AnalysisConfig(scope="generated", max_new_tokens=3))


def test_response_scope_needs_targets(tmp_path, tiny, plan):
    model, tok = tiny
    with pytest.raises(AnalysisError, match="without one"):
        run_analysis(Run.create(tmp_path), model, tok, plan, AnalysisConfig(scope="response"))


def test_quality_filter_pairs_and_unpaired():
    s = PromptItem("s1", "a", "safe", pair_id="p1")
    u = PromptItem("u1", "b", "unsafe", pair_id="p1")
    s2 = PromptItem("s2", "c", "safe", pair_id="p2")
    u2 = PromptItem("u2", "d", "unsafe", pair_id="p2")
    # pair 1: safe refused, unsafe complied -> kept; pair 2: unsafe refused -> both dropped
    assert quality_filter([s, s2, u, u2], [True, True, False, True]) == [True, False, True, False]
    lone = PromptItem("u3", "e", "unsafe")
    assert quality_filter([lone], [True]) == [False]


def test_seed_api_matches_run_tables(tmp_path, tiny):
    model, tok = tiny
    safe, unsafe = _items("safe", 4), _items("unsafe", 4)
    data = process_mixed_batches(model, tok, safe, unsafe, batch_size=4, scope="generated", max_new_tokens=4)
    assert [d["batch_idx"] for d in data] == [0, 1]
    assert data[0]["safe_indices"] == [0, 1] and data[0]["unsafe_indices"] == [2, 3]
    table = calculate_risk_diff_per_batch(data[0], num_experts_per_tok=2)
    assert list(table.columns[:10]) == [
        "batch_idx",
        "layer",
        "expert",
        "a_safe",
        "a_unsafe",
        "d_safe",
        "d_unsafe",
        "a_safe_n",
        "a_unsafe_n",
        "risk_diff",
    ]

    # the same analysis through the run store yields the same numbers
    plan = compose_batches(safe, unsafe, batch_size=4, shuffle=False)
    run = Run.create(tmp_path)
    res = run_analysis(run, model, tok, plan, AnalysisConfig(scope="generated", max_new_tokens=4))
    mine = res.per_batch[res.per_batch.batch_idx == 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine[table.columns[:10]], table[table.columns[:10]], check_dtype=False)

    sft = load_batch_data_list(run, with_routing=True)
    bd = sft["batch_data_list"][0]
    assert [o["in_batch_idx"] for o in bd["batch_outputs"]] == [0, 1, 2, 3]
    again = calculate_risk_diff_per_batch({**bd, "num_experts": 8, "layers": [0, 1]}, num_experts_per_tok=2)
    pd.testing.assert_frame_equal(again[table.columns[:10]], table[table.columns[:10]], check_dtype=False)
