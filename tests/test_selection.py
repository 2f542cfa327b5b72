"""moe_core.analysis.selection: each method on hand-built tables, random baselines, per-batch masks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from moe_core.analysis import risk
from moe_core.analysis.masks import ExpertMask
from moe_core.analysis.selection import (
    NothingSelectedError,
    SelectionConfig,
    SelectionError,
    create_expert_mask,
    identify_unsafe_experts,
    random_experts,
    random_like,
    select_experts,
    select_per_batch,
)
from tests import reference_algorithm as ref

# 3 layers x 4 experts. Positives ranked: (0,0) .5, (2,2) .4, (1,1) .3, (2,3) .25, (0,2) .2,
# (1,3) .1, (1,0) .05; their total is 1.8.
SCORES = np.array(
    [
        [0.50, -0.10, 0.20, 0.00],
        [0.05, 0.30, -0.40, 0.10],
        [0.00, 0.00, 0.40, 0.25],
    ]
)
NL, NE = 3, 4


def _table(scores: np.ndarray = SCORES, **extra: np.ndarray) -> pd.DataFrame:
    layers, experts = np.nonzero(np.ones_like(scores, dtype=bool))
    df = pd.DataFrame({"layer": layers, "expert": experts, "risk_diff": scores.ravel()})
    for name, values in extra.items():
        df[name] = np.asarray(values).ravel()
    return df.sample(frac=1.0, random_state=0).reset_index(drop=True)  # order must not matter


def _chosen(mask: ExpertMask) -> set[tuple[int, int]]:
    return set(mask.experts())


@pytest.mark.parametrize(
    "config, expected",
    [
        (SelectionConfig("top_n", n=3), {(0, 0), (2, 2), (1, 1)}),
        (SelectionConfig("threshold", threshold=0.2), {(0, 0), (2, 2), (1, 1), (2, 3)}),
        (
            SelectionConfig("threshold", threshold=-0.15),
            {(l, e) for l in range(3) for e in range(4)} - {(1, 2)},
        ),
        (SelectionConfig("per_layer", per_layer_k=1), {(0, 0), (1, 1), (2, 2)}),
        (SelectionConfig("per_layer", per_layer_k=2), {(0, 0), (0, 2), (1, 1), (1, 3), (2, 2), (2, 3)}),
        (SelectionConfig("top_n", n=3, threshold=0.35), {(0, 0), (2, 2)}),  # fewer pass than n
    ],
)
def test_methods_on_hand_built_table(config, expected):
    mask = select_experts(_table(), config, NL, NE)
    assert _chosen(mask) == expected
    assert mask.meta["selection"]["method"] == config.method and mask.meta["n_selected"] == len(expected)
    scores = [s["score"] for s in mask.meta["selected"]]
    assert scores == sorted(scores, reverse=True)  # recorded in rank order with their scores
    assert all(SCORES[s["layer"], s["expert"]] == s["score"] for s in mask.meta["selected"])


@pytest.mark.parametrize(
    "p, n_expected",
    [(0.2, 1), (0.2777, 1), (0.2778, 2), (0.5, 2), (0.51, 3), (0.67, 4), (1.0, 7)],
)
def test_top_p_arithmetic(p, n_expected):
    ranked = [(0, 0), (2, 2), (1, 1), (2, 3), (0, 2), (1, 3), (1, 0)]
    mask = select_experts(_table(), SelectionConfig("top_p", top_p=p), NL, NE)
    # .5/1.8 = .2778 (one expert); .9/1.8 = .5 exactly reaches 0.5 (two); then 1.2/1.8 = .667
    assert [(s["layer"], s["expert"]) for s in mask.meta["selected"]] == ranked[:n_expected]


def test_ties_rank_by_layer_then_expert():
    scores = np.array([[0.1, 0.3, 0.3, 0.0], [0.3, 0.0, 0.0, 0.2]])
    mask = select_experts(_table(scores), SelectionConfig("top_n", n=2), 2, 4)
    assert [(s["layer"], s["expert"]) for s in mask.meta["selected"]] == [(0, 1), (0, 2)]


def test_score_column_and_sign_consistency_filter():
    consistency = np.array([[0.5, 1, 1, 1], [1, 1, 1, 0.9], [1, 1, 0.6, 1]])
    t = SCORES[::-1].copy()  # a different ranking in another column
    df = _table(sign_consistency=consistency, t_score=t)
    mask = select_experts(df, SelectionConfig("top_n", n=2, min_sign_consistency=0.8), NL, NE)
    assert mask.experts() == [(1, 1), (2, 3)]  # (0,0) and (2,2) are inconsistent across batches
    by_t = select_experts(df, SelectionConfig("top_n", n=2, score="t_score"), NL, NE)
    assert _chosen(by_t) == {(2, 0), (0, 2)}  # t = .5 at (2,0) and .4 at (0,2)
    with pytest.raises(SelectionError, match="aggregated table"):
        select_experts(_table(), SelectionConfig(n=2, min_sign_consistency=0.5), NL, NE)


def test_random_is_seeded_counted_and_excludes():
    chosen = select_experts(_table(), SelectionConfig("top_n", n=3), NL, NE)
    a = random_like(chosen, seed=7, exclude=chosen)
    b = random_like(chosen, seed=7, exclude=chosen)
    assert a == b and a.count() == 3 and not (a.mask & chosen.mask).any()
    draws = {tuple(random_like(chosen, seed=s).experts()) for s in range(20)}
    assert len(draws) > 10  # different seeds, different draws
    # all available experts when n equals what is left after exclusion
    full = random_experts(NL, NE, NL * NE - 3, seed=0, exclude=chosen)
    assert (full.mask == ~chosen.mask).all()
    with pytest.raises(SelectionError, match="lower n"):
        random_experts(NL, NE, NL * NE - 2, seed=0, exclude=chosen)


def test_random_draws_only_moe_layers_and_uniformly():
    dense_first = _table()[lambda d: d["layer"] > 0]  # layer 0 dense: no rows in the table
    mask = select_experts(dense_first, SelectionConfig("random", n=8, seed=1), NL, NE)
    assert mask.count() == 8 and not mask.mask[0].any()
    assert mask == select_experts(dense_first, SelectionConfig("random", n=8, seed=1), NL, NE)
    hits = np.zeros((NL, NE))
    for s in range(1200):
        hits += random_experts(NL, NE, 1, seed=s).mask
    assert hits.sum() == 1200 and hits.min() > 50 and hits.max() < 150  # expectation 100 per cell


def test_per_batch_masks():
    b0 = _table().assign(batch_idx=0)
    b1 = _table(SCORES[::-1]).assign(batch_idx=1)
    b2 = _table(-np.abs(SCORES)).assign(batch_idx=2)  # nothing positive
    per_batch = pd.concat([b1, b0, b2], ignore_index=True)
    masks = select_per_batch(per_batch, SelectionConfig("top_n", n=2), NL, NE)
    assert sorted(masks) == [0, 1, 2]
    assert _chosen(masks[0]) == {(0, 0), (2, 2)}
    assert _chosen(masks[1]) == {(2, 0), (0, 2)}  # reversed layers: .5 now at (2,0), .4 at (0,2)
    assert masks[2].count() == 0 and masks[1].meta["batch_idx"] == 1
    rnd = select_per_batch(per_batch, SelectionConfig("random", n=3, seed=4), NL, NE)
    assert all(m.count() == 3 for m in rnd.values()) and rnd[0] != rnd[1]
    assert rnd == select_per_batch(per_batch, SelectionConfig("random", n=3, seed=4), NL, NE)
    with pytest.raises(NothingSelectedError, match="no batch selected any expert"):
        select_per_batch(b2, SelectionConfig("top_n", n=2), NL, NE)


def test_seed_compatible_api_equals_reference():
    rng = np.random.default_rng(0)
    batches = [
        {
            "batch_idx": b,
            "safe_routings": [rng.standard_normal((4, int(rng.integers(5, 30)), 8)) for _ in range(3)],
            "unsafe_routings": [rng.standard_normal((4, int(rng.integers(5, 30)), 8)) for _ in range(3)],
        }
        for b in range(3)
    ]
    ours = risk.aggregate_batch_risk_diffs([risk.calculate_risk_diff_per_batch(b, 2) for b in batches])
    for threshold, top_k in [(0.0, None), (0.0, 5), (0.05, 3), (0.05, None), (-1.0, 0)]:
        got = identify_unsafe_experts(ours, threshold, top_k)
        assert got == ref.identify_unsafe_experts(ours, threshold, top_k)
        assert all(type(l) is int and type(e) is int for l, e in got)
        np.testing.assert_array_equal(create_expert_mask(4, 8, got), ref.create_expert_mask(4, 8, got))
    # top_n on our ranked table is the reference's top-k choice
    top5 = select_experts(ours, SelectionConfig("top_n", n=5), 4, 8)
    assert [(s["layer"], s["expert"]) for s in top5.meta["selected"]] == identify_unsafe_experts(ours, 0.0, 5)
    with pytest.raises(ValueError, match="outside"):
        create_expert_mask(4, 8, [(4, 0)])


def test_clear_errors():
    with pytest.raises(SelectionError, match="unknown selection method 'best'"):
        select_experts(_table(), SelectionConfig("best"), NL, NE)
    with pytest.raises(SelectionError, match="empty"):
        select_experts(_table().iloc[:0], SelectionConfig(), NL, NE)
    with pytest.raises(SelectionError, match="n=13 is larger than the 12 experts"):
        select_experts(_table(), SelectionConfig("top_n", n=13), NL, NE)
    with pytest.raises(NothingSelectedError, match=r"lower threshold \(now 0.6\)"):
        select_experts(_table(), SelectionConfig("threshold", threshold=0.6), NL, NE)
    with pytest.raises(NothingSelectedError, match="min_sign_consistency"):
        df = _table(sign_consistency=np.zeros((3, 4)))
        select_experts(df, SelectionConfig(n=2, min_sign_consistency=0.5), NL, NE)
    with pytest.raises(SelectionError, match="use select_per_batch"):
        select_experts(pd.concat([_table(), _table()]), SelectionConfig(), NL, NE)
    with pytest.raises(SelectionError, match="pass the model's sizes"):
        select_experts(_table(), SelectionConfig(), 2, NE)
    with pytest.raises(SelectionError, match="'t_score'"):
        select_experts(_table(), SelectionConfig(score="t_score"), NL, NE)
    with pytest.raises(SelectionError, match="top_p must be in"):
        select_experts(_table(), SelectionConfig("top_p", top_p=0.0), NL, NE)
    with pytest.raises(SelectionError, match="positive scores"):
        select_experts(_table(-np.abs(SCORES)), SelectionConfig("top_p", threshold=-1.0), NL, NE)
    with pytest.raises(SelectionError, match="selects no experts"):
        random_like(ExpertMask.empty(NL, NE), seed=0)


def test_mask_json_round_trip(tmp_path):
    mask = select_experts(_table(), SelectionConfig("top_p", top_p=0.5), NL, NE)
    path = mask.save(tmp_path / "mask.json")
    raw = json.loads(path.read_text())
    assert raw["experts"] == {"0": [0], "2": [2]}
    loaded = ExpertMask.load(path)
    assert loaded == mask and loaded.meta == mask.meta
    assert loaded.meta["selection"]["top_p"] == 0.5
    assert loaded.meta["selected"][0] == {"layer": 0, "expert": 0, "score": 0.5}


# -- mask files: checked field by field ------------------------------------------------------------
# Exactly what the code before the schema wrote: must keep loading.
OLD_MASK = {
    "format": "moe-safety-lab/expert-mask@1",
    "num_layers": 4,
    "num_experts": 8,
    "experts": {"0": [1, 5], "3": [2]},
    "meta": {"selection": {"method": "top_n", "n": 3}},
}
OLD_BATCH_MASKS = {
    "format": "moe-safety-lab/batch-expert-masks@1",
    "num_layers": 4,
    "num_experts": 8,
    "batches": {"0": {"0": [1]}, "3": {"2": [0, 7]}, "5": {}},
}


def test_mask_files_written_by_earlier_code_still_load(tmp_path):
    from moe_core.analysis.masks import load_batch_masks

    (tmp_path / "m.json").write_text(json.dumps(OLD_MASK))
    mask = ExpertMask.load(tmp_path / "m.json")
    assert mask.experts() == [(0, 1), (0, 5), (3, 2)] and mask.meta == OLD_MASK["meta"]
    (tmp_path / "b.json").write_text(json.dumps(OLD_BATCH_MASKS))
    masks = load_batch_masks(tmp_path / "b.json")
    assert sorted(masks) == [0, 3, 5] and masks[3].experts() == [(2, 0), (2, 7)] and masks[5].count() == 0


@pytest.mark.parametrize(
    "content, match",
    [
        ({"0": "12"}, "no 'experts' field"),  # an ESFT-style bare mapping: no shape to check it against
        ({**OLD_MASK, "experts": {"0": "12"}}, r"experts\.0: Input should be a valid list \(got '12'\)"),
        ({**OLD_MASK, "experts": {"0": [1, "2"]}}, r"experts\.0\.1: Input should be a valid integer"),
        ({**OLD_MASK, "experts": {"0": [8]}}, r"experts\.0: experts \[8\] are outside 0\.\.7"),
        ({**OLD_MASK, "experts": {"4": [1]}}, r"experts: layer 4 is outside 0\.\.3"),
        ({**OLD_MASK, "num_layers": 0}, r"num_layers: Input should be greater than or equal to 1"),
        ({**OLD_MASK, "meta": "note"}, r"meta: Input should be a valid dictionary"),
        (OLD_BATCH_MASKS, "holds per-batch masks"),
        ([[0, 1]], "not an expert mask"),
    ],
)
def test_a_bad_mask_file_is_one_clear_error_naming_file_and_field(tmp_path, content, match):
    from moe_core.analysis.masks import MaskError
    from moe_core.errors import MoELabError

    path = tmp_path / "hand_edited.json"
    path.write_text(json.dumps(content))
    with pytest.raises(MaskError, match=match) as info:
        ExpertMask.load(path)
    assert str(info.value).startswith(str(path)) and isinstance(info.value, (MoELabError, ValueError))


def test_a_bad_per_batch_mask_file_names_the_batch(tmp_path):
    from moe_core.analysis.masks import MaskError, load_batch_masks

    path = tmp_path / "per_batch.json"
    for batches, match in [
        ({"0": {"1": "12"}}, r"batches\.0\.1: Input should be a valid list"),
        ({"x": {}}, r"batches: key 'x' is not a whole number"),
        ({"2": {"0": [9]}}, r"batches\.2\.0: experts \[9\]"),
    ]:
        path.write_text(json.dumps({**OLD_BATCH_MASKS, "batches": batches}))
        with pytest.raises(MaskError, match=match):
            load_batch_masks(path)
    path.write_text(json.dumps(OLD_MASK))
    with pytest.raises(MaskError, match="not a per-batch mask file"):
        load_batch_masks(path)
    path.write_text("{not json")
    with pytest.raises(MaskError, match="not valid JSON"):
        load_batch_masks(path)
