"""Shared helpers of the app's pages: page setup + sidebar, the current run, the error boundary,
cached readers, job panel.

The app follows Streamlit's classic multipage convention: ``app.py`` is Home and every file in
``pages/`` is one page, opened by its own URL (``/data``, ``/heatmaps``, ...). Every page starts
with ``ui.setup()``, which draws the shared sidebar (navigation, run picker, model, device), so a
page opened directly by URL or reloaded looks exactly like one reached by a click. The open run
lives in the URL (``?run=<run id>``): reloads, back/forward and shared links keep it.

This module is not a page (it is not in ``pages/``). Pages stay thin: they read and write through ``moe_core`` and draw; everything they share lives
here. ``st.session_state`` holds only ids and paths (``run_path``, a few widget values); tables
are cached with ``st.cache_data`` keyed on (path, mtime), models/tokenizers with
``st.cache_resource``. Long work is a background job (``moe_core.jobs``) that the job panel polls.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st
from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

from moe_core import jobs
from moe_core.errors import MoELabError
from moe_core.store.files import RunError, read_json
from moe_core.store.jobs import ACTIVE_STATES, JobInfo, format_eta, read_job
from moe_core.store.manifest import default_runs_root
from moe_core.store.run import Run

log = logging.getLogger("moe_app")

PLOT_EXPORT = {
    "toImageButtonOptions": {"format": "svg", "scale": 2}
}  # the camera icon saves an SVG (vector, for slides)
RUN_KEY = "run_path"  # session_state: absolute path of the open run (or absent); not a widget key
PICKER_KEY = "run_picker"  # the sidebar's run selectbox (a widget's state is per page in a pages/ app:
#                            the picker is re-seeded from RUN_KEY on every page, never the other way round)
FLASH_KEY = "flash"  # session_state: one message to show after a rerun
POLL_S = 2.0  # seconds between job-panel refreshes while a job is live
NAV = [  # (key, page file relative to app.py, label, icon): the sidebar navigation, in order
    ("home", "app.py", "Home", ":material/home:"),
    ("data", "pages/1_data.py", "Data & batches", ":material/dataset:"),
    ("analysis", "pages/2_analysis.py", "Analysis", ":material/query_stats:"),
    ("heatmaps", "pages/3_heatmaps.py", "Heatmaps", ":material/grid_on:"),
    ("experts", "pages/4_experts.py", "Experts", ":material/target:"),
    ("training", "pages/5_training.py", "Training", ":material/model_training:"),
    ("evaluation", "pages/6_evaluation.py", "Evaluation", ":material/fact_check:"),
    ("present", "pages/7_present.py", "Present", ":material/slideshow:"),
    ("runs", "pages/8_runs.py", "Runs", ":material/folder_open:"),
]
PAGES = {key: path for key, path, _, _ in NAV}  # page files, for st.page_link / st.switch_page


# -- errors ---------------------------------------------------------------------------------
BUG_TEXT = "Internal error (a bug): {kind}: {message}. Details are in the app's log; please report it."


UI_WORDS = [  # how moe_core's messages (written for Python callers) name things, and how a page names them
    (
        re.compile(r"use move\(\) to put an item into another batch"),
        "use the Move tab to put an item into another batch",
    ),
    (
        re.compile(r"pass column='<name>' to say which column holds the prompts"),
        "pick the column that holds the prompts",
    ),
    (
        re.compile(r"pass format='csv'\|'json'\|'jsonl'\|'parquet'"),
        "use a file whose name ends in .csv, .json, .jsonl or .parquet",
    ),
    (re.compile(r"\b(\w+)='([^']*)'"), r"\1 \2"),  # any other keyword=value
    (re.compile(r"\b([a-z_]+)\(\)"), r"\1"),  # any other call()
]


def ui_words(text: str) -> str:
    """A user error's text with Python API words (``move()``, ``column='<name>'``) in the UI's words."""
    for pattern, repl in UI_WORDS:
        text = pattern.sub(repl, text)
    return text


def error_text(e: BaseException, prefix: str = "") -> tuple[bool, str]:
    """(is_bug, text to show) for an exception that reached a page.

    A ``MoELabError`` is the user's to fix: its message, as it is. An ``OSError`` from a file
    operation on user input (a path typed or a file removed meanwhile) is shown with the file it
    names. Anything else is a bug in the lab: a short note with the exception type, never passed
    off as a user error (the traceback goes to the log, see ``report_error``).
    """
    if isinstance(e, MoELabError):
        return False, f"{prefix}{ui_words(str(e))}"
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
        log.exception(
            "bug behind a page (shown to the user as an internal error): %s: %s", type(e).__name__, e
        )
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
    """The remembered message, in a slot that is there with or without one: the elements below keep
    their place, so a tab or a table selection survives the rerun that clears the message."""
    msg, slot = st.session_state.pop(FLASH_KEY, None), st.empty()
    if msg:
        slot.success(msg, icon=":material/check_circle:")


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


def link(
    key: str,
    label: str | None = None,
    icon: str | None = None,
    container: Any = None,
    extra: dict[str, Any] | None = None,
    **kw: Any,
) -> None:
    """``st.page_link`` to page ``key`` that carries the open run (and ``extra`` parameters) in the URL."""
    target = container if container is not None else st
    path = st.session_state.get(RUN_KEY)
    _, file, default_label, default_icon = next(n for n in NAV if n[0] == key)
    params = {RUN_PARAM: run_ref(path)} if path else {}
    params.update({k: str(v) for k, v in (extra or {}).items()})
    target.page_link(
        file, label=label or default_label, icon=icon or default_icon, query_params=params or None, **kw
    )


def clicked_point(event: Any, memo_key: str, fields: tuple[str, ...] = ("y", "x")) -> tuple[int, ...] | None:
    """``fields`` (as ints) of a new click/selection on a chart drawn with ``st.plotly_chart(on_select=...)``,
    once per click: the same selection seen again on a later rerun is None, so the boxes it filled
    can be changed by hand afterwards."""
    points = ((getattr(event, "selection", None) or {}).get("points") or []) if event else []
    found = next(
        (tuple(int(pt[f]) for f in fields) for pt in points if all(pt.get(f) is not None for f in fields)),
        None,
    )
    if (
        found is None
    ):  # nothing selected (a second click on a point deselects it): the next click counts again
        st.session_state.pop(memo_key, None)
        return None
    if st.session_state.get(memo_key) == list(found):
        return None
    st.session_state[memo_key] = list(found)
    return found


def backend_choice(prefix: str, spec: Any, backend_help: str, url_label: str) -> tuple[str, str | None]:
    """The generation backend and, for vLLM, the server URL (widgets ``{prefix}_backend``, ``{prefix}_vllm_url``)
    with ``spec``'s defaults -> (backend, url or None): the Analysis and Evaluation pages ask the same way."""
    from moe_core.model.backends import Backend

    choices = list(Backend.__args__)
    b1, b2 = st.columns([1, 2])
    backend = b1.selectbox(
        "Generation backend",
        choices,
        index=choices.index(spec.backend),
        key=f"{prefix}_backend",
        help=backend_help,
    )
    url = b2.text_input(
        url_label,
        spec.vllm_url or "",
        key=f"{prefix}_vllm_url",
        disabled=backend != "vllm",
        placeholder="http://host:8000/v1 (empty: the job starts one)",
    )
    return backend, (url.strip() or None) if backend == "vllm" else None


