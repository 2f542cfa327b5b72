"""moe_core.analysis.risk: the vectorised risk tables equal the reference loop port exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moe_core.analysis import risk
from tests import reference_algorithm as ref

L, E, K = 4, 8, 2


def _logits(
    rng: np.random.Generator, n_tokens: int, dtype=np.float32, ties: bool | str = False
) -> np.ndarray:
    if ties == "wide":  # softmax underflows to exactly 0 for all but the top expert: ties in probability
        return (rng.standard_normal((L, n_tokens, E)) * 1000).astype(dtype)
    if ties:  # few distinct values, like bf16 router logits: ties at the k-th place are common
        return rng.integers(-2, 3, size=(L, n_tokens, E)).astype(dtype)
    return rng.standard_normal((L, n_tokens, E)).astype(dtype)


def _batches(seed: int = 0, ties: bool | str = False, dtype=np.float32) -> list[dict]:
    """Several batches, uneven token counts; batch 2 has zero safe tokens, batch 3 an empty sample."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(4):
        safe = [_logits(rng, int(rng.integers(1, 40)), dtype, ties) for _ in range(3)]
        unsafe = [_logits(rng, int(rng.integers(1, 40)), dtype, ties) for _ in range(3)]
        if b == 2:
            safe = [_logits(rng, 0, dtype, ties) for _ in range(3)]
        if b == 3:
            unsafe.append(_logits(rng, 0, dtype, ties))
        out.append({"batch_idx": 10 + b, "safe_routings": safe, "unsafe_routings": unsafe})
    return out


def _to_ids(batch: dict, k: int = K) -> dict:
    """Logits -> top-k ids (uint8, shuffled within the k) with the reference's ranking rule."""
    rng = np.random.default_rng(1)

    def conv(x: np.ndarray) -> np.ndarray:
        ids = np.argsort(ref._softmax(x), axis=-1)[..., -k:] if x.shape[1] else np.zeros((L, 0, k), int)
        return rng.permuted(ids, axis=-1).astype(np.uint8)

    return {
        "batch_idx": batch["batch_idx"],
        "safe_routings": [conv(x) for x in batch["safe_routings"]],
        "unsafe_routings": [conv(x) for x in batch["unsafe_routings"]],
        "num_experts": E,
    }


