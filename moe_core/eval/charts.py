"""Plotly figures and small HTML views for the app: pure functions of arrays and DataFrames.

Kept out of the page scripts so that they can be unit-tested (a figure is a JSON spec) and the
pages stay thin. Nothing here imports Streamlit, reads files or touches a model.

    fig = risk_heatmap(matrix, title="Batch 3", marked=[(0, 5), (2, 1)])   # layer x expert, zmid=0
    fig = consistency_heatmap(aggregated_df, num_layers=16, num_experts=64)
    fig = loss_curve(pd.DataFrame({"step": [1, 2], "loss": [2.3, 1.9]}))
    html = highlight_tokens_html(["He", "llo"], routed=np.array([True, False]))

Conventions: rows are decoder layers (layer 0 on top), columns experts; risk colours are a
diverging red/blue scale centred on 0 (red = fires more on unsafe tokens).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from moe_core.analysis.risk import risk_matrix

DIVERGING = "RdBu_r"  # blue = fires more on safe tokens, red = more on unsafe tokens
SEQUENTIAL = "Reds"
MARK_COLOR = "#111111"
PICK_COLOR = "#f0a500"  # the clicked cell
SAFE_COLOR = "#2c7fb8"
UNSAFE_COLOR = "#d7301f"
ARM_COLORS = (
    "#d7301f",
    "#2c7fb8",
    "#41ab5d",
    "#807dba",
    "#737373",
)  # chosen, random, layer-matched, full, base
_LAYOUT = dict(margin=dict(l=60, r=20, t=50, b=50), template="plotly_white")
# charts with a legend and long category labels: legend above the plot (never on the tick labels),
# margins grown to fit the labels, so a 400 px wide screen shows no overlap
_NARROW_SAFE = dict(
    margin=dict(l=50, r=10, t=80, b=40, autoexpand=True),
    template="plotly_white",
    legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0.0),
)
# a click selects the cell under it. Not dragmode "select"/"lasso": there Streamlit's chart turns clickmode
# to "event" and a click only clears the selection (box select stays one modebar button away)
CLICK_LAYOUT = dict(clickmode="event+select", dragmode="zoom", hovermode="closest")


def _symmetric_limit(z: np.ndarray, floor: float = 1e-6) -> float:
    """Colour range +-m so that 0 sits in the middle of the diverging scale."""
    finite = np.abs(z[np.isfinite(z)])
    return float(max(finite.max() if finite.size else 0.0, floor))


def _grid_layout(
    fig: go.Figure, title: str, num_layers: int, num_experts: int, height: int | None
) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.0, xanchor="left"),
        xaxis=dict(
            title="expert",
            tickmode="linear" if num_experts <= 32 else "auto",
            dtick=1 if num_experts <= 32 else None,
            showgrid=False,
            zeroline=False,
            constrain="domain",
            range=[-0.5, num_experts - 0.5],
        ),
        # fixed ranges: the click layer's markers would otherwise pad the axes past the cells
        yaxis=dict(
            title="layer",
            range=[num_layers - 0.5, -0.5],
            tickmode="linear" if num_layers <= 32 else "auto",
            dtick=1 if num_layers <= 32 else None,
            showgrid=False,
            zeroline=False,
        ),
        height=height or int(min(900, max(260, 60 + 26 * num_layers))),
        **_LAYOUT,
    )
    return fig


def _int_axis(title: str, n: int) -> dict:
    """An axis of whole numbers (batches, steps): no 0.5 ticks between them."""
    return dict(title=title, tickmode="linear", dtick=1) if n <= 25 else dict(title=title, tickformat="d")


def _marks(marked: Iterable[tuple[int, int]], name: str = "chosen") -> go.Scatter | None:
    pts = [(int(l), int(e)) for l, e in marked]
    if not pts:
        return None
    return go.Scatter(
        x=[e for _, e in pts],
        y=[l for l, _ in pts],
        mode="markers",
        name=name,
        marker=dict(symbol="square-open", size=13, line=dict(width=2.5, color=MARK_COLOR), color=MARK_COLOR),
        hovertemplate="layer %{y}, expert %{x}: " + name + "<extra></extra>",
    )


def _click_layer(z: np.ndarray, label: str, fmt: str = ".3f") -> go.Scatter:
    """An invisible point on every cell (x = expert, y = layer), drawn on top of a heatmap.

    Plotly reports clicks and box/lasso selections on scatter points, not on heatmap cells, so
    this layer is what makes a cell clickable in the app (``st.plotly_chart(on_select=...)``): the
    selection event carries the cell's ``x`` (expert) and ``y`` (layer). It also carries the hover text.
    """
    n_l, n_e = z.shape
    ll, ee = np.meshgrid(np.arange(n_l), np.arange(n_e), indexing="ij")
    vals = np.where(np.isfinite(z), z, np.nan).ravel()
    return go.Scatter(
        x=ee.ravel().tolist(),
        y=ll.ravel().tolist(),
        mode="markers",
        name="cells",
        showlegend=False,
        # invisible until clicked: the selected cell gets an amber outline (plotly's selected-point style)
        marker=dict(
            symbol="square-open",
            size=max(6, min(22, int(800 / max(n_e, 1)))),
            opacity=0.01,
            color=PICK_COLOR,
            line=dict(width=3),
        ),
        selected=dict(marker=dict(opacity=1.0)),
        unselected=dict(marker=dict(opacity=0.01)),
        customdata=[[None if np.isnan(v) else float(v)] for v in vals],
        hovertemplate="layer %{y}, expert %{x}<br>" + label + " %{customdata[0]:" + fmt + "}<br>"
        "<i>click to drill down</i><extra></extra>",
    )


def risk_heatmap(
    matrix: np.ndarray,
    title: str = "Risk difference (unsafe rate - safe rate)",
    marked: Iterable[tuple[int, int]] = (),
    zmax: float | None = None,
    colorbar_title: str = "risk diff",
    height: int | None = None,
    clickable: bool = False,
) -> go.Figure:
    """Layer x expert heatmap of a signed value (NaN cells, e.g. dense layers, stay blank).

    ``zmax`` fixes the colour range to +-zmax (use the same value across batches so colours are
    comparable); by default it is the largest absolute value. ``marked`` draws an open square on
    each chosen (layer, expert). ``clickable`` adds an invisible point per cell (last trace) so a
    click selects the cell (see ``_click_layer``).
    """
    z = np.asarray(matrix, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"a heatmap needs a 2-D [layers, experts] matrix; got shape {z.shape}")
    m = float(zmax) if zmax else _symmetric_limit(z)
    n_l, n_e = z.shape
    fig = go.Figure(
        go.Heatmap(
            z=np.where(np.isfinite(z), z, None).tolist(),
            x=list(range(n_e)),
            y=list(range(n_l)),
            colorscale=DIVERGING,
            zmid=0.0,
            zmin=-m,
            zmax=m,
            xgap=1,
            ygap=1,
            hoverongaps=False,
            colorbar=dict(title=dict(text=colorbar_title), thickness=14),
            hovertemplate="layer %{y}, expert %{x}<br>" + colorbar_title + " %{z:.3f}<extra></extra>",
        )
    )
    mk = _marks(marked)
    if mk is not None:
        fig.add_trace(mk)
        fig.update_layout(showlegend=False)
    if clickable:
        fig.data[0].hoverinfo = "skip"  # the click layer on top shows the same text
        fig.add_trace(_click_layer(z, colorbar_title))
        fig.update_layout(showlegend=False, **CLICK_LAYOUT)
    return _grid_layout(fig, title, n_l, n_e, height)


def signed_consistency(aggregated: pd.DataFrame, num_layers: int, num_experts: int) -> np.ndarray:
    """[layers, experts] of sign(mean risk_diff) x sign_consistency: +1 = always more on unsafe."""

    sign = np.sign(risk_matrix(aggregated, "risk_diff", num_layers, num_experts))
    cons = risk_matrix(aggregated, "sign_consistency", num_layers, num_experts)
    return sign * cons


def consistency_heatmap(
    aggregated: pd.DataFrame,
    num_layers: int,
    num_experts: int,
    marked: Iterable[tuple[int, int]] = (),
    clickable: bool = False,
) -> go.Figure:
    """How reliably each expert's risk difference keeps its sign across batches (-1 .. +1)."""
    z = signed_consistency(aggregated, num_layers, num_experts)
    return risk_heatmap(
        z,
        title="Sign consistency across batches (+1: every batch says 'more on unsafe')",
        marked=marked,
        zmax=1.0,
        colorbar_title="signed consistency",
        clickable=clickable,
    )


