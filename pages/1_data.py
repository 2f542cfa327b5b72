"""Data & batches: load safe/unsafe prompt sets, compose mixed batches, hand-edit them, save the plan.

The working plan is a draft file in the run (``plan.draft.json``; the previous version is kept
for undo) so that nothing but paths sits in the session; "Save plan" writes the run's
``plan.json`` that the analysis reads.
"""

from __future__ import annotations

import hashlib

import pandas as pd
import streamlit as st

import ui  # noqa: I001 - the shared page helpers (not a page)
from moe_core import pipeline as P
from moe_core.batching.demo_prompts import demo_sets
from moe_core.batching.edits import add, drop, move, replace, swap
from moe_core.batching.plan import BatchPlan, BatchPlanError, split_counts
from moe_core.batching.prompts import (
    FORMATS,
    LoadedPrompts,
    PromptLoadError,
    detect_prompt_column,
    list_columns,
    load_prompt_set,
    pair_by_row,
)
from moe_core.batching.validation import validate
from moe_core.types import PromptItem

ui.setup("Data & batches")
st.title("Data & batches")
st.caption(
    "**Safe** items are those the model should refuse or may answer (a plain harmful goal it refuses, or a "
    "benign request); **unsafe** items are those it complies with wrongly (the same goal jailbroken, or a "
    "harmful request). Each batch holds its safe block, then its unsafe block; training later replays exactly "
    "these batches."
)
ui.show_flash()
run = ui.require_run("the data page")
DRAFT = P.draft_plan_path(run)
SAVED = run.path_for("plan")


# -- cached loaders (plain arguments only) ----------------------------------------------------
@st.cache_data(max_entries=8, show_spinner=False)
def _demo(mode: str, seed: int) -> tuple[list[PromptItem], list[PromptItem]]:
    return demo_sets("train", mode=mode, seed=seed)  # type: ignore[arg-type]


@st.cache_data(max_entries=16, show_spinner="Reading columns...")
def _columns_or_error(source: str | bytes, name: str | None, split: str | None) -> list[str] | str:
    """Cached either way: a dataset name that fails (offline hub) is not retried on every rerun."""
    try:
        return list_columns(source, name=name, split=split or None)
    except PromptLoadError as e:
        return str(e)


def _columns(source: str | bytes, name: str | None, split: str | None) -> list[str]:
    out = _columns_or_error(source, name, split)
    if isinstance(out, str):
        raise PromptLoadError(out)
    return out


@st.cache_data(max_entries=16, show_spinner="Loading prompts...")
def _load(
    source: str | bytes,
    name: str | None,
    split: str | None,
    column: str | None,
    label: str,
    limit: int | None,
) -> LoadedPrompts:
    return load_prompt_set(source, name=name, split=split or None, column=column, label=label, limit=limit)  # type: ignore[arg-type]


LABEL_COLUMNS = (
    "label",
    "labels",
    "safety_label",
    "is_harmful",
    "harmful",
    "is_unsafe",
    "unsafe",
    "is_safe",
    "safe",
    "type",
    "class",
)  # a column that says, per row, whether the prompt is harmful
_UNSAFE_VALUES = {
    "unsafe",
    "harmful",
    "jailbreak",
    "jailbroken",
    "toxic",
    "malicious",
    "attack",
    "bad",
    "1",
    "true",
    "yes",
}
_SAFE_VALUES = {"safe", "benign", "harmless", "contrast_safe", "good", "0", "false", "no"}


def label_column(cols: list[str], prompt_column: str | None) -> str | None:
    """A column (other than the prompt column) that labels each row safe/harmful, if the file has one."""
    lower = {c.lower(): c for c in cols if c != prompt_column}
    return next((lower[n] for n in LABEL_COLUMNS if n in lower), None)


def side_of(value: str, column: str) -> str | None:
    """'safe' / 'unsafe' for a label value, when its meaning is clear (``is_safe=1`` is safe)."""
    v = str(value).strip().lower()
    side = "unsafe" if v in _UNSAFE_VALUES else "safe" if v in _SAFE_VALUES else None
    if side and column.lower() in ("is_safe", "safe") and v in ("1", "true", "yes", "0", "false", "no"):
        side = "safe" if side == "unsafe" else "unsafe"
    return side


