"""Training: fine-tune only the chosen experts (or a baseline) as a background job; loss and batch monitor."""

from __future__ import annotations

import dataclasses
import json
import re
import typing

import pandas as pd
import streamlit as st
from transformers.trainer_utils import SchedulerType

import ui  # noqa: I001 - the shared page helpers (not a page)
from moe_core import jobs
from moe_core.errors import MoELabError
from moe_core.eval import charts
from moe_core.pipeline import TrainSpec
from moe_core.specs import Consistency
from moe_core.store.checks import check_free
from moe_core.store.jobs import job_events, loss_points, read_job
from moe_core.train.hf_args import default_of, open_fields
from moe_core.train.outputs import COMPARE_COLUMNS, training_outputs, trainings_table
from moe_core.train.step import stage_of

JOB = "train"
BASELINES = {
    "experts": "chosen experts only",
    "full": "full fine-tuning (baseline)",
    "random_experts": "as many random experts (baseline)",
}
CONSISTENCY = {  # every choice of the spec's Consistency (checked below), in words
    "none": "none",
    "forward": "KL(safe || unsafe)",
    "reverse": "KL(unsafe || safe)",
    "symmetric": "symmetric KL",
    "js": "Jensen-Shannon",
}
assert set(CONSISTENCY) == set(typing.get_args(Consistency)), "the page's consistency choices drifted"

SCHEDULERS = [s.value for s in SchedulerType]


def _training_args(hf: dict, other: str, defaults: dict) -> str | None:
    """The advanced settings that differ from our defaults, plus the JSON box, as the spec's JSON text."""
    values = {k: v for k, v in hf.items() if v != defaults[k]}
    if other.strip():
        try:
            extra = json.loads(other)
        except ValueError as e:
            raise MoELabError(f"other training arguments are not valid JSON ({e})") from None
        if not isinstance(extra, dict):
            raise MoELabError('other training arguments must be a JSON object, e.g. {"optim": "adamw_torch"}')
        values.update(extra)
    return json.dumps(values, sort_keys=True) if values else None


ui.setup("Training")
st.title("Training")
st.caption(
    "Each training step is exactly one analysis batch (same items, same order); only the chosen experts' "
    "rows get gradients and optimizer state."
)
ui.show_flash()
run = ui.require_run("training")
masks = ui.mask_names(run)
info = read_job(run.path, JOB)

