"""Which run a page works on: the session's run, the run in the URL (?run=), and its model's shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from moe_core.store.files import RunError
from moe_core.store.manifest import default_runs_root
from moe_core.store.run import Run

RUN_KEY = "run_path"  # session_state: absolute path of the open run (or absent); not a widget key


PICKER_KEY = "run_picker"  # the sidebar's run selectbox (a widget's state is per page in a pages/ app:


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
    for candidate in (runs_root() / ref, Path(ref).expanduser()):
        if "/" in ref and candidate == runs_root() / ref:
            continue  # a path is never looked up under the runs root
        try:
            return str(Run.open(candidate).path)
        except (RunError, OSError, ValueError):
            continue
    return None


def open_run(path: str | Path) -> None:
    """Make ``path`` the open run: the session and the URL (so a reload or a shared link keeps it)."""
    st.session_state[RUN_KEY] = str(path)
    st.query_params[RUN_PARAM] = run_ref(path)


def _run_picked() -> None:
    """on_change of the sidebar's run picker: the session and the URL follow the choice."""
    path = st.session_state.get(PICKER_KEY)
    if path:
        open_run(path)


def sync_run_with_url(paths: list[str]) -> None:
    """Before the run picker is drawn: the URL's ``?run=`` wins (a reload, back/forward, a shared link);
    without one the session's run (or the newest) opens and is written into the URL."""
    wanted = st.query_params.get(RUN_PARAM)
    if wanted:
        path = resolve_run_ref(wanted)
        if path is None:
            st.session_state["sidebar_error"] = (
                f"The link names run {wanted!r}, which is not under "
                f"{runs_root()}: showing another run instead."
            )
        elif path != st.session_state.get(RUN_KEY):
            st.session_state[RUN_KEY] = path
    if not st.session_state.get(RUN_KEY) and paths:
        st.session_state[RUN_KEY] = paths[0]  # no run asked for: the newest
    current = st.session_state.get(RUN_KEY)
    if current and st.query_params.get(RUN_PARAM) != run_ref(current):
        st.query_params[RUN_PARAM] = run_ref(current)


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
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []
