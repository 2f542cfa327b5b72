"""Choose the "unsafe experts" from a risk table -> ``moe_core.analysis.masks.ExpertMask``.

Methods (``SelectionConfig.method``), all ranking by one score column (``risk_diff`` by default,
or e.g. ``t_score`` of an aggregated table) among experts whose score is above ``threshold``:

- ``top_n``: the ``n`` highest scores overall (the reference's ``identify_unsafe_experts``).
- ``threshold``: every expert above ``threshold``.
- ``per_layer``: the ``per_layer_k`` highest in each layer (spreads the choice over depth).
- ``top_p``: ESFT-style; positive scores sorted descending, the smallest set whose cumulative
  share of their total reaches ``top_p``.
- ``random``: a baseline; ``n`` experts drawn uniformly (seeded) among the table's MoE layers.
  ``random_like(mask, seed, exclude=mask)`` draws as many as another mask, avoiding its experts.

Ties rank by (layer, expert) so every selection is deterministic. The mask's ``meta`` records
the config and each chosen expert's score, so the JSON file says why it holds what it holds.

Usage::

    cfg = SelectionConfig(method="top_p", top_p=0.3, min_sign_consistency=0.75)
    mask = select_experts(aggregated_df, cfg, num_layers=16, num_experts=64)
    masks = select_per_batch(per_batch_df, SelectionConfig(n=10), 16, 64)  # {batch_idx: mask}
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from moe_core.analysis.masks import ExpertMask
from moe_core.errors import MoELabError

logger = logging.getLogger(__name__)

METHODS = ("top_n", "threshold", "per_layer", "top_p", "random")


class SelectionError(MoELabError, ValueError):
    """The selection cannot be made as configured; the message names the knob to change."""


class NothingSelectedError(SelectionError):
    """No expert passed the filters."""


def experts_for_budget(budget: float, total_experts: int) -> int:
    """The one budget rule: a share of all routed experts -> how many experts (at least one).

    A budget means exactly that many experts, ranked by score whatever its sign (the study's
    random arms get the same number), so ``budget_config`` sets no threshold."""
    if not 0 < budget <= 1 or total_experts < 1:
        raise SelectionError(f"budget must be a share in (0, 1] of the routed experts (got {budget})")
    return max(1, round(budget * total_experts))


def budget_config(budget: float, total_experts: int, **values: Any) -> SelectionConfig:
    """Top-N by ``score`` for a budget (``experts_for_budget``), no threshold: exactly N experts."""
    return SelectionConfig(
        **{**values, "method": "top_n", "n": experts_for_budget(budget, total_experts), "threshold": -np.inf}
    )


@dataclass
class SelectionConfig:
    """How to pick experts from a risk table (plain values; saved into the mask's meta)."""

    method: str = "top_n"  # one of METHODS
    n: int = 16  # top_n: experts to keep; random: experts to draw (1/64 of OLMoE's 16 x 64 experts)
    threshold: float = 0.0  # candidates need score > threshold (not used by random)
    per_layer_k: int = 2  # per_layer: experts kept in each layer
    top_p: float = 0.5  # top_p: share of the positive score total to cover, in (0, 1]
    seed: int = 0  # random: RNG seed (per-batch masks draw with (seed, batch_idx))
    min_sign_consistency: float | None = (
        None  # keep experts whose sign_consistency >= this (aggregated tables)
    )
    score: str = "risk_diff"  # column to rank by, e.g. risk_diff, t_score, pos_frac

    def validate(self) -> None:
        """Raise SelectionError on values no method can use."""
        if self.method not in METHODS:
            raise SelectionError(
                f"unknown selection method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        if self.method in ("top_n", "random") and int(self.n) < 1:
            raise SelectionError(f"n must be >= 1 for {self.method}; got {self.n}")
        if self.method == "per_layer" and int(self.per_layer_k) < 1:
            raise SelectionError(f"per_layer_k must be >= 1; got {self.per_layer_k}")
        if self.method == "top_p" and not 0.0 < float(self.top_p) <= 1.0:
            raise SelectionError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.min_sign_consistency is not None and not 0.0 <= float(self.min_sign_consistency) <= 1.0:
            raise SelectionError(
                f"min_sign_consistency must be in [0, 1] or None; got {self.min_sign_consistency}"
            )


# ----------------------------------------------------------------------------- seed API
def identify_unsafe_experts(
    risk_df: pd.DataFrame, threshold: float = 0.0, top_k: int | None = None
) -> list[tuple[int, int]]:
    """Seed-compatible: (layer, expert) of rows with risk_diff > threshold, in the table's order,
    at most ``top_k`` (the table is expected ranked, as ``aggregate_batch_risk_diffs`` returns it)."""
    _require_columns(risk_df, ["layer", "expert", "risk_diff"])
    if top_k is not None and top_k < 0:
        raise SelectionError(f"top_k must be >= 0 or None; got {top_k}")
    chosen = risk_df[risk_df["risk_diff"].to_numpy() > threshold]
    if top_k is not None:
        chosen = chosen.head(top_k)
    return [(int(l), int(e)) for l, e in zip(chosen["layer"].to_numpy(), chosen["expert"].to_numpy())]


def create_expert_mask(
    num_layers: int, n_experts: int, unsafe_experts: Iterable[tuple[int, int]]
) -> np.ndarray:
    """Seed-compatible 0/1 float mask ``[num_layers, n_experts]``; out-of-range experts raise."""
    return ExpertMask.from_experts(unsafe_experts, num_layers, n_experts).mask.astype(np.float64)


# ----------------------------------------------------------------------------- selection
def select_experts(
    risk_df: pd.DataFrame, config: SelectionConfig, num_layers: int, num_experts: int
) -> ExpertMask:
    """Apply ``config`` to a one-row-per-(layer, expert) risk table (aggregated, or one batch's)."""
    config.validate()
    _check_table(risk_df, num_layers, num_experts)
    if config.method == "random":
        layers = np.unique(risk_df["layer"].to_numpy())
        return random_experts(num_layers, num_experts, config.n, config.seed, layers=layers, config=config)

    _require_columns(risk_df, [config.score], hint="pick a score column the table has")
    n = int(config.n)
    if config.method == "top_n" and n > len(risk_df):
        raise SelectionError(
            f"n={config.n} is larger than the {len(risk_df)} experts in the risk table; lower n"
        )
    layer = risk_df["layer"].to_numpy(dtype=np.int64)
    expert = risk_df["expert"].to_numpy(dtype=np.int64)
    score = risk_df[config.score].to_numpy(dtype=np.float64)
    floor = max(config.threshold, 0.0) if config.method == "top_p" else config.threshold
    keep = score > floor
    if config.min_sign_consistency is not None:
        hint = "min_sign_consistency needs an aggregated table (aggregate_batch_risk_diffs)"
        _require_columns(risk_df, ["sign_consistency"], hint=hint)
        keep &= risk_df["sign_consistency"].to_numpy(dtype=np.float64) >= config.min_sign_consistency
    idx = np.nonzero(keep)[0]
    idx = idx[np.lexsort((expert[idx], layer[idx], -score[idx]))]  # score desc, then (layer, expert)

    if config.method == "top_n":
        if idx.size < n:
            logger.warning("top_n: only %d experts pass the filters, fewer than n=%d", idx.size, n)
        idx = idx[:n]
    elif config.method == "per_layer":
        if config.per_layer_k > num_experts:
            raise SelectionError(
                f"per_layer_k={config.per_layer_k} exceeds the {num_experts} experts per layer"
            )
        rank = pd.Series(layer[idx]).groupby(layer[idx]).cumcount().to_numpy()  # 0 = best in its layer
        idx = idx[rank < int(config.per_layer_k)]
    elif config.method == "top_p" and idx.size:
        if not np.isfinite(score[idx]).all():
            raise SelectionError(
                f"top_p needs finite scores; {config.score} has infinite values: use score='risk_diff'"
            )
        share = np.cumsum(score[idx]) / score[idx].sum()
        m = int(np.searchsorted(share, config.top_p - 1e-12, side="left")) + 1
        idx = idx[: min(m, idx.size)]

    if idx.size == 0:
        best = float(np.nanmax(score)) if not np.isnan(score).all() else None
        raise NothingSelectedError(_nothing_message(config, best, floor))
    selected = [
        {"layer": int(layer[i]), "expert": int(expert[i]), "score": _json_float(score[i])} for i in idx
    ]
    return ExpertMask.from_experts(
        zip(layer[idx], expert[idx]),
        num_layers,
        num_experts,
        selection=asdict(config),
        n_selected=int(idx.size),
        selected=selected,
    )


def random_experts(
    num_layers: int,
    num_experts: int,
    n: int,
    seed: int | Sequence[int],
    *,
    layers: Iterable[int] | None = None,
    exclude: ExpertMask | Iterable[tuple[int, int]] | None = None,
    config: SelectionConfig | None = None,
) -> ExpertMask:
    """``n`` distinct experts drawn uniformly among ``layers`` (default all) x all experts, minus ``exclude``."""
    rows = np.arange(num_layers) if layers is None else np.unique(np.asarray(list(layers), dtype=np.int64))
    if rows.size and (rows.min() < 0 or rows.max() >= num_layers):
        raise SelectionError(f"layers {rows.tolist()} fall outside a model with {num_layers} layers")
    allowed = np.zeros((num_layers, num_experts), dtype=bool)
    allowed[rows] = True
    if exclude is not None:
        ex = (
            exclude
            if isinstance(exclude, ExpertMask)
            else ExpertMask.from_experts(exclude, num_layers, num_experts)
        )
        if ex.shape != allowed.shape:
            raise SelectionError(f"exclude mask is {ex.shape}, the model is {allowed.shape}")
        allowed &= ~ex.mask
    cells = np.flatnonzero(allowed)
    if n < 1 or n > cells.size:
        raise SelectionError(
            f"cannot draw n={n} random experts: {cells.size} are available "
            f"({rows.size} MoE layers x {num_experts} experts, minus exclusions); lower n"
        )
    seed_list = [int(s) for s in np.atleast_1d(seed)]
    picked = np.sort(np.random.default_rng(seed_list).choice(cells, size=int(n), replace=False))
    meta_cfg = asdict(config) if config is not None else {"method": "random", "n": int(n)}
    return ExpertMask.from_experts(
        zip(picked // num_experts, picked % num_experts),
        num_layers,
        num_experts,
        selection=meta_cfg,
        rng_seed=seed_list,
        n_selected=int(n),
        excluded=int(0 if exclude is None else (~allowed[rows]).sum()),
    )


def random_like(
    mask: ExpertMask,
    seed: int | Sequence[int],
    exclude: ExpertMask | Iterable[tuple[int, int]] | None = None,
    *,
    layers: Iterable[int] | None = None,
) -> ExpertMask:
    """A random baseline with the same number of experts as ``mask`` (e.g. ``exclude=mask``).

    ``layers`` limits the draw to MoE layers (e.g. ``MoEAdapter.moe_layers`` when the first
    layers are dense); by default every layer of the mask is eligible.
    """
    if mask.count() == 0:
        raise SelectionError("the mask to imitate selects no experts")
    return random_experts(
        mask.num_layers, mask.num_experts, mask.count(), seed, layers=layers, exclude=exclude
    )


def random_layer_matched(
    mask: ExpertMask, seed: int | Sequence[int], exclude_chosen: bool = True
) -> ExpertMask:
    """A random baseline with exactly as many experts in each layer as ``mask`` (by default none of its own).

    Why: a uniform draw spreads experts over layers differently from the chosen set; matching
    the per-layer counts separates "which experts" from "which layers".
    """
    if mask.count() == 0:
        raise SelectionError("the mask to imitate selects no experts")
    rng = np.random.default_rng([int(s) for s in np.atleast_1d(seed)])
    picked: list[tuple[int, int]] = []
    for layer, chosen in sorted(mask.by_layer().items()):
        pool = (
            np.setdiff1d(np.arange(mask.num_experts), chosen)
            if exclude_chosen
            else np.arange(mask.num_experts)
        )
        if pool.size < len(
            chosen
        ):  # the layer is mostly chosen: take every other expert, fill up with chosen ones
            fill = rng.choice(np.asarray(chosen), size=len(chosen) - pool.size, replace=False)
            picked += [(layer, int(e)) for e in np.concatenate([pool, fill])]
            continue
        picked += [(layer, int(e)) for e in rng.choice(pool, size=len(chosen), replace=False)]
    return ExpertMask.from_experts(
        picked,
        mask.num_layers,
        mask.num_experts,
        selection={"method": "random_layer_matched", "n": len(picked)},
        rng_seed=[int(s) for s in np.atleast_1d(seed)],
        n_selected=len(picked),
    )


def select_per_batch(
    per_batch_df: pd.DataFrame, config: SelectionConfig, num_layers: int, num_experts: int
) -> dict[int, ExpertMask]:
    """One mask per analysis batch, each from that batch's own rows of the per-batch tables.

    A batch where nothing passes gets an empty mask (logged); if every batch is empty, raises.
    Random masks draw with seed (config.seed, batch_idx): different per batch, reproducible.
    """
    _require_columns(per_batch_df, ["batch_idx", "layer", "expert"])
    if per_batch_df.empty:
        raise SelectionError("the per-batch risk table is empty: run the analysis first")
    out: dict[int, ExpertMask] = {}
    for b, sub in per_batch_df.groupby("batch_idx", sort=True):
        b = int(b)
        try:
            if config.method == "random":
                config.validate()
                _check_table(sub, num_layers, num_experts)
                m = random_experts(
                    num_layers,
                    num_experts,
                    config.n,
                    [config.seed, b],
                    layers=np.unique(sub["layer"]),
                    config=config,
                )
            else:
                m = select_experts(sub, config, num_layers, num_experts)
        except NothingSelectedError as e:
            logger.warning("batch %d: %s", b, e)
            m = ExpertMask.empty(num_layers, num_experts, selection=asdict(config), n_selected=0)
        m.meta["batch_idx"] = b
        out[b] = m
    if all(m.count() == 0 for m in out.values()):
        raise NothingSelectedError("no batch selected any expert: " + _nothing_message(config, None))
    return out


# ----------------------------------------------------------------------------- helpers
def _require_columns(df: pd.DataFrame, cols: Sequence[str], hint: str = "") -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        extra = f" ({hint})" if hint else ""
        raise SelectionError(f"the risk table lacks column(s) {missing}{extra}; it has {list(df.columns)}")


def _check_table(df: pd.DataFrame, num_layers: int, num_experts: int) -> None:
    _require_columns(df, ["layer", "expert"])
    if df.empty:
        raise SelectionError("the risk table is empty: run the analysis (or load its results) first")
    if df.duplicated(["layer", "expert"]).any():
        raise SelectionError(
            "the table has several rows per (layer, expert), i.e. one per batch: aggregate it "
            "(aggregate_batch_risk_diffs) or use select_per_batch"
        )
    layer, expert = df["layer"].to_numpy(), df["expert"].to_numpy()
    if layer.min() < 0 or expert.min() < 0 or layer.max() >= num_layers or expert.max() >= num_experts:
        raise SelectionError(
            f"the table's layers/experts reach ({int(layer.max())}, {int(expert.max())}) but the model has "
            f"{num_layers} layers x {num_experts} experts: pass the model's sizes"
        )


def _nothing_message(config: SelectionConfig, best: float | None, floor: float | None = None) -> str:
    best_s = "" if best is None else f" (the best {config.score} is {best:.4g})"
    floor = config.threshold if floor is None else floor
    if config.method == "top_p" and floor <= 0:
        knobs = ["top_p needs positive scores: pick another score column or method"]
    else:
        knobs = [f"lower threshold (now {config.threshold:g})"]
    if config.min_sign_consistency is not None:
        knobs.append(f"lower min_sign_consistency (now {config.min_sign_consistency:g})")
    return f"no expert has {config.score} > {floor:g}{best_s}: " + " or ".join(knobs)


def _json_float(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
