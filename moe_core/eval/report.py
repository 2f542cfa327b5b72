"""One self-contained HTML report of a run: the story, its figures (interactive), numbers, settings
and the commands that reproduce it. Opens offline: plotly.js is inlined once.

    from moe_core.eval.report import write_report
    path = write_report(run)            # <run>/report.html
    html = build_report(run)            # the same text, not written

Built only from the run's artifacts (plan, risk tables, masks, training metadata, evaluations,
selection study, job launches); no model is loaded. Nothing here imports Streamlit.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import shlex
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from moe_core.analysis.atlas import AtlasError
from moe_core.analysis.atlas_query import Atlas, card_text, present_experts
from moe_core.analysis.masks import ExpertMask
from moe_core.analysis.risk import risk_matrix
from moe_core.batching.plan import load_plan
from moe_core.eval import charts
from moe_core.eval.evaluation import comparison_table, list_evaluations, load_evaluation
from moe_core.eval.study_summary import (
    ARMS,
    STUDY_NAME,
    across_seed_headline,
    across_seeds,
    load_study,
    per_seed,
    reference_study,
    study_commands,
    verdicts,
)
from moe_core.eval.study_targets import budget_targets
from moe_core.model.loading import ORGANISM, load_tokenizer_of
from moe_core.store.atomic import atomic_write_text
from moe_core.store.files import listed, read_json, read_parquet
from moe_core.store.jobs import list_jobs
from moe_core.store.provenance import model_info_of
from moe_core.store.run import Run

REPORT_NAME = "report.html"
QUESTION = (
    "Which experts of this Mixture-of-Experts model fire when it complies with a harmful request "
    "(unsafe) rather than refusing it (safe), and does fine-tuning only those experts make it refuse "
    "jailbreaks while it keeps answering benign requests?"
)
SAFE_UNSAFE = (
    "<b>Safe</b> = the model refused (a plain harmful request, or a benign one it answered); "
    "<b>unsafe</b> = the model complied (the same request wrapped in a jailbreak, or a harmful one)."
)


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _table(df: pd.DataFrame, index: bool = False, digits: int = 3) -> str:
    """A table that scrolls sideways inside its own box on a narrow screen (the page never does)."""
    html_table = df.to_html(
        index=index, float_format=lambda v: f"{v:.{digits}f}", border=0, classes="t", escape=True
    )
    return f"<div class='scroll'>{html_table}</div>"


def _figure(fig: go.Figure, name: str) -> str:
    """A figure as a div (plotly.js is in the page once); its camera icon saves an SVG."""
    fig = go.Figure(fig)  # a copy: the legend goes under the plot, never over its title on a phone
    fig.update_layout(
        legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0), autosize=True
    )
    return fig.to_html(
        full_html=False,
        include_plotlyjs=False,
        div_id=f"fig-{name}",
        default_width="100%",
        config={
            "displaylogo": False,
            "responsive": True,
            "toImageButtonOptions": {"format": "svg", "filename": name},
        },
    )


def chosen_mask(run: Run):
    """The run's main expert mask (``unsafe_experts`` if present, else the first global one), or None."""

    d = run.path / "masks"
    files = listed(d)
    files.sort(key=lambda p: (p.stem != "unsafe_experts", "random" in p.stem, p.stem))
    for p in files:
        try:
            return p.stem, ExpertMask.load(p)
        except Exception:  # noqa: BLE001 - a per-batch mask file or an unreadable one: try the next
            continue
    return None


def grid_of(run: Run, agg: pd.DataFrame) -> tuple[int, int]:

    info = model_info_of(run)
    return (
        int(info.get("num_layers") or int(agg["layer"].max()) + 1),
        int(info.get("num_experts") or int(agg["expert"].max()) + 1),
    )


