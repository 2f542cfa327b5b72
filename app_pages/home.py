"""Home: what the lab does, where the open run stands, and the one-click demo on the organism."""

from __future__ import annotations

import streamlit as st

from moe_core import jobs
from moe_core.pipeline import DemoSpec
from moe_core.runs import Run, list_runs
from app_pages import _ui as ui

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


DEMO = "demo"  # job name of the demo; the CLI names its later stages demo-train-<baseline>, demo-eval
DEMO_STAGES = [("demo", "Analysis (builds the organism first)"), ("demo-train-experts", "Training: chosen experts"),
               ("demo-train-random_experts", "Training: random experts (baseline)"),
               ("demo-train-full", "Training: full fine-tuning (baseline)"), ("demo-eval", "Evaluation")]


def _live_demo_run() -> Run | None:
    """A run whose demo process is still working (so a second click never starts another)."""
    for r in list_runs(ui.runs_root()):
        if not r.error and jobs.read_job(r.path, DEMO, log_lines=0).process_alive:
            return Run.open(r.path)
    return None


def _start_demo() -> None:
    """Callback: a fresh run named 'demo' and the demo job in it (the CLI runs the whole pipeline)."""
    if _live_demo_run() is not None:
        return
    try:
        run = Run.create(ui.runs_root(), name="demo", config={"created_by": "app", "command": "demo"}, model="organism")
        jobs.start_step(run, DEMO, DemoSpec())
    except Exception as e:  # noqa: BLE001 - sorted into a user error or a logged bug
        st.session_state["demo_error"] = ui.error_message(e, "The demo did not start: ")
        return
    st.session_state[ui.RUN_KEY] = str(run.path)
    ui.flash(f"Demo started in run {run.id}: the organism is built (first time only), analysed, its unsafe "
             "experts selected, trained and evaluated. Progress below.")


def demo_progress(run: Run) -> None:
    """Every stage of the demo pipeline with its state; refreshes while the demo process runs."""
    alive = jobs.read_job(run.path, DEMO, log_lines=0).process_alive

    @st.fragment(run_every=ui.POLL_S if alive else None)
    def panel() -> None:
        head = jobs.read_job(run.path, DEMO, log_lines=25)
        was = st.session_state.get("demo_alive")
        st.session_state["demo_alive"] = head.process_alive
        if was and not head.process_alive:
            st.rerun()  # finished: redraw the page (step checklist, links)
        found = {j.name: j for j in jobs.list_jobs(run.path, prefix=DEMO)}
        stages = [(n, label) for n, label in DEMO_STAGES] + [(n, n) for n in found if n not in dict(DEMO_STAGES)]
        done = sum(1 for n, _ in stages if found.get(n) and found[n].state == "done")
        with st.container(border=True):
            st.progress(done / len(stages), text=f"{done} of {len(stages)} stages done"
                        + (" · working..." if head.process_alive else ""))
            for n, label in stages:
                j = found.get(n)
                state = j.state if j else ("waiting" if head.process_alive else "not run")
                icon = {"done": ":material/check_circle:", "running": ":material/progress_activity:",
                        "queued": ":material/schedule:", "error": ":material/error:", "dead": ":material/error:",
                        "stopped": ":material/stop_circle:"}.get(state, ":material/radio_button_unchecked:")
                c1, c2 = st.columns([2, 3], vertical_alignment="center")
                c1.markdown(f"{icon} {label}")
                if j and j.state == "running" and j.total:
                    c2.progress(j.fraction or 0.0, text=f"{j.done}/{j.total}"
                                + (f" · about {jobs.format_eta(j.eta_s)} left" if j.eta_s is not None else ""))
                else:
                    c2.caption(state + (f": {j.message}" if j and j.message and j.message != state else ""))
                if j and j.error:
                    st.error(f"{label}: {j.error}", icon=":material/error:")
            if head.active or head.process_alive:
                if st.button("Stop the demo", icon=":material/stop_circle:"):
                    for j in found.values():
                        if j.active:
                            jobs.request_stop(run.path, j.name)
                    st.toast("Asked the demo to stop after its current step")
            if not head.process_alive and done == len(stages):
                links = st.columns(3)
                links[0].page_link(ui.PAGES["heatmaps"], label="See the heatmaps", icon=":material/grid_on:")
                links[1].page_link(ui.PAGES["training"], label="Training results", icon=":material/model_training:")
                links[2].page_link(ui.PAGES["evaluation"], label="Before vs after", icon=":material/fact_check:")
            if head.log_tail:
                with st.expander("Log (last lines)"):
                    st.code(head.log_tail, language="text")

    panel()


live = _live_demo_run()
left, right = st.columns([3, 2], gap="large")
with right:
    with st.container(border=True):
        st.subheader(":material/rocket_launch: One-click demo")
        st.markdown(
            "Runs the whole pipeline on the built-in **model organism** (a tiny OLMoE trained here to refuse "
            "harmful requests but comply when jailbroken): batches, routing analysis, unsafe experts, "
            "expert-only fine-tuning with baselines, evaluation. Offline and CPU-friendly."
        )
        st.button("Run the demo", type="primary", icon=":material/play_arrow:", on_click=_start_demo, width="stretch",
                  disabled=live is not None, help="a demo is already running" if live else None)
        if live is not None and str(live.path) != st.session_state.get(ui.RUN_KEY):
            st.caption(f"A demo is running in run {live.id}: open it in the sidebar to follow it.")
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
            except OSError:  # a folder that cannot be listed: the step is not done as far as we can tell
                done = False
            icon = ":material/check_circle:" if done else ":material/radio_button_unchecked:"
            c1, c2 = st.columns([2, 3], vertical_alignment="center")
            c1.page_link(ui.PAGES[key], label=title, icon=icon)
            c2.caption(what)

if run is not None and jobs.read_job(run.path, DEMO, log_lines=0).state != "none":
    st.subheader("Demo progress")
    demo_progress(run)