def count_heatmap(
    counts: np.ndarray, title: str, colorbar_title: str = "batches", clickable: bool = False
) -> go.Figure:
    """Layer x expert heatmap of a count (e.g. in how many per-batch masks an expert is chosen)."""
    z = np.asarray(counts, dtype=np.float64)
    n_l, n_e = z.shape
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(),
            x=list(range(n_e)),
            y=list(range(n_l)),
            colorscale=SEQUENTIAL,
            zmin=0,
            xgap=1,
            ygap=1,
            colorbar=dict(title=dict(text=colorbar_title), thickness=14),
            hovertemplate="layer %{y}, expert %{x}<br>" + colorbar_title + " %{z:.0f}<extra></extra>",
        )
    )
    if clickable:
        fig.data[0].hoverinfo = "skip"
        fig.add_trace(_click_layer(z, colorbar_title, ".0f"))
        fig.update_layout(showlegend=False, **CLICK_LAYOUT)
    return _grid_layout(fig, title, n_l, n_e, None)


def expert_across_batches(
    batch_ids: Sequence[int], values: Sequence[float], layer: int, expert: int, current: int | None = None
) -> go.Figure:
    """One expert's risk difference in every batch (bars coloured by sign; the ``current`` batch outlined).

    A click on a bar selects it (``st.plotly_chart(on_select=...)`` reports its ``x`` = batch)."""
    v = np.asarray(values, dtype=np.float64)
    colors = [UNSAFE_COLOR if x > 0 else SAFE_COLOR for x in np.nan_to_num(v)]
    outline = [3 if current is not None and int(b) == int(current) else 0 for b in batch_ids]
    fig = go.Figure(
        go.Bar(
            x=[int(b) for b in batch_ids],
            y=np.where(np.isfinite(v), v, None).tolist(),
            marker_color=colors,
            marker_line=dict(width=outline, color=MARK_COLOR),
            hovertemplate="batch %{x}: %{y:.3f}<br><i>click to see this batch's tokens</i><extra></extra>",
        )
    )
    fig.add_hline(y=0, line_width=1, line_color="#888")
    fig.update_layout(
        title=dict(text=f"Layer {layer}, expert {expert}: risk difference per batch", x=0.0),
        xaxis=_int_axis("batch", len(v)),
        yaxis_title="risk diff",
        height=280,
        **_LAYOUT,
        **CLICK_LAYOUT,
    )
    return fig


