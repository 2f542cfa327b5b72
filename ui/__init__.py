"""Shared helpers of the app's pages: page setup + sidebar, the current run, the error boundary,
cached readers, job panel.

The app follows Streamlit's classic multipage convention: ``app.py`` is Home and every file in
``pages/`` is one page, opened by its own URL (``/data``, ``/heatmaps``, ...). Every page starts
with ``ui.setup()``, which draws the shared sidebar (navigation, run picker, model, device), so a
page opened directly by URL or reloaded looks exactly like one reached by a click. The open run
lives in the URL (``?run=<run id>``): reloads, back/forward and shared links keep it.

This package is not a page (it is not in ``pages/``). Pages stay thin: they read and write through ``moe_core`` and draw; everything they share lives
here. ``st.session_state`` holds only ids and paths (``run_path``, a few widget values); tables
are cached with ``st.cache_data`` keyed on (path, mtime), models/tokenizers with
``st.cache_resource``. Long work is a background job (``moe_core.jobs``) that the job panel polls.

This file is the package's face: pages call ``ui.<name>``; each name lives in one module beside it.
"""

from ui.cache import (
    atlas_for,
    load_plan_cached,
    read_json_cached,
    read_table,
    risk_tables_or_stop,
    risk_tensor,
    score_table_cached,
    study_targets_of,
    tokenizer_for,
)
from ui.jobs import POLL_S, job_panel
from ui.messages import (
    column_labels,
    error_message,
    error_text,
    flash,
    guard,
    md_escape,
    report_error,
    show_flash,
)
from ui.navigation import (
    PLOT_EXPORT,
    backend_choice,
    budget_choice,
    clicked_cell,
    clicked_point,
    link,
    take_param,
)
from ui.runs import (
    RUN_KEY,
    current_run,
    grid_shape,
    mask_names,
    model_info,
    open_run,
    pick_newest,
    require_run,
    run_ref,
    runs_root,
    training_names,
)
from ui.sidebar import setup
from ui.tasks import running_task, start_task, task_panel

__all__ = [
    "atlas_for",
    "PLOT_EXPORT",
    "POLL_S",
    "RUN_KEY",
    "backend_choice",
    "budget_choice",
    "clicked_cell",
    "clicked_point",
    "column_labels",
    "current_run",
    "error_message",
    "error_text",
    "flash",
    "grid_shape",
    "guard",
    "job_panel",
    "link",
    "load_plan_cached",
    "mask_names",
    "md_escape",
    "model_info",
    "open_run",
    "pick_newest",
    "read_json_cached",
    "read_table",
    "report_error",
    "require_run",
    "risk_tables_or_stop",
    "risk_tensor",
    "running_task",
    "score_table_cached",
    "study_targets_of",
    "run_ref",
    "runs_root",
    "setup",
    "show_flash",
    "start_task",
    "take_param",
    "task_panel",
    "tokenizer_for",
    "training_names",
]