def interval_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Models x headline metrics as "0.42 [0.30, 0.55]" (value and its 95% Wilson interval)."""

    return comparison_table(summary, with_ci=True)


def reproduce_commands(run: Run) -> list[str]:
    """The command line of every job launched in the run (in launch order), as a shell would take it."""
    out = []
    for j in list_jobs(run.path):
        if j.argv:  # the interpreter's own path means nothing on the reader's machine
            argv = ["python", *j.argv[1:]] if j.argv[1:3] == ["-m", "moe_core"] else j.argv
            out.append(" ".join(shlex.quote(a) for a in argv))
    return out


def _batches_section(run: Run) -> tuple[str, str] | None:

    plan_path = run.path_for("plan")
    if not plan_path.is_file():
        return None
    plan = load_plan(plan_path)
    b0 = plan.batches[0]
    ex = ""
    if plan.paired and b0.safe and b0.unsafe:
        twin = next((u for u in b0.unsafe if u.pair_id == b0.safe[0].pair_id), b0.unsafe[0])
        ex = (
            f"<div class='pair'><div><h4>Plain request (safe: refused)</h4><pre>{_esc(b0.safe[0].text)}</pre></div>"
            f"<div><h4>Same request, jailbroken (unsafe: complied)</h4><pre>{_esc(twin.text)}</pre></div></div>"
        )
    return (
        "The batches",
        (
            f"<p>{len(plan)} batches of {plan.batch_size} prompts ({len(b0.safe)} safe then {b0.size - len(b0.safe)} "
            f"unsafe each), {'paired: each plain request beside its jailbreak' if plan.paired else 'unpaired'}; "
            f"{plan.num_items} prompts in all. Training replays exactly these batches.</p>{ex}"
        ),
    )


def _experts_section(run: Run) -> tuple[str, str] | None:

    agg_path = run.path_for("risk_aggregated")
    if not agg_path.is_file():
        return None
    agg = read_parquet(agg_path)
    n_l, n_e = grid_of(run, agg)
    m = chosen_mask(run)
    marked = m[1].experts() if m else []
    fig = charts.risk_heatmap(
        risk_matrix(agg, "risk_diff", n_l, n_e),
        marked=marked,
        title=f"Mean risk difference (unsafe rate − safe rate); squares: {len(marked)} chosen experts"
        if marked
        else "Mean risk difference",
    )
    cols = [
        c
        for c in ("layer", "expert", "risk_diff", "risk_diff_std", "sign_consistency", "n_batches")
        if c in agg.columns
    ]
    return (
        "The experts",
        (
            "<p>Red cells fire more when the model complies, blue ones when it refuses.</p>"
            + _figure(fig, "heatmap")
            + (f"<p>Mask <code>{_esc(m[0])}</code>: {len(marked)} experts.</p>" if m else "")
            + "<h4>Top 10 experts by risk difference</h4>"
            + _table(agg[cols].head(10))
        ),
    )


def _training_section(run: Run) -> tuple[str, str] | None:
    trained, curves = [], []
    for meta_path in (
        sorted((run.path / "train").glob("*/training_metadata.json")) if (run.path / "train").is_dir() else []
    ):
        meta = read_json(meta_path)
        rep = meta.get("report") or {}
        hist = [h for h in meta.get("loss_history") or [] if "loss" in h]
        curves.append((meta_path.parent.name, hist))
        trained.append(
            {
                "training": meta_path.parent.name,
                "baseline": meta.get("baseline"),
                "trained experts": "all" if meta.get("baseline") == "full" else rep.get("trained_experts"),
                "steps": len(meta.get("batch_monitor") or []),
                "final loss": hist[-1]["loss"] if hist else None,
            }
        )
    if not trained:
        return None
    # the loss of the chosen experts' training (the demo's baselines train after it), when it was logged
    name, hist = min(curves, key=lambda c: (not c[0].startswith("experts"), c[0]))
    fig = (
        _figure(
            charts.loss_curve(
                pd.DataFrame([{"step": h.get("step", i + 1), "loss": h["loss"]} for i, h in enumerate(hist)]),
                title=f"Training loss: {name}",
            ),
            "loss",
        )
        if hist
        else ""
    )
    return (
        "The training",
        "<p>Only the chosen experts' rows get gradients and optimizer state; the "
        "baselines train as many random experts, or everything.</p>" + fig + _table(pd.DataFrame(trained)),
    )


def _evaluation_section(run: Run) -> tuple[str, str] | None:

    evals = list_evaluations(run)
    if not evals:
        return None
    name = "comparison" if "comparison" in evals else evals[-1]
    _, summary = load_evaluation(run, name)
    head = summary[summary["metric"].notna()]
    arrows = head["better"].map({"lower": " (lower is better)", "higher": " (higher is better)"}).fillna("")
    fig = charts.metric_bars(
        head.assign(metric=(head["metric"] + arrows).map(charts.wrap_label)),
        title="Held-out behaviour before vs after (95% intervals)",
    )
    return ("Before vs after", _figure(fig, "before_after") + _table(interval_table(summary), index=True))


def _reference_section(run: Run) -> tuple[str, str] | None:
    """The result across seeds (the reference study shipped with the code) beside a run's evaluation, so a
    report of one run never presents that run's seed as the result."""
    reference = reference_study()
    if reference is None or not list_evaluations(run):
        return None
    settings, results = reference
    headline = across_seed_headline(results)
    fig = charts.seed_points_figure(per_seed(results), ARMS)
    return (
        "Across seeds",
        f"<p>{_esc(headline.splitlines()[0])}</p>"
        + _figure(fig, "across_seeds")
        + _table(across_seeds(results))
        + "<p>Issue 17's targets (set at 1/16): on how many seed pairs each selector meets each, per budget.</p>"
        + _table(budget_targets(results))
        + f"<p>{_esc(' '.join(verdicts(results)))} Reference: "
        + ", then ".join(f"<code>{_esc(c)}</code>" for c in study_commands(settings))
        + f"; last arm at commit {_esc(str(settings.get('commit')))}.</p>",
    )


def _experts_up_close_section(run: Run) -> tuple[str, str] | None:
    """The expert cards a researcher added from the atlas (``pipeline.present_experts``), as text."""
    pairs = present_experts(run)
    if not pairs:
        return None
    try:
        atlas = Atlas.open(run)
    except AtlasError:
        return None
    tok = load_tokenizer_of(run)
    cards = "".join(
        f"<pre>{_esc(card_text(atlas.card(layer, expert, tok)))}</pre>" for layer, expert in pairs
    )
    return ("Experts up close", "<p>Cards from the expert atlas: the whole run, one expert each.</p>" + cards)


