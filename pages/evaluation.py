"""Evaluation: refusal and over-refusal before vs after training, as charts, with sample answers side by side.

Reads what the evaluation job writes into the run's ``eval/`` folder; launches
``python -m moe_core evaluate --run RUN --job evaluate`` when ``moe_core.evaluation`` exists.
"""

from __future__ import annotations

import importlib.util

import streamlit as st

from moe_core import jobs
from pages import _ui as ui

JOB = "evaluate"

st.title("Evaluation")
st.caption("Refusal rate on held-out harmful and jailbroken prompts, answers on benign prompts (over-refusal), "
           "before vs after fine-tuning the chosen experts.")
ui.show_flash()
run = ui.require_run("the evaluation")
available = importlib.util.find_spec("moe_core.evaluation") is not None
eval_dir = run.path_for("eval")
files = sorted(eval_dir.glob("*.json")) if eval_dir.is_dir() else []

if not available and not files:
    st.info("Evaluation is not available yet in this version of moe_core (no `moe_core.evaluation`). "
            "Training results are on the Training page.", icon=":material/hourglass_empty:")
    st.stop()

info = jobs.read_job(run.path, JOB)
if available:
    with st.container(border=True):
        st.subheader("Run the evaluation")
        if st.button("Evaluate", type="primary", icon=":material/play_arrow:", disabled=info.active):
            with ui.guard("Not started: "):
                jobs.start_job(run.path, JOB, "evaluate")
                ui.flash("Evaluation started.")
                st.rerun()
    ui.job_panel(run, JOB, unit="prompts")

if not files:
    st.info("No evaluation results in this run yet.", icon=":material/info:")
    st.stop()

for f in files:
    with st.expander(f.name, expanded=len(files) == 1):
        st.json(ui.read_json_cached(f), expanded=2)
