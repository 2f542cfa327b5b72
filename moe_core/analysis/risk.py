"""Per-batch risk differences of MoE experts, vectorised, plus aggregation across batches.

For one analysis batch and each (layer, expert): how often the expert is among the top-k
chosen for *unsafe* tokens, minus how often for *safe* tokens::

    a_safe   = safe tokens routed to the expert      d_safe = safe tokens not routed to it
    a_safe_n = a_safe / (a_safe + d_safe + 1e-10)     (the activation rate; 0 with no tokens)
    risk_diff = a_unsafe_n - a_safe_n

The numbers are exactly those of the reference loop (SteerMoE ``calculate_risk_diff_per_batch``,
ported in ``tests/reference_algorithm.py``); here they are counted with one ``np.bincount`` (or
one sort for router logits) instead of Python loops over layers and tokens.

Usage::

    from moe_core import risk
    table = risk.risk_table(batch_idx, safe_ids, unsafe_ids, num_experts=64, layers=moe_layers)
    # or seed-compatible, with router logits [L, T, E] or top-k ids [L, T, k] per sample:
    table = risk.calculate_risk_diff_per_batch(batch_data, num_experts_per_tok=8)
    agg = risk.aggregate_batch_risk_diffs([table, ...])      # ranked by mean risk_diff
    heat = risk.risk_matrix(agg, "risk_diff")                 # [layers, experts] for a heatmap

``layer`` columns hold decoder-layer indices when a ``layers`` mapping (routing row -> decoder
layer, e.g. ``MoEAdapter.moe_layers``) is given; otherwise the routing row index.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from moe_core.errors import MoELabError

logger = logging.getLogger(__name__)

#: Columns of a per-batch table, in the reference's order (ours adds the token counts after).
SEED_COLUMNS = [
    "batch_idx", "layer", "expert", "a_safe", "a_unsafe", "d_safe", "d_unsafe",
    "a_safe_n", "a_unsafe_n", "risk_diff",
]  # fmt: skip
TOKEN_COLUMNS = ["n_safe_tokens", "n_unsafe_tokens"]
#: Columns of an aggregated table that the reference also produced, in its order.
AGG_SEED_COLUMNS = [
    "layer", "expert", "a_safe", "a_unsafe", "d_safe", "d_unsafe",
    "a_safe_n", "a_unsafe_n", "risk_diff", "Layer_Expert", "risk_diff_abs",
]  # fmt: skip
#: Columns the aggregation adds (spread and consistency across batches).
AGG_EXTRA_COLUMNS = [
    "risk_diff_std", "risk_diff_min", "risk_diff_max", "n_batches", "pos_frac",
    "sign_consistency", "t_score",
]  # fmt: skip

# A gap between the k-th and (k+1)-th largest logit below this (relative to the row's scale)
# could become a tie after the softmax; such rows are re-ranked exactly as the reference does.
_TIE_RTOL = 1e-9
# exp() of a logit this far below the row maximum nears float64 underflow, where probabilities
# lose precision and can tie; such rows are also re-ranked exactly.
_UNDERFLOW_GAP = 700.0


class RiskInputError(MoELabError, ValueError):
    """Routing data that cannot be turned into a risk table (shape, dtype, range)."""


# ----------------------------------------------------------------------------- counting
def activation_counts(expert_ids: Any, num_experts: int, *, check: bool = True) -> np.ndarray:
    """Tokens routed to each expert: ``expert_ids [L, T, k]`` (ints) -> ``counts [L, E]`` int64.

    One ``np.bincount`` over ``layer * E + id``. ``check`` validates the id range and that no
    token lists an expert twice (a router never does; a hand-made file might, and would then
    count a token twice).
    """
    ids = np.asarray(expert_ids)
    if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
        raise RiskInputError(
            f"expert ids must be an integer array [layers, tokens, k]; got {ids.dtype} {ids.shape}"
        )
    n_layers, n_tokens, k = ids.shape
    if num_experts < 1:
        raise RiskInputError(f"num_experts must be >= 1; got {num_experts}")
    if n_tokens == 0 or k == 0:
        return np.zeros((n_layers, num_experts), dtype=np.int64)
    if check:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_experts:
            raise RiskInputError(
                f"expert ids range over [{lo}, {hi}] but the model has {num_experts} experts "
                "(ids 0..num_experts-1): pass the right num_experts or fix the routing file"
            )
        if k > num_experts or _has_duplicate_ids(ids, num_experts):
            raise RiskInputError(
                "a token lists the same expert more than once in its top-k ids; "
                "top-k routing ids must be distinct per token and layer"
            )
    offsets = (np.arange(n_layers, dtype=np.intp) * num_experts)[:, None, None]
    flat = (ids.astype(np.intp) + offsets).ravel()
    return np.bincount(flat, minlength=n_layers * num_experts).reshape(n_layers, num_experts)


def _has_duplicate_ids(ids: np.ndarray, num_experts: int) -> bool:
    if ids.shape[-1] < 2:
        return False
    if num_experts <= 64:  # one bit per expert: k distinct ids set exactly k bits
        bits = np.left_shift(np.uint64(1), ids.astype(np.uint64))
        return bool((np.bitwise_count(np.bitwise_or.reduce(bits, axis=-1)) != ids.shape[-1]).any())
    return bool((np.diff(np.sort(ids, axis=-1), axis=-1) == 0).any())


def logit_activation_counts(logits: Any, num_experts_per_tok: int) -> np.ndarray:
    """Top-k counts from router logits ``[L, T, E]`` (or a list of per-sample arrays ``[L, T_i, E]``)
    by the reference rule -> ``[L, E]`` int64.

    The reference takes ``argsort(softmax(logits))[-k:]`` per token. The softmax is monotonic,
    so one vectorised sort of the logits finds the same k experts, except where two
    probabilities tie at the k-th place. Rows where that is possible (a tiny gap between the
    k-th and (k+1)-th logit, or probabilities near float64 underflow) are recomputed exactly as
    the reference does (float64 softmax, ``np.argsort``), so results equal the reference's even
    with ties; which of several exactly-equal experts wins is then whatever ``np.argsort``
    picks (numpy-defined, identical to the reference on the same machine). Ties are common
    with bf16 router logits and have probability zero with continuous random floats.
    """
    parts = [_check_logits(p) for p in ([logits] if isinstance(logits, np.ndarray) else logits)]
    if not parts:
        raise RiskInputError("no routing samples given: pass at least one [layers, tokens, experts] array")
    n_layers, _, n_experts = parts[0].shape
    if any((p.shape[0], p.shape[2]) != (n_layers, n_experts) for p in parts):
        shapes = sorted({(p.shape[0], p.shape[2]) for p in parts})
        raise RiskInputError(f"routing samples disagree on (layers, experts): {shapes}")
    k = _check_k(num_experts_per_tok, n_experts)
    counts = np.zeros((n_layers, n_experts), dtype=np.int64)
    parts = [p for p in parts if p.shape[1] > 0]
    if not parts:
        return counts
    if k == n_experts:  # every expert is always chosen
        return counts + sum(p.shape[1] for p in parts)

    # Each sample is sorted where it lies (no concatenated copy; the sort stays in cache).
    # Counts add up over tokens; the 4 order statistics per row are kept for one check below.
    stats = []
    for p in parts:
        s = np.sort(p, axis=-1)
        chosen = (p >= s[..., n_experts - k, None]).view(np.uint8)
        acc = np.uint8 if p.shape[1] < 2**8 else np.uint16 if p.shape[1] < 2**16 else np.int64
        counts += chosen.sum(axis=1, dtype=acc)  # narrow accumulators sum ~2x faster
        stats.append(s[..., [0, n_experts - k - 1, n_experts - k, n_experts - 1]])
    first, below, kth, top = np.moveaxis(np.concatenate(stats, axis=1).astype(np.float64), -1, 0)
    if not (np.isfinite(top).all() and np.isfinite(first).all()):
        raise RiskInputError("router logits contain NaN or infinity; the routing capture is broken")
    unsure = (kth - below <= _TIE_RTOL * (1.0 + np.abs(top) + np.abs(kth))) | (kth - top < -_UNDERFLOW_GAP)
    if unsure.any():
        counts += _rerank_exactly(parts, unsure, kth, k)
    return counts


def _check_logits(p: Any) -> np.ndarray:
    p = np.asarray(p)
    if p.ndim != 3 or not np.issubdtype(p.dtype, np.floating):
        raise RiskInputError(
            f"router logits must be a float array [layers, tokens, experts]; got {p.dtype} {p.shape}"
        )
    return p


def _check_k(num_experts_per_tok: int, n_experts: int) -> int:
    k = int(num_experts_per_tok)
    if not 1 <= k <= n_experts:
        raise RiskInputError(
            f"num_experts_per_tok={num_experts_per_tok} must be between 1 and the {n_experts} "
            "experts in the routing: pass the model's top-k (config.num_experts_per_tok)"
        )
    return k


def _rerank_exactly(parts: list[np.ndarray], unsure: np.ndarray, kth: np.ndarray, k: int) -> np.ndarray:
    """Count correction for rows that may tie: undo the fast choice, redo the reference's argsort."""
    n_layers, n_experts = parts[0].shape[0], parts[0].shape[2]
    li, ti = np.nonzero(unsure)  # ti indexes the tokens of all parts, concatenated
    logger.debug("re-ranking %d of %d routing rows exactly (possible ties)", li.size, unsure.size)
    offsets = np.cumsum([0] + [p.shape[1] for p in parts])
    part_of = np.searchsorted(offsets, ti, side="right") - 1
    rows = np.empty((li.size, n_experts), dtype=np.float64)
    for i in np.unique(part_of):
        sel = part_of == i
        rows[sel] = parts[i][li[sel], ti[sel] - offsets[i]]
    cell = li[:, None] * n_experts + np.arange(n_experts)
    fast = rows >= kth[li, ti][:, None]
    order = np.argsort(_softmax64(rows), axis=-1)[:, -k:]
    size = n_layers * n_experts
    undo = np.bincount(cell[fast], minlength=size)
    redo = np.bincount((li[:, None] * n_experts + order).ravel(), minlength=size)
    return (redo - undo).reshape(n_layers, n_experts)


def _softmax64(x: np.ndarray) -> np.ndarray:
    """The reference's softmax (float64, max-shifted): same formula, so bit-identical rows."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- tables
def _samples(routings: Any, name: str) -> list[np.ndarray]:
    """One array or a list of per-sample arrays ``[L, T_i, X]``, validated (one form, same L and X)."""
    if routings is None:
        return []
    parts = [routings] if isinstance(routings, np.ndarray) else [np.asarray(r) for r in routings]
    for i, p in enumerate(parts):
        if p.ndim != 3:
            raise RiskInputError(
                f"{name}[{i}] must be 3-D [layers, tokens, experts or k]; got shape {p.shape}"
            )
    if len({(p.shape[0], p.shape[2]) for p in parts}) > 1:
        shapes = sorted({(p.shape[0], p.shape[2]) for p in parts})
        raise RiskInputError(f"{name}: samples disagree on (layers, last dim): {shapes}")
    if len({_form(p, name) for p in parts}) > 1:
        raise RiskInputError(f"{name} mixes integer top-k ids and float logits; use one form per batch")
    return parts


def _form(arr: np.ndarray, name: str) -> str:
    if np.issubdtype(arr.dtype, np.integer):
        return "ids"
    if np.issubdtype(arr.dtype, np.floating):
        return "logits"
    raise RiskInputError(f"{name} has dtype {arr.dtype}: expected float router logits or integer top-k ids")


def _pair_shape(safe: list[np.ndarray], unsafe: list[np.ndarray]) -> tuple[str, int, int]:
    """(form, layers, last dim) shared by both labels; a label without samples just has 0 tokens."""
    if not safe and not unsafe:
        raise RiskInputError("the batch has no safe and no unsafe routing: nothing to compare")
    forms = {_form(p, "routing") for p in safe[:1] + unsafe[:1]}
    if len(forms) > 1:
        raise RiskInputError("safe_routings and unsafe_routings must both be logits or both be top-k ids")
    shapes = {(p.shape[0], p.shape[2]) for p in safe[:1] + unsafe[:1]}
    if len(shapes) > 1:
        raise RiskInputError(f"safe and unsafe routing disagree on (layers, last dim): {sorted(shapes)}")
    (n_layers, last), form = shapes.pop(), forms.pop()
    return form, n_layers, last


def _n_tokens(parts: list[np.ndarray]) -> int:
    return int(sum(p.shape[1] for p in parts))


def _ids_counts(parts: list[np.ndarray], n_layers: int, num_experts: int) -> np.ndarray:
    if not parts:
        return np.zeros((n_layers, num_experts), dtype=np.int64)
    ids = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)  # small ints: one bincount
    return activation_counts(ids, num_experts)


def _layer_index(layers: Sequence[int] | None, n_rows: int) -> np.ndarray:
    if layers is None:
        return np.arange(n_rows, dtype=np.int64)
    idx = np.asarray(layers, dtype=np.int64).reshape(-1)
    if idx.size != n_rows or len(set(idx.tolist())) != idx.size or (idx < 0).any():
        raise RiskInputError(
            f"layers must map each of the {n_rows} routing rows to a distinct decoder layer "
            f"(e.g. MoEAdapter.moe_layers); got {list(map(int, idx))}"
        )
    return idx


def _build_table(
    batch_idx: int, a_safe: np.ndarray, a_unsafe: np.ndarray, n_safe: int, n_unsafe: int, layers: np.ndarray
) -> pd.DataFrame:
    """Counts [L, E] -> the reference's per-batch DataFrame (layer-major rows) + token counts."""
    n_layers, n_experts = a_safe.shape
    a_s, a_u = a_safe.astype(np.float64).ravel(), a_unsafe.astype(np.float64).ravel()
    d_s, d_u = float(n_safe) - a_s, float(n_unsafe) - a_u
    a_safe_n = a_s / (a_s + d_s + 1e-10)  # same expression as the reference: same floats
    a_unsafe_n = a_u / (a_u + d_u + 1e-10)
    size = n_layers * n_experts
    return pd.DataFrame(
        {
            "batch_idx": np.full(size, int(batch_idx), dtype=np.int64),
            "layer": np.repeat(layers, n_experts),
            "expert": np.tile(np.arange(n_experts, dtype=np.int64), n_layers),
            "a_safe": a_s,
            "a_unsafe": a_u,
            "d_safe": d_s,
            "d_unsafe": d_u,
            "a_safe_n": a_safe_n,
            "a_unsafe_n": a_unsafe_n,
            "risk_diff": a_unsafe_n - a_safe_n,
            "n_safe_tokens": np.full(size, int(n_safe), dtype=np.int64),
            "n_unsafe_tokens": np.full(size, int(n_unsafe), dtype=np.int64),
        }
    )


