"""The sidebar's pages and links between them, and reading clicks on charts."""

from __future__ import annotations

from typing import Any

import streamlit as st

from ui.runs import RUN_KEY, RUN_PARAM, run_ref

PLOT_EXPORT = {
    "toImageButtonOptions": {"format": "svg", "scale": 2}
}  # the camera icon saves an SVG (vector, for slides)


NAV = [  # (key, page file relative to app.py, label, icon): the sidebar navigation, in order
    ("home", "app.py", "Home", ":material/home:"),
    ("data", "pages/1_data.py", "Data & batches", ":material/dataset:"),
    ("analysis", "pages/2_analysis.py", "Analysis", ":material/query_stats:"),
    ("heatmaps", "pages/3_heatmaps.py", "Heatmaps", ":material/grid_on:"),
    ("experts", "pages/4_experts.py", "Experts", ":material/target:"),
    ("atlas", "pages/9_atlas.py", "Expert atlas", ":material/travel_explore:"),
    ("training", "pages/5_training.py", "Training", ":material/model_training:"),
    ("evaluation", "pages/6_evaluation.py", "Evaluation", ":material/fact_check:"),
    ("present", "pages/7_present.py", "Present", ":material/slideshow:"),
    ("runs", "pages/8_runs.py", "Runs", ":material/folder_open:"),
]


PAGES = {key: path for key, path, _, _ in NAV}  # page files, for st.page_link / st.switch_page


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


def budget_choice(results: Any, key: str) -> float | None:
    """The expert budget to read a study at (widget ``key``): its budgets as shares, the one nearest the
    headline's 1/16 first; Home and the Evaluation page ask the same way. None when it trained none."""
    from moe_core.eval.study_summary import share_label
    from moe_core.eval.study_targets import nearest_budget, study_budgets

    budgets, nearest = study_budgets(results), nearest_budget(results)
    if len(budgets) < 2:
        return nearest
    shown = st.segmented_control(
        "Expert budget",
        budgets,
        default=nearest,
        format_func=share_label,
        key=key,
        help="Share of all experts trained",
    )
    return nearest if shown is None else shown
