"""Experts: choose the unsafe experts (top-N, threshold, per layer, top-p, random), edit by hand, save the mask."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import streamlit as st

import ui  # noqa: I001 - the shared page helpers (not a page)
from moe_core import pipeline as P
from moe_core.analysis.masks import ExpertMask, apply_toggles
from moe_core.analysis.risk import risk_matrix
from moe_core.analysis.scores import FROM_ROUTING, SCORES, with_score
from moe_core.analysis.selection import METHODS, SelectionConfig, select_experts, select_per_batch
from moe_core.eval import charts
from moe_core.pipeline import SelectSpec

ui.setup("Experts")
st.title("Experts")
st.caption(
    "Pick the experts to fine-tune from the risk table; the result is an expert mask "
    "(a small readable JSON of {layer: [experts]}) saved in the run."
)
ui.show_flash()
run = ui.require_run("expert selection")
agg, per_batch = ui.risk_tables_or_stop(run)
n_layers, n_experts = ui.grid_shape(run, agg)
SCORE_WORDS = {  # the selector scores in words (moe_core.analysis.scores)
    "risk_diff": "risk difference (activation frequency)",
    "t_score": "risk difference / its spread (t-score)",
    "pos_frac": "share of batches with a positive difference",
    "sign_consistency": "sign consistency across batches",
    "gate_diff": "router weight difference (gate score)",
    "grad_attr": "gradient of the refusal loss",
    "grad_contrast": "refusal gradient minus retain gradient",
    "ablation": "refusal drop with the expert off",
}
SELECT_FIELDS = {f.name for f in dataclasses.fields(SelectSpec)}
TOGGLES = f"ex_toggles::{run.id}"  # session_state: this run's hand-toggled experts as "layer:expert" strings

PARAMS = {  # which settings each method uses (only those are shown)
    "top_n": ("n",),
    "threshold": ("threshold",),
    "per_layer": ("k",),
    "top_p": ("top_p",),
    "random": ("n", "seed"),
}
TOGGLES_PB = (
    f"ex_toggles_pb::{run.id}"  # session_state: per-batch hand toggles {batch: ["layer:expert", ...]}
)

# -- rule ------------------------------------------------------------------------------------
with st.container(border=True):
    st.subheader("Selection rule")
    c1, c2, c3 = st.columns(3)
    scope = c1.segmented_control(
        "Masks",
        ["global", "per_batch"],
        default="global",
        required=True,
        key="ex_scope",
        format_func={"global": "One global mask", "per_batch": "One mask per batch"}.get,
    )
    method = c2.selectbox(
        "Method",
        METHODS,
        key="ex_method",
        format_func={
            "top_n": "top-N",
            "threshold": "threshold",
            "per_layer": "per-layer top-k",
            "top_p": "top-p (ESFT)",
            "random": "random baseline",
        }.get,
    )
    d = SelectSpec()  # the defaults, defined once in moe_core.pipeline
    score = "risk_diff"
    if method != "random":
        scores = [c for c in ("risk_diff", "t_score", "pos_frac", "sign_consistency") if c in agg.columns]
        scores += [s for s in SCORES if s in FROM_ROUTING or P.score_path(run, s).is_file()]
        score = c3.selectbox(
            "Rank by",
            scores if scope == "global" else ["risk_diff"],
            key="ex_score",
            format_func=lambda s: SCORE_WORDS.get(s, s),
            help="grad_attr, grad_contrast and ablation need the model: compute them once with "
            "`python -m moe_core select --run RUN --score grad_attr` (or the others); they then appear here",
        )
        if score in SCORES:
            with ui.guard(f"Cannot rank by {score}: "):
                agg = with_score(agg, ui.score_table_cached(run, score))
    shown = PARAMS.get(method, ())
    cols = iter(st.columns(3))
    n, threshold, k, top_p, seed = (
        min(d.n, n_layers * n_experts),
        d.threshold,
        min(d.per_layer_k, n_experts),
        d.top_p,
        d.seed,
    )
    if "n" in shown:
        n = int(next(cols).number_input("How many experts (N)", 1, n_layers * n_experts, n, key="ex_n"))
    if "threshold" in shown:
        threshold = float(
            next(cols).number_input(
                "Keep experts whose score is above", -1.0, 1000.0, threshold, 0.01, key="ex_thr"
            )
        )
    if "k" in shown:
        k = int(next(cols).number_input("Experts per layer", 1, n_experts, k, key="ex_k"))
    if "top_p" in shown:
        top_p = float(
            next(cols).slider(
                "Share of the total positive score to cover (top-p)", 0.05, 1.0, top_p, 0.05, key="ex_top_p"
            )
        )
    if "seed" in shown:
        seed = int(next(cols).number_input("Seed of the random draw", 0, 2**31 - 1, seed, key="ex_seed"))
    min_cons = 0.0
    if scope == "global" and method != "random":
        min_cons = next(cols).slider(
            "Min sign consistency (0 = off)",
            0.0,
            1.0,
            d.min_sign_consistency or 0.0,
            0.05,
            key="ex_cons",
            help="keep only experts whose risk difference has the same sign "
            "in at least this share of batches",
        )

cfg = SelectionConfig(
    method=method,
    n=n,
    threshold=threshold,
    per_layer_k=k,
    top_p=top_p,
    seed=seed,
    min_sign_consistency=min_cons if (min_cons > 0 and scope == "global") else None,
    score=score,
)
if TOGGLES not in st.session_state and run.path_for("mask", name=SelectSpec().name).is_file():
    with ui.guard("The saved mask cannot be read: "):  # a reload shows the saved mask's hand toggles again
        saved = ExpertMask.load(run.path_for("mask", name=SelectSpec().name))
        st.session_state[TOGGLES] = list(saved.meta.get("hand_toggled") or [])
toggles: list[str] = st.session_state.setdefault(TOGGLES, [])
pb_toggles: dict[int, list[str]] = st.session_state.setdefault(TOGGLES_PB, {})


mask: ExpertMask | None = None
batch_masks: dict[int, ExpertMask] | None = None
with ui.guard("Nothing to save: "):
    if scope == "global":
        mask = apply_toggles(select_experts(agg, cfg, n_layers, n_experts), toggles)
        if mask.count() == 0:
            raise ValueError(
                "every selected expert was toggled off by hand: toggle one back on or change the rule"
            )
    else:
        batch_masks = {
            b: apply_toggles(m, pb_toggles.get(int(b), []))
            for b, m in select_per_batch(per_batch, cfg, n_layers, n_experts).items()
        }

# -- result ------------------------------------------------------------------------------------
agg_m = risk_matrix(agg, "risk_diff", n_layers, n_experts)
event = None
if mask is not None:
    chosen = mask.experts()
    event = st.plotly_chart(
        charts.risk_heatmap(
            agg_m,
            title=f"{len(chosen)} chosen experts (squares) on the mean risk difference",
            marked=chosen,
            clickable=True,
        ),
        key="ex_heat",
        on_select="rerun",
        selection_mode="points",
    )
    sel = (
        pd.DataFrame(chosen, columns=["layer", "expert"])
        .merge(agg, on=["layer", "expert"], how="left")
        .sort_values("risk_diff", ascending=False, kind="stable")
    )
    cols = [
        c
        for c in ("Layer_Expert", "layer", "expert", "risk_diff", "sign_consistency", "t_score")
        if c in sel.columns
    ]
    st.dataframe(
        sel[cols],
        hide_index=True,
        width="stretch",
        column_config=ui.column_labels(
            cols, {c: "%.3f" for c in ("risk_diff", "sign_consistency", "t_score")}
        ),
    )
elif batch_masks is not None:
    counts = np.sum([m.mask for m in batch_masks.values()], axis=0)
    event = st.plotly_chart(
        charts.count_heatmap(
            counts, f"How many of {len(batch_masks)} per-batch masks choose each expert", clickable=True
        ),
        key="ex_counts",
        on_select="rerun",
        selection_mode="points",
    )
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "batch_idx": b,
                    "experts": m.count(),
                    "chosen": ", ".join(f"L{l}E{e}" for l, e in m.experts()),
                }
                for b, m in batch_masks.items()
            ]
        ),
        hide_index=True,
        width="stretch",
        column_config=ui.column_labels(["batch_idx"]),
    )

# a click on a cell picks that expert for the hand edit below and links to its tokens
clicked = ui.clicked_cell(event, "ex_last_click")
if clicked is not None:
    st.session_state["ex_t_layer"], st.session_state["ex_t_expert"] = clicked

# -- hand edits --------------------------------------------------------------------------------------
with st.expander(
    "Toggle single experts by hand" + ("" if scope == "global" else " (in one batch's mask)"),
    expanded=bool(toggles if scope == "global" else any(pb_toggles.values())) or clicked is not None,
):
    st.caption("Click a cell of the heatmap to pick its expert here.")
    c0, c1, c2, c3, c4 = st.columns([1, 1, 1, 1, 1], vertical_alignment="bottom")
    tb = None
    if scope == "per_batch" and batch_masks:
        tb = int(c0.selectbox("Batch", list(batch_masks), key="ex_t_batch"))
    layers = sorted(int(x) for x in agg["layer"].unique())
    if st.session_state.get("ex_t_layer") not in layers:
        st.session_state.pop("ex_t_layer", None)
    tl = c1.selectbox("Layer", layers, key="ex_t_layer")
    te = c2.selectbox("Expert", list(range(n_experts)), key="ex_t_expert")
    current = toggles if tb is None else pb_toggles.get(tb, [])
    if c3.button("Toggle", icon=":material/swap_horiz:", disabled=scope == "per_batch" and tb is None):
        key = f"{tl}:{te}"
        new = [t for t in current if t != key] if key in current else [*current, key]
        if tb is None:
            st.session_state[TOGGLES] = new
        else:
            st.session_state[TOGGLES_PB] = {**pb_toggles, tb: new}
        st.rerun()
    if c4.button("Clear hand edits", disabled=not current):
        if tb is None:
            st.session_state[TOGGLES] = []
        else:
            st.session_state[TOGGLES_PB] = {**pb_toggles, tb: []}
        st.rerun()
    if current:
        st.caption(
            ("Toggled by hand: " if tb is None else f"Toggled by hand in batch {tb}: ")
            + ", ".join(f"L{t.split(':')[0]}E{t.split(':')[1]}" for t in current)
        )
    ui.link(
        "heatmaps",
        f"See the tokens of layer {tl}, expert {te}",
        ":material/manage_search:",
        extra={"layer": tl, "expert": te, **({"batch": tb} if tb is not None else {})},
    )

# -- save ---------------------------------------------------------------------------------------------
if mask is not None or batch_masks is not None:
    with st.container(border=True):
        st.subheader("Save the mask")
        default = "unsafe_experts" if scope == "global" else "unsafe_experts_per_batch"
        if method == "random":
            default = "random_experts" if scope == "global" else "random_experts_per_batch"
        c1, c2 = st.columns([2, 1])
        name = c1.text_input("Mask name", default, key=f"ex_name_{scope}_{method == 'random'}").strip()
        also_random = c2.checkbox(
            "Also save a random baseline of the same size",
            key="ex_also_random",
            disabled=mask is None or method == "random",
        )
        replace = False  # no silent overwrite: an existing mask is replaced only when the user ticks this
        mask_path = None
        with ui.guard():  # an invalid name is said here, once; Save and the download wait for a valid one
            mask_path = run.path_for("mask", name=name)
        if mask_path is not None and mask_path.exists():
            with ui.guard():  # never a silent difference between what is shown and what is saved
                saved = ExpertMask.load(mask_path) if mask is not None else None
                if saved is not None and saved.experts() != mask.experts():
                    edits = saved.meta.get("hand_toggled") or []
                    st.info(
                        f"The saved mask {name!r} holds {saved.count()} experts"
                        + (f" ({len(edits)} toggled by hand: {', '.join(edits)})" if edits else "")
                        + f"; the one shown here has {mask.count()}. Saving replaces it.",
                        icon=":material/difference:",
                    )
            replace = st.checkbox(f"A mask named {name!r} exists: overwrite it?", key="ex_replace")
        if st.button(
            "Save mask",
            type="primary",
            icon=":material/save:",
            disabled=mask_path is None,
            help="give the mask a valid name first" if mask_path is None else None,
        ):
            with ui.guard("Not saved: "):
                spec = SelectSpec(  # the select step saves (under the run's writer lease), as the CLI does
                    **{k: v for k, v in dataclasses.asdict(cfg).items() if k in SELECT_FIELDS},
                    per_batch=scope != "global",
                    name=name,
                    overwrite=replace,
                    toggles=",".join(toggles) if scope == "global" else None,
                    batch_toggles=json.dumps(pb_toggles) if scope != "global" and pb_toggles else None,
                    random_baseline=bool(mask is not None and also_random),
                )
                saved_masks = P.select(spec, run)
                path = run.path_for("mask", name=spec.name)
                if isinstance(saved_masks, ExpertMask):
                    msg = f"Saved {saved_masks.count()} experts as {path.name}"
                    if spec.random_baseline:
                        msg += f" and a random baseline {spec.name}_random.json"
                else:
                    msg = f"Saved {len(saved_masks)} per-batch masks as {path.name}"
                ui.flash(msg + ". Next: Training.")
                st.rerun()
        if mask is not None:
            st.download_button(
                "Download mask JSON",
                json.dumps(mask.to_json_dict(), indent=2),
                file_name=f"{name}.json",
                mime="application/json",
                icon=":material/download:",
            )
        elif mask_path is not None and mask_path.is_file():
            with ui.guard():
                st.download_button(
                    "Download saved per-batch masks",
                    mask_path.read_bytes(),
                    file_name=f"{name}.json",
                    mime="application/json",
                    icon=":material/download:",
                )
        saved = ui.mask_names(run)
        if saved:
            st.caption("Masks in this run: " + ", ".join(saved))
        ui.link("training", "Go to Training", ":material/arrow_forward:")
