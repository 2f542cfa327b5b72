"""Runs: every run with its settings, a health check (doctor), a side-by-side comparison, and tracing a
training step to its batch. A damaged file is shown as a message naming it, never a crash."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

import ui  # noqa: I001 - the shared page helpers (not a page)
from moe_core.analysis.analyse import analysis_config_of
from moe_core.doctor import diagnose
from moe_core.store.manifest import list_runs
from moe_core.store.provenance import model_info_of
from moe_core.store.run import Run

ui.setup("Runs")
st.title("Runs")
st.caption(
    f"Runs live under `{ui.runs_root()}` (set `MOE_LAB_RUNS` to change it); each is one folder of "
    "plain files: manifest.json, plan.json, routing/, risk/, masks/, train/, eval/, jobs/."
)

runs = list_runs(ui.runs_root())
if not runs:
    st.info("No runs yet: create one in the sidebar or run the demo on Home.", icon=":material/info:")
    st.stop()


def _row(r) -> dict:
    mark = {"done": "✓", "running": "…", "error": "✗", "failed": "✗", "stopped": "■", "interrupted": "⚠"}
    row = {
        "id": r.id,
        "name": r.name,
        "created": (r.created or "")[:19].replace("T", " "),
        "model": r.model,
        "steps": ", ".join(f"{k} {mark.get(v, v)}" for k, v in r.steps.items()),
    }
    if r.error:
        row["error"] = r.error
    return row


table = pd.DataFrame([_row(r) for r in runs])
st.dataframe(table, hide_index=True, width="stretch")
good = [r for r in runs if not r.error]


def _settings(run: Run) -> dict[str, str]:
    """Flat key -> value view of what defines a run (for the comparison table)."""
    cfg = analysis_config_of(run)
    plan = ui.load_plan_cached(run.path_for("plan"))
    info = model_info_of(run)
    out = {"model": str(run.manifest.get("model")), "created": str(run.manifest.get("created", ""))[:19]}
    out.update({f"config.{k}": json.dumps(v) for k, v in (run.manifest.get("config") or {}).items()})
    if plan is not None:
        out.update(
            {
                "batches": str(len(plan)),
                "batch_size": str(plan.batch_size),
                "safe_ratio": str(plan.safe_ratio),
                "seed": str(plan.seed),
                "paired": str(plan.paired),
            }
        )
    if cfg is not None:
        out.update(
            {
                "scope": cfg.scope,
                "max_new_tokens": str(cfg.max_new_tokens),
                "quality_filter": str(cfg.quality_filter),
                "judge": cfg.judge,
            }
        )
    if info:
        out["grid"] = f"{info.get('num_layers')} x {info.get('num_experts')} (top-{info.get('top_k')})"
    out["analysed batches"] = str(len(run.completed_batches()))
    out["masks"] = ", ".join(ui.mask_names(run))
    return out


# -- doctor -------------------------------------------------------------------------------------
def _doctor(run: Run) -> None:
    """List damaged or missing pieces of the open run; the button repairs what can be recomputed (seconds:
    file checks and table recomputes, no model), holding the run's writer lease like any job."""
    st.subheader("Check this run")
    st.caption(
        "Damaged or missing pieces (truncated routing, broken tables, temp files of killed writes, steps "
        "of processes that are gone). Same as `python -m moe_core doctor --run RUN`."
    )
    with ui.guard("The check failed: "):
        found = diagnose(run)
        if not found:
            st.success(f"Run {run.id}: no problems found.", icon=":material/check_circle:")
            return
        st.dataframe(
            pd.DataFrame([{"piece": f.path, "problem": f.problem, "fix": f.fix} for f in found]),
            hide_index=True,
            width="stretch",
        )
        if st.button("Repair what can be recomputed", icon=":material/build:", key="doctor_repair"):
            done = diagnose(run, repair=True)
            left = [f for f in done if not f.repaired]
            ui.flash(
                f"Repaired {len(done) - len(left)} piece(s)"
                + (f"; {len(left)} need the fix named in the table." if left else ".")
            )
            st.rerun()


ui.show_flash()
_open = ui.current_run()
if _open is not None:
    with st.container(border=True):
        _doctor(_open)

# -- compare ------------------------------------------------------------------------------------
if len(good) >= 2:
    with st.container(border=True):
        st.subheader("Compare two runs")
        c1, c2 = st.columns(2)
        labels = {str(r.path): f"{r.name} · {r.id}" for r in good}
        a = c1.selectbox("Run A", list(labels), format_func=labels.get, key="cmp_a")
        b = c2.selectbox("Run B", list(labels), index=1, format_func=labels.get, key="cmp_b")
        with ui.guard():
            ra, rb = Run.open(a), Run.open(b)
            sa, sb = _settings(ra), _settings(rb)
            keys = list(dict.fromkeys([*sa, *sb]))
            cmp = pd.DataFrame(
                {"setting": keys, "A": [sa.get(k, "") for k in keys], "B": [sb.get(k, "") for k in keys]}
            )
            cmp["differs"] = (cmp["A"] != cmp["B"]).map({True: "≠", False: ""})
            cmp = cmp.sort_values("differs", ascending=False, kind="stable")  # differences first
            st.dataframe(cmp, hide_index=True, width="stretch")
            ta, tb = (
                ui.read_table(ra.path_for("risk_aggregated")),
                ui.read_table(rb.path_for("risk_aggregated")),
            )
            if ta is not None and tb is not None:
                n = st.slider("Top-N experts to compare", 1, 50, 10, key="cmp_n")
                top_a = set(ta.head(n)["Layer_Expert"])
                top_b = set(tb.head(n)["Layer_Expert"])
                both = top_a & top_b
                st.markdown(
                    f"Top-{n} overlap: **{len(both)}** experts (Jaccard {len(both) / len(top_a | top_b):.2f})"
                    + (f": {', '.join(sorted(both))}" if both else "")
                )

# -- trace -------------------------------------------------------------------------------------
with st.container(border=True):
    st.subheader("Trace a training example back to its analysis batch")
    run = ui.current_run()
    if run is None:
        st.info("Open a run in the sidebar.")
        st.stop()
    plan = None
    with ui.guard():
        plan = ui.load_plan_cached(run.path_for("plan"))
    if plan is None:
        st.info(f"Run {run.id} has no saved batch plan yet.")
        st.stop()
    steps = []
    train_root = run.path / "train"
    for out in sorted(train_root.iterdir()) if train_root.is_dir() else []:
        meta = None
        with ui.guard(
            f"Training {out.name}: "
        ):  # a damaged metadata file is named, the rest of the page works
            meta = ui.read_json_cached(out / "training_metadata.json")
        monitor = (meta or {}).get("batch_monitor") if isinstance(meta, dict) else None
        for rec in monitor if isinstance(monitor, list) else []:
            if isinstance(rec, dict) and {"step", "epoch", "batch_idx"} <= set(rec):
                steps.append({"training": out.name, **rec})
    c1, c2 = st.columns(2)
    if steps:
        pick = c1.selectbox(
            "Training step",
            range(len(steps)),
            key="tr_step",
            format_func=lambda i: (
                f"{steps[i]['training']} · step {steps[i]['step']} (epoch {steps[i]['epoch']:.2f}) -> batch {steps[i]['batch_idx']}"
            ),
        )
        batch = int(steps[pick]["batch_idx"])
    else:
        c1.caption("No training in this run yet: pick an analysis batch directly.")
        batch = int(c1.selectbox("Analysis batch", plan.batch_indices, key="trace_batch"))
    b = plan.batch(batch)
    example = c2.selectbox(
        "Example (in_batch_idx)",
        range(b.size),
        key="trace_example",
        format_func=lambda i: f"{i} · {b.labels[i]} · {b.items[i].text[:60]}",
    )
    item = b.items[example]
    st.markdown(
        f"**Example** `{item.id}` ({item.label}), batch **{batch}**, position {example} "
        f"(safe items 0-{len(b.safe) - 1}, unsafe {len(b.safe)}-{b.size - 1})"
    )
    st.code(item.text, language="text", wrap_lines=True)
    outputs = None
    with ui.guard(f"Batch {batch}'s answers cannot be read (the check above repairs it): "):
        outputs = ui.read_json_cached(run.path_for("outputs", batch_idx=batch))
    if isinstance(outputs, dict) and isinstance(outputs.get("samples"), list):
        sample = next((s for s in outputs["samples"] if s["id"] == item.id), None)
        if sample:
            st.markdown(
                f"Answer during the analysis ({'refused' if sample['refusal'] else 'complied'}"
                f"{'' if sample.get('kept', True) else ', filtered out'}):"
            )
            st.code(sample["generated_text"] or "(empty)", language="text", wrap_lines=True)
    risk = None
    with ui.guard(f"Batch {batch}'s risk table cannot be read (the check above repairs it): "):
        risk = ui.read_table(run.path_for("risk", batch_idx=batch))
    if risk is None:
        st.info(f"Batch {batch} has not been analysed yet.")
    else:
        st.markdown(f"**Risk table of batch {batch}** (top 15 by risk difference)")
        cols = [
            c
            for c in (
                "layer",
                "expert",
                "risk_diff",
                "a_safe_n",
                "a_unsafe_n",
                "a_safe",
                "a_unsafe",
                "n_safe_tokens",
                "n_unsafe_tokens",
            )
            if c in risk.columns
        ]
        st.dataframe(
            risk.sort_values("risk_diff", ascending=False)[cols].head(15),
            hide_index=True,
            width="stretch",
            column_config=ui.column_labels(
                cols, {c: "%.3f" for c in ("risk_diff", "a_safe_n", "a_unsafe_n")}
            ),
        )