def risk_table(
    batch_idx: int, safe_ids: Any, unsafe_ids: Any, num_experts: int, layers: Sequence[int] | None = None
) -> pd.DataFrame:
    """Per-batch risk table from top-k ids ``[L, T, k]`` (one array, or a list of per-sample ones).

    A label with no tokens (empty list or T = 0) gets rate 0, as in the reference.
    """
    safe, unsafe = _samples(safe_ids, "safe_ids"), _samples(unsafe_ids, "unsafe_ids")
    form, n_layers, _ = _pair_shape(safe, unsafe)
    if form != "ids":
        raise RiskInputError(
            "risk_table takes integer top-k ids; use calculate_risk_diff_per_batch for logits"
        )
    return _build_table(
        batch_idx,
        _ids_counts(safe, n_layers, num_experts),
        _ids_counts(unsafe, n_layers, num_experts),
        _n_tokens(safe),
        _n_tokens(unsafe),
        _layer_index(layers, n_layers),
    )


def calculate_risk_diff_per_batch(
    batch_data: Mapping[str, Any], num_experts_per_tok: int | None = None, *, num_experts: int | None = None
) -> pd.DataFrame:
    """Seed-compatible per-batch risk table (same columns, order and values as the reference).

    ``batch_data``: ``batch_idx``, ``safe_routings``, ``unsafe_routings`` (one array per sample),
    either float router logits ``[L, T, E]`` (the reference format; top-k by softmax rank) or
    integer top-k ids ``[L, T, k]`` (our capture format; then ``num_experts`` comes from the
    keyword or ``batch_data["num_experts"]``). Optional ``batch_data["layers"]`` maps routing rows
    to decoder layers. Extra columns: ``n_safe_tokens``, ``n_unsafe_tokens``.
    """
    if "batch_idx" not in batch_data:
        raise RiskInputError("batch_data needs a 'batch_idx'")
    safe = _samples(batch_data.get("safe_routings"), "safe_routings")
    unsafe = _samples(batch_data.get("unsafe_routings"), "unsafe_routings")
    form, n_layers, last = _pair_shape(safe, unsafe)
    layers = _layer_index(batch_data.get("layers"), n_layers)

    if form == "ids":
        n_exp = num_experts if num_experts is not None else batch_data.get("num_experts")
        if n_exp is None:
            raise RiskInputError(
                "routing holds top-k ids, so the expert count is unknown: pass num_experts= "
                "or put 'num_experts' in batch_data"
            )
        if num_experts_per_tok is not None and int(num_experts_per_tok) != last:
            raise RiskInputError(
                f"routing ids hold top-{last} experts per token but num_experts_per_tok={num_experts_per_tok}"
            )
        a_s, a_u = _ids_counts(safe, n_layers, int(n_exp)), _ids_counts(unsafe, n_layers, int(n_exp))
    else:
        if num_experts_per_tok is None:
            raise RiskInputError("routing holds router logits: pass num_experts_per_tok (the model's top-k)")
        if num_experts is not None and int(num_experts) != last:
            raise RiskInputError(f"logits have {last} experts but num_experts={num_experts}")
        k = _check_k(num_experts_per_tok, last)
        empty = [np.zeros((n_layers, 0, last), dtype=np.float32)]
        a_s = logit_activation_counts(safe or empty, k)
        a_u = logit_activation_counts(unsafe or empty, k)
    return _build_table(batch_data["batch_idx"], a_s, a_u, _n_tokens(safe), _n_tokens(unsafe), layers)


