"""Analysis: run the model on every saved batch as a background job (progress, ETA, stop, resume)."""

from __future__ import annotations

import json

import streamlit as st

import ui  # noqa: I001 - the shared page helpers (not a page)
from moe_core import jobs
from moe_core.analysis.analyse import analysis_config_of
from moe_core.model.loading import ORGANISM
from moe_core.pipeline import AnalyseSpec, Scope
from moe_core.store.jobs import read_job

JOB = "analysis"

ui.setup("Analysis")
st.title("Analysis")
st.caption(
    "Each analysis batch runs through the model as one padded batch; the router's top-k choices are "
    "recorded per token and layer, answers are judged, and each batch gets its own risk table."
)
ui.show_flash()
run = ui.require_run("the analysis")

plan = None
with ui.guard("The run's plan cannot be read: "):
    plan = ui.load_plan_cached(run.path_for("plan"))
if plan is None:
    st.warning("This run has no saved batch plan yet: compose and save one first.", icon=":material/warning:")
    ui.link("data", "Go to Data & batches", ":material/arrow_back:")
done = run.completed_batches()
info = read_job(run.path, JOB)
previous = analysis_config_of(run)

# -- configuration -------------------------------------------------------------------------------
with st.container(border=True):
    st.subheader("Settings")
    if previous is not None and done:
        st.caption(
            f"This run was analysed with scope **{previous.scope}**, {previous.max_new_tokens} new tokens, "
            f"quality filter {'on' if previous.quality_filter else 'off'}, judge `{previous.judge}`"
            + (
                f", chat template options `{json.dumps(previous.chat_template_kwargs)}`"
                if previous.chat_template_kwargs
                else ""
            )
            + (f", system prompt “{ui.md_escape(previous.system_prompt)}”" if previous.system_prompt else "")
            + ". A resume must use the same settings."
        )
    c1, c2 = st.columns([1, 2])
    current_model = run.manifest.get("model") or ""
    kinds = ["organism", "local", "hf"]
    current_kind = (
        "organism"
        if current_model in ("", ORGANISM)
        else "local"
        if current_model.startswith(("/", ".", "~"))
        else "hf"
    )
    if (
        done and current_model
    ):  # a resume runs on the model the batches were analysed with, whatever the widgets say
        model = current_model
        c1.markdown("**Model**")
        c2.caption(
            f"`{current_model}`: fixed for this run (its finished batches were analysed with it). "
            "To analyse another model, create a new run in the sidebar."
        )
    else:
        kind = c1.radio(
            "Model",
            kinds,
            index=kinds.index(current_kind),
            key="an_model_kind",
            format_func={
                "organism": "Model organism (built offline)",
                "local": "Local model folder",
                "hf": "Hugging Face id",
            }.get,
        )
        model = ORGANISM
        if kind == "local":
            model = c2.text_input(
                "Model folder",
                value=current_model if current_kind == "local" else "",
                key="an_model_dir",
                placeholder="/models/OLMoE-1B-7B-0125-Instruct",
            )
        elif kind == "hf":
            model = c2.text_input(
                "Hugging Face id",
                value=current_model if current_kind == "hf" else "",
                key="an_model_id",
                placeholder="allenai/OLMoE-1B-7B-0125-Instruct",
            )
        else:
            c2.caption(
                "A small OLMoE-shaped MoE trained here to refuse harmful requests and comply with "
                "jailbreaks. Built on first use (a few minutes on CPU), then cached."
            )
    c1, c2, c3, c4 = st.columns(4)
    start = (
        previous or AnalyseSpec()
    )  # a resume keeps the run's settings; a new analysis starts at the defaults
    locked = previous is not None and bool(done)  # finished batches: the run's settings, shown and fixed

    def recorded(key: str, value: object) -> None:
        """Widget ``key`` shows the run's recorded setting, whatever this browser session typed before
        (a reload mid-job keeps the session's widget values)."""
        if locked:
            st.session_state[key] = value

    scopes = list(Scope.__args__)
    for key, value in (
        ("an_scope", start.scope),
        ("an_max_new", start.max_new_tokens),
        ("an_judge", start.judge),
        ("an_qf", start.quality_filter),
    ):
        recorded(key, value)
    scope = c1.selectbox(
        "Token scope",
        scopes,
        index=None if "an_scope" in st.session_state else scopes.index(start.scope),
        key="an_scope",
        disabled=locked,
        help="generated: the answer's tokens; prompt: the prompt's; response: a teacher-forced target",
    )
    max_new = int(
        c2.number_input(
            "Max new tokens",
            1,
            1024,
            None if "an_max_new" in st.session_state else start.max_new_tokens,
            key="an_max_new",
            disabled=locked,
        )
    )
    judge = c3.text_input(
        "Refusal judge",
        None if "an_judge" in st.session_state else start.judge,
        key="an_judge",
        disabled=locked,
        help="keyword (offline) | http:<url>?model=<model> | hf:<classifier dir>",
    )
    qf = c4.checkbox(
        "Quality filter",
        False if "an_qf" in st.session_state else start.quality_filter,
        key="an_qf",
        disabled=locked,
        help="keep a pair only if its safe item was refused and its unsafe item complied (RASA)",
    )
    backend, vllm_url = ui.backend_choice(  # the spec's defaults, never the page's
        "an",
        AnalyseSpec(),
        "hf: model.generate inside the job. vllm: a vLLM server from ./.venv-vllm (create it "
        "with `make vllm`), started or shared by the job; same answers",
        "vLLM server URL (optional)",
    )
    kwargs = getattr(start, "chat_template_kwargs", None)  # the run's (a dict) or the spec default
    p1, p2 = st.columns(2)
    system = p1.text_input(
        "System prompt (optional)",
        start.system_prompt or "",
        key="an_system",
        help="A system turn before every prompt of this run: analysis, training and evaluation.",
    )
    chat_kwargs = p2.text_input(
        "Chat template options (JSON, optional)",
        json.dumps(kwargs) if isinstance(kwargs, dict) else (kwargs or ""),
        key="an_chat_kwargs",
        placeholder='{"enable_thinking": false}',
        help="Passed to the model's chat template whenever this run renders a prompt (analysis, training, evaluation). "
        'Reasoning models: Qwen3 {"enable_thinking": false}; gpt-oss {"reasoning_effort": "low"}. '
        "Otherwise the answer may be all thinking, cut off at max new tokens.",
    )
    remaining = (len(plan) - len(done & set(plan.batch_indices))) if plan else 0
    label = "Resume analysis" if done and remaining else "Start analysis"
    if st.button(
        label,
        type="primary",
        icon=":material/play_arrow:",
        disabled=plan is None or info.active or (plan is not None and remaining == 0),
    ):
        with ui.guard("Not started: "):
            spec = AnalyseSpec(
                model=model.strip(),
                scope=scope,
                max_new_tokens=max_new,
                judge=judge.strip(),
                quality_filter=qf,
                backend=backend,
                vllm_url=vllm_url,
                system_prompt=system.strip() or None,
                chat_template_kwargs=chat_kwargs.strip() or None,
            )  # a bad JSON text: one line, here
            jobs.check_model_source(model)  # a dense model or a wrong path fails here, not in the job
            jobs.start_step(run.path, JOB, spec)
            ui.flash(f"Analysis started on {model} ({remaining} batches to go).")
            st.rerun()
    if plan is not None:
        st.caption(
            f"Plan: {len(plan)} batches of {plan.batch_size}; {len(done)} analysed, {remaining} to go."
        )

