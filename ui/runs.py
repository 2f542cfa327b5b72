"""Which run a page works on: the session's run, the run in the URL (?run=), and its model's shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from moe_core.store.files import RunError, listed
from moe_core.store.manifest import default_runs_root
from moe_core.store.run import Run
from ui.messages import md_escape

RUN_KEY = "run_path"  # session_state: absolute path of the open run (or absent); not a widget key
# session_state: the ?run= a link named that does not exist (kept until a run is opened)
MISSING_KEY = "missing_run"


PICKER_KEY = "run_picker"  # the sidebar's run selectbox (a widget's state is per page in a pages/ app:
#                            the picker is re-seeded from RUN_KEY on every page, never the other way round)


# -- runs -------------------------------------------------------------------------------------
def runs_root() -> Path:
    return default_runs_root()


def current_run() -> Run | None:
    """The open run, or None (also when its folder went away)."""
    path = st.session_state.get(RUN_KEY)
    if not path:
        return None
    try:
        return Run.open(path)
    except RunError:
        return None


def require_run(what: str = "this page") -> Run:
    """The open run; without one, say how to get one and stop the page here."""
    run = current_run()
    if run is None:
        if not st.session_state.get(MISSING_KEY):  # else the page already says which run is missing
            st.info(
                f"No run is open. Create one in the sidebar (**New run**) or pick an existing one to use {what}.",
                icon=":material/folder_open:",
            )
        st.stop()
    return run  # type: ignore[return-value]


# -- the run in the URL --------------------------------------------------------------------------
RUN_PARAM = "run"  # ?run=<run id> (a run under the runs root) or ?run=<absolute path> (opened by path)


def run_ref(path: str | Path) -> str:
    """What ``?run=`` holds for the run at ``path``: its id under the runs root, else its absolute path."""
    p = Path(path)
    try:
        if p.resolve().parent == runs_root().resolve():
            return p.name
    except OSError:
        pass
    return str(p)


def resolve_run_ref(ref: str) -> str | None:
    """The run folder (as the session stores it) that ``?run=`` names, or None when there is no such run."""
    ref = (ref or "").strip()
    if not ref:
        return None
    candidate = Path(ref).expanduser() if "/" in ref else runs_root() / ref  # a path, or an id under the root
    try:
        return str(Run.open(candidate).path)
    except (RunError, OSError, ValueError):
        return None


def open_run(path: str | Path) -> None:
    """Make ``path`` the open run: the session and the URL (so a reload or a shared link keeps it)."""
    st.session_state[RUN_KEY] = str(path)
    st.session_state.pop(MISSING_KEY, None)
    st.query_params[RUN_PARAM] = run_ref(path)


def _run_picked() -> None:
    """on_change of the sidebar's run picker: the session and the URL follow the choice."""
    path = st.session_state.get(PICKER_KEY)
    if path:
        open_run(path)


def sync_run_with_url(paths: list[str]) -> None:
    """Before the run picker is drawn: the URL's ``?run=`` wins (a reload, back/forward, a shared link);
    without one the session's run (or the newest) opens and is written into the URL.

    A ``?run=`` naming no run opens none (never another run in its place: the user would read the wrong
    run's results as the one asked for); ``missing_run_notice`` says so until a run is picked."""
    wanted = st.query_params.get(RUN_PARAM)
    if wanted:
        path = resolve_run_ref(wanted)
        if path is None:
            st.session_state[MISSING_KEY] = wanted
            st.session_state.pop(RUN_KEY, None)
            return
        st.session_state.pop(MISSING_KEY, None)
        if path != st.session_state.get(RUN_KEY):
            st.session_state[RUN_KEY] = path
    if not st.session_state.get(RUN_KEY) and paths and not st.session_state.get(MISSING_KEY):
        st.session_state[RUN_KEY] = paths[0]  # no run asked for: the newest
    current = st.session_state.get(RUN_KEY)
    if current and st.query_params.get(RUN_PARAM) != run_ref(current):
        st.query_params[RUN_PARAM] = run_ref(current)


def missing_run_notice(any_runs: bool) -> None:
    """In the page's main area: the run a link asked for does not exist, and how to open one instead."""
    wanted = st.session_state.get(MISSING_KEY)
    if not wanted:
        return
    how = (
        "Pick a run in the sidebar's **Run** list, or create one under **New run**."
        if any_runs
        else "There are no runs yet: create one under **New run** in the sidebar, or start the demo on Home."
    )
    st.error(
        f"**No run named “{md_escape(wanted)}” exists** under `{runs_root()}`: the link may be mistyped, or "
        f"the run was deleted or moved. No other run was opened in its place. {how}",
        icon=":material/folder_off:",
    )


def model_info(run: Run) -> dict[str, Any]:
    """Layers/experts/top-k the run's analysis recorded ({} before any analysis)."""
    from moe_core.store.provenance import model_info_of

    return model_info_of(run)


def grid_shape(run: Run, table: pd.DataFrame) -> tuple[int, int]:
    """(num_layers, num_experts): from the analysis' model info, else from the risk table."""
    info = model_info(run)
    nl = info.get("num_layers") or int(table["layer"].max()) + 1
    ne = info.get("num_experts") or int(table["expert"].max()) + 1
    return int(nl), int(ne)


def mask_names(run: Run) -> list[str]:
    d = run.path / "masks"
    return [p.stem for p in listed(d)]


def training_names(run: Run) -> set[str]:
    """Names of the run's trainings, finished or not (what a new training's name must not repeat)."""
    d = run.path / "train"
    return (
        {p.name.removeprefix(".").removesuffix(".partial") for p in d.iterdir() if p.is_dir()}
        if d.is_dir()
        else set()
    )


def pick_newest(key: str, newest: Any, names: list[str], newest_name: str) -> None:
    """Select ``newest`` in the widget ``key`` when ``newest_name`` appeared since the page last drew (among
    ``names``): a training or an evaluation that just finished is what the page shows, not the one before."""
    seen_key = f"{key}::seen"
    seen = st.session_state.get(seen_key)
    if seen is not None and newest_name not in seen:
        st.session_state[key] = newest
    st.session_state[seen_key] = list(names)