# -- configuration ---------------------------------------------------------------------------------
with st.container(border=True):
    st.subheader("Settings")
    if not masks:
        st.warning("No expert mask in this run yet: select and save one first.", icon=":material/warning:")
        ui.link("experts", "Go to Experts", ":material/arrow_back:")
    c1, c2, c3 = st.columns(3)
    mask_name = c1.selectbox("Expert mask", masks, key="tr_mask", placeholder="no mask saved yet")
    per_batch_file = False
    if mask_name:
        d = ui.read_json_cached(run.path_for("mask", name=mask_name)) or {}
        per_batch_file = "batches" in d
    modes = ["union", "per_batch"] if per_batch_file else ["union"]
    mask_mode = c2.selectbox(
        "Mask mode",
        modes,
        key="tr_mode",
        format_func={
            "union": "union: every chosen expert on every step",
            "per_batch": "per batch: each step its batch's experts",
        }.get,
        help="per-batch mode needs a mask saved with 'One mask per batch'",
    )
    baseline = c3.selectbox("What to train", list(BASELINES), format_func=BASELINES.get, key="tr_baseline")
    c1, c2, c3, c4 = st.columns(4)
    d = TrainSpec()  # the defaults, defined once in moe_core.pipeline
    lr = float(c1.number_input("Learning rate", 1e-7, 1.0, d.lr, format="%.1e", key="tr_lr"))
    epochs = float(c2.number_input("Epochs", 0.1, 1000.0, float(d.epochs), 1.0, key="tr_epochs"))
    rc = c3.selectbox(
        "Router-consistency loss",
        list(CONSISTENCY),
        index=list(CONSISTENCY).index(d.router_consistency),
        format_func=CONSISTENCY.get,
        key="tr_rc",
    )
    rcw = float(
        c4.number_input(
            "Consistency weight",
            0.0,
            100.0,
            d.router_consistency_weight,
            0.05,
            key="tr_rcw",
            disabled=rc == "none",
        )
    )
    with st.expander("Advanced: more training settings (Hugging Face TrainingArguments)"):
        a1, a2, a3, a4 = st.columns(4)
        wd = float(a1.number_input("Weight decay", 0.0, 10.0, d.weight_decay, 0.01, key="tr_wd"))
        seed = int(a2.number_input("Seed", 0, 2**31 - 1, d.seed, key="tr_seed"))
        max_length = int(a3.number_input("Max tokens per example", 8, 32768, d.max_length, key="tr_maxlen"))
        train_router = a4.checkbox("Train the routers too", d.train_router, key="tr_router")
        h = {f.name: default_of(f) for f in open_fields()}  # our defaults for Hugging Face's arguments
        b1, b2, b3, b4 = st.columns(4)
        hf = {
            "bf16": b1.checkbox("bf16 mixed precision", h["bf16"], key="tr_bf16"),
            "warmup_steps": float(
                b2.number_input(
                    "Warmup (steps, or a share < 1)", 0.0, 1e6, float(h["warmup_steps"]), key="tr_warm"
                )
            ),
            "lr_scheduler_type": b3.selectbox(
                "Scheduler", SCHEDULERS, SCHEDULERS.index(h["lr_scheduler_type"]), key="tr_sched"
            ),
            "max_grad_norm": float(
                b4.number_input("Max grad norm", 0.0, 1e6, float(h["max_grad_norm"]), key="tr_gradnorm")
            ),
        }
        other = st.text_area(
            "Other TrainingArguments (JSON object)",
            "",
            key="tr_hfjson",
            placeholder='{"optim": "adamw_torch", "adam_beta2": 0.95}',
            help="Any open field of transformers' TrainingArguments; those that would break the method "
            "(batch size, gradient accumulation, output folder, hub upload, ...) are refused with the reason.",
        )
    spec = None
    with ui.guard(
        "Not ready: "
    ):  # a combination the spec refuses (full fine-tuning + per-batch) is a message
        spec = TrainSpec(
            monitor_batches=True,
            mask=mask_name or d.mask,
            mask_mode=mask_mode,
            baseline=baseline,
            lr=lr,
            epochs=epochs,
            router_consistency=rc,
            router_consistency_weight=rcw,
            weight_decay=wd,
            seed=seed,
            max_length=max_length,
            train_router=train_router,
            training_args=_training_args(hf, other, h),
        )
    if spec is not None:  # a name of its own: the default, or one built from the settings when that is taken
        suggestion = spec.suggested_name(ui.training_names(run))
        typed = st.text_input(
            "Training name",
            suggestion,
            key=f"tr_name::{suggestion}",
            max_chars=100,
            help="Each training of the run has its own name; the suggestion follows the settings above.",
        )
        with ui.guard("Not ready: "):
            spec = dataclasses.replace(spec, name=typed.strip() or None)
            spec = None if spec is None else TrainSpec(**dataclasses.asdict(spec))  # checks the name
    out = run.path_for("train", name=spec.training_name()) if spec else None
    if out is not None and out.exists():  # no silent overwrite: replaced only when the user ticks this
        spec.overwrite = st.checkbox(f"A training named {out.name!r} exists: overwrite it?", key="tr_replace")
    elif out is not None and stage_of(out).exists():
        st.info(
            f"An unfinished training {out.name!r} is in this run: starting it with the same settings resumes it "
            "from its last checkpoint.",
            icon=":material/restart_alt:",
        )
    if st.button(
        "Start training",
        type="primary",
        icon=":material/play_arrow:",
        disabled=not mask_name or info.active or spec is None,
    ):
        with ui.guard("Not started: "):
            check_free(out, f"training {out.name!r}", spec.overwrite)
            if not run.path_for("plan").exists() or not run.completed_batches():
                raise MoELabError(
                    "this run has no analysed batches: training replays the analysis batches, "
                    "so run the analysis first"
                )
            jobs.start_step(run.path, JOB, spec)
            ui.flash(f"Training started with mask {mask_name} ({mask_mode}, {BASELINES[baseline]}).")
            st.rerun()

# -- live job --------------------------------------------------------------------------------------
info = ui.job_panel(run, JOB, unit="steps")


MONITOR_RE = re.compile(r"Current training batch contains samples from batches: \[?(\d+)")


def live_batches(plan) -> pd.DataFrame:
    """One row per training step so far: its analysis batch and that batch's safe/unsafe counts.

    Read from the job while it runs: progress events that carry ``batch_idx``, else the trainer's
    per-step monitor line in the job log (``TrainSpec`` runs print it when monitoring is on)."""
    rows = []
    for e in job_events(run.path, JOB):
        if e.get("kind") == "progress" and e.get("batch_idx") is not None:
            rows.append({"step": e.get("done"), "batch_idx": int(e["batch_idx"])})
    if not rows:
        log = read_job(run.path, JOB, log_lines=100_000).log_tail
        rows = [{"step": i + 1, "batch_idx": int(m.group(1))} for i, m in enumerate(MONITOR_RE.finditer(log))]
    df = pd.DataFrame(rows, columns=["step", "batch_idx"])
    if plan is not None and len(df):
        size = {b.batch_idx: (len(b.safe), b.size - len(b.safe)) for b in plan.batches}
        df["n_safe"] = df["batch_idx"].map(lambda b: size.get(b, (None, None))[0])
        df["n_unsafe"] = df["batch_idx"].map(lambda b: size.get(b, (None, None))[1])
    return df