# ----------------------------------------------------------------------------- aggregation
def aggregate_batch_risk_diffs(batch_risk_diffs: Sequence[pd.DataFrame] | pd.DataFrame) -> pd.DataFrame:
    """Combine per-batch tables: the reference's columns plus spread and consistency.

    Counts are summed, rates and ``risk_diff`` averaged over batches (as the reference), then
    ``risk_diff_std`` (sample std, 0 for one batch), ``risk_diff_min``/``max``, ``n_batches``,
    ``pos_frac`` (share of batches with risk_diff > 0), ``sign_consistency`` (share of batches
    whose sign equals the sign of the mean) and ``t_score`` = mean / (std / sqrt(n)): NaN for a
    single batch, +-inf when every batch agrees exactly (std 0), 0 when the mean is 0.
    Rows are ranked by mean risk_diff, descending; ties keep (layer, expert) order so the
    ranking is deterministic (the reference's unstable sort left tie order undefined).
    """
    frames = [batch_risk_diffs] if isinstance(batch_risk_diffs, pd.DataFrame) else list(batch_risk_diffs)
    if not frames:
        raise RiskInputError("no per-batch risk tables to aggregate: run the analysis on at least one batch")
    df = pd.concat(frames, ignore_index=True)
    missing = [c for c in SEED_COLUMNS[1:] if c not in df.columns]
    if missing:
        raise RiskInputError(
            f"risk tables lack columns {missing}; build them with calculate_risk_diff_per_batch"
        )
    if df.empty:
        raise RiskInputError("the risk tables are empty")
    if "batch_idx" in df.columns and df.duplicated(["batch_idx", "layer", "expert"]).any():
        dup = sorted(set(df.loc[df.duplicated(["batch_idx", "layer", "expert"]), "batch_idx"].tolist()))
        raise RiskInputError(f"batch(es) {dup} appear more than once: each batch's table must be given once")

    rd = df["risk_diff"].to_numpy(dtype=np.float64)
    keys = ["layer", "expert"]
    mean_b = df.groupby(keys, sort=True)["risk_diff"].transform("mean").to_numpy()
    work = df.assign(
        _pos=(rd > 0).astype(np.float64), _agree=(np.sign(rd) == np.sign(mean_b)).astype(np.float64)
    )
    spec: dict[str, tuple[str, str]] = {c: (c, "sum") for c in ("a_safe", "a_unsafe", "d_safe", "d_unsafe")}
    spec.update({c: (c, "mean") for c in ("a_safe_n", "a_unsafe_n", "risk_diff")})
    spec.update({c: (c, "sum") for c in TOKEN_COLUMNS if c in df.columns})
    spec.update(
        risk_diff_std=("risk_diff", "std"),
        risk_diff_min=("risk_diff", "min"),
        risk_diff_max=("risk_diff", "max"),
        n_batches=("risk_diff", "size"),
        pos_frac=("_pos", "mean"),
        sign_consistency=("_agree", "mean"),
    )
    agg = work.groupby(keys, sort=True).agg(**spec).reset_index()

    n = agg["n_batches"].to_numpy(dtype=np.float64)
    std = np.where(n > 1, agg["risk_diff_std"].to_numpy(dtype=np.float64), 0.0)
    agg["risk_diff_std"] = std
    agg["t_score"] = _t_score(agg["risk_diff"].to_numpy(dtype=np.float64), std, n)
    layer_s = agg["layer"].astype(str).str.zfill(2)
    expert_s = agg["expert"].astype(str).str.zfill(2)
    agg["Layer_Expert"] = "L" + layer_s + "_E" + expert_s
    agg["risk_diff_abs"] = agg["risk_diff"].abs()

    extra_tokens = [c for c in TOKEN_COLUMNS if c in agg.columns]
    agg = agg[AGG_SEED_COLUMNS + extra_tokens + AGG_EXTRA_COLUMNS]
    order = np.argsort(-agg["risk_diff"].to_numpy(), kind="stable")
    return agg.iloc[order].reset_index(drop=True)


