"""MoE Safety Lab: the Streamlit app over ``moe_core``.

    streamlit run app.py            # or: make app

Pages (``st.navigation``, one file each in ``app_pages/``; the folder is deliberately not named
``pages/``: Streamlit treats a ``pages/`` folder beside the entry script as a legacy multipage app
and then runs a page file without this script, i.e. without the sidebar): Home (one-click demo), Data & batches, Analysis, Heatmaps, Experts,
Training, Evaluation, Runs. The sidebar shows the open run, its model and the device, and opens
or creates runs (``?run=<run id>`` in the URL opens a run). Runs live under ``$MOE_LAB_RUNS``
(default ``./runs``). Long steps run as
background jobs (``moe_core.jobs``): refreshing the page never stops or duplicates them.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # pages import moe_core and app_pages._ui from the repo root
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from moe_core.runs import Run, RunError, list_runs  # noqa: E402
from app_pages import _ui as ui  # noqa: E402

st.set_page_config(page_title="MoE Safety Lab", page_icon=":material/hub:", layout="wide")


def _create_run() -> None:
    """Callback of 'Create run': runs before the script, so the selectbox shows the new run."""
    name = (st.session_state.get("new_run_name") or "").strip() or "run"
    try:
        run = Run.create(ui.runs_root(), name=name, config={"created_by": "app"})
    except Exception as e:  # noqa: BLE001 - sorted into a user error or a logged bug
        st.session_state["sidebar_error"] = ui.error_message(e, "Not created: ")
        return
    st.session_state[ui.RUN_KEY] = str(run.path)
    st.session_state["new_run_name"] = ""
    ui.flash(f"Created run {run.id}")


def _open_by_path() -> None:
    path = (st.session_state.get("open_run_path") or "").strip()
    try:
        run = Run.open(Path(path).expanduser().resolve())
    except Exception as e:  # noqa: BLE001 - RunError, an unreadable folder, or a logged bug
        st.session_state["sidebar_error"] = ui.error_message(e, "Not opened: ")
        return
    st.session_state[ui.RUN_KEY] = str(run.path)


def sidebar() -> None:
    runs = [r for r in list_runs(ui.runs_root()) if not r.error]
    paths = [str(r.path) for r in runs]
    labels = {str(r.path): (r.name if r.name and r.name != r.id else r.id) + f"  ·  {r.id[:15]}" for r in runs}
    extra = st.session_state.get(ui.RUN_KEY)
    if extra and extra not in paths:  # a run opened by path, outside the runs root
        try:
            Run.open(extra)
            paths.insert(0, extra)
            labels[extra] = Path(extra).name + "  ·  (opened by path)"
        except RunError:
            st.session_state.pop(ui.RUN_KEY, None)
    wanted = st.query_params.get("run")  # ?run=<run id>: a link that opens a given run
    if wanted and wanted != st.session_state.get("applied_run_param"):
        st.session_state["applied_run_param"] = wanted
        match = [str(r.path) for r in runs if r.id == wanted]
        if match:
            st.session_state[ui.RUN_KEY] = match[0]
        else:
            st.session_state["sidebar_error"] = f"no run {wanted!r} under {ui.runs_root()}"
    if paths and not st.session_state.get(ui.RUN_KEY):
        st.session_state[ui.RUN_KEY] = paths[0]  # open the newest run by default
    with st.sidebar:
        st.markdown("### :material/hub: MoE Safety Lab")
        if paths:
            st.selectbox("Run", paths, key=ui.RUN_KEY, format_func=lambda p: labels.get(p, p))
        else:
            st.info(f"No runs yet under `{ui.runs_root()}`. Create one below or run the demo on Home.")
        run = ui.current_run()
        if run is not None:
            info = ui.model_info(run)
            model = run.manifest.get("model") or "not chosen yet"
            shape = (f"{info['num_layers']} layers × {info['num_experts']} experts, top-{info['top_k']}"
                     if info.get("num_experts") else "")
            st.caption(f"**Model:** {model}" + (f"  \n{shape}" if shape else ""))
        st.caption(f"**Device:** {ui.device_name()}")
        with st.expander("New run", expanded=not paths):
            st.text_input("Name", key="new_run_name", placeholder="e.g. olmoe-advbench")
            st.button("Create run", on_click=_create_run, icon=":material/add:", width="stretch")
        with st.expander("Open a run folder by path"):
            st.text_input("Run folder", key="open_run_path", placeholder="/path/to/runs/20260101-...")
            st.button("Open", on_click=_open_by_path, width="stretch")
        err = st.session_state.pop("sidebar_error", None)
        if err:
            st.error(err)


pages = [
    st.Page("app_pages/home.py", title="Home", icon=":material/home:", url_path="home", default=True),
    st.Page("app_pages/data.py", title="Data & batches", icon=":material/dataset:", url_path="data"),
    st.Page("app_pages/analysis.py", title="Analysis", icon=":material/query_stats:", url_path="analysis"),
    st.Page("app_pages/heatmaps.py", title="Heatmaps", icon=":material/grid_on:", url_path="heatmaps"),
    st.Page("app_pages/experts.py", title="Experts", icon=":material/target:", url_path="experts"),
    st.Page("app_pages/training.py", title="Training", icon=":material/model_training:", url_path="training"),
    st.Page("app_pages/evaluation.py", title="Evaluation", icon=":material/fact_check:", url_path="evaluation"),
    st.Page("app_pages/runs.py", title="Runs", icon=":material/folder_open:", url_path="runs"),
]
nav = st.navigation(pages)
sidebar()
nav.run()