def _prompt_set(label: str, mode: str) -> list[PromptItem] | None:
    """One side's prompts from an upload or a path / HF dataset name, with a column picker; a file
    with a label column keeps only the rows of this side (chosen values, pre-filled when clear)."""
    st.markdown(f"**{label.capitalize()} prompts**")
    source: str | bytes | None = None
    name: str | None = None
    split: str | None = None
    if mode == "upload":
        f = st.file_uploader(
            f"{label} file",
            type=[suffix.lstrip(".") for suffix in FORMATS],
            key=f"up_{label}",
            label_visibility="collapsed",
        )
        if f is not None:
            source, name = f.getvalue(), f.name
    else:
        text = st.text_input(
            f"{label} file path or Hugging Face dataset",
            key=f"src_{label}",
            placeholder="/path/prompts.csv  or  walledai/AdvBench",
        )
        split = st.text_input("split (datasets only)", key=f"split_{label}", placeholder="train")
        source = text.strip() or None
    if source is None:
        return None
    # widgets about this file are keyed by its content: a new upload never inherits a stale column choice
    raw = source if isinstance(source, bytes) else f"{source}|{split}".encode()
    fid = hashlib.sha1(raw + (name or "").encode()).hexdigest()[:10]
    with ui.guard(f"{label} prompts: "):
        cols = _columns(source, name, split)
        auto = detect_prompt_column(cols)
        column = st.selectbox(
            f"{label} prompt column",
            cols,
            index=cols.index(auto) if auto in cols else None,
            key=f"col_{label}_{fid}",
            placeholder="choose the column holding the prompts",
            help="auto-detected when a usual name (prompt, goal, instruction, ...) is present",
        )
        limit = int(st.number_input(f"max {label} prompts (0 = all)", 0, 1_000_000, 0, key=f"limit_{label}"))
        loaded = _load(source, name, split, column, label, None)
        items = loaded.items
        lab_col = label_column(cols, column)
        if lab_col is not None:
            values = sorted({str(it.meta.get(lab_col)) for it in items})
            default = [v for v in values if side_of(v, lab_col) == label]
            keep = st.multiselect(
                f"This file has a label column, `{lab_col}`: keep the rows whose {lab_col} is",
                values,
                default=default,
                key=f"keep_{label}_{fid}",
                help=f"only these rows become {label} prompts; the other rows belong on the other side",
            )
            if keep:
                items = [it for it in items if str(it.meta.get(lab_col)) in keep]
            else:
                st.warning(
                    f"No {lab_col} value chosen: every row of this file counts as {label}, whatever its "
                    f"{lab_col} says.",
                    icon=":material/warning:",
                )
            if not items:
                raise PromptLoadError(f"no row has {lab_col} in {keep}")
        if limit:
            items = items[:limit]
        skipped = (  # said here, not only in the server log: a row the user wrote is not used
            f" ({loaded.skipped} empty row{'' if loaded.skipped == 1 else 's'} skipped: no text in "
            f"`{loaded.column}`)"
            if loaded.skipped
            else ""
        )
        st.caption(f"{len(items)} {label} prompts{skipped}, e.g. “{ui.md_escape(items[0].text[:90])}”")
        return items
    return None


def source_description(
    mode: str, demo_mode: str | None, safe: list[PromptItem] | None, unsafe: list[PromptItem] | None
) -> str:
    """A short name of what the prompt sets are now (stored in a composed plan to spot a stale one)."""
    if mode == "demo":
        return f"the built-in demo set ({demo_mode})"
    sides = [
        f"{len(items)} {side} from {items[0].source}" if items else f"no {side} prompts yet"
        for side, items in (("safe", safe), ("unsafe", unsafe))
    ]
    return " and ".join(sides)


# -- draft plan on disk ------------------------------------------------------------------------
def _draft() -> BatchPlan | None:
    if DRAFT.is_file():
        return ui.load_plan_cached(DRAFT)
    return ui.load_plan_cached(SAVED)


def _store(plan: BatchPlan, message: str) -> None:
    """Write the edited draft (keeping the previous one for undo) and redraw the page."""
    P.store_draft_plan(run, plan)
    ui.flash(message)
    st.rerun()


def _filled(table: pd.DataFrame) -> pd.DataFrame:
    """The prompt table without its empty columns (a category column of None in every row says nothing)."""
    empty = [
        c for c in table.columns if table[c].isna().all() or (table[c].astype(str).str.strip() == "").all()
    ]
    return table.drop(columns=empty)


