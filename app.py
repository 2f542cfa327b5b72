"""MoE Safety Lab: the Streamlit app over ``moe_core``. This file is its Home page.

    streamlit run app.py            # or: make app

Streamlit's classic multipage layout: this entry script is Home (the one-click demo and where the
open run stands) and every file in ``pages/`` is one page with its own URL: Data & batches
(``/data``), Analysis, Heatmaps, Experts, Training, Evaluation, Present, Runs. Every page, this
one included, starts with ``ui.setup()``: the shared sidebar (navigation, the run picker, the
run's model, the device, new/open run), so a page opened directly by URL or reloaded shows the
same sidebar and the same run. The open run is in the URL (``?run=<run id>``). Runs live under
``$MOE_LAB_RUNS`` (default ``./runs``). Long steps run as background jobs (``moe_core.jobs``):
refreshing the page never stops or duplicates them.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # pages import moe_core and ui from the repo root
    sys.path.insert(0, str(ROOT))

from typing import Any  # noqa: E402

import streamlit as st  # noqa: E402

import ui  # noqa: E402
from moe_core import jobs
from moe_core.errors import MoELabError
from moe_core.eval import charts
from moe_core.eval.evaluation import load_evaluation
from moe_core.eval.study_summary import (
    ARMS,
    REFERENCE_DIR,
    across_seed_headline,
    commands_markdown,
    demo_headline,
    per_seed,
    reference_curves,
    reference_study,
    share_label,
    verdicts,
)
from moe_core.eval.study_targets import nearest_budget, wrapper_split
from moe_core.pipeline import DemoSpec, StudySpec
from moe_core.store.jobs import format_eta, list_jobs, read_job
from moe_core.store.manifest import list_runs
from moe_core.store.run import Run

run = ui.setup()
st.title("MoE Safety Lab")
st.markdown(
    "Find the experts of a Mixture-of-Experts LLM that fire when it behaves **unsafely** "
    "(complies with a jailbreak) rather than **safely** (refuses), then fine-tune **only those experts**."
)
ui.show_flash()

STEPS = [  # (title, page key, what it does, done?)
    ("Data & batches", "data", "Compose mixed safe/unsafe batches", lambda r: r.path_for("plan").exists()),
    (
        "Analysis",
        "analysis",
        "Route every batch, judge answers, measure risk differences",
        lambda r: r.path_for("risk_aggregated").exists(),
    ),
    (
        "Heatmaps",
        "heatmaps",
        "Layer × expert risk, per batch and aggregated",
        lambda r: r.path_for("risk_aggregated").exists(),
    ),
    ("Experts", "experts", "Select the unsafe experts -> expert mask", lambda r: bool(ui.mask_names(r))),
    ("Training", "training", "Fine-tune only the chosen experts", lambda r: bool(r.trainings())),
    (
        "Evaluation",
        "evaluation",
        "Refusal and over-refusal before vs after",
        lambda r: r.path_for("eval").is_dir() and any(r.path_for("eval").iterdir()),
    ),
]

DEMO = "demo"  # job name of the demo; the CLI names its later stages demo-train-<baseline>, demo-eval
DEMO_STAGES = [  # (job, label, page that shows its results, link label)
    ("demo", "Analysis (builds the organism first)", "heatmaps", "See the heatmaps"),
    ("demo-train-experts", "Training: chosen experts", "training", "Training results"),
    ("demo-train-random_experts", "Training: random experts (baseline)", "training", "Training results"),
    ("demo-train-full", "Training: full fine-tuning (baseline)", "training", "Training results"),
    ("demo-eval", "Evaluation", "evaluation", "Before vs after"),
]
_ICON = {
    "done": ":material/check_circle:",
    "running": ":material/progress_activity:",
    "queued": ":material/schedule:",
    "error": ":material/error:",
    "dead": ":material/error:",
    "stopped": ":material/stop_circle:",
}


def _live_demo_run() -> Run | None:
    """A run whose demo process is still working (so a second click never starts another)."""
    for r in list_runs(ui.runs_root()):
        if not r.error and read_job(r.path, DEMO, log_lines=0).process_alive:
            return Run.open(r.path)
    return None


def _start_demo() -> None:
    """Callback: a fresh run named 'demo' and the demo job in it (the CLI runs the whole pipeline)."""
    if _live_demo_run() is not None:
        return
    try:
        new = Run.create(
            ui.runs_root(), name="demo", config={"created_by": "app", "command": "demo"}, model="organism"
        )
        jobs.start_step(new, DEMO, DemoSpec())
    except Exception as e:  # noqa: BLE001 - sorted into a user error or a logged bug
        st.session_state["demo_error"] = ui.error_message(e, "The demo did not start: ")
        return
    ui.open_run(new.path)
    ui.flash(
        f"Demo started in run {new.id}: the organism is built (first time only), analysed, its unsafe "
        "experts selected, trained and evaluated. Each stage links to its results as soon as it ends."
    )


def stop_demo(run: Run) -> None:
    """Stop the demo wherever it is: the running stage and every stage still to come (a stage that has
    not started yet finds its stop request when it starts, so the demo ends even between stages)."""
    for name, *_ in DEMO_STAGES:
        if read_job(run.path, name, log_lines=0).state not in ("done", "error", "stopped"):
            jobs.request_stop(run.path, name)


def checklist(r: Run) -> None:
    r.reload()  # the demo writes the manifest while this polls: tick what it has finished
    st.subheader(f"Run: {ui.md_escape(r.name)}")  # a name is the user's text: shown literally
    st.caption(f"`{r.path}`")
    for title, key, what, is_done in STEPS:
        try:
            done = bool(is_done(r))
        except OSError:  # a folder that cannot be listed: the step is not done as far as we can tell
            done = False
        c1, c2 = st.columns([2, 3], vertical_alignment="center")
        ui.link(
            key,
            title,
            ":material/check_circle:" if done else ":material/radio_button_unchecked:",
            container=c1,
        )
        c2.caption(what)


def demo_progress(r: Run) -> None:
    """Every stage of the demo with its state and, as soon as it ends, a link to its results."""
    head = read_job(r.path, DEMO, log_lines=25)
    found = {j.name: j for j in list_jobs(r.path, prefix=DEMO)}
    known = {n for n, *_ in DEMO_STAGES}
    stages = DEMO_STAGES + [(n, n, None, None) for n in found if n not in known]
    done = sum(1 for n, *_ in stages if found.get(n) and found[n].state == "done")
    with st.container(border=True):
        st.progress(
            done / len(stages),
            text=f"{done} of {len(stages)} stages done" + (" · working..." if head.process_alive else ""),
        )
        for n, label, page, link_label in stages:
            j = found.get(n)
            state = j.state if j else ("waiting" if head.process_alive else "not run")
            c1, c2, c3 = st.columns([3, 2, 3], vertical_alignment="center")  # room for the whole link label
            c1.markdown(f"{_ICON.get(state, ':material/radio_button_unchecked:')} {label}")
            if j and j.state == "running" and j.total:
                c2.progress(
                    j.fraction or 0.0,
                    text=f"{j.done}/{j.total}"
                    + (f" · about {format_eta(j.eta_s)} left" if j.eta_s is not None else ""),
                )
            else:
                c2.caption(state + (f": {j.message}" if j and j.message and j.message != state else ""))
            if j and j.state == "done" and page:
                ui.link(page, link_label, ":material/arrow_forward:", container=c3)
            if j and j.error:
                st.error(f"{label}: {j.error}", icon=":material/error:")
        result = found.get("demo-eval")
        if result is not None and result.state == "done" and not head.process_alive:
            demo_result(r)
        if head.process_alive:
            if st.button("Stop the demo", icon=":material/stop_circle:", key="stop_demo"):
                stop_demo(r)
                st.toast("Asked the demo to stop after its current step")
        if head.log_tail:
            with st.expander("Log (last lines)"):
                st.code(head.log_tail, language="text")


def demo_result(r: Run) -> None:
    """The demo's result in one line, with the way to the Present page (and the across-seed result below)."""
    with ui.guard("The demo's evaluation cannot be read: "):
        line = demo_headline(
            load_evaluation(r, DemoSpec().evaluate_spec().name)[1], f"experts-{DemoSpec().mask_name}"
        )
        if line:
            st.success(line, icon=":material/flag:")
            ui.link("present", "Present the result", ":material/slideshow:")


