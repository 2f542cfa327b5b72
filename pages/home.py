"""Home: what the lab does, where the open run stands, and the one-click demo on the organism."""

from __future__ import annotations

import streamlit as st

from moe_core import jobs
from moe_core.runs import Run
from pages import _ui as ui

st.title("MoE Safety Lab")
st.markdown(
    "Find the experts of a Mixture-of-Experts LLM that fire when it behaves **unsafely** "
    "(complies with a jailbreak) rather than **safely** (refuses), then fine-tune **only those experts**."
)
ui.show_flash()

STEPS = [
    ("Data & batches", "data", "Compose mixed safe/unsafe batches", lambda r: r.path_for("plan").exists()),
    ("Analysis", "analysis", "Route every batch, judge answers, measure risk differences",
     lambda r: r.path_for("risk_aggregated").exists()),
    ("Heatmaps", "heatmaps", "Layer × expert risk, per batch and aggregated", lambda r: r.path_for("risk_aggregated").exists()),
    ("Experts", "experts", "Select the unsafe experts -> expert mask", lambda r: bool(ui.mask_names(r))),
    ("Training", "training", "Fine-tune only the chosen experts", lambda r: (r.path / "train").is_dir() and any((r.path / "train").iterdir())),
    ("Evaluation", "evaluation", "Refusal and over-refusal before vs after", lambda r: r.path_for("eval").is_dir() and any(r.path_for("eval").iterdir())),
]


def _start_demo() -> None:
    """Callback: a fresh run named 'demo' and the demo job in it (the CLI runs the whole pipeline)."""
    try:
        run = Run.create(ui.runs_root(), name="demo", config={"created_by": "app", "command": "demo"}, model="organism")
        jobs.start_job(run, "demo", "demo")
    except ValueError as e:
        st.session_state["demo_error"] = str(e)
        return
    st.session_state[ui.RUN_KEY] = str(run.path)
    ui.flash(f"Demo started in run {run.id}: the organism is built (first time only), analysed, its unsafe "
             "experts selected, trained and evaluated. Progress below.")


left, right = st.columns([3, 2], gap="large")
with right:
    with st.container(border=True):
        st.subheader(":material/rocket_launch: One-click demo")
        st.markdown(
            "Runs the whole pipeline on the built-in **model organism** (a tiny OLMoE trained here to refuse "
            "harmful requests but comply when jailbroken): batches -> routing analysis -> unsafe experts -> "
            "expert-only fine-tuning -> evaluation. Everything is offline and CPU-friendly."
        )
        st.button("Run the demo", type="primary", icon=":material/play_arrow:", on_click=_start_demo, width="stretch")
        err = st.session_state.pop("demo_error", None)
        if err:
            st.error(err)

run = ui.current_run()
with left:
    if run is None:
        st.info("No run is open yet: start the demo, or create a run in the sidebar and begin with "
                "**Data & batches**.", icon=":material/info:")
    else:
        st.subheader(f"Run: {run.name}")
        st.caption(f"`{run.path}`")
        for title, key, what, is_done in STEPS:
            try:
                done = bool(is_done(run))
            except (OSError, ValueError):
                done = False
            icon = ":material/check_circle:" if done else ":material/radio_button_unchecked:"
            c1, c2 = st.columns([2, 3], vertical_alignment="center")
            c1.page_link(ui.PAGES[key], label=title, icon=icon)
            c2.caption(what)

if run is not None and jobs.read_job(run.path, "demo").state != "none":
    st.subheader("Demo progress")
    ui.job_panel(run, "demo")
