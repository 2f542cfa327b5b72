"""Expert atlas: every expert of the run at once: its card, the experts a word fires, a map of all experts."""

from __future__ import annotations

import html

import altair as alt
import pandas as pd
import streamlit as st

import ui  # noqa: I001 - the shared page helpers (not a page)
from moe_core import jobs
from moe_core import pipeline as P
from moe_core.analysis.atlas import AtlasError
from moe_core.pipeline import AtlasSpec
from moe_core.store.jobs import read_job

JOB = "atlas"

ui.setup("Expert atlas")
st.title("Expert atlas")
st.caption(
    "Every expert of the run at once, the way a feature browser shows a sparse-autoencoder feature: how often "
    "it fires on safe and on unsafe tokens, its top contexts, the tokens it takes, the experts it fires with."
)
ui.show_flash()
run = ui.require_run("the expert atlas")
for name in ("layer", "expert"):  # a link from a heatmap, the Experts page or this page: ?layer=&expert=
    value = ui.take_param(name)
    if value is not None:
        st.session_state[f"atlas_{name}"] = value

job = read_job(run.path, JOB)
c1, c2 = st.columns([3, 1], vertical_alignment="center")
c1.caption("Building reads every analysed batch once; a later build only adds the batches analysed since.")
if c2.button("Build / update the atlas", icon=":material/build:", disabled=job.active, key="atlas_build"):
    with ui.guard("The atlas could not start: "):
        jobs.start_step(run, JOB, AtlasSpec())
        ui.flash("Building the expert atlas.")
        st.rerun()
ui.job_panel(run, JOB, unit="batches")
try:
    atlas = ui.atlas_for(run)
except AtlasError as e:
    st.info(str(e).split(":")[0] + ": press **Build / update the atlas** above.", icon=":material/info:")
    st.stop()
meta = atlas.meta
experts = atlas.experts()
n_layers, n_experts = len(meta["moe_layers"]), meta["num_experts"]
st.caption(
    f"{len(meta['shards'])} batches, {atlas.tokens:,} tokens ({meta['safe_tokens']:,} safe, "
    f"{meta['unsafe_tokens']:,} unsafe), {n_layers} MoE layers x {n_experts} experts, top-{meta['top_k']}."
    + ("" if meta["has_weights"] else " Routed without router weights (e.g. vLLM): counts only.")
)
tokenizer = None
with ui.guard("Token text is unavailable: "):
    tokenizer = ui.tokenizer_for(run.manifest.get("model") or "organism")


def expert_link(layer: int, expert: int) -> str:
    """A URL to this page at one expert (keeps the run)."""
    return f"atlas?run={ui.run_ref(run.path)}&layer={layer}&expert={expert}"


def sample_link(c: dict) -> str:
    """A URL to the Heatmaps drill-down at this context's batch and expert (its sample's routed tokens)."""
    return (
        f"heatmaps?run={ui.run_ref(run.path)}&layer={c['layer']}&expert={c['expert']}&batch={c['batch_idx']}"
    )


HEADERS = {  # readable headers of the atlas's expert tables
    "open": st.column_config.LinkColumn("Card", display_text="open"),
    "rate": st.column_config.NumberColumn("Share of its occurrences", format="%.2f"),
    "risk_diff": st.column_config.NumberColumn("Risk difference", format="%+.3f"),
    "rank_by_risk": st.column_config.NumberColumn("Rank by risk"),
    "safe_rate": st.column_config.NumberColumn("Rate on safe", format="%.3f"),
    "unsafe_rate": st.column_config.NumberColumn("Rate on unsafe", format="%.3f"),
    "mean_weight": st.column_config.NumberColumn("Mean router weight", format="%.3f"),
    "share_of_tokens": st.column_config.NumberColumn("Share of routing", format="%.3f"),
}


def experts_table(df: pd.DataFrame, key: str) -> None:
    """Experts, each with a link to its card."""
    df = df.assign(open=[expert_link(r.layer, r.expert) for r in df.itertuples()])
    st.dataframe(
        df, hide_index=True, key=key, column_config={c: v for c, v in HEADERS.items() if c in df.columns}
    )


tab_card, tab_search, tab_map, tab_all = st.tabs(["Expert card", "Search", "Map", "All experts"])

