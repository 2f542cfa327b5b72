"""Present: one run told to an audience in full-width steps, with no controls in the way; and the
"Export report" button (one self-contained HTML file, written into the run, offered for download).

Steps: the question, the batches, the heatmap with the chosen experts, their tokens, before vs
after with intervals, the selection study's curve. Each appears once the run has reached it.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

import ui  # noqa: I001 - the shared page helpers (not a page)
from moe_core import pipeline as P
from moe_core.analysis.atlas_query import card_text
from moe_core.analysis.risk import risk_matrix
from moe_core.eval import charts
from moe_core.eval.evaluation import list_evaluations, load_evaluation
from moe_core.eval.report import (
    QUESTION,
    REPORT_NAME,
    chosen_mask,
    interval_table,
    write_report,
)
from moe_core.eval.study_summary import load_study
from moe_core.pipeline import StudySpec

ui.setup("Present", sidebar_state="collapsed")
st.title("Present")
run = ui.require_run("the presentation")
st.caption(f"Run **{ui.md_escape(run.name)}** · `{run.id}`")

# -- export -------------------------------------------------------------------------------------
with st.container(border=True):
    c1, c2 = st.columns([1, 2], vertical_alignment="center")
    if c1.button("Export report", icon=":material/description:", type="primary", key="pr_export"):
        with ui.guard("The report was not written: "):
            path = write_report(run)
            ui.flash(
                f"Wrote {path} ({path.stat().st_size // 1024} KB): one HTML file, figures interactive, opens offline."
            )
            st.rerun()
    report = run.path / REPORT_NAME
    if report.is_file():
        c2.download_button(
            "Download report.html",
            report.read_bytes(),
            file_name=f"{run.id}-report.html",
            mime="text/html",
            icon=":material/download:",
            key="pr_download",
        )
    ui.show_flash()

step = 0


def header(title: str) -> None:
    global step
    step += 1
    st.divider()
    st.header(f"{step}. {title}")


# -- 1. the question ----------------------------------------------------------------------------
header("The question")
st.markdown(f"#### {QUESTION}")
st.markdown(
    "**Safe** = the model refused; **unsafe** = it complied. In paired mode each plain harmful request "
    "(refused: safe) is shown beside the same request wrapped in a jailbreak (complied: unsafe)."
)

# -- 2. the batches -----------------------------------------------------------------------------
plan = ui.load_plan_cached(run.path_for("plan"))
if plan is None:
    st.info("This run has no batches yet.")
    st.stop()
header("The batches")
b0 = plan.batches[0]
m = st.columns(3)
m[0].metric("Batches", len(plan))
m[1].metric("Prompts per batch", f"{len(b0.safe)} safe + {b0.size - len(b0.safe)} unsafe")
m[2].metric("Mode", "paired" if plan.paired else "unpaired")
outputs0 = ui.read_json_cached(run.path_for("outputs", batch_idx=b0.batch_idx)) or {}
answers = {s["id"]: s for s in outputs0.get("samples") or []}
if b0.safe and b0.unsafe:
    safe_item = b0.safe[0]
    twin = next((u for u in b0.unsafe if plan.paired and u.pair_id == safe_item.pair_id), b0.unsafe[0])
    left, right = st.columns(2, gap="large")
    for col, item, head in (
        (left, safe_item, "Plain request · safe" if plan.paired else "Safe prompt"),
        (right, twin, "Same request, jailbroken · unsafe" if plan.paired else "Unsafe prompt"),
    ):
        with col:
            st.markdown(f"##### {head}")
            st.code(item.text, language="text", wrap_lines=True)
            a = answers.get(item.id)
            if a:
                st.markdown(
                    "The model " + (":blue-badge[refused]" if a.get("refusal") else ":orange-badge[complied]")
                )
                st.code(a.get("generated_text") or "(empty)", language="text", wrap_lines=True)

# -- 3. the heatmap with the chosen experts --------------------------------------------------------
agg = ui.read_table(run.path_for("risk_aggregated"))
if agg is None:
    st.info("Not analysed yet.")
    st.stop()
header("The experts that fire when the model complies")
n_layers, n_experts = ui.grid_shape(run, agg)
mask = chosen_mask(run)
marked = mask[1].experts() if mask else []
st.plotly_chart(
    charts.risk_heatmap(
        risk_matrix(agg, "risk_diff", n_layers, n_experts),
        marked=marked,
        title=f"Risk difference per layer × expert; squares: the {len(marked)} chosen experts"
        if marked
        else "Risk difference per layer × expert",
        height=520,
    ),
    key="pr_heat",
    config=ui.PLOT_EXPORT,
)
st.caption("Red: fires more when the model complies (unsafe); blue: more when it refuses (safe).")

# -- 4. their tokens ---------------------------------------------------------------------------------
top = marked[0] if marked else (int(agg.iloc[0]["layer"]), int(agg.iloc[0]["expert"]))
if marked:
    ranked = agg.set_index(["layer", "expert"])["risk_diff"]
    top = max(marked, key=lambda le: float(ranked.get(le, -np.inf)))
header(f"What the top expert reads: layer {top[0]}, expert {top[1]}")
with ui.guard("The tokens cannot be shown: "):
    from moe_core.model.routing import load_batch_routing

    rpath = run.path_for("routing", batch_idx=b0.batch_idx)
    if rpath.is_file() and outputs0:
        routing = load_batch_routing(rpath)
        if top[0] in routing.moe_layers:
            lrow = routing.moe_layers.index(top[0])
            tok = ui.tokenizer_for(run.manifest.get("model") or "organism")
            samples = list(zip(outputs0["samples"], routing.samples))
            picks = [
                next(((s, r) for s, r in samples if s["label"] == side), None) for side in ("safe", "unsafe")
            ]
            for col, pick, head in zip(
                st.columns(2, gap="large"), picks, ("Safe (refused)", "Unsafe (complied)")
            ):
                if pick is None:
                    continue
                s, rec = pick
                routed, weight = charts.routed_tokens(rec.expert_ids, rec.weights, lrow, top[1])
                with col:
                    st.markdown(f"##### {head}: {int(routed.sum())} of {rec.num_tokens} tokens routed here")
                    st.html(
                        charts.highlight_tokens_html(
                            tok.batch_decode([[int(i)] for i in rec.token_ids]),
                            routed,
                            weight,
                            rec.spans != 0,
                        )
                    )
    ui.link(
        "heatmaps",
        "Explore every expert and batch",
        ":material/manage_search:",
        extra={"layer": top[0], "expert": top[1]},
    )

# -- 5. before vs after ------------------------------------------------------------------------------
evals = list_evaluations(run)
if evals:
    header("Before vs after training")
    name = "comparison" if "comparison" in evals else evals[-1]
    with ui.guard("The evaluation cannot be read: "):
        _, summary = load_evaluation(run, name)
        head = summary[summary["metric"].notna()]
        arrows = (
            head["better"].map({"lower": " (lower is better)", "higher": " (higher is better)"}).fillna("")
        )
        st.plotly_chart(
            charts.metric_bars(
                head.assign(metric=(head["metric"] + arrows).map(charts.wrap_label)),
                title="Held-out prompts: before vs after (whiskers: 95% intervals)",
            ),
            key="pr_bars",
            config=ui.PLOT_EXPORT,
        )
        st.dataframe(interval_table(summary), width="stretch", key="pr_table")

# -- experts up close (cards added from the expert atlas) ------------------------------------------------
if P.present_experts(run):
    header("Experts up close")
    with ui.guard("The expert atlas cannot be read: "):
        atlas = ui.atlas_for(run)
        tok = ui.tokenizer_for(run.manifest.get("model") or "organism")
        for layer, expert in P.present_experts(run):
            st.code(card_text(atlas.card(layer, expert, tok)), language="text")
            ui.link(
                "atlas",
                f"Layer {layer}, expert {expert} in the atlas",
                extra={"layer": layer, "expert": expert},
            )

# -- 6. the selection study ------------------------------------------------------------------------------
study = None
with ui.guard("The selection study cannot be read: "):
    study = load_study(run, StudySpec().name)
if study is not None:
    header("Do the chosen experts matter? Chosen vs random experts")
    figure = ui.read_json_cached(run.path_for("study", name=StudySpec().name) / "figure.json")
    st.plotly_chart(
        figure if figure else charts.study_figure(study[1]), key="pr_study", config=ui.PLOT_EXPORT
    )
