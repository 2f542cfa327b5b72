"""Evaluation: refusal and over-refusal before vs after training, as charts, with answers side by side.

Reads the evaluations saved in the run's ``eval/`` folder (``moe_core.eval.evaluation.save_evaluation``)
and launches ``python -m moe_core evaluate --run RUN --job evaluate`` (base model vs every trained
model of the run, optionally the base with the mask's experts steered off).
"""

from __future__ import annotations

import streamlit as st

import ui  # noqa: I001 - the shared page helpers (not a page)
from moe_core import jobs
from moe_core.analysis.risk import risk_matrix
from moe_core.eval import charts
from moe_core.eval.audit import (
    audit_report,
    label_answer,
    load_labels,
    sample_for_review,
)
from moe_core.eval.evaluation import (
    check_evaluation_free,
    compare_evaluations,
    list_evaluations,
    load_evaluation,
)
from moe_core.eval.report import interval_table
from moe_core.eval.study_summary import load_curves, load_study, share_label
from moe_core.eval.study_targets import wrapper_split
from moe_core.judge.verdicts import LABELS as AUDIT_LABELS
from moe_core.pipeline import EvaluateSpec, StudySpec
from moe_core.store.jobs import read_job

JOB = "evaluate"
STUDY_JOB = "study"

ui.setup("Evaluation")
st.title("Evaluation")
st.caption(
    "Held-out prompts the model never saw: jailbreak compliance (lower is better), refusal of plain harmful "
    "requests (higher), answers to benign requests (higher), over-refusal of borderline ones (lower). "
    "Whiskers: 95% Wilson intervals."
)
ui.show_flash()
run = ui.require_run("the evaluation")

# -- launch ------------------------------------------------------------------------------------
info = read_job(run.path, JOB)
trained = sorted(run.trainings())
with st.container(border=True):
    st.subheader("Run an evaluation")
    st.caption(
        "Compares the run's base model with every finished training of this run"
        + (f" ({', '.join(trained)})" if trained else " (none yet: only the base model will be measured)")
        + "."
    )
    c1, c2, c3, c4 = st.columns(4)
    masks = ui.mask_names(run)
    steer = c1.selectbox(
        "Also steer off the experts of",
        ["(no steering)", *masks],
        key="ev_steer",
        help="SteerMoE-style: the base model with these experts forced off at the router",
    )
    limit = int(c2.number_input("Prompts per set (0 = all)", 0, 10_000, 0, key="ev_limit"))
    d = EvaluateSpec()  # the defaults, defined once in moe_core.pipeline
    max_new = int(c3.number_input("Max new tokens", 1, 1024, d.max_new_tokens, key="ev_max_new"))
    name = c4.text_input("Name", d.name, key="ev_name")
    shift = st.checkbox(
        "Also measure the routing shift of each trained model",
        d.shift,
        key="ev_shift",
        help="re-runs the analysis (same batches, same settings) on every trained model",
    )
    backend, vllm_url = ui.backend_choice(
        "ev",
        d,
        "vllm: each saved model answers through a vLLM server from "
        "./.venv-vllm (`make vllm`); steered answers always come from HF",
        "vLLM server URL of the base model (optional)",
    )
    replace = False  # no silent overwrite: an existing evaluation is replaced only when the user ticks this
    if name.strip() in list_evaluations(run):
        replace = st.checkbox(f"An evaluation named {name.strip()!r} exists: overwrite it?", key="ev_replace")
    if st.button("Evaluate", type="primary", icon=":material/play_arrow:", disabled=info.active):
        with ui.guard(
            "Not started: "
        ):  # a bad name or an existing one is refused here, before the job starts
            spec = EvaluateSpec(
                name=name.strip(),
                max_new_tokens=max_new,
                eval_limit=limit or None,
                shift=shift,
                steer_mask=None if steer == "(no steering)" else steer,
                overwrite=replace,
                backend=backend,
                vllm_url=vllm_url,
            )
            check_evaluation_free(run, spec.name, replace)
            jobs.start_step(run.path, JOB, spec)
            ui.flash("Evaluation started.")
            st.rerun()
ui.job_panel(run, JOB, unit="prompts")

