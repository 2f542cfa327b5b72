"""Shared helpers of the app's pages: the current run, the error boundary, cached readers, job panel.

Pages stay thin: they read and write through ``moe_core`` and draw; everything they share lives
here. ``st.session_state`` holds only ids and paths (``run_path``, a few widget values); tables
are cached with ``st.cache_data`` keyed on (path, mtime), models/tokenizers with
``st.cache_resource``. Long work is a background job (``moe_core.jobs``) that the job panel polls.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import streamlit as st

from moe_core import jobs
from moe_core.errors import MoELabError
from moe_core.runs import Run, RunError, default_runs_root, read_json

log = logging.getLogger("moe_app")

RUN_KEY = "run_path"  # session_state: absolute path of the open run (or absent)
FLASH_KEY = "flash"  # session_state: one message to show after a rerun
POLL_S = 2.0  # seconds between job-panel refreshes while a job is live
PAGES = {  # page files, for st.page_link
    "home": "app_pages/home.py", "data": "app_pages/data.py", "analysis": "app_pages/analysis.py",
    "heatmaps": "app_pages/heatmaps.py", "experts": "app_pages/experts.py", "training": "app_pages/training.py",
    "evaluation": "app_pages/evaluation.py", "runs": "app_pages/runs.py",
}


# -- errors ---------------------------------------------------------------------------------
BUG_TEXT = "Internal error (a bug): {kind}: {message}. Details are in the app's log; please report it."


def error_text(e: BaseException, prefix: str = "") -> tuple[bool, str]:
    """(is_bug, text to show) for an exception that reached a page.

    A ``MoELabError`` is the user's to fix: its message, as it is. An ``OSError`` from a file
    operation on user input (a path typed or a file removed meanwhile) is shown with the file it
    names. Anything else is a bug in the lab: a short note with the exception type, never passed
    off as a user error (the traceback goes to the log, see ``report_error``).
    """
    if isinstance(e, MoELabError):
        return False, f"{prefix}{e}"
    if isinstance(e, OSError):
        if e.strerror and e.filename:
            return False, f"{prefix}{e.strerror}: {e.filename}"
        return False, f"{prefix}{e}"
    message = str(e).strip().splitlines()[0][:200] if str(e).strip() else "(no message)"
    return True, BUG_TEXT.format(kind=type(e).__name__, message=message)


def error_message(e: BaseException, prefix: str = "") -> str:
    """The text to show for ``e`` (see ``error_text``); a bug's traceback is logged here.

    Call it inside the ``except`` block that caught ``e`` (callbacks keep the text for the next run).
    """
    is_bug, text = error_text(e, prefix)
    if is_bug:
        log.exception("bug behind a page (shown to the user as an internal error): %s: %s", type(e).__name__, e)
    else:
        log.info("shown to the user: %s", text)
    return text


def report_error(e: BaseException, prefix: str = "") -> None:
    """Show ``e`` with st.error (see ``error_text``); a bug's traceback goes to the log."""
    st.error(error_message(e, prefix), icon=":material/error:")


@contextlib.contextmanager
def guard(prefix: str = "") -> Iterator[None]:
    """Error boundary of a page section: a user-fixable ``MoELabError`` (or a file ``OSError``) becomes
    one st.error line; any other exception is reported as a bug (short message, traceback logged).

    Streamlit's own ``st.rerun``/``st.stop`` are ``BaseException``s and pass through.
    """
    try:
        yield
    except Exception as e:  # noqa: BLE001 - the boundary: sorted into user errors and bugs, never swallowed silently
        report_error(e, prefix)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:])")


def md_escape(text: str) -> str:
    """User text (prompts, answers) shown literally inside st.markdown/st.caption."""
    return _MD_SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")


def flash(message: str) -> None:
    """Remember a success message to show on the next run (survives st.rerun)."""
    st.session_state[FLASH_KEY] = message


def show_flash() -> None:
    msg = st.session_state.pop(FLASH_KEY, None)
    if msg:
        st.success(msg, icon=":material/check_circle:")


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


def model_info(run: Run) -> dict[str, Any]:
    """Layers/experts/top-k the run's analysis recorded ({} before any analysis)."""
    from moe_core.analysis import model_info_of

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


# -- cached readers (keyed on path + mtime: a new artifact invalidates the cache) -------------------
def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


@st.cache_data(max_entries=64, show_spinner=False)
def _parquet(path: str, mtime_ns: int) -> pd.DataFrame:
    from moe_core.runs import read_parquet

    return read_parquet(path)


def read_table(path: Path) -> pd.DataFrame | None:
    """A Parquet artifact, cached until the file changes; None when it does not exist."""
    return _parquet(str(path), _mtime(path)) if path.is_file() else None