def loss_curve(points: pd.DataFrame, title: str = "Training loss") -> go.Figure:
    """Line chart of ``loss`` (and any ``*_loss`` columns) against ``step``."""
    if "step" not in points.columns or "loss" not in points.columns:
        raise ValueError(f"loss_curve needs columns 'step' and 'loss'; got {list(points.columns)}")
    fig = go.Figure()
    for col in [c for c in points.columns if c == "loss" or c.endswith("_loss")]:
        sub = points[["step", col]].dropna()
        fig.add_trace(go.Scatter(x=sub["step"].tolist(), y=sub[col].tolist(), mode="lines+markers", name=col))
    n_steps = int(points["step"].max()) if len(points) else 0
    fig.update_layout(
        title=dict(text=title, x=0.0),
        xaxis=_int_axis("step", n_steps),
        yaxis_title="loss",
        height=320,
        **_LAYOUT,
    )
    return fig


def metric_bars(
    summary: pd.DataFrame,
    x: str = "metric",
    group: str = "model",
    y: str = "value",
    title: str = "Held-out behaviour by model",
) -> go.Figure:
    """Grouped bars of a long table (one bar per ``group`` value within each ``x``), with CI whiskers.

    Confidence columns ``{y}_ci_low`` / ``{y}_ci_high`` are drawn as asymmetric error bars when
    present (e.g. the Wilson intervals of ``moe_core.eval.evaluation.summarize``).
    """
    for col in (x, group, y):
        if col not in summary.columns:
            raise ValueError(
                f"metric_bars needs columns {x!r}, {group!r}, {y!r}; got {list(summary.columns)}"
            )
    df = summary.dropna(subset=[y])
    lo, hi = f"{y}_ci_low", f"{y}_ci_high"
    fig = go.Figure()
    for name, sub in df.groupby(group, sort=False):
        vals = sub[y].astype(float)
        err = None
        if lo in sub.columns and hi in sub.columns:
            err = dict(
                type="data",
                symmetric=False,
                array=(sub[hi].astype(float) - vals).clip(lower=0).tolist(),
                arrayminus=(vals - sub[lo].astype(float)).clip(lower=0).tolist(),
                thickness=1.2,
                width=3,
            )
        fig.add_trace(
            go.Bar(
                x=sub[x].astype(str).tolist(),
                y=vals.tolist(),
                name=str(name),
                error_y=err,
                hovertemplate=f"{name}<br>%{{x}}: %{{y:.2f}}<extra></extra>",
            )
        )
    fig.update_layout(
        barmode="group",
        title=dict(text=title, x=0.0),
        yaxis=dict(range=[0, 1.05], title="rate"),
        xaxis=dict(automargin=True, tickangle=0, tickfont=dict(size=11)),
        height=420,
        **_NARROW_SAFE,
    )
    return fig