def clicked_cell(event: Any, memo_key: str) -> tuple[int, int] | None:
    """(layer, expert) of a new click on a layer x expert heatmap (its click layer: x = expert, y = layer)."""
    cell = clicked_point(event, memo_key, ("y", "x"))
    return None if cell is None else (cell[0], cell[1])


def take_param(name: str) -> int | None:
    """An integer URL parameter set by a link from another page (``?layer=3``), read once and removed."""
    raw = st.query_params.get(name)
    if raw is None:
        return None
    del st.query_params[name]
    try:
        return int(raw)
    except ValueError:
        return None


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
    sidebar()
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


def sidebar() -> None:
    """Navigation, run picker (synced with ``?run=``), the run's model, the device, new/open run."""
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
                "Run", paths, key=PICKER_KEY, format_func=lambda p: labels.get(p, p), on_change=_run_picked
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


# -- cached readers (keyed on path + mtime: a new artifact invalidates the cache) -------------------
def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


@st.cache_data(max_entries=64, show_spinner=False)
def _parquet(path: str, mtime_ns: int) -> pd.DataFrame:
    from moe_core.store.files import read_parquet

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
        link("analysis", "Go to Analysis", ":material/arrow_back:")
        st.stop()
    return agg, per_batch


@st.cache_data(max_entries=64, show_spinner=False)
def _json(path: str, mtime_ns: int) -> Any:
    return read_json(path)


def read_json_cached(path: Path) -> Any:
    return _json(str(path), _mtime(path)) if path.is_file() else None


@st.cache_data(max_entries=4, show_spinner="Preparing the batch x layer x expert tensor...")
def _risk_tensor(path: str, mtime_ns: int, num_layers: int, num_experts: int, value: str):
    from moe_core.analysis.risk import per_batch_tensor
    from moe_core.store.files import read_parquet

    return per_batch_tensor(read_parquet(path), value, num_layers, num_experts)


def risk_tensor(run: Run, num_layers: int, num_experts: int, value: str = "risk_diff"):
    """(batch_ids [B], values [B, L, E]) of the run's per-batch risk, computed once per file version."""
    p = run.path_for("risk_per_batch")
    return _risk_tensor(str(p), _mtime(p), num_layers, num_experts, value)


@st.cache_data(max_entries=8, show_spinner=False)
def _plan(path: str, mtime_ns: int):
    from moe_core.batching.plan import load_plan

    return load_plan(path)


def load_plan_cached(path: Path):
    return _plan(str(path), _mtime(path)) if path.is_file() else None


@st.cache_resource(max_entries=1, show_spinner="Loading the tokenizer...")
def tokenizer_for(model_spec: str):
    """The tokenizer of a run's model (organism, local folder or HF id), to show routed tokens."""
    from transformers import AutoTokenizer

    source = model_spec
    if model_spec == "organism":
        from moe_core.model.organism import organism_dir

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
