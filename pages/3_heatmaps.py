"""Heatmaps: layer x expert risk differences per batch and aggregated, sign consistency, token drill-down.

The per-batch [B, L, E] tensor is built once per risk file (cached), so moving the batch slider
only slices it. Drill-down: pick an expert (or click a cell) and see, for every sample of the
batch, which of its tokens were routed to that expert, safe and unsafe side by side.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

import ui  # noqa: I001 - the shared page helpers (not a page)
from moe_core.analysis.analyse import analysis_config_of
from moe_core.analysis.risk import risk_matrix
from moe_core.batching.glossary import RISK_DIFFERENCE, safe_unsafe, sides
from moe_core.errors import MoELabError
from moe_core.eval import charts
from moe_core.model.routing import SCOPES, load_batch_routing

ui.setup("Heatmaps")
st.title("Heatmaps")
run = ui.require_run("the heatmaps")
_plan = ui.load_plan_cached(run.path_for("plan"))
st.caption(
    f"{RISK_DIFFERENCE} {safe_unsafe(bool(_plan is not None and _plan.paired))} "
    "Click a cell to see that expert's tokens below."
)
# a link from another page (Experts, Present) may name the expert and batch to show
_asked = {k: ui.take_param(k) for k in ("layer", "expert", "batch")}
if _asked["layer"] is not None and _asked["expert"] is not None:
    st.session_state["dd_layer"], st.session_state["dd_expert"] = _asked["layer"], _asked["expert"]

agg, per_batch = ui.risk_tables_or_stop(run)

n_layers, n_experts = ui.grid_shape(run, agg)
batch_ids, tensor = ui.risk_tensor(run, n_layers, n_experts)
zmax = float(np.nanmax(np.abs(tensor))) if np.isfinite(tensor).any() else 1.0
agg_m = risk_matrix(agg, "risk_diff", n_layers, n_experts)

view = st.segmented_control(
    "View",
    ["batch", "aggregated", "consistency"],
    default="batch",
    required=True,
    key="hm_view",
    format_func={
        "batch": "Per batch",
        "aggregated": "Aggregated (mean)",
        "consistency": "Sign consistency",
    }.get,
)
if len(batch_ids) > 1:
    _wanted = _asked["batch"] if _asked["batch"] is not None else st.session_state.pop("hm_bar_batch", None)
    if _wanted in {int(b) for b in batch_ids}:  # a link, or a click on a bar of the drill-down
        st.session_state["hm_batch"] = _wanted
    batch = st.select_slider("Batch", options=[int(b) for b in batch_ids], key="hm_batch")
else:
    batch = int(batch_ids[0])
pos = int(np.searchsorted(batch_ids, batch))

if view == "batch":
    fig = charts.risk_heatmap(tensor[pos], title=f"Batch {batch}: risk difference", zmax=zmax, clickable=True)
elif view == "aggregated":
    fig = charts.risk_heatmap(
        agg_m, title=f"Mean risk difference over {len(batch_ids)} batches", clickable=True
    )
else:
    fig = charts.consistency_heatmap(agg, n_layers, n_experts, clickable=True)
event = st.plotly_chart(
    fig,
    key=f"hm_chart_{view}",
    on_select="rerun",
    selection_mode=("points", "box"),
    config={"displaylogo": False, **ui.PLOT_EXPORT},
)

# a click on a cell picks the drill-down expert (once per click; the boxes below can change it after)
clicked = ui.clicked_cell(event, "hm_last_click")
if clicked is not None:
    st.session_state["dd_layer"], st.session_state["dd_expert"] = clicked

# -- one expert across batches ----------------------------------------------------------------
st.subheader("Drill-down")
moe_layers = ui.model_info(run).get("moe_layers") or sorted(int(x) for x in agg["layer"].unique())
c1, c2, c3 = st.columns([1, 1, 2])
if st.session_state.get("dd_layer") not in moe_layers:
    st.session_state["dd_layer"] = int(agg.iloc[0]["layer"])
    st.session_state["dd_expert"] = int(agg.iloc[0]["expert"])
layer = c1.selectbox("Layer", moe_layers, key="dd_layer")
expert = c2.selectbox("Expert", list(range(n_experts)), key="dd_expert")
row = agg[(agg["layer"] == layer) & (agg["expert"] == expert)]
if not row.empty:
    r = row.iloc[0]
    c3.markdown(
        f"mean risk diff **{r['risk_diff']:+.3f}** ± {r['risk_diff_std']:.3f} · sign consistency "
        f"**{r['sign_consistency']:.2f}** over {int(r['n_batches'])} batches · rank "
        f"{int(row.index[0]) + 1} of {len(agg)}"
    )
ui.link(
    "atlas", "This expert in the atlas (whole run)", extra={"layer": layer, "expert": expert}, container=c3
)
bars = st.plotly_chart(
    charts.expert_across_batches(batch_ids, tensor[:, layer, expert], layer, expert, current=batch),
    key="hm_bars",
    on_select="rerun",
    selection_mode="points",
    config=ui.PLOT_EXPORT,
)
if len(batch_ids) > 1:
    st.caption("Click a bar to see that batch's prompts and tokens below.")
_bar = ui.clicked_point(bars, "hm_last_bar", ("x",))
if _bar is not None and _bar[0] != batch and len(batch_ids) > 1:
    st.session_state["hm_bar_batch"] = _bar[0]  # the batch slider above takes it on the rerun
    st.rerun()

# -- tokens routed to the expert in this batch ----------------------------------------------------
st.markdown(
    f"**Tokens of batch {batch} routed to layer {layer}, expert {expert}** "
    "(highlight strength = gate weight; grey = outside the analysed scope)"
)
outputs = routing = None
with ui.guard("This batch's records cannot be read: "):
    outputs = ui.read_json_cached(run.path_for("outputs", batch_idx=batch))
    rpath = run.path_for("routing", batch_idx=batch)
    routing = load_batch_routing(rpath) if rpath.is_file() else None
if outputs is None or routing is None:
    st.info("No routing records for this batch.")
    st.stop()
cfg = analysis_config_of(run)
scope_code = SCOPES[cfg.scope if cfg else "generated"]
if layer not in routing.moe_layers:
    st.info(f"Layer {layer} is not an MoE layer of this model.")
    st.stop()
lrow = routing.moe_layers.index(layer)
tok = None
try:
    tok = ui.tokenizer_for(run.manifest.get("model") or "organism")
except MoELabError as e:  # the model's tokenizer cannot be loaded: token ids still tell the story
    st.caption(f"Tokenizer not available ({e}); showing token ids.")
except Exception as e:  # noqa: BLE001 - a bug: reported (traceback logged), the page goes on with ids
    ui.report_error(e)

show_prompt = st.toggle(
    "Show prompt tokens too", value=cfg is not None and cfg.scope == "prompt", key="dd_prompt"
)
plan = ui.load_plan_cached(run.path_for("plan"))
paired = bool(plan is not None and plan.paired)
SIDES = sides(paired)  # what "safe" and "unsafe" mean in this data mode (moe_core.batching.glossary)


def sample_view(s: dict, rec) -> None:
    keep = np.ones(rec.num_tokens, dtype=bool) if show_prompt else rec.spans != 0
    ids = rec.token_ids[keep]
    routed, weight = charts.routed_tokens(
        rec.expert_ids[:, keep], None if rec.weights is None else rec.weights[:, keep], lrow, expert
    )
    tokens = tok.batch_decode([[int(i)] for i in ids]) if tok is not None else [f"[{int(i)}]" for i in ids]
    n_scope = int((rec.spans[keep] == scope_code).sum())
    verdict = ":blue-badge[refused]" if s.get("refusal") else ":orange-badge[complied]"
    kept = "" if s.get("kept", True) else " · filtered out"
    st.markdown(
        f"**{s['label']}** · {verdict} #{s['in_batch_idx']}{kept} · {int(routed[rec.spans[keep] == scope_code].sum())}"
        f"/{n_scope} answer tokens routed to this expert"
    )
    st.caption(f"Prompt: “{ui.md_escape(str(s['prompt'])[:160])}”")
    st.html(charts.highlight_tokens_html(tokens, routed, weight, rec.spans[keep] == scope_code))


pairs = list(zip(outputs["samples"], routing.samples))


def side_heading(side: str) -> None:
    st.markdown(f"##### {SIDES[side][0]}")
    st.caption(SIDES[side][1])


if paired:  # headings over the pairs; on a narrow screen each card also says its side (sample_view)
    for side, col in zip(("safe", "unsafe"), st.columns(2, gap="large")):
        with col:
            side_heading(side)
if paired:  # one row per pair: the plain request beside its jailbreak
    unsafe_by_pair = {s.get("pair_id"): (s, r) for s, r in pairs if s["label"] == "unsafe"}
    shown = set()
    for s, rec in pairs:
        if s["label"] != "safe":
            continue
        twin = unsafe_by_pair.get(s.get("pair_id"))
        left, right = st.columns(2, gap="large")
        with left:
            sample_view(s, rec)
        if twin is not None:
            shown.add(twin[0]["in_batch_idx"])
            with right:
                sample_view(*twin)
    for s, rec in pairs:  # unsafe items without a twin in this batch
        if s["label"] == "unsafe" and s["in_batch_idx"] not in shown:
            with st.columns(2, gap="large")[1]:
                sample_view(s, rec)
else:  # each heading inside its column, so a narrow screen stacks it with its own cards
    for side, col in zip(("safe", "unsafe"), st.columns(2, gap="large")):
        with col:
            side_heading(side)
            for s, rec in pairs:
                if s["label"] == side:
                    sample_view(s, rec)