# -- one expert -------------------------------------------------------------------------------------
with tab_card:
    a, b = st.columns(2)
    if st.session_state.get("atlas_layer") not in meta["moe_layers"]:  # a link may name a layer it lacks
        st.session_state["atlas_layer"] = meta["moe_layers"][0]
    st.session_state["atlas_expert"] = min(
        max(int(st.session_state.get("atlas_expert", 0)), 0), n_experts - 1
    )
    layer = a.selectbox(
        "Layer", meta["moe_layers"], key="atlas_layer", help="the model's decoder layer index"
    )
    expert = b.number_input("Expert", 0, n_experts - 1, key="atlas_expert")
    card = atlas.card(int(layer), int(expert), tokenizer)
    shown = (int(layer), int(expert)) in P.present_experts(run)
    if st.button(
        "Remove from the Present story" if shown else "Add to the Present story",
        icon=":material/slideshow:",
        key="atlas_present",
        help="the Present page and the exported report show this expert's card",
    ):
        with ui.guard("Not changed: "):
            P.add_present_expert(run, int(layer), int(expert), keep=not shown)
            ui.flash(
                f"Expert {expert} of layer {layer} {'removed from' if shown else 'added to'} the Present story."
            )
            st.rerun()
    s = card["stats"]
    m = st.columns(4)
    m[0].metric("On safe tokens", f"{s['safe_rate']:.1%}", help=f"{s['safe_n']:,} routed safe tokens")
    m[1].metric("On unsafe tokens", f"{s['unsafe_rate']:.1%}", help=f"{s['unsafe_n']:,} routed unsafe tokens")
    m[2].metric("Risk difference", f"{s['risk_diff']:+.3f}", help="unsafe rate minus safe rate")
    m[3].metric("Mean router weight", "n/a" if s["mean_weight"] is None else f"{s['mean_weight']:.3f}")
    st.markdown("**Top contexts** (the routed token highlighted, by router weight)")
    sides = st.columns(2)
    for col, label in zip(sides, ("safe", "unsafe")):
        col.markdown(f"*{label.capitalize()} tokens*")
        rows = [c for c in card["contexts"] if c["label"] == label]
        for c in rows:
            col.markdown(
                f"<div style='font-family:monospace;font-size:0.85rem;margin-bottom:4px'>"
                f"{c['weight']:.3f} · <a href='{sample_link(c)}' target='_self'>batch {c['batch_idx']} sample "
                f"{c['in_batch_idx']}</a>: "
                f"{html.escape(c.get('left', ''))}<mark>{html.escape(c['token'])}</mark>"
                f"{html.escape(c.get('right', ''))}</div>",
                unsafe_allow_html=True,
            )
        if not rows:
            col.caption("none among the top contexts")
    if card["writes"] is not None and len(card["writes"]):
        st.markdown(
            "**What it writes** (its mean output through the final norm and unembedding promotes): "
            + ", ".join(f"`{ui.md_escape(t)}`" for t in card["writes"]["token"])
        )
    t1, t2 = st.columns(2)
    t1.markdown("**Tokens it takes most**")
    t1.dataframe(card["tokens"][["token", "n"]].head(15), hide_index=True, key="atlas_tokens")
    with t2:
        for what, key in (("same layer", "coactive_same_layer"), ("next layer", "coactive_next_layer")):
            st.markdown(f"**Fires with ({what})**")
            target = int(layer) if key == "coactive_same_layer" else card["next_layer"]
            links = [f"[{p['expert']}]({expert_link(target, p['expert'])}) ({p['n']})" for p in card[key]]
            last = key == "coactive_next_layer" and card["next_layer"] is None
            st.markdown("none: the last MoE layer" if last else ", ".join(links) or "none")
    if len(card["risk_series"]):
        st.markdown("**Risk difference batch by batch**")
        st.line_chart(card["risk_series"], x="batch_idx", y="risk_diff", height=180)
    for sh in card["shift"]:
        st.caption(
            f"After training {sh['training']}: risk difference {sh['before']:+.3f} -> {sh['after']:+.3f}"
        )

# -- search -----------------------------------------------------------------------------------------
with tab_search:
    words = st.text_input("A word or a prompt", key="atlas_search", max_chars=20_000)
    if words.strip():
        if tokenizer is None:
            st.warning("Searching by word needs the run's tokenizer.")
        else:
            ids = tokenizer(words, add_special_tokens=False)["input_ids"]
            hits = atlas.search(ids)
            if hits.empty:
                st.info("No expert in the atlas saw these tokens.")
            else:
                experts_table(hits, "atlas_hits")

# -- map --------------------------------------------------------------------------------------------
with tab_map:
    st.caption(
        "Each dot is an expert, placed by PCA of its token profile (the share of its routed tokens per token, "
        "over the most common tokens): experts that take the same tokens sit together. Colour: risk difference. "
        "Click or drag a box to list experts."
    )
    points = atlas.map()
    pick = alt.selection_interval(name="box")
    click = alt.selection_point(name="dot", fields=["layer", "expert"])
    chart = (
        alt.Chart(points)
        .mark_circle(size=60)
        .encode(
            x=alt.X("x:Q", title="PC 1"),
            y=alt.Y("y:Q", title="PC 2"),
            color=alt.Color("risk_diff:Q", scale=alt.Scale(scheme="redblue", reverse=True, domainMid=0)),
            tooltip=["layer", "expert", alt.Tooltip("risk_diff:Q", format="+.3f")],
        )
        .add_params(pick, click)
        .properties(height=420)
    )
    event = st.altair_chart(chart, on_select="rerun", key="atlas_map", width="stretch")
    chosen = pd.DataFrame()
    selection = getattr(event, "selection", None) or {}
    if selection.get("dot"):
        chosen = pd.DataFrame(selection["dot"])[["layer", "expert"]]
    elif selection.get("box"):
        box = selection["box"]
        x0, x1 = box.get("x", [0, 0])
        y0, y1 = box.get("y", [0, 0])
        chosen = points[points["x"].between(x0, x1) & points["y"].between(y0, y1)][["layer", "expert"]]
    if len(chosen):
        chosen = chosen.merge(points, on=["layer", "expert"]).sort_values("risk_diff", ascending=False)
        experts_table(chosen[["layer", "expert", "risk_diff"]], "atlas_picked")

# -- every expert ----------------------------------------------------------------------------------
with tab_all:
    experts_table(experts.sort_values("risk_diff", ascending=False), "atlas_all")