def _t_score(mean: np.ndarray, std: np.ndarray, n: np.ndarray) -> np.ndarray:
    """mean / (std / sqrt(n)), guarded: n = 1 -> NaN; std ~ 0 -> sign(mean) * inf (0 if mean = 0)."""
    t = np.full(mean.shape, np.nan)
    spread = (n > 1) & (std > 1e-12)
    t[spread] = mean[spread] / (std[spread] / np.sqrt(n[spread]))
    flat = (n > 1) & ~spread
    t[flat] = np.copysign(np.inf, mean[flat])
    t[flat & (mean == 0)] = 0.0
    return t


# ----------------------------------------------------------------------------- heatmaps
def _grid_shape(df: pd.DataFrame, num_layers: int | None, num_experts: int | None) -> tuple[int, int]:
    if df.empty:
        raise RiskInputError("the risk table is empty")
    layers, experts = df["layer"].to_numpy(), df["expert"].to_numpy()
    n_l = int(layers.max()) + 1 if num_layers is None else int(num_layers)
    n_e = int(experts.max()) + 1 if num_experts is None else int(num_experts)
    if layers.min() < 0 or experts.min() < 0 or layers.max() >= n_l or experts.max() >= n_e:
        raise RiskInputError(f"the table's (layer, expert) cells do not fit a {n_l} x {n_e} grid")
    return n_l, n_e


