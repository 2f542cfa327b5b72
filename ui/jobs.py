"""The live panel of a background job: state, progress, ETA, log tail, Stop."""

from __future__ import annotations

import streamlit as st

from moe_core import jobs
from moe_core.store.jobs import ACTIVE_STATES, JobInfo, format_eta, read_job
from moe_core.store.run import Run
from ui.messages import guard

POLL_S = 2.0  # seconds between job-panel refreshes while a job is live


# -- jobs -------------------------------------------------------------------------------------
_STATE_BADGE = {
    "none": ("not started", "gray"),
    "queued": ("starting", "blue"),
    "running": ("running", "blue"),
    "done": ("done", "green"),
    "error": ("failed", "red"),
    "dead": ("stopped unexpectedly", "orange"),
    "stopped": ("stopped", "orange"),
}


def job_panel(run: Run, name: str, unit: str = "steps") -> JobInfo:
    """Progress bar, ETA, log tail, stop/resume of job ``name``; refreshes itself while live.

    The panel is a fragment that re-runs every few seconds only while the job is live; when the
    job finishes it reruns the whole page once so results below it appear.
    """
    info = read_job(run.path, name)
    prev_key = f"job_state_{name}"

    @st.fragment(run_every=POLL_S if info.active else None)
    def panel() -> None:
        cur = read_job(run.path, name)
        prev = st.session_state.get(prev_key)
        st.session_state[prev_key] = cur.state
        if prev in ACTIVE_STATES and not cur.active:
            st.rerun()  # the job just ended: redraw the page with its results
        if cur.state == "none":
            return
        label, color = _STATE_BADGE.get(cur.state, (cur.state, "gray"))
        if cur.stopping:  # asked to stop: it finishes the unit it is on first
            label, color = f"stopping after this {unit.rstrip('s') or unit}", "orange"
        with st.container(border=True):
            head = st.columns([3, 1, 1], vertical_alignment="center")
            head[0].markdown(f"**Job `{name}`** &nbsp; :{color}-badge[{label}]")
            if cur.active:
                if head[2].button(
                    "Stopping..." if cur.stopping else "Stop",
                    key=f"stop_{name}",
                    icon=":material/stop_circle:",
                    disabled=cur.stopping,
                ):
                    jobs.request_stop(run.path, name)
                    st.rerun()  # the "stopping" state at once, not after the unit
            elif cur.state in ("stopped", "dead", "error") and jobs.relaunch_flags(run.path, name):
                if head[2].button("Resume", key=f"resume_{name}", icon=":material/play_circle:"):
                    command, flags = jobs.relaunch_flags(run.path, name)  # type: ignore[misc]
                    with guard():
                        jobs.start_job(run.path, name, command, flags)
                        st.rerun()
            if cur.total:
                text = f"{cur.done} / {cur.total} {unit}"
                if cur.eta_s is not None:
                    text += f" · about {format_eta(cur.eta_s)} left"
                st.progress(cur.fraction or 0.0, text=text)
            elif cur.active:
                st.progress(0.0, text="starting (loading the model)...")
            if cur.message:
                st.caption(cur.message)
            if cur.error:
                st.error(cur.error, icon=":material/error:")
            if cur.log_tail:
                with st.expander("Log (last lines)", expanded=cur.state in ("error", "dead")):
                    st.code(cur.log_tail, language="text")

    panel()
    return info