live = _live_demo_run()
left, right = st.columns([3, 2], gap="large")
with right:
    with st.container(border=True):
        st.subheader(":material/rocket_launch: One-click demo")
        st.markdown(
            "Runs the whole pipeline on the built-in **model organism** (a small OLMoE-shaped MoE, 6 layers x 64 experts, top-8, trained here to refuse "
            "harmful requests but comply when jailbroken): batches, routing analysis, unsafe experts, "
            "expert-only fine-tuning with baselines, evaluation. Offline and CPU-friendly."
        )
        st.button(
            "Run the demo",
            type="primary",
            icon=":material/play_arrow:",
            on_click=_start_demo,
            width="stretch",
            disabled=live is not None,
            help="a demo is already running" if live else None,
        )
        if live is not None and str(live.path) != st.session_state.get(ui.RUN_KEY):
            st.caption(f"A demo is running in run {live.id}: open it in the sidebar to follow it.")
        err = st.session_state.pop("demo_error", None)
        if err:
            st.error(err)

if run is None:
    with left:
        st.info(
            "No run is open yet: start the demo, or create a run in the sidebar and begin with "
            "**Data & batches**.",
            icon=":material/info:",
        )
else:
    alive = read_job(run.path, DEMO, log_lines=0).process_alive

    @st.fragment(run_every=ui.POLL_S if alive else None)
    def status() -> None:
        """The checklist and the demo's stages, refreshed while the demo works (each stage ticks off
        and links to its results as soon as it ends)."""
        head = read_job(run.path, DEMO, log_lines=0)
        was = st.session_state.get("demo_alive")
        st.session_state["demo_alive"] = head.process_alive
        if was and not head.process_alive:
            st.rerun()  # finished: redraw the whole page once (stops the polling)
        checklist(run)
        if head.state != "none":
            st.subheader("Demo progress")
            demo_progress(run)

    with left:
        status()