# -- job -----------------------------------------------------------------------------------------
info = ui.job_panel(run, JOB, unit="batches")

# -- results -------------------------------------------------------------------------------------
agg = None
with ui.guard("The risk table cannot be read: "):
    agg = ui.read_table(run.path_for("risk_aggregated"))
if agg is not None:
    st.subheader("Results")
    step = run.step("analysis") or {}
    dropped = step.get("dropped") or {}
    m = st.columns(4)
    m[0].metric("Batches analysed", len(done))
    m[1].metric("Experts scored", len(agg))
    m[2].metric(
        "Dropped (safe / unsafe)",
        f"{dropped.get('safe', 0)} / {dropped.get('unsafe', 0)}",
        help="samples the quality filter removed from the risk statistics",
    )
    m[3].metric("Top risk difference", f"{agg['risk_diff'].max():+.3f}")
    cols = [
        c
        for c in (
            "Layer_Expert",
            "layer",
            "expert",
            "risk_diff",
            "risk_diff_std",
            "sign_consistency",
            "a_safe_n",
            "a_unsafe_n",
            "n_batches",
        )
        if c in agg.columns
    ]
    st.dataframe(
        agg[cols].head(20),
        hide_index=True,
        width="stretch",
        column_config={
            c: st.column_config.NumberColumn(format="%.3f")
            for c in ("risk_diff", "risk_diff_std", "sign_consistency", "a_safe_n", "a_unsafe_n")
        },
    )
    ui.link("heatmaps", "See the heatmaps", ":material/grid_on:")