def _new_item(text: str, label: str) -> PromptItem:
    text = text.strip()
    if not text:
        raise BatchPlanError("the new prompt is empty: type the prompt text first")
    digest = hashlib.sha1(f"{label}:{text}".encode()).hexdigest()[:8]
    return PromptItem(id=f"manual-{label}-{digest}", text=text, label=label, goal=text, source="manual")  # type: ignore[arg-type]


# -- 1. prompt sets ----------------------------------------------------------------------------
with st.container(border=True):
    st.subheader("1. Prompt sets")
    kept = None
    with ui.guard("The run's prompt sets cannot be read: "):
        kept = P.draft_sources(run)  # what this run's batches were composed from (uploads included)
    modes = (["run"] if kept else []) + ["demo", "upload", "path"]
    mode = st.segmented_control(
        "Source",
        modes,
        default=modes[0],
        key="data_source",
        required=True,
        format_func={
            "run": "The run's prompt sets",
            "demo": "Built-in demo set",
            "upload": "Upload files",
            "path": "Path or HF dataset",
        }.get,
    )
    safe: list[PromptItem] | None = None
    unsafe: list[PromptItem] | None = None
    demo_mode = None
    if mode == "run" and kept:
        safe, unsafe, kept_from = kept
        st.caption(
            f"{len(safe)} safe and {len(unsafe)} unsafe prompts, kept with the run: {ui.md_escape(kept_from)}."
        )
    elif mode == "demo":
        demo_mode = st.radio(
            "Demo set",
            ["paired", "unpaired"],
            horizontal=True,
            key="demo_mode",
            format_func={
                "paired": "paired: plain harmful goal (refused) vs the same goal jailbroken",
                "unpaired": "unpaired: benign requests vs harmful requests",
            }.get,
        )
        safe, unsafe = _demo(demo_mode, 0)
        st.caption(
            f"{len(safe)} safe and {len(unsafe)} unsafe prompts (our own synthetic text, train split)."
        )
    else:
        c1, c2 = st.columns(2, gap="large")
        with c1:
            safe = _prompt_set("safe", mode)
        with c2:
            unsafe = _prompt_set("unsafe", mode)
        if safe and unsafe and st.checkbox("Pair safe row i with unsafe row i", key="pair_rows"):
            with ui.guard():
                safe, unsafe = pair_by_row(safe, unsafe)

current_source = kept[2] if mode == "run" and kept else source_description(mode, demo_mode, safe, unsafe)

# -- 2. composition ----------------------------------------------------------------------------
with st.container(border=True):
    st.subheader("2. Compose batches")
    c1, c2, c3, c4 = st.columns(4)
    d = P.AnalyseSpec()  # the defaults, defined once in moe_core.specs
    batch_size = int(c1.number_input("Batch size", 2, 512, d.batch_size, key="batch_size"))
    safe_ratio = float(c2.slider("Safe ratio", 0.05, 0.95, d.safe_ratio, 0.05, key="safe_ratio"))
    seed = int(c3.number_input("Seed", 0, 2**31 - 1, d.seed, key="seed"))
    shuffle = c4.checkbox("Shuffle", True, key="shuffle")
    with ui.guard():
        n_s, n_u = split_counts(batch_size, safe_ratio)
        st.caption(f"Each batch: {n_s} safe then {n_u} unsafe items.")
    ready = bool(safe) and bool(unsafe)
    composing = ui.running_task("compose") is not None
    if st.button(
        "Compose batches", type="primary", disabled=not ready or composing, icon=":material/view_module:"
    ):
        # in a thread beside the page: a 20 MB file makes thousands of batches, and the bar shows where it is
        ui.start_task(
            "compose",
            "Composing",
            P.compose_draft,
            (run, list(safe or []), list(unsafe or []), current_source),
            dict(batch_size=batch_size, safe_ratio=safe_ratio, seed=seed, shuffle=shuffle),
            error_prefix="Cannot compose: ",
        )
        st.rerun()
    ui.task_panel(
        "compose", lambda task: ui.flash(f"Composed {len(task.result)} batches of {task.result.batch_size}.")
    )
    if not ready:
        st.caption("Load both a safe and an unsafe set first.")

plan = None
with ui.guard("The draft plan cannot be read: "):
    plan = _draft()
if plan is None:
    st.stop()