def _newest_study() -> tuple[Run, Any] | None:
    """The newest run under the runs root that holds a finished selection study, with (results, summary)."""
    from moe_core.eval.study_summary import load_study

    for r in sorted((s for s in list_runs(ui.runs_root()) if not s.error), key=lambda s: s.id, reverse=True):
        try:
            opened = Run.open(r.path)
            study = load_study(opened, StudySpec().name)
        except (MoELabError, OSError):
            continue
        if study is not None:
            return opened, study
    return None


st.divider()
st.subheader("Do the chosen experts matter?")
st.caption(
    "The selection study trains the experts with the highest risk difference (and those a gradient "
    "attribution ranks first) and, at the same budget, random experts (uniform and layer-matched), over "
    "budgets and seeds; full fine-tuning and router steering beside them. Reproduce it with "
    "`python -m moe_core study` (hours on 2 cores: every budget, 5 draws, 3 seeds; `--quick` runs about a "
    "tenth of the arms) or from the Evaluation page."
)
reference = reference_study()
if reference is not None:
    ref_settings, ref_results = reference
    shown = ui.budget_choice(ref_results, "home_reference_budget")
    ref_headline = across_seed_headline(ref_results, shown)
    st.markdown(
        f"**Across seeds** (the reference study shipped with the code). {ref_headline.splitlines()[0]}"
    )
    st.plotly_chart(charts.seed_points_figure(per_seed(ref_results, shown), ARMS), key="home_reference_fig")
    st.caption(
        " ".join(verdicts(ref_results, shown))
        + " Each dot is one seed pair; bars are medians. Made by "
        + commands_markdown(ref_settings)
        + f" (last arm at commit `{ref_settings.get('commit')}`): one seed's demo is one of these dots, "
        "not the result."
    )
    with st.expander("Issue 17's targets per selector and budget, on the reference's seed pairs"):
        st.dataframe(
            ui.study_targets_of(REFERENCE_DIR / "results.parquet"),
            hide_index=True,
            width="stretch",
            key="home_reference_targets",
        )
        split = wrapper_split(ref_results, reference_curves(), shown)
        if len(split):
            st.caption(
                f"Where the compliance left is at {share_label(shown)} of the experts, at each arm's chosen point "
                "(validation, median of seed pairs): on all jailbreak prompts, and on the wrappers that no training "
                "batch held."
            )
            st.dataframe(split, hide_index=True, width="stretch", key="home_reference_wrappers")
found = _newest_study()
if found is None:
    st.info("No selection study under this runs folder yet.", icon=":material/info:")
else:
    study_run, (results, summary) = found
    figure = ui.read_json_cached(study_run.path_for("study", name=StudySpec().name) / "figure.json")
    if figure:
        st.plotly_chart(figure, key="home_study_fig")
    budget = nearest_budget(summary)
    view = summary[(summary["budget"] == budget) | summary["method"].isin(["base", "full"])]
    st.dataframe(
        view[
            [
                "method",
                "n_experts",
                "runs",
                "jailbreak_compliance",
                "jailbreak_compliance_ci_low",
                "jailbreak_compliance_ci_high",
                "benign_answer_rate",
                "over_refusal",
            ]
        ],
        hide_index=True,
        width="stretch",
        key="home_study_table",
        column_config={
            c: st.column_config.NumberColumn(format="%.2f")
            for c in summary.columns
            if c.startswith(("jailbreak", "benign", "over"))
        },
    )
    st.caption(f"Study of run `{study_run.id}`; seeds {sorted(results['seed'].unique().tolist())}.")