@pytest.mark.parametrize("ties", [False, True, "wide"], ids=["random", "tied", "underflow"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logits_form_equals_reference_exactly(ties, dtype):
    for batch in _batches(ties=ties, dtype=dtype):
        expected = ref.calculate_risk_diff_per_batch(batch, K)
        got = risk.calculate_risk_diff_per_batch(batch, K)
        assert list(got.columns) == risk.SEED_COLUMNS + risk.TOKEN_COLUMNS
        pd.testing.assert_frame_equal(got[risk.SEED_COLUMNS], expected, check_exact=True)


def test_tied_logits_choose_exactly_k_per_token():
    # A plain "logit >= k-th value" count would pick more than k experts on tied rows.
    batch = _batches(seed=3, ties=True)[0]
    got = risk.calculate_risk_diff_per_batch(batch, K)
    n_safe = sum(x.shape[1] for x in batch["safe_routings"])
    per_layer = got.groupby("layer")["a_safe"].sum().to_numpy()
    np.testing.assert_array_equal(per_layer, np.full(L, K * n_safe))
    logits = np.concatenate(batch["safe_routings"], axis=1)
    naive = (logits >= np.sort(logits, axis=-1)[..., [E - K]]).sum()
    assert naive > K * n_safe * L  # the data really has ties at the boundary


def test_ids_form_equals_logits_form():
    for batch in _batches(seed=5):
        from_logits = risk.calculate_risk_diff_per_batch(batch, K)
        ids_batch = _to_ids(batch)
        from_ids = risk.calculate_risk_diff_per_batch(ids_batch, K)
        pd.testing.assert_frame_equal(from_ids, from_logits, check_exact=True)
        table = risk.risk_table(
            batch["batch_idx"], ids_batch["safe_routings"], ids_batch["unsafe_routings"], E
        )
        pd.testing.assert_frame_equal(table, from_logits, check_exact=True)


def test_activation_counts_by_hand():
    ids = np.array(
        [[[0, 1], [1, 2], [2, 1]], [[3, 0], [0, 3], [0, 1]]], dtype=np.int16
    )  # [2 layers, 3 tokens, k=2]
    np.testing.assert_array_equal(risk.activation_counts(ids, 4), [[1, 3, 2, 0], [3, 1, 0, 2]])


def test_zero_safe_tokens_give_zero_rate():
    batch = _batches()[2]
    got = risk.calculate_risk_diff_per_batch(batch, K)
    assert (got["n_safe_tokens"] == 0).all() and (got["a_safe_n"] == 0).all()
    np.testing.assert_array_equal(got["risk_diff"], got["a_unsafe_n"])
    no_samples = risk.calculate_risk_diff_per_batch({**batch, "safe_routings": []}, K)
    pd.testing.assert_frame_equal(no_samples, got)


def test_layers_map_rows_to_decoder_layers():
    batch = _batches()[0]
    plain = risk.calculate_risk_diff_per_batch(batch, K)
    mapped = risk.calculate_risk_diff_per_batch({**batch, "layers": [1, 3, 5, 7]}, K)
    np.testing.assert_array_equal(mapped["layer"], np.repeat([1, 3, 5, 7], E))
    pd.testing.assert_frame_equal(mapped.drop(columns="layer"), plain.drop(columns="layer"))


def test_aggregate_equals_reference():
    tables = [risk.calculate_risk_diff_per_batch(b, K) for b in _batches(seed=7)]
    expected = ref.aggregate_batch_risk_diffs([t[risk.SEED_COLUMNS] for t in tables])
    got = risk.aggregate_batch_risk_diffs(tables)
    assert list(got.columns) == risk.AGG_SEED_COLUMNS + risk.TOKEN_COLUMNS + risk.AGG_EXTRA_COLUMNS
    by_cell = lambda df: df.sort_values(["layer", "expert"]).reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(by_cell(got[risk.AGG_SEED_COLUMNS]), by_cell(expected), check_exact=True)
    # ranked by mean risk_diff, ties in (layer, expert) order
    key = np.lexsort((got["expert"], got["layer"], -got["risk_diff"]))
    np.testing.assert_array_equal(key, np.arange(len(got)))
    # same ranking of values as the reference (whose unstable sort leaves tie order undefined)
    assert np.array_equal(got["risk_diff"].to_numpy(), expected["risk_diff"].to_numpy())


def _hand_table(batch_idx: int, risk_diffs: list[float]) -> pd.DataFrame:
    rd = np.asarray(risk_diffs)
    n = rd.size
    return pd.DataFrame(
        {
            "batch_idx": batch_idx, "layer": np.zeros(n, int), "expert": np.arange(n),
            "a_safe": np.ones(n), "a_unsafe": np.full(n, 2.0), "d_safe": np.full(n, 3.0), "d_unsafe": np.full(n, 4.0),
            "a_safe_n": np.full(n, 0.25), "a_unsafe_n": 0.25 + rd, "risk_diff": rd,
        }
    )  # fmt: skip


def test_aggregate_consistency_columns_by_hand():
    batches = [[0.2, 0.15, 0.0, -0.5, 0.15], [0.4, 0.15, 0.0, 0.1, 0.15], [-0.3, 0.15, 0.0, -0.2, 0.15]]
    got = risk.aggregate_batch_risk_diffs([_hand_table(b, rd) for b, rd in enumerate(batches)])
    assert list(got["expert"]) == [1, 4, 0, 2, 3]  # by mean risk_diff; the 1/4 tie in expert order
    got = got.set_index("expert")
    e0, e1, e2, e3 = (got.loc[i] for i in range(4))
    assert e0["risk_diff"] == pytest.approx(0.1) and e1["risk_diff"] == pytest.approx(0.15)
    assert e0["a_safe"] == 3.0 and e0["d_unsafe"] == 12.0 and e0["n_batches"] == 3
    assert e0["Layer_Expert"] == "L00_E00" and e3["Layer_Expert"] == "L00_E03"
    assert e0["pos_frac"] == pytest.approx(2 / 3) and e0["sign_consistency"] == pytest.approx(2 / 3)
    assert e0["risk_diff_min"] == -0.3 and e0["risk_diff_max"] == 0.4
    std0 = np.std([0.2, 0.4, -0.3], ddof=1)
    assert e0["risk_diff_std"] == pytest.approx(std0)
    assert e0["t_score"] == pytest.approx(0.1 / (std0 / np.sqrt(3)))
    assert e1["sign_consistency"] == 1.0 and e1["risk_diff_std"] == pytest.approx(0, abs=1e-15)
    assert e1["t_score"] == np.inf  # every batch agrees exactly
    assert e2["t_score"] == 0.0 and e2["sign_consistency"] == 1.0 and e2["pos_frac"] == 0.0
    assert e3["sign_consistency"] == pytest.approx(2 / 3) and e3["risk_diff_abs"] == pytest.approx(0.2)

    single = risk.aggregate_batch_risk_diffs(_hand_table(0, [0.3, -0.1]))
    assert (single["risk_diff_std"] == 0).all() and single["t_score"].isna().all()
    assert (single["sign_consistency"] == 1).all() and list(single["expert"]) == [0, 1]


def test_risk_matrix_and_per_batch_tensor_placement():
    tables = [risk.calculate_risk_diff_per_batch({**b, "layers": [0, 2, 3, 5]}, K) for b in _batches()]
    agg = risk.aggregate_batch_risk_diffs(tables)
    m = risk.risk_matrix(agg, "risk_diff", num_layers=6)
    assert m.shape == (6, E)
    assert np.isnan(m[[1, 4]]).all() and not np.isnan(m[[0, 2, 3, 5]]).any()
    row = agg.iloc[0]
    assert m[row["layer"], row["expert"]] == row["risk_diff"]

    per_batch = pd.concat(tables, ignore_index=True)
    ids, t = risk.per_batch_tensor(per_batch, "a_unsafe_n")
    np.testing.assert_array_equal(ids, [10, 11, 12, 13])
    assert t.shape == (4, 6, E)
    sel = (per_batch["batch_idx"] == 12) & (per_batch["layer"] == 3) & (per_batch["expert"] == 4)
    assert t[2, 3, 4] == per_batch.loc[sel, "a_unsafe_n"].item()
    with pytest.raises(risk.RiskInputError, match="aggregate it first"):
        risk.risk_matrix(per_batch)


def test_bad_inputs_raise_clear_errors():
    batch = _batches()[0]
    ids_batch = _to_ids(batch)
    with pytest.raises(risk.RiskInputError, match="num_experts_per_tok"):
        risk.calculate_risk_diff_per_batch(batch, E + 1)
    with pytest.raises(risk.RiskInputError, match="num_experts_per_tok"):
        risk.calculate_risk_diff_per_batch(batch)
    with pytest.raises(risk.RiskInputError, match="pass num_experts"):
        risk.calculate_risk_diff_per_batch({k: v for k, v in ids_batch.items() if k != "num_experts"}, K)
    with pytest.raises(risk.RiskInputError, match="top-2 experts"):
        risk.calculate_risk_diff_per_batch(ids_batch, 3)
    with pytest.raises(risk.RiskInputError, match="range over"):
        risk.calculate_risk_diff_per_batch(ids_batch, K, num_experts=4)
    with pytest.raises(risk.RiskInputError, match="both be logits"):
        risk.calculate_risk_diff_per_batch({**batch, "unsafe_routings": ids_batch["unsafe_routings"]}, K)
    with pytest.raises(risk.RiskInputError, match="distinct decoder layer"):
        risk.calculate_risk_diff_per_batch({**batch, "layers": [0, 1, 1, 2]}, K)
    bad = [x.copy() for x in batch["safe_routings"]]
    bad[0][0, 0, 0] = np.nan
    with pytest.raises(risk.RiskInputError, match="NaN"):
        risk.calculate_risk_diff_per_batch({**batch, "safe_routings": bad}, K)
    dup = np.zeros((1, 2, 2), dtype=np.int64)
    with pytest.raises(risk.RiskInputError, match="same expert more than once"):
        risk.activation_counts(dup, 4)
    with pytest.raises(risk.RiskInputError, match="same expert more than once"):
        risk.activation_counts(np.array([[[0, 1], [100, 100]]]), 300)  # the sort path (E > 64)
    with pytest.raises(risk.RiskInputError, match="no safe and no unsafe"):
        risk.calculate_risk_diff_per_batch({"batch_idx": 0, "safe_routings": [], "unsafe_routings": []}, K)
    with pytest.raises(risk.RiskInputError, match="at least one batch"):
        risk.aggregate_batch_risk_diffs([])
    table = risk.calculate_risk_diff_per_batch(batch, K)
    with pytest.raises(risk.RiskInputError, match=r"batch\(es\) \[10\] appear more than once"):
        risk.aggregate_batch_risk_diffs([table, table])
