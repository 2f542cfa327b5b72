"""Training: fine-tune only the chosen experts (or a baseline) as a background job; loss and batch monitor."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from moe_core import charts, jobs
from moe_core.pipeline import TrainSpec
from app_pages import _ui as ui

JOB = "train"
BASELINES = {"experts": "chosen experts only", "full": "full fine-tuning (baseline)",
             "random_experts": "as many random experts (baseline)"}
CONSISTENCY = {"none": "none", "forward": "KL(safe || unsafe)", "reverse": "KL(unsafe || safe)", "symmetric": "symmetric KL"}

st.title("Training")
st.caption("Each training step is exactly one analysis batch (same items, same order); only the chosen experts' "
           "rows get gradients and optimizer state.")
ui.show_flash()
run = ui.require_run("training")
masks = ui.mask_names(run)
info = jobs.read_job(run.path, JOB)

# -- configuration ---------------------------------------------------------------------------------
with st.container(border=True):
    st.subheader("Settings")
    if not masks:
        st.warning("No expert mask in this run yet: select and save one first.", icon=":material/warning:")
        st.page_link(ui.PAGES["experts"], label="Go to Experts", icon=":material/arrow_back:")
    c1, c2, c3 = st.columns(3)
    mask_name = c1.selectbox("Expert mask", masks, key="tr_mask", placeholder="no mask saved yet")
    per_batch_file = False
    if mask_name:
        d = ui.read_json_cached(run.path_for("mask", name=mask_name)) or {}
        per_batch_file = "batches" in d
    modes = ["union", "per_batch"] if per_batch_file else ["union"]
    mask_mode = c2.selectbox("Mask mode", modes, key="tr_mode", format_func={
        "union": "union: every chosen expert on every step", "per_batch": "per batch: each step its batch's experts"}.get,
        help="per-batch mode needs a mask saved with 'One mask per batch'")
    baseline = c3.selectbox("What to train", list(BASELINES), format_func=BASELINES.get, key="tr_baseline")
    c1, c2, c3, c4 = st.columns(4)
    d = TrainSpec()  # the defaults, defined once in moe_core.pipeline
    lr = float(c1.number_input("Learning rate", 1e-7, 1.0, d.lr, format="%.1e", key="tr_lr"))
    epochs = float(c2.number_input("Epochs", 0.1, 1000.0, float(d.epochs), 1.0, key="tr_epochs"))
    rc = c3.selectbox("Router-consistency loss", list(CONSISTENCY), index=list(CONSISTENCY).index(d.router_consistency),
                      format_func=CONSISTENCY.get, key="tr_rc")
    rcw = float(c4.number_input("Consistency weight", 0.0, 100.0, d.router_consistency_weight, 0.05, key="tr_rcw",
                                disabled=rc == "none"))
    spec = TrainSpec(mask=mask_name or d.mask, mask_mode=mask_mode, baseline=baseline, lr=lr, epochs=epochs,
                     router_consistency=rc, router_consistency_weight=rcw)
    if st.button("Start training", type="primary", icon=":material/play_arrow:", disabled=not mask_name or info.active):
        with ui.guard("Not started: "):
            if not run.path_for("plan").exists() or not run.completed_batches():
                raise ValueError("this run has no analysed batches: training replays the analysis batches, "
                                 "so run the analysis first")
            if baseline == "full" and mask_mode == "per_batch":
                raise ValueError("full fine-tuning trains every parameter; per-batch masks do not apply: choose 'union'")
            jobs.start_step(run.path, JOB, spec)
            ui.flash(f"Training started with mask {mask_name} ({mask_mode}, {BASELINES[baseline]}).")
            st.rerun()

# -- live job --------------------------------------------------------------------------------------
info = ui.job_panel(run, JOB, unit="steps")


@st.fragment(run_every=ui.POLL_S if info.active else None)
def live_loss() -> None:
    pts = jobs.loss_points(jobs.job_events(run.path, JOB))
    if pts:
        st.plotly_chart(charts.loss_curve(pd.DataFrame(pts), title="Training loss (live)"), key="tr_live_loss")


if info.state != "none":
    live_loss()

# -- results ---------------------------------------------------------------------------------------
train_root = run.path / "train"
outs = sorted((p for p in train_root.iterdir() if (p / "training_metadata.json").is_file()),
              key=lambda p: p.stat().st_mtime, reverse=True) if train_root.is_dir() else []
if outs:
    st.subheader("Results")
    out = st.selectbox("Training output", outs, format_func=lambda p: p.name, key="tr_out")
    meta = None
    with ui.guard("The training metadata cannot be read: "):
        meta = ui.read_json_cached(out / "training_metadata.json")
    if meta:
        report = meta.get("report") or {}
        m = st.columns(4)
        m[0].metric("Baseline", meta.get("baseline", "?"))
        m[1].metric("Mask mode", meta.get("mask_mode", "?"))
        n_exp = report.get("trained_experts")
        m[2].metric("Trained experts", "all (full)" if meta.get("baseline") == "full" else (n_exp if n_exp is not None else "?"),
                    help=f"optimizer state: {report.get('optimizer_state_bytes', '?')} bytes")
        steps = [h for h in meta.get("loss_history") or [] if "loss" in h]
        m[3].metric("Final loss", f"{steps[-1]['loss']:.4f}" if steps else "?")
        if steps:
            hist = pd.DataFrame([{"step": h.get("step"), "loss": h["loss"]} for h in steps])
            st.plotly_chart(charts.loss_curve(hist), key="tr_loss")
        monitor = pd.DataFrame(meta.get("batch_monitor") or [])
        if not monitor.empty:
            st.markdown("**Batch monitor**: the analysis batch of every training step and its composition")
            plan = ui.load_plan_cached(run.path_for("plan"))
            if plan is not None:
                ids = {b.batch_idx: ", ".join(it.id for it in b.items[:4]) + (" ..." if b.size > 4 else "") for b in plan.batches}
                monitor["items"] = monitor["batch_idx"].map(ids)
            st.dataframe(monitor, hide_index=True, width="stretch")
        with st.expander("Files"):
            for p in sorted(out.iterdir()):
                st.markdown(f"- `{p}`")
        st.page_link(ui.PAGES["evaluation"], label="Evaluate before vs after", icon=":material/arrow_forward:")