def risk_matrix(
    df: pd.DataFrame, value: str = "risk_diff", num_layers: int | None = None, num_experts: int | None = None
) -> np.ndarray:
    """One column of a one-row-per-cell table as ``[layers, experts]`` (NaN where no row, e.g. dense layers)."""
    if value not in df.columns:
        raise RiskInputError(f"no column {value!r} in the risk table; columns: {list(df.columns)}")
    if df.duplicated(["layer", "expert"]).any():
        raise RiskInputError(
            "the table has several rows per (layer, expert), one per batch: aggregate it first "
            "(aggregate_batch_risk_diffs) or use per_batch_tensor"
        )
    n_l, n_e = _grid_shape(df, num_layers, num_experts)
    out = np.full((n_l, n_e), np.nan)
    out[df["layer"].to_numpy(), df["expert"].to_numpy()] = df[value].to_numpy(dtype=np.float64)
    return out


def per_batch_tensor(
    per_batch_df: pd.DataFrame,
    value: str = "risk_diff",
    num_layers: int | None = None,
    num_experts: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch tables (concatenated) -> ``(batch_ids [B], values [B, layers, experts])``, NaN-filled."""
    if value not in per_batch_df.columns or "batch_idx" not in per_batch_df.columns:
        raise RiskInputError(
            f"per_batch_tensor needs columns batch_idx and {value!r}; got {list(per_batch_df.columns)}"
        )
    if per_batch_df.duplicated(["batch_idx", "layer", "expert"]).any():
        raise RiskInputError("several rows share (batch_idx, layer, expert): the same batch was added twice")
    n_l, n_e = _grid_shape(per_batch_df, num_layers, num_experts)
    batch_col = per_batch_df["batch_idx"].to_numpy()
    batch_ids, pos = np.unique(batch_col, return_inverse=True)
    out = np.full((batch_ids.size, n_l, n_e), np.nan)
    out[pos, per_batch_df["layer"].to_numpy(), per_batch_df["expert"].to_numpy()] = per_batch_df[
        value
    ].to_numpy(dtype=np.float64)
    return batch_ids, out