def wrap_label(text: str, width: int = 11) -> str:
    """``text`` broken into lines of about ``width`` characters with ``<br>`` (plotly tick labels do
    not wrap by themselves and overlap on a narrow screen: four categories on a 400 px screen leave
    about 75 px, 11 characters, per label)."""
    words, lines, cur = str(text).replace("_", " ").split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "<br>".join([*lines, cur] if cur else lines)


STUDY_COLORS = {
    "chosen": "#c0392b",
    "chosen_grad_attr": "#e67e22",
    "chosen_grad_contrast": "#1f77b4",
    "chosen_gate_diff": "#b7950b",
    "chosen_ablation": "#6c3483",
    "random": "#7f8c8d",
    "random_layer": "#2c3e50",
    "steer_off": "#8e44ad",
    "steer_on": "#16a085",
    "steer_both": "#d35400",
}


def study_figure(summary: pd.DataFrame) -> go.Figure:
    """Jailbreak compliance vs share of experts trained (log x), benign answers and over-refusal beside it.

    ``summary`` is ``moe_core.eval.study_summary.summarize_study``'s table; base and full fine-tuning are
    drawn as dashed reference lines. Whiskers: 95% Wilson intervals of the pooled counts.
    """
    from plotly.subplots import make_subplots

    need = {"method", "budget", "jailbreak_compliance", "benign_answer_rate", "over_refusal"}
    if not need <= set(summary.columns):
        raise ValueError(f"study_figure needs columns {sorted(need)}; got {list(summary.columns)}")
    panels = [
        ("jailbreak_compliance", "jailbreak compliance (lower is better)"),
        ("benign_answer_rate", "benign answered (higher is better)"),
        ("over_refusal", "over-refusal (lower is better)"),
    ]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in panels], horizontal_spacing=0.07)
    for col, (metric, _) in enumerate(panels, start=1):
        for method, sub in summary[summary["budget"].between(0, 1, inclusive="neither")].groupby(
            "method", sort=False
        ):
            sub = sub.sort_values("budget")
            v = sub[metric].astype(float)
            err = dict(
                type="data",
                symmetric=False,
                array=(sub[f"{metric}_ci_high"] - v).clip(lower=0).tolist(),
                arrayminus=(v - sub[f"{metric}_ci_low"]).clip(lower=0).tolist(),
                thickness=1.2,
                width=3,
            )
            fig.add_trace(
                go.Scatter(
                    x=sub["budget"].tolist(),
                    y=v.tolist(),
                    mode="lines+markers",
                    name=str(method),
                    legendgroup=str(method),
                    showlegend=col == 1,
                    error_y=err,
                    line=dict(color=STUDY_COLORS.get(str(method))),
                ),
                row=1,
                col=col,
            )
        for method, dash in (("base", "dot"), ("full", "dash")):
            ref = summary[summary["method"] == method]
            if len(ref):
                fig.add_hline(
                    y=float(ref[metric].iloc[0]),
                    line_dash=dash,
                    line_color="#555",
                    row=1,
                    col=col,
                    annotation_text=method if col == 1 else None,
                    annotation_position="top left",
                )
        fig.update_xaxes(type="log", title_text="share of experts trained", row=1, col=col)
        fig.update_yaxes(range=[-0.02, 1.05], row=1, col=col)
    fig.update_layout(
        title=dict(text="Chosen vs random experts", x=0.0, y=0.98, yanchor="top"),
        height=440,
        **{
            **_NARROW_SAFE,
            "margin": dict(l=50, r=10, t=110, b=50, autoexpand=True),
            "legend": dict(orientation="h", yanchor="bottom", y=1.12, xanchor="left", x=0.0),
        },
    )
    fig.update_annotations(font_size=11)  # the panel titles
    return fig


