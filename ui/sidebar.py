"""Every page's first call: page config, the page-wide error boundary and the shared sidebar."""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

from moe_core.store.files import RunError
from moe_core.store.run import Run
from ui.cache import device_name
from ui.messages import error_message, error_text, flash, md_escape, report_error
from ui.navigation import NAV, link
from ui.runs import (
    PICKER_KEY,
    RUN_KEY,
    RUN_PARAM,
    _run_picked,
    current_run,
    missing_run_notice,
    model_info,
    open_run,
    runs_root,
    sync_run_with_url,
)


# -- page setup and the shared sidebar -------------------------------------------------------------
def _user_error_boundary(e: Exception) -> bool:
    """Streamlit's handler of an exception no ``guard`` caught: a user error (a damaged file named with
    its fix) is one message; a bug keeps Streamlit's own box (its traceback goes to the log)."""
    is_bug, _ = error_text(e)
    if not is_bug:
        report_error(e)
    return not is_bug  # True: Streamlit shows nothing more


def setup(title: str = "MoE Safety Lab", sidebar_state: str = "auto") -> Run | None:
    """First call of every page: page config, the shared sidebar; returns the open run (or None)."""
    ctx = get_script_run_ctx()
    if ctx is not None:  # the page-wide boundary (the context's on_script_error, as st.App's option sets it)
        ctx.on_script_error = _user_error_boundary
    st.set_page_config(
        page_title=f"{title} · MoE Safety Lab" if title != "MoE Safety Lab" else title,
        page_icon=":material/hub:",
        layout="wide",
        initial_sidebar_state=sidebar_state,
    )
    any_runs = sidebar()
    missing_run_notice(any_runs)
    return current_run()


def _create_run() -> None:
    """Callback of 'Create run': runs before the script, so the picker shows the new run."""
    name = (st.session_state.get("new_run_name") or "").strip() or "run"
    try:
        run = Run.create(runs_root(), name=name, config={"created_by": "app"})
    except Exception as e:  # noqa: BLE001 - sorted into a user error or a logged bug
        st.session_state["sidebar_error"] = error_message(e, "Not created: ")
        return
    open_run(run.path)
    st.session_state["new_run_name"] = ""
    flash(f"Created run {run.id}")


def _open_by_path() -> None:
    path = (st.session_state.get("open_run_path") or "").strip()
    try:
        run = Run.open(Path(path).expanduser().resolve())
    except Exception as e:  # noqa: BLE001 - RunError, an unreadable folder, or a logged bug
        st.session_state["sidebar_error"] = error_message(e, "Not opened: ")
        return
    open_run(run.path)


def sidebar() -> bool:
    """Navigation, run picker (synced with ``?run=``), the run's model, the device, new/open run;
    True when there is any run to pick."""
    from moe_core.store.manifest import list_runs

    runs = [r for r in list_runs(runs_root()) if not r.error]
    paths = [str(r.path) for r in runs]
    labels = {
        str(r.path): (r.name if r.name and r.name != r.id else r.id) + f"  ·  {r.id[:15]}" for r in runs
    }
    sync_run_with_url(paths)
    extra = st.session_state.get(RUN_KEY)
    if extra and extra not in paths:  # a run opened by path, outside the runs root
        try:
            Run.open(extra)
            paths.insert(0, extra)
            labels[extra] = Path(extra).name + "  ·  (opened by path)"
        except RunError:
            st.session_state.pop(RUN_KEY, None)
            st.query_params.pop(RUN_PARAM, None)
    with st.sidebar:
        st.markdown("### :material/hub: MoE Safety Lab")
        for key, _, label, icon in NAV:
            link(key, label, icon, width="stretch")
        st.divider()
        if paths:
            st.session_state[PICKER_KEY] = st.session_state.get(RUN_KEY)
            st.selectbox(
                "Run",
                paths,
                key=PICKER_KEY,
                format_func=lambda p: labels.get(p, p),
                on_change=_run_picked,
                placeholder="Pick a run",
            )
        else:
            st.info(f"No runs yet under `{runs_root()}`. Create one below or run the demo on Home.")
        run = current_run()
        if run is not None:
            info = model_info(run)
            model = run.manifest.get("model") or "not chosen yet"
            shape = (
                f"{info['num_layers']} layers × {info['num_experts']} experts, top-{info['top_k']}"
                if info.get("num_experts")
                else ""
            )
            st.caption(
                f"**Open run:** {md_escape(run.name)} · `{run.path.name}`  \n**Model:** {model}"
                + (f"  \n{shape}" if shape else "")
            )
        st.caption(f"**Device:** {device_name()}")
        with st.expander("New run", expanded=not paths):
            st.text_input("Name", key="new_run_name", placeholder="e.g. olmoe-advbench")
            st.button("Create run", on_click=_create_run, icon=":material/add:", width="stretch")
        with st.expander("Open a run folder by path"):
            st.text_input("Run folder", key="open_run_path", placeholder="/path/to/runs/20260101-...")
            st.button("Open", on_click=_open_by_path, width="stretch")
        err = st.session_state.pop("sidebar_error", None)
        if err:
            st.error(err)
    return bool(paths)