# -- selection study ---------------------------------------------------------------------------
with st.container(border=True):
    st.subheader("Selection study: do the chosen experts matter?")
    st.caption(
        "Chosen experts vs the same number of random ones (uniform and layer-matched), over expert budgets "
        "and seeds, beside full fine-tuning and router steering; each trained in memory from the base model."
    )
    study = curves = None
    with ui.guard("The study cannot be read: "):
        study = load_study(run, StudySpec().name)
    if study is not None and "batch_seed" in study[0].columns:
        with ui.guard("The learning curves cannot be read: "):
            curves = load_curves(run, StudySpec().name)
            if curves is not None and len(curves):
                pairs = sorted({(int(s), int(b)) for s, b in zip(study[0]["seed"], study[0]["batch_seed"])})
                pair = st.selectbox(
                    "Learning curves of seed / batch seed",
                    pairs,
                    format_func=lambda p: f"{p[0]} / {p[1]}",
                    key="ev_curve_pair",
                )
                st.plotly_chart(charts.curves_figure(curves, study[0], *pair), key="ev_curves_fig")
    if study is not None:
        study_dir = run.path_for("study", name=StudySpec().name)
        figure = ui.read_json_cached(study_dir / "figure.json")
        if figure:
            st.plotly_chart(figure, key="ev_study_fig")
        st.dataframe(
            study[1],
            hide_index=True,
            width="stretch",
            column_config={
                c: st.column_config.NumberColumn(format="%.2f")
                for c in study[1].columns
                if c not in ("method", "n_experts", "runs", "budget")
            },
        )
        goals = ui.study_targets_of(study_dir / "results.parquet")
        if len(goals):
            st.caption(
                "Issue 17's targets at each budget of the study (set at 1/16): on how many seed pairs each "
                "selector meets each (test split, at the step chosen on validation); 'full fine-tuning <= 0.10' "
                "is the ceiling: the pairs on which training every weight gets there."
            )
            st.dataframe(goals, hide_index=True, width="stretch", key="ev_study_targets")
        budget = ui.budget_choice(study[0], "ev_study_budget")
        if budget is not None and len(split := wrapper_split(study[0], curves, budget)):
            st.caption(
                f"Where the compliance left is at {share_label(budget)} of the experts, at each arm's chosen point "
                "(validation, median of seed pairs): on all jailbreak prompts, and on the wrappers that no training "
                "batch held."
            )
            st.dataframe(split, hide_index=True, width="stretch", key="ev_study_wrappers")
    quick = st.toggle(
        "Quick setting (1 seed, 2 budgets, 2 draws: about a tenth of the arms; the whole study takes hours)",
        StudySpec().quick,
        key="ev_study_quick",
    )
    study_job = read_job(run.path, STUDY_JOB)
    if st.button("Run the study", icon=":material/science:", disabled=study_job.active, key="ev_study_start"):
        with ui.guard("Not started: "):
            jobs.start_step(run.path, STUDY_JOB, StudySpec(quick=quick))
            ui.flash("Selection study started.")
            st.rerun()
    ui.job_panel(run, STUDY_JOB, unit="budgets")

# -- results -----------------------------------------------------------------------------------
names = list_evaluations(run)
if not names:
    st.info("No evaluation in this run yet.", icon=":material/info:")
    st.stop()
ui.pick_newest("ev_pick", names[-1], names, names[-1])  # one that finished since the page last drew is shown
pick = st.selectbox("Evaluation", names[::-1], key="ev_pick")
responses = summary = None
with ui.guard("This evaluation cannot be read: "):
    responses, summary = load_evaluation(run, pick)
if responses is None or summary is None:
    st.stop()

headline = summary[summary["metric"].notna()]
arrows = headline["better"].map({"lower": " (lower is better)", "higher": " (higher is better)"}).fillna("")
st.plotly_chart(
    charts.metric_bars(headline.assign(metric=(headline["metric"] + arrows).map(charts.wrap_label))),
    key="ev_bars",
    config=ui.PLOT_EXPORT,
)
with ui.guard():
    st.caption("Each cell: the rate and its 95% Wilson interval [low, high] (the chart's whiskers).")
    st.dataframe(interval_table(summary), width="stretch", key="ev_table")

if len(names) > 1:
    with st.expander(f"Compare evaluations ({len(names)})", icon=":material/compare_arrows:"):
        chosen = st.multiselect("Evaluations", names[::-1], default=names[::-1][:2], key="ev_compare")
        with ui.guard("These evaluations cannot be compared: "):
            if chosen:
                st.dataframe(compare_evaluations(run, chosen), width="stretch", key="ev_compare_table")