# -- token views ----------------------------------------------------------------------------
def routed_tokens(
    expert_ids: np.ndarray, weights: np.ndarray | None, row: int, expert: int
) -> tuple[np.ndarray, np.ndarray]:
    """For one sample's routing ``[moe_layers, T, k]``: (routed [T] bool, gate weight [T]) of one expert.

    ``row`` is the routing row of the layer (its position in ``moe_layers``).
    """
    hit = np.asarray(expert_ids[row]) == expert  # [T, k]
    routed = hit.any(axis=-1)
    if weights is None:
        return routed, routed.astype(np.float64)
    w = np.where(hit, np.asarray(weights[row], dtype=np.float64), 0.0).sum(axis=-1)
    return routed, w


def highlight_tokens_html(
    tokens: Sequence[str],
    routed: np.ndarray,
    weight: np.ndarray | None = None,
    in_scope: np.ndarray | None = None,
    color: str = "255, 99, 71",
) -> str:
    """Tokens as escaped inline spans; routed tokens highlighted (stronger = larger gate weight).

    Tokens outside the analysed scope (``in_scope`` False) are greyed. Every token passes through
    ``html.escape``, so a prompt can never inject markup into the page.
    """
    routed = np.asarray(routed, dtype=bool)
    if len(tokens) != routed.shape[0]:
        raise ValueError(f"{len(tokens)} tokens but {routed.shape[0]} routing flags")
    w = np.ones(len(tokens)) if weight is None else np.clip(np.asarray(weight, dtype=np.float64), 0.0, 1.0)
    scope = np.ones(len(tokens), dtype=bool) if in_scope is None else np.asarray(in_scope, dtype=bool)
    parts = []
    for tok, r, wt, sc in zip(tokens, routed, w, scope):
        text = html.escape(tok).replace("\n", "&#8629;<br>")
        style = "white-space:pre-wrap;"
        if r:
            alpha = 0.35 + 0.65 * float(wt)
            style += f"background:rgba({color},{alpha:.2f});border-radius:3px;"
        if not sc:
            style += "color:#9aa0a6;"
        title = f' title="gate weight {wt:.2f}"' if r else ""
        parts.append(f'<span style="{style}"{title}>{text}</span>')
    return (
        '<div style="font-family:ui-monospace,monospace;font-size:0.85rem;line-height:1.7;'
        'border:1px solid #e6e6e6;border-radius:6px;padding:6px 8px;margin-bottom:6px;">'
        + "".join(parts)
        + "</div>"
    )


