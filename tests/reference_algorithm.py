"""A faithful loop port of the reference risk-difference code, used ONLY by tests and bench.

The reference (JACKPURCELL/SteerMoE ``demo_refactored.py``) counts, with Python loops over
layers and tokens, how often each expert is among the top-k of the softmaxed router logits on
safe and on unsafe tokens, and ranks experts by the difference of the two activation rates.
This file keeps those loops on purpose: it is the yardstick that ``moe_core.analysis.risk`` (vectorised)
must match exactly, and the baseline that ``bench/bench_risk.py`` times. Do not optimise it.

Assumptions where the reference is not fully specified: the softmax is computed once over the
whole concatenated array in float64 (``exp(x - max) / sum``, the numerically usual form), and
``identify_unsafe_experts`` applies ``head(top_k)`` only when ``top_k is not None``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def calculate_risk_diff_per_batch(batch_data: dict, num_experts_per_tok: int) -> pd.DataFrame:
    """Reference: per-(layer, expert) activation counts and rates in one mixed batch."""
    safe_all = np.concatenate(batch_data["safe_routings"], axis=1)  # [layers, tokens, experts]
    unsafe_all = np.concatenate(batch_data["unsafe_routings"], axis=1)
    n_layers, _, n_experts = safe_all.shape
    k = num_experts_per_tok

    safe_probs = _softmax(safe_all)
    unsafe_probs = _softmax(unsafe_all)

    a_safe = np.zeros((n_layers, n_experts))
    d_safe = np.zeros((n_layers, n_experts))
    a_unsafe = np.zeros((n_layers, n_experts))
    d_unsafe = np.zeros((n_layers, n_experts))

    for layer in range(n_layers):
        for token in range(safe_probs.shape[1]):
            prob = safe_probs[layer, token]
            activated = np.argsort(prob)[-k:]
            deactivated = np.argsort(prob)[:-k]
            a_safe[layer, activated] += 1
            d_safe[layer, deactivated] += 1
        for token in range(unsafe_probs.shape[1]):
            prob = unsafe_probs[layer, token]
            activated = np.argsort(prob)[-k:]
            deactivated = np.argsort(prob)[:-k]
            a_unsafe[layer, activated] += 1
            d_unsafe[layer, deactivated] += 1

    a_safe_n = a_safe / (a_safe + d_safe + 1e-10)
    a_unsafe_n = a_unsafe / (a_unsafe + d_unsafe + 1e-10)
    risk_diff = a_unsafe_n - a_safe_n

    rows = []
    for layer in range(n_layers):
        for expert in range(n_experts):
            rows.append(
                {
                    "batch_idx": batch_data["batch_idx"],
                    "layer": layer,
                    "expert": expert,
                    "a_safe": a_safe[layer, expert],
                    "a_unsafe": a_unsafe[layer, expert],
                    "d_safe": d_safe[layer, expert],
                    "d_unsafe": d_unsafe[layer, expert],
                    "a_safe_n": a_safe_n[layer, expert],
                    "a_unsafe_n": a_unsafe_n[layer, expert],
                    "risk_diff": risk_diff[layer, expert],
                }
            )
    return pd.DataFrame(rows)


def aggregate_batch_risk_diffs(batch_risk_diffs: list[pd.DataFrame]) -> pd.DataFrame:
    """Reference: sum counts, average rates and risk differences over batches, rank."""
    all_df = pd.concat(batch_risk_diffs, ignore_index=True)
    agg = (
        all_df.groupby(["layer", "expert"])
        .agg(
            {
                "a_safe": "sum",
                "a_unsafe": "sum",
                "d_safe": "sum",
                "d_unsafe": "sum",
                "a_safe_n": "mean",
                "a_unsafe_n": "mean",
                "risk_diff": "mean",
            }
        )
        .reset_index()
    )
    agg["Layer_Expert"] = agg.apply(lambda r: f"L{int(r['layer']):02d}_E{int(r['expert']):02d}", axis=1)
    agg["risk_diff_abs"] = agg["risk_diff"].abs()
    return agg.sort_values("risk_diff", ascending=False)


def identify_unsafe_experts(risk_df: pd.DataFrame, threshold: float = 0.0, top_k: int | None = None) -> list:
    """Reference: experts with risk_diff above threshold, in table order, at most top_k."""
    unsafe = risk_df[risk_df["risk_diff"] > threshold]
    if top_k is not None:
        unsafe = unsafe.head(top_k)
    return [(int(r["layer"]), int(r["expert"])) for _, r in unsafe.iterrows()]


def create_expert_mask(num_layers: int, n_experts: int, unsafe_experts: list) -> np.ndarray:
    """Reference: 0/1 float mask [layers, experts]."""
    mask = np.zeros((num_layers, n_experts))
    for layer, expert in unsafe_experts:
        mask[layer, expert] = 1
    return mask