st.subheader("Answers side by side")
c1, c2 = st.columns([1, 3])
sets = list(dict.fromkeys(responses["set"]))
chosen_set = c1.selectbox(
    "Set", sets, key="ev_set", index=sets.index("harmful_jailbreak") if "harmful_jailbreak" in sets else 0
)
sub = responses[responses["set"] == chosen_set]
prompts = list(dict.fromkeys(sub["id"]))
text_of = dict(zip(sub["id"], sub["prompt"]))
pid = c2.selectbox(
    "Prompt", prompts, key="ev_prompt", format_func=lambda i: f"{i}: {str(text_of.get(i, ''))[:100]}"
)
st.code(text_of.get(pid, ""), language="text", wrap_lines=True)
rows = sub[sub["id"] == pid]
models = list(dict.fromkeys(rows["model"])) if "model" in rows.columns else ["model"]
for col, model in zip(st.columns(max(1, len(models))), models):
    r = rows[rows["model"] == model].iloc[0] if "model" in rows.columns else rows.iloc[0]
    with col:
        st.markdown(f"**{model}** " + (":blue-badge[refused]" if r["refusal"] else ":orange-badge[answered]"))
        st.code(r["response"] or "(empty)", language="text", wrap_lines=True)

# -- judge audit -------------------------------------------------------------------------------
st.subheader("Audit the judge")
st.caption(
    "Label a sample of answers by hand; the judge's agreement with you (accuracy, precision, recall, Cohen's "
    "kappa) and every disagreement appear below, and the metrics can be recomputed with your labels."
)
labels = load_labels(run, pick)
todo = sample_for_review(responses, n=1, labels=labels, seed=len(labels))
if len(todo):
    item = todo.iloc[0]
    st.markdown(
        f"**{item.get('model', 'model')}** · {item['set']} · judge says **{item.get('judge_label', '?')}**"
    )
    st.code(str(item["prompt"]), language="text", wrap_lines=True)
    st.code(str(item["response"]) or "(empty)", language="text", wrap_lines=True)
    cols = st.columns(len(AUDIT_LABELS))
    for col, lab in zip(cols, AUDIT_LABELS):
        if col.button(lab, key=f"ev_audit_{lab}", width="stretch"):
            with ui.guard("Not saved: "):
                label_answer(run, pick, item, lab)
                st.rerun()
else:
    st.caption("Every answer of this evaluation is labelled.")
if len(labels):
    report = None
    with ui.guard("The audit cannot be computed: "):
        report = audit_report(run, pick)
    if report is not None:
        a = report.agreement
        m = st.columns(5)
        for col, key in zip(m, ("n", "accuracy", "precision", "recall", "kappa")):
            v = a.get(key)
            missing = v is None or (isinstance(v, float) and v != v)  # nan: undefined with these labels
            col.metric(key, "-" if missing else (f"{v:.2f}" if isinstance(v, float) else str(v)))
        if len(report.disagreements):
            st.dataframe(report.disagreements, hide_index=True, width="stretch", key="ev_audit_dis")
        if st.toggle("Recompute the metrics with the human labels where they exist", key="ev_audit_human"):
            st.dataframe(interval_table(report.summary_human), width="stretch", key="ev_audit_table")

# -- routing shift -----------------------------------------------------------------------------
shifts = sorted(run.path_for("eval").glob("shift_*.parquet"))
if shifts:
    st.subheader("Routing shift")
    st.caption(
        "How each expert's risk difference moved when the analysis is re-run, on the same batches, on a "
        "trained model: delta = after − before (blue: the expert now fires less on the unsafe side)."
    )
    shift_path = st.selectbox(
        "Trained model", shifts, key="ev_shift_pick", format_func=lambda p: p.stem[len("shift_") :]
    )
    shift = None
    with ui.guard("This routing shift cannot be read: "):
        shift = ui.read_table(shift_path)
    if shift is not None:
        n_layers, n_experts = ui.grid_shape(run, shift)
        left, right = st.columns([3, 2])
        left.plotly_chart(
            charts.risk_heatmap(
                risk_matrix(shift, "delta", n_layers, n_experts),
                title="Change of risk difference (after − before)",
                colorbar_title="delta",
            ),
            key="ev_shift_map",
        )
        right.dataframe(
            shift.head(15),
            width="stretch",
            hide_index=True,
            column_config={
                c: st.column_config.NumberColumn(format="%+.3f")
                for c in ("risk_diff_before", "risk_diff_after", "delta")
            },
        )