@st.fragment(run_every=ui.POLL_S if info.active else None)
def live() -> None:
    """While the job runs: the loss so far and the batch monitor (one row per step)."""
    cur = read_job(run.path, JOB, log_lines=0)
    if not cur.active:
        return  # finished: the results below show the final loss and monitor (never both charts)
    pts = loss_points(job_events(run.path, JOB))
    left, right = st.columns([3, 2])
    if pts:
        left.plotly_chart(
            charts.loss_curve(pd.DataFrame(pts), title="Training loss (live)"), key="tr_live_loss"
        )
    monitor = live_batches(ui.load_plan_cached(run.path_for("plan")))
    monitor = monitor[monitor["step"] <= cur.done]  # the log names a step as it starts: count finished ones
    with right:
        st.markdown(
            f"**Batch monitor (live)**: step {cur.done} of {cur.total or '?'}, the analysis batch of each"
        )
        if len(monitor):
            st.dataframe(
                monitor.iloc[::-1], hide_index=True, width="stretch", height=260, key="tr_live_monitor"
            )
        else:
            st.caption(f"step {cur.done} of {cur.total or '?'}: the job does not report its batches yet")


if info.state != "none":
    live()


def _baseline(path) -> str:
    try:
        meta = ui.read_json_cached(path / "training_metadata.json")
    except MoELabError:  # damaged: named below, when it is picked
        return "damaged"
    return str(meta.get("baseline", "?")) if isinstance(meta, dict) else "damaged"


# -- results ---------------------------------------------------------------------------------------
outs = training_outputs(run)  # newest first
newest = outs[0] if outs else None
# the chosen experts' training first (the demo also trains the random and full baselines after it)
outs.sort(key=lambda p: 0 if p.name.startswith("experts") else 1)
if outs:  # ...but a training that finished since the page last drew is the one shown
    st.subheader("Results")
    ui.pick_newest("tr_out", newest, [p.name for p in outs], newest.name)
    out = st.selectbox(
        "Training output",
        outs,
        format_func=lambda p: f"{p.name} · {BASELINES.get(_baseline(p), _baseline(p))}",
        key="tr_out",
    )
    meta = None
    with ui.guard("The training metadata cannot be read: "):
        data = ui.read_json_cached(out / "training_metadata.json")
        if data is not None and not isinstance(data, dict):
            raise MoELabError(
                f"{out / 'training_metadata.json'} is not a JSON object; delete {out.name} and train again"
            )
        meta = data
    if meta:
        report = meta.get("report") or {}
        m = st.columns(4)
        m[0].metric("Baseline", meta.get("baseline", "?"))
        m[1].metric("Mask mode", meta.get("mask_mode", "?"))
        n_exp = report.get("trained_experts")
        m[2].metric(
            "Trained experts",
            "all (full)" if meta.get("baseline") == "full" else (n_exp if n_exp is not None else "?"),
            help=f"optimizer state: {report.get('optimizer_state_bytes', '?')} bytes",
        )
        steps = [h for h in meta.get("loss_history") or [] if "loss" in h]
        m[3].metric("Final loss", f"{steps[-1]['loss']:.4f}" if steps else "?")
        if steps:
            hist = pd.DataFrame([{"step": h.get("step"), "loss": h["loss"]} for h in steps])
            st.plotly_chart(charts.loss_curve(hist), key="tr_loss")
        monitor = pd.DataFrame(meta.get("batch_monitor") or [])
        if not monitor.empty:
            st.markdown("**Batch monitor**: the analysis batch of every training step and its composition")
            plan = ui.load_plan_cached(run.path_for("plan"))
            if plan is not None:
                ids = {
                    b.batch_idx: ", ".join(it.id for it in b.items[:4]) + (" ..." if b.size > 4 else "")
                    for b in plan.batches
                }
                monitor["items"] = monitor["batch_idx"].map(ids)
            st.dataframe(monitor, hide_index=True, width="stretch")
        with st.expander("Files"):
            for p in sorted(out.iterdir()):
                st.markdown(f"- `{p}`")
        ui.link("evaluation", "Evaluate before vs after", ":material/arrow_forward:")
    if len(outs) > 1:
        with st.expander(f"Compare trainings ({len(outs)})", icon=":material/compare_arrows:"):
            st.dataframe(
                trainings_table(run).rename(columns=COMPARE_COLUMNS),
                hide_index=True,
                width="stretch",
                key="tr_compare",
            )