def risk_tables_or_stop(run: Run) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's aggregated and per-batch risk tables, or a pointer to the Analysis page and stop."""
    agg = per_batch = None
    with guard("The risk tables cannot be read: "):
        agg = read_table(run.path_for("risk_aggregated"))
        per_batch = read_table(run.path_for("risk_per_batch"))
    if agg is None or per_batch is None:
        st.info("No risk tables yet: run the analysis first.", icon=":material/info:")
        st.page_link(PAGES["analysis"], label="Go to Analysis", icon=":material/arrow_back:")
        st.stop()
    return agg, per_batch


@st.cache_data(max_entries=64, show_spinner=False)
def _json(path: str, mtime_ns: int) -> Any:
    return read_json(path)


def read_json_cached(path: Path) -> Any:
    return _json(str(path), _mtime(path)) if path.is_file() else None


@st.cache_data(max_entries=4, show_spinner="Preparing the batch x layer x expert tensor...")
def _risk_tensor(path: str, mtime_ns: int, num_layers: int, num_experts: int, value: str):
    from moe_core.risk import per_batch_tensor
    from moe_core.runs import read_parquet

    return per_batch_tensor(read_parquet(path), value, num_layers, num_experts)


def risk_tensor(run: Run, num_layers: int, num_experts: int, value: str = "risk_diff"):
    """(batch_ids [B], values [B, L, E]) of the run's per-batch risk, computed once per file version."""
    p = run.path_for("risk_per_batch")
    return _risk_tensor(str(p), _mtime(p), num_layers, num_experts, value)


@st.cache_data(max_entries=8, show_spinner=False)
def _plan(path: str, mtime_ns: int):
    from moe_core.batches import load_plan

    return load_plan(path)


def load_plan_cached(path: Path):
    return _plan(str(path), _mtime(path)) if path.is_file() else None


@st.cache_resource(max_entries=1, show_spinner="Loading the tokenizer...")
def tokenizer_for(model_spec: str):
    """The tokenizer of a run's model (organism, local folder or HF id), to show routed tokens."""
    from transformers import AutoTokenizer

    source = model_spec
    if model_spec == "organism":
        from moe_core.demo import organism_dir

        source = str(organism_dir())
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:  # transformers: missing files / a tokenizer class it cannot build
        raise MoELabError(f"cannot load the tokenizer of {model_spec!r}: {e}") from e


@st.cache_resource(max_entries=1)
def device_name() -> str:
    import torch

    return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"


# -- jobs -------------------------------------------------------------------------------------
_STATE_BADGE = {
    "none": ("not started", "gray"), "queued": ("starting", "blue"), "running": ("running", "blue"),
    "done": ("done", "green"), "error": ("failed", "red"), "dead": ("stopped unexpectedly", "orange"),
    "stopped": ("stopped", "orange"),
}


def job_panel(run: Run, name: str, unit: str = "steps") -> jobs.JobInfo:
    """Progress bar, ETA, log tail, stop/resume of job ``name``; refreshes itself while live.

    The panel is a fragment that re-runs every few seconds only while the job is live; when the
    job finishes it reruns the whole page once so results below it appear.
    """
    info = jobs.read_job(run.path, name)
    prev_key = f"job_state_{name}"

    @st.fragment(run_every=POLL_S if info.active else None)
    def panel() -> None:
        cur = jobs.read_job(run.path, name)
        prev = st.session_state.get(prev_key)
        st.session_state[prev_key] = cur.state
        if prev in jobs.ACTIVE_STATES and not cur.active:
            st.rerun()  # the job just ended: redraw the page with its results
        if cur.state == "none":
            return
        label, color = _STATE_BADGE.get(cur.state, (cur.state, "gray"))
        with st.container(border=True):
            head = st.columns([3, 1, 1], vertical_alignment="center")
            head[0].markdown(f"**Job `{name}`** &nbsp; :{color}-badge[{label}]")
            if cur.active:
                if head[2].button("Stop", key=f"stop_{name}", icon=":material/stop_circle:"):
                    jobs.request_stop(run.path, name)
                    st.toast(f"Asked job {name} to stop after the current step")
            elif cur.state in ("stopped", "dead", "error") and jobs.relaunch_flags(run.path, name):
                if head[2].button("Resume", key=f"resume_{name}", icon=":material/play_circle:"):
                    command, flags = jobs.relaunch_flags(run.path, name)  # type: ignore[misc]
                    with guard():
                        jobs.start_job(run.path, name, command, flags)
                        st.rerun()
            if cur.total:
                text = f"{cur.done} / {cur.total} {unit}"
                if cur.eta_s is not None:
                    text += f" · about {jobs.format_eta(cur.eta_s)} left"
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