def _study_section(run: Run) -> tuple[str, str] | None:

    study = load_study(run, STUDY_NAME)
    if study is None:
        return None
    fig_path = run.path_for("study", name=STUDY_NAME) / "figure.json"
    fig = go.Figure(json.loads(fig_path.read_text())) if fig_path.is_file() else charts.study_figure(study[1])
    return (
        "Do the chosen experts matter?",
        "<p>Chosen experts vs as many random ones, over expert budgets."
        "</p>" + _figure(fig, "study") + _table(study[1]),
    )


def model_words(run: Run) -> str:
    """The run's model as a reader knows it: ``organism`` (or none named, which the analysis reads as
    the organism) is the built-in model organism, never "organism" or "null"."""
    model = run.manifest.get("model")
    if model == ORGANISM:
        return "the built-in organism"
    if not model:
        return "the built-in organism (the default: the run names no model)"
    return str(model)


def made_steps(run: Run) -> list[str]:
    """What the run holds, in words: its saved batch plan and every step its manifest records."""
    out = ["the batch plan"] if run.path_for("plan").is_file() else []
    return out + [f"{name} ({status})" for name, status in run.status().items()]


def _no_commands(run: Run) -> str:
    """Why the report shows no command lines: none was recorded (steps made in the app or by the library)."""
    steps = made_steps(run)
    if not steps:
        return "<p>Nothing has been made in this run yet, so there is no command to reproduce.</p>"
    return (
        f"<p>This run holds {_esc(', '.join(steps))}. Their commands were not recorded: they were made "
        "in the app or by the library directly, not by a launched job, so there is no command line to "
        "repeat here.</p>"
    )


def _settings_section(run: Run) -> tuple[str, str]:
    settings = {
        "run": run.id,
        "name": run.name,
        "model": model_words(run),
        "created": run.manifest.get("created"),
        **{f"config.{k}": v for k, v in (run.manifest.get("config") or {}).items()},
    }
    step = run.step("analysis") or {}
    for k in ("scope", "max_new_tokens", "judge", "quality_filter", "model_info"):
        if k in (step.get("config") or {}):
            settings[f"analysis.{k}"] = step["config"][k]
    cmds = reproduce_commands(run)
    return (
        "Settings and how to reproduce",
        _table(
            pd.DataFrame(
                {
                    "setting": list(settings),
                    "value": [json.dumps(v) if not isinstance(v, str) else v for v in settings.values()],
                }
            )
        )
        + ("<pre>" + _esc("\n".join(cmds)) + "</pre>" if cmds else _no_commands(run)),
    )


def sections(run: Run) -> list[tuple[str, str]]:
    """(title, html body) of every step the run has reached, in story order."""
    out: list[tuple[str, str]] = [("The question", f"<p>{_esc(QUESTION)}</p><p>{SAFE_UNSAFE}</p>")]
    for section in (
        _batches_section,
        _experts_section,
        _training_section,
        _evaluation_section,
        _reference_section,
        _experts_up_close_section,
        _study_section,
    ):
        part = section(run)
        if part is not None:
            out.append(part)
    out.append(_settings_section(run))
    return out


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2rem auto;padding:0 1rem;color:#1f2933}
h1{margin-bottom:.2rem} section{margin:2.2rem 0} table.t{border-collapse:collapse;font-size:.9rem}
table.t td,table.t th{padding:.25rem .6rem;border-bottom:1px solid #e3e6ea;text-align:left}
pre{white-space:pre-wrap;background:#f4f6f8;padding:.6rem;border-radius:6px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1rem} .muted{color:#6b7280}
.scroll{max-width:100%;overflow-x:auto} p,code,pre{overflow-wrap:anywhere} .js-plotly-plot{max-width:100%}
@media (max-width:640px){body{margin:1rem auto;padding:0 .6rem} .pair{grid-template-columns:1fr}
h1{font-size:1.4rem} table.t{font-size:.8rem}}"""


def build_report(run: Run) -> str:
    """The report's HTML (one file: CSS, plotly.js and every figure inline)."""
    from plotly.offline import get_plotlyjs

    body = "".join(
        f"<section><h2>{i}. {_esc(t)}</h2>{b}</section>" for i, (t, b) in enumerate(sections(run), 1)
    )
    now = _dt.datetime.now().isoformat(timespec="seconds")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>MoE Safety Lab · {_esc(run.name)}</title>"
        f"<style>{CSS}</style><script>{get_plotlyjs()}</script></head><body>"
        f"<h1>MoE Safety Lab report: {_esc(run.name)}</h1><p class='muted'>run {_esc(run.id)} · written {now}</p>"
        f"{body}</body></html>"
    )


def write_report(run: Run, path: str | Path | None = None) -> Path:
    """Write the report into the run (``report.html``) or to ``path``; returns where it went."""
    target = Path(path) if path else run.path / REPORT_NAME
    atomic_write_text(target, build_report(run))
    return target