def curves_figure(curves: pd.DataFrame, results: pd.DataFrame, seed: int, batch_seed: int) -> go.Figure:
    """Validation jailbreak compliance vs training step for one seed pair: one line per trained arm (at the
    learning rate chosen for it), the chosen step marked. ``curves``/``results``: a study's two tables."""
    fig = go.Figure()
    pair = (curves["seed"] == seed) & (curves["batch_seed"] == batch_seed)
    rows = results[(results["seed"] == seed) & (results["batch_seed"] == batch_seed) & (results["lr"] > 0)]
    for _, r in rows.sort_values(["budget", "method", "draw"]).iterrows():
        arm = curves[pair & (curves["method"] == r["method"]) & (curves["budget"] == r["budget"])]
        arm = arm[(arm["draw"] == r["draw"]) & (arm["lr"] == r["lr"])].sort_values("step")
        name = f"{r['method']}{'' if r['method'] != 'random' else f' #{r.draw}'} ({r['budget']:.3g})"
        fig.add_trace(go.Scatter(x=arm["step"], y=arm["jailbreak_compliance"], mode="lines", name=name))
        fig.add_trace(
            go.Scatter(
                x=[r["step"]],
                y=[r["val_jailbreak_compliance"]],
                mode="markers",
                marker={"symbol": "x", "size": 9},
                showlegend=False,
                hovertemplate=f"{name}: chosen step %{{x}}<extra></extra>",
            )
        )
    fig.update_layout(
        title=f"Learning curves, seed {seed} / batches {batch_seed} (validation split)",
        xaxis_title="training step",
        yaxis_title="jailbreak compliance",
        yaxis_range=[-0.02, 1.02],
        height=420,
    )
    return fig


def seed_points_figure(per_seed: pd.DataFrame, labels: dict[str, str]) -> go.Figure:
    """Each seed pair's test rate per arm (one dot each) with the median as a bar: the result across seeds,
    never one seed's number. ``per_seed``: ``study_summary.per_seed``; ``labels``: arm -> label, in order."""
    from plotly.subplots import make_subplots

    panels = [
        ("jailbreak_compliance", "jailbreak compliance (lower is better)"),
        ("benign_answer_rate", "benign answered (higher is better)"),
        ("over_refusal", "over-refusal (lower is better)"),
    ]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in panels], horizontal_spacing=0.07)
    arms = [m for m in labels if m in set(per_seed["method"])]
    for col, (metric, _) in enumerate(panels, start=1):
        for i, arm in enumerate(arms):
            sub = per_seed[per_seed["method"] == arm]
            text = [f"seed {s} / batches {b}" for s, b in zip(sub["seed"], sub["batch_seed"])]
            fig.add_bar(
                x=[labels[arm]],
                y=[float(sub[metric].median())],
                marker_color=ARM_COLORS[i % len(ARM_COLORS)],
                opacity=0.35,
                name=labels[arm],
                showlegend=False,
                row=1,
                col=col,
                hovertemplate="median %{y:.2f}<extra></extra>",
            )
            fig.add_scatter(
                x=[labels[arm]] * len(sub),
                y=sub[metric].astype(float).tolist(),
                mode="markers",
                text=text,
                marker=dict(color=ARM_COLORS[i % len(ARM_COLORS)], size=8, line=dict(width=1, color="white")),
                showlegend=False,
                row=1,
                col=col,
                hovertemplate="%{text}: %{y:.2f}<extra></extra>",
            )
        fig.update_yaxes(range=[-0.03, 1.03], row=1, col=col)
    fig.update_layout(height=360, margin=dict(t=50, l=10, r=10, b=10), bargap=0.45)
    return fig