# -- 3. batches ----------------------------------------------------------------------------------
issues = validate(plan)
frame = plan.to_frame()
in_plan = set(frame["id"])
# the loaded prompts in no batch: the one source of the Unused metric and the Unused tab (the count at
# compose time goes stale as soon as an item is dropped or another set is loaded)
unused_items = [it for it in [*(safe or []), *(unsafe or [])] if it.id not in in_plan]
with st.container(border=True):
    st.subheader("3. Batches")
    composed_from = plan.meta.get("composed_from")
    if composed_from and composed_from != current_source:
        st.warning(
            f"These batches were composed from {composed_from}; the prompt sets above are now "
            f"{current_source}. Composing again would replace the batches and every hand edit in them"
            + (": pick **The run's prompt sets** above to go on with them." if kept else "."),
            icon=":material/history:",
        )
    m = st.columns(4)
    m[0].metric("Batches", len(plan))
    m[1].metric("Items", plan.num_items)
    m[2].metric("Paired", "yes" if plan.paired else "no")
    unused_n = {side: sum(1 for it in unused_items if it.label == side) for side in ("safe", "unsafe")}
    loaded_any = bool(safe or unsafe)
    m[3].metric(
        "Unused (safe / unsafe)",
        f"{unused_n['safe']} / {unused_n['unsafe']}" if loaded_any else "–",
        help="loaded prompts that are in no batch" if loaded_any else "load the prompt sets to count them",
    )
    errors = [i for i in issues if i.severity == "error"]
    warnings = [i for i in issues if i.severity == "warning"]
    for i in errors[:10]:
        st.error(str(i), icon=":material/error:")
    for i in warnings[:10]:
        st.warning(str(i), icon=":material/warning:")
    if len(issues) > 20:
        st.caption(f"... and {len(issues) - 20} more findings")
    if not issues:
        st.success(
            "The plan is valid: every batch holds both labels in the intended ratio.", icon=":material/check:"
        )

    overview = (
        frame.groupby("batch_idx")
        .agg(
            safe=("label", lambda s: int((s == "safe").sum())),
            unsafe=("label", lambda s: int((s == "unsafe").sum())),
            size=("label", "size"),
        )
        .reset_index()
    )
    flagged = {i.batch_idx for i in issues if i.batch_idx is not None}
    overview["issues"] = overview["batch_idx"].map(lambda b: "yes" if b in flagged else "")
    t1, t2, t3 = st.tabs(["One batch", "Overview of all batches", f"Unused prompts ({len(unused_items)})"])
    with t3:
        if unused_items:
            st.caption(
                "Loaded but in no batch (the batches are full or the ratio left them out); pick one in "
                "**Replace** or **Add** below to use it."
            )
            st.dataframe(
                _filled(
                    pd.DataFrame([{"id": it.id, "label": it.label, "text": it.text} for it in unused_items])
                ),
                hide_index=True,
                width="stretch",
                key="unused_table",
            )
        else:
            st.caption(
                "Every loaded prompt is in a batch."
                if (safe or unsafe)
                else "Load the prompt sets above to see which of them are not in a batch."
            )
    with t1:
        b = st.selectbox("Batch", plan.batch_indices, key="view_batch")
        rows = frame[frame["batch_idx"] == b][["in_batch_idx", "label", "id", "text", "category"]]
        st.dataframe(
            _filled(rows),
            hide_index=True,
            width="stretch",
            column_config={
                "text": st.column_config.TextColumn("text", width="large"),
                "label": st.column_config.TextColumn("label", width="small"),
            },
        )
    with t2:
        st.caption("Select a batch (the box at the start of its row) to see its prompts.")
        picked = st.dataframe(
            overview,
            hide_index=True,
            width="stretch",
            key="overview_table",
            on_select="rerun",
            selection_mode="single-row",
        )
        rows_sel = [r for r in (picked.selection.rows if picked is not None else []) if r < len(overview)]
        if rows_sel:  # (a selection kept from a longer plan composed before is ignored)
            sel_b = int(overview.iloc[rows_sel[0]]["batch_idx"])
            st.markdown(f"**Prompts of batch {sel_b}**")
            st.dataframe(
                _filled(frame[frame["batch_idx"] == sel_b][["in_batch_idx", "label", "id", "text"]]),
                hide_index=True,
                width="stretch",
                key="overview_batch",
                column_config={"text": st.column_config.TextColumn("text", width="large")},
            )

# -- 4. hand-pick ----------------------------------------------------------------------------------
ids = frame["id"].tolist()
text_of = dict(zip(frame["id"], frame["text"]))
where = {r.id: f"b{r.batch_idx}/{r.label}" for r in frame.itertuples()}
label_of = dict(zip(frame["id"], frame["label"]))
batch_of = dict(zip(frame["id"], frame["batch_idx"]))


def _fmt(item_id: str) -> str:
    return f"[{where.get(item_id, '?')}] {item_id}: {str(text_of.get(item_id, ''))[:70]}"


with st.container(border=True):
    st.subheader("4. Hand-pick items")
    tabs = st.tabs(["Move", "Swap", "Replace", "Drop", "Add"])
    with tabs[0]:
        item = st.selectbox("Item", ids, format_func=_fmt, key="mv_item")
        to = st.selectbox("To batch", plan.batch_indices, key="mv_to")
        if st.button("Move", key="mv_go"):
            if batch_of.get(item) == to:  # no edit (and no undo step) for a move that changes nothing
                st.info(
                    f"{ui.md_escape(item)} is already in batch {to}: nothing moved.", icon=":material/info:"
                )
            else:
                with ui.guard():
                    _store(move(plan, item, int(to)), f"Moved {item} to batch {to}.")
    with tabs[1]:
        a = st.selectbox("Item A", ids, format_func=_fmt, key="sw_a")
        label_a = label_of.get(a)
        same = [i for i in ids if label_of.get(i) == label_a and i != a]
        b2 = st.selectbox(
            f"Item B (also {label_a})",
            same,
            format_func=_fmt,
            key="sw_b",
            placeholder=f"no other {label_a} item",
        )
        if st.button("Swap", key="sw_go", disabled=b2 is None):
            with ui.guard():
                _store(swap(plan, a, b2), f"Swapped {a} and {b2}.")
    with tabs[2]:
        item = st.selectbox("Item to replace", ids, format_func=_fmt, key="rp_item")
        label_r = label_of.get(item)
        spare = {it.id: it for it in unused_items if it.label == label_r}
        NEW = "(type a new prompt)"
        choice = st.selectbox(
            f"Replace it with an unused {label_r} prompt",
            [*spare, NEW],
            key="rp_with",
            format_func=lambda i: i if i == NEW else f"{i}: {spare[i].text[:80]}",
        )
        new_text = st.text_area("New prompt text", key="rp_text", height=80) if choice == NEW else ""
        if st.button("Replace", key="rp_go"):
            with ui.guard():
                new_item = spare[choice] if choice in spare else _new_item(new_text, label_r)
                _store(replace(plan, item, new_item), f"Replaced {item} with {new_item.id}.")
    with tabs[3]:
        item = st.selectbox("Item to drop", ids, format_func=_fmt, key="dr_item")
        if st.button("Drop", key="dr_go"):
            with ui.guard():
                _store(drop(plan, item), f"Dropped {item}.")
    with tabs[4]:
        c1, c2 = st.columns(2)
        to = c1.selectbox("Batch", plan.batch_indices, key="ad_batch")
        label = c2.radio("Label", ["safe", "unsafe"], horizontal=True, key="ad_label")
        new_text = st.text_area("Prompt text", key="ad_text", height=80)
        if st.button("Add", key="ad_go"):
            with ui.guard():
                _store(
                    add(plan, int(to), _new_item(new_text, label)), f"Added a {label} prompt to batch {to}."
                )
    if P.can_undo_draft_plan(run) and st.button("Undo last edit", icon=":material/undo:"):
        P.undo_draft_plan(run)
        ui.flash("Undid the last edit.")
        st.rerun()

# -- 5. save --------------------------------------------------------------------------------------
with st.container(border=True):
    st.subheader("5. Save the plan into the run")
    saved = None
    with ui.guard("The saved plan cannot be read: "):
        saved = ui.load_plan_cached(SAVED)
    same = saved is not None and saved.to_json_dict() == plan.to_json_dict()
    if same:
        st.caption(f"The run's plan.json holds this plan ({len(plan)} batches).")
    if st.button("Save plan", type="primary", disabled=same, icon=":material/save:"):
        with ui.guard("Not saved: "):
            found = P.commit_plan(plan, run)  # the plan step, under the run's writer lease
            ui.flash(
                f"Saved the plan ({len(plan)} batches, {len(found)} warnings) to {SAVED.name}. "
                "Next: Analysis."
            )
            st.rerun()
    ui.link("analysis", "Go to Analysis", ":material/arrow_forward:")
