"""The Streamlit app driven headlessly with AppTest, plus its background-job launcher (moe_core.jobs).

A real finished run (tiny random OLMoE: plan, analysis, mask, expert-only training, evaluation) is
built once by tests/app_fixtures.py; tests open every page with and without a run, drive the main
flow (compose -> analysis results -> heatmap -> select -> train config) and assert on what a user
sees: element values, plotly specs, st.error texts. Two tests launch real CLI jobs on the tiny
model and poll them. The organism demo is marked slow.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from moe_core import jobs
from moe_core.analysis.masks import ExpertMask
from moe_core.batching.plan import load_plan
from moe_core.eval import charts
from moe_core.eval.study_summary import reference_study
from moe_core.store.files import read_json
from moe_core.store.jobs import (
    LAUNCH_NAME,
    JobInfo,
    format_eta,
    job_events,
    loss_points,
    progress_estimate,
    read_job,
)
from moe_core.store.run import Run
from tests.app_fixtures import (
    MASK_NAME,
    build_finished_run,
    build_risk_only_run,
    compose_plan,
    save_dense_model,
    save_tiny_model,
)

streamlit_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = streamlit_testing.AppTest

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "app.py")
PAGES = {  # page file -> title
    "home": "MoE Safety Lab",
    "data": "Data & batches",
    "analysis": "Analysis",
    "heatmaps": "Heatmaps",
    "experts": "Experts",
    "atlas": "Expert atlas",
    "training": "Training",
    "evaluation": "Evaluation",
    "present": "Present",
    "runs": "Runs",
}
FILES = {  # page key -> file, relative to app.py (classic multipage layout: app.py is Home, pages/ the rest)
    "home": "app.py",
    "data": "pages/1_data.py",
    "analysis": "pages/2_analysis.py",
    "heatmaps": "pages/3_heatmaps.py",
    "experts": "pages/4_experts.py",
    "atlas": "pages/9_atlas.py",
    "training": "pages/5_training.py",
    "evaluation": "pages/6_evaluation.py",
    "present": "pages/7_present.py",
    "runs": "pages/8_runs.py",
}
NEEDS_RUN = ("data", "analysis", "heatmaps", "experts", "atlas", "training", "evaluation", "present")


# -- fixtures and helpers ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(runs root, tiny model dir, finished run) shared by the module's read-only tests."""
    tmp = tmp_path_factory.mktemp("lab")
    model_dir = save_tiny_model(tmp / "tiny-olmoe")
    run = build_finished_run(tmp / "runs", model_dir, n_batches=3, train=True, evaluate=True)
    return tmp / "runs", model_dir, run


def open_app(run: Run | None = None, page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=90)
    if run is not None:
        at.session_state["run_path"] = str(run.path)
    at.run()
    if page:
        at.switch_page(FILES[page]).run()
    return at


def no_exceptions(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def button(at: AppTest, label: str):
    found = [b for b in at.button if b.label == label]
    assert found, f"no button {label!r}; buttons: {[b.label for b in at.button]}"
    return found[0]


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def plotly_specs(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def column_box(at: AppTest, side: str):
    """The prompt-column picker of one side (keyed by the file it belongs to, so found by its label)."""
    found = [s for s in at.selectbox if s.label == f"{side} prompt column"]
    assert len(found) == 1, [s.label for s in at.selectbox]
    return found[0]


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}; metrics: {[m.label for m in at.metric]}"
    return found[0]


def wait_job(run: Run, name: str, timeout_s: float = 300) -> JobInfo:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        info = read_job(run.path, name)
        if not info.active and info.state != "none":
            return info
        time.sleep(1.0)
    pytest.fail(f"job {name} still {read_job(run.path, name).state} after {timeout_s}s:\n{info.log_tail}")


# -- every page ----------------------------------------------------------------------------------
def test_every_page_opens_without_a_run(runs_root):
    at = open_app()
    no_exceptions(at)
    assert at.title[0].value == PAGES["home"]
    assert any("No runs yet" in i.value for i in at.sidebar.info)
    for page, title in PAGES.items():
        at.switch_page(FILES[page]).run()
        no_exceptions(at)
        assert at.title[0].value == title
        assert not errors(at)
        if page in NEEDS_RUN:
            assert any("No run is open" in i.value for i in at.info), page


def test_every_page_opens_with_a_finished_run(lab, monkeypatch):
    root, model_dir, run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app(run)
    for page, title in PAGES.items():
        at.switch_page(FILES[page]).run()
        no_exceptions(at)
        assert at.title[0].value == title
        assert not errors(at), (page, errors(at))
        assert not [i.value for i in at.info if "No run is open" in i.value], page
        # the sidebar ran with the page: it names the run's model and the device
        assert any(str(model_dir) in c.value for c in at.sidebar.caption), page
        assert any("Device:" in c.value for c in at.sidebar.caption), page


def test_home_checklist_and_sidebar_run_picker(lab, monkeypatch):
    root, _, run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app()  # no run chosen: the newest run opens by default
    assert at.session_state["run_path"] == str(run.path)
    assert at.sidebar.selectbox(key="run_picker").value == str(run.path)
    links = {link.proto.label: link.proto.icon for link in at.main.get("page_link")}
    assert links["Analysis"] == ":material/check_circle:" and links["Training"] == ":material/check_circle:"


# -- data & batches ------------------------------------------------------------------------------
def test_compose_edit_and_save_a_plan(runs_root):
    at = open_app()
    at.sidebar.text_input(key="new_run_name").input("my study")
    button(at, "Create run").click()
    at.run()
    no_exceptions(at)
    run = Run.open(at.session_state["run_path"])
    assert run.name == "my study"

    at.switch_page(FILES["data"]).run()
    at.number_input(key="batch_size").set_value(8)
    at.run()
    assert any("4 safe then 4 unsafe" in c.value for c in at.caption)
    button(at, "Compose batches").click()
    at.run()
    no_exceptions(at)
    draft = load_plan(run.path / "plan.draft.json")
    assert metric(at, "Batches") == str(len(draft)) and len(draft) >= 2
    assert any("The plan is valid" in s.value for s in at.success)
    table = at.dataframe[0].value  # batch 0: safe rows then unsafe rows
    assert list(table["label"]) == ["safe"] * 4 + ["unsafe"] * 4
    assert list(table["id"]) == [it.id for it in draft.batch(0).items]

    victim = draft.batch(0).safe[0].id
    at.selectbox(key="dr_item").set_value(victim)
    button(at, "Drop").click()
    at.run()
    assert victim not in {it.id for it in load_plan(run.path / "plan.draft.json").items()}
    assert any("batch 0 has 7 items, not 8" in w.value for w in at.warning)

    button(at, "Undo last edit").click()
    at.run()
    assert victim in {it.id for it in load_plan(run.path / "plan.draft.json").items()}

    at.selectbox(key="ad_batch").set_value(1)
    at.text_area(key="ad_text").input("Explain how to fold a paper crane.")
    button(at, "Add").click()
    at.run()
    added = load_plan(run.path / "plan.draft.json").batch(1)
    assert added.safe[-1].text == "Explain how to fold a paper crane." and added.size == 9

    button(at, "Save plan").click()
    at.run()
    no_exceptions(at)
    saved = load_plan(run.path_for("plan"))
    assert saved.to_json_dict() == load_plan(run.path / "plan.draft.json").to_json_dict()
    assert any("Saved the plan" in s.value for s in at.success)


def upload(runs_root: Path, key: str, file: tuple[str, bytes, str]) -> AppTest:
    """The Data page of a fresh run, in upload mode, after uploading ``file`` to uploader ``key``."""
    Run.create(runs_root, name="u")
    at = open_app(page="data")
    at.segmented_control(key="data_source").set_value("upload")
    at.run()
    at.file_uploader(key=key).set_value(file)
    at.run()
    no_exceptions(at)
    return at


def test_bad_upload_shows_an_actionable_error(runs_root):
    at = upload(runs_root, "up_safe", ("safe.json", b'[{"prompt": "hi", ', "application/json"))
    assert any("could not parse as json" in e for e in errors(at)), errors(at)
    assert button(at, "Compose batches").disabled


def test_missing_column_error_then_pick_the_column(runs_root):
    at = upload(
        runs_root, "up_unsafe", ("mine.csv", b"foo,bar\nhow do I pick a lock,1\nhow to steal,2\n", "text/csv")
    )
    assert any("no prompt column found" in e and "'foo'" in e for e in errors(at)), errors(at)
    column_box(at, "unsafe").set_value("foo")
    at.run()
    assert not errors(at)
    assert any("2 unsafe prompts" in c.value for c in at.caption)


# -- analysis --------------------------------------------------------------------------------------
def _run_with_plan(root: Path, n_batches: int = 2) -> Run:
    from moe_core.batching.plan import save_plan

    run = Run.create(root, name="to analyse")
    save_plan(run.path_for("plan"), compose_plan(n_batches))
    return run


def test_non_moe_model_folder_is_refused_before_launch(runs_root, tmp_path):
    run = _run_with_plan(runs_root)
    dense = save_dense_model(tmp_path / "dense-llama")
    at = open_app(run, page="analysis")
    at.radio(key="an_model_kind").set_value("local")
    at.run()
    at.text_input(key="an_model_dir").input(str(dense))
    at.run()
    button(at, "Start analysis").click()
    at.run()
    no_exceptions(at)
    assert any("Mixture-of-Experts" in e for e in errors(at)), errors(at)
    assert read_job(run.path, "analysis").state == "none"  # nothing was launched

    at.text_input(key="an_model_dir").input(str(tmp_path / "nowhere"))
    at.run()
    button(at, "Start analysis").click()
    at.run()
    assert any("no model folder" in e for e in errors(at)), errors(at)


def test_chat_template_options_are_checked_before_launch_and_passed_on(runs_root, monkeypatch):
    """The Analysis page's chat template box: text that is no JSON object is one error line and nothing starts;
    a JSON object (and a system prompt) reach the job's command line."""
    run = _run_with_plan(runs_root)
    launched = []
    monkeypatch.setattr(jobs, "start_job", lambda run, name, command, flags, env=None: launched.append(flags))
    at = open_app(run, page="analysis")
    at.text_input(key="an_chat_kwargs").input("enable_thinking=False")
    at.run()
    button(at, "Start analysis").click()
    at.run()
    no_exceptions(at)
    assert any("JSON object" in e for e in errors(at)), errors(at)
    assert not launched
    at.text_input(key="an_chat_kwargs").input('{"enable_thinking": false}')
    at.text_input(key="an_system").input("Be brief.")
    at.run()
    button(at, "Start analysis").click()
    at.run()
    (flags,) = launched
    assert flags[flags.index("--chat-template-kwargs") + 1] == '{"enable_thinking": false}', flags
    assert flags[flags.index("--system-prompt") + 1] == "Be brief.", flags


def test_analysis_page_without_a_plan_says_what_to_do(runs_root):
    run = Run.create(runs_root, name="empty")
    at = open_app(run, page="analysis")
    no_exceptions(at)
    assert any("no saved batch plan" in w.value for w in at.warning)
    assert button(at, "Start analysis").disabled


def test_a_bug_behind_a_page_is_reported_as_a_bug_not_a_user_error(runs_root, monkeypatch, caplog):
    """A user error shows its message; a bug (here a KeyError in the plan reader) shows a short
    'internal error' note with its type, and its traceback goes to the log."""
    import moe_core.batching.plan

    run = _run_with_plan(runs_root)
    run.path_for("plan").write_text("{not json")
    at = open_app(run, page="analysis")
    assert any(
        e.startswith("The run's plan cannot be read: ") and "not valid JSON" in e for e in errors(at)
    ), errors(at)

    def broken(path):
        raise KeyError("batch_idx")

    monkeypatch.setattr(moe_core.batching.plan, "load_plan", broken)
    run.path_for("plan").write_text("{}")  # a new mtime: the cached reader runs again
    with caplog.at_level("ERROR", logger="moe_app"):
        at = open_app(run, page="analysis")
    shown = errors(at)
    assert any(e.startswith("Internal error (a bug): KeyError") for e in shown), shown
    assert not any("cannot be read" in e for e in shown), shown  # never passed off as the user's problem
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


def test_analysis_job_runs_in_the_background_and_results_appear(runs_root, lab):
    _, model_dir, _ = lab
    run = _run_with_plan(runs_root, n_batches=2)
    at = open_app(run, page="analysis")
    at.radio(key="an_model_kind").set_value("local")
    at.run()
    at.text_input(key="an_model_dir").input(str(model_dir))
    at.number_input(key="an_max_new").set_value(4)
    at.run()
    button(at, "Start analysis").click()
    at.run()
    no_exceptions(at)
    first = read_job(run.path, "analysis")
    assert first.state in ("queued", "running", "done")
    # a second click (another tab, a refresh) does not start a second process
    again = jobs.start_job(run.path, "analysis", "analyze", ["--model", str(model_dir)])
    if again.active:
        assert again.pid == first.pid
    info = wait_job(run, "analysis")
    assert info.state == "done", info.log_tail
    assert info.done == info.total == 2
    assert Run.open(run.path).completed_batches() == {0, 1}
    at.run()
    no_exceptions(at)
    assert metric(at, "Batches analysed") == "2"
    assert button(at, "Start analysis").disabled  # nothing left to analyse


def test_stop_then_resume_an_analysis_from_the_page(runs_root, lab):
    _, model_dir, _ = lab
    run = _run_with_plan(runs_root, n_batches=4)
    run.update(model=str(model_dir))
    at = open_app(run, page="analysis")
    at.radio(key="an_model_kind").set_value("local")
    at.run()
    at.text_input(key="an_model_dir").input(str(model_dir))
    at.number_input(key="an_max_new").set_value(8)
    at.run()
    button(at, "Start analysis").click()
    at.run()
    button(at, "Stop").click()  # the job panel's stop button: the job ends between two batches
    at.run()
    stopped = wait_job(run, "analysis")
    assert stopped.state == "stopped", stopped.log_tail
    partial = Run.open(run.path).completed_batches()
    assert len(partial) < 4
    at.run()
    assert button(at, "Resume analysis" if partial else "Start analysis")
    button(at, "Resume").click()  # the panel's resume starts the same command again
    at.run()
    done = wait_job(run, "analysis")
    assert done.state == "done", done.log_tail
    assert Run.open(run.path).completed_batches() == {0, 1, 2, 3}
    assert done.done == done.total == 4


SHARED = Path(__import__("os").environ.get("MOE_LAB_SHARED") or REPO.parent / "shared")


@pytest.mark.skipif(
    not (SHARED / "datasets" / "jailbreakbench").is_dir(), reason="shared datasets not available"
)
def test_public_files_by_path_paired_by_row(runs_root):
    jbb = SHARED / "datasets" / "jailbreakbench"
    Run.create(runs_root, name="jbb")
    at = open_app(page="data")
    at.segmented_control(key="data_source").set_value("path")
    at.run()
    at.text_input(key="src_safe").input(str(jbb / "benign_behaviors.csv"))
    at.text_input(key="src_unsafe").input(str(jbb / "harmful_behaviors.csv"))
    at.run()
    no_exceptions(at)
    assert not errors(at), errors(at)
    assert column_box(at, "safe").value == "Goal"  # auto-detected
    at.checkbox(key="pair_rows").check()
    at.run()
    button(at, "Compose batches").click()
    at.run()
    no_exceptions(at)
    assert metric(at, "Paired") == "yes"
    assert int(metric(at, "Batches")) == 100 // 8  # 100 pairs, 8 pairs per batch of 16


# -- heatmaps ----------------------------------------------------------------------------------------
def test_heatmap_is_diverging_around_zero_and_follows_the_batch(lab, monkeypatch):
    root, _, run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app(run, page="heatmaps")
    no_exceptions(at)
    heat = plotly_specs(at)[0]
    trace = heat["data"][0]
    assert trace["type"] == "heatmap" and trace["zmid"] == 0
    assert trace["zmin"] == -trace["zmax"]
    assert len(trace["z"]) == 2 and len(trace["z"][0]) == 8  # layers x experts of the tiny model
    assert heat["layout"]["title"]["text"].startswith("Batch 0")

    at.select_slider(key="hm_batch").set_value(2)
    at.run()
    assert plotly_specs(at)[0]["layout"]["title"]["text"].startswith("Batch 2")

    at.segmented_control(key="hm_view").set_value("aggregated")
    at.run()
    agg_spec = plotly_specs(at)[0]
    assert agg_spec["layout"]["title"]["text"].startswith("Mean risk difference over 3 batches")
    at.segmented_control(key="hm_view").set_value("consistency")
    at.run()
    cons = plotly_specs(at)[0]["data"][0]
    assert cons["zmin"] == -1 and cons["zmax"] == 1


def test_hundred_batches_tensor_is_built_once(runs_root, monkeypatch):
    """100 OLMoE-sized batches: moving the batch slider slices the cached [B, L, E] tensor."""
    from moe_core.analysis import risk

    run = build_risk_only_run(runs_root, n_batches=100)
    calls = []
    real = risk.per_batch_tensor
    monkeypatch.setattr(risk, "per_batch_tensor", lambda *a, **k: calls.append(1) or real(*a, **k))
    at = open_app(run, page="heatmaps")
    no_exceptions(at)
    spec = plotly_specs(at)[0]
    assert len(spec["data"][0]["z"]) == 16 and len(spec["data"][0]["z"][0]) == 64
    for b in (10, 55, 99):
        at.select_slider(key="hm_batch").set_value(b)
        at.run()
        assert plotly_specs(at)[0]["layout"]["title"]["text"].startswith(f"Batch {b}")
    assert len(calls) == 1
    assert any("No routing records" in i.value for i in at.info)  # risk-only run: drill-down says so


def test_drill_down_shows_routed_tokens_safe_and_unsafe(lab, monkeypatch):
    root, _, run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app(run, page="heatmaps")
    at.selectbox(key="dd_layer").set_value(1)
    at.selectbox(key="dd_expert").set_value(3)
    at.run()
    no_exceptions(at)
    bars = plotly_specs(at)[1]
    assert bars["data"][0]["type"] == "bar" and len(bars["data"][0]["x"]) == 3
    assert "Layer 1, expert 3" in bars["layout"]["title"]["text"]
    htmls = [el.proto.body for el in at.get("html")]
    assert len(htmls) == 8  # every sample of the batch, 4 safe + 4 unsafe
    # issue 12, problem 7: in paired mode the page says why a plainly harmful prompt sits on the safe side
    heads = {m.value.strip("# ") for m in at.markdown}
    assert {
        "Safe side: plain harmful requests, refused",
        "Unsafe side: the same requests jailbroken, complied with",
    } <= heads
    assert any("safe* because the model refused" in c.value for c in at.caption)
    outputs = read_json(run.path_for("outputs", batch_idx=0))
    from moe_core.model.routing import load_batch_routing

    routing = load_batch_routing(run.path_for("routing", batch_idx=0))
    rec = routing.samples[0]
    gen = rec.spans != 0
    routed = charts.routed_tokens(rec.expert_ids[:, gen], None, routing.moe_layers.index(1), 3)[0]
    assert htmls[0].count("background:rgba") == int(routed.sum())  # exactly the routed tokens are highlighted
    assert outputs["samples"][0]["label"] == "safe"


# -- experts -------------------------------------------------------------------------------------------
def test_select_toggle_and_save_a_mask(lab, monkeypatch, tmp_path):
    root, _, finished = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app(finished, page="experts")
    at.number_input(key="ex_n").set_value(2)
    at.run()
    no_exceptions(at)
    marks = plotly_specs(at)[0]["data"][1]
    chosen = sorted(zip(marks["y"], marks["x"]))
    assert len(chosen) == 2
    agg = finished.path_for("risk_aggregated")
    import pandas as pd

    top2 = pd.read_parquet(agg).head(2)
    assert chosen == sorted(zip(top2["layer"], top2["expert"]))

    free = next((l, e) for l in range(2) for e in range(8) if (l, e) not in chosen)
    at.selectbox(key="ex_t_layer").set_value(free[0])
    at.selectbox(key="ex_t_expert").set_value(free[1])
    button(at, "Toggle").click()
    at.run()
    marks = plotly_specs(at)[0]["data"][1]
    assert sorted(zip(marks["y"], marks["x"])) == sorted([*chosen, free])

    at.text_input(key="ex_name_global_False").input("hand_picked")
    at.run()
    button(at, "Save mask").click()
    at.run()
    no_exceptions(at)
    saved = ExpertMask.load(finished.path_for("mask", name="hand_picked"))
    assert sorted(saved.experts()) == sorted([*chosen, free])
    assert saved.meta["hand_toggled"] == [f"{free[0]}:{free[1]}"]
    assert at.get("download_button")
    finished.path_for("mask", name="hand_picked").unlink()


def test_nothing_selected_is_an_error_not_a_traceback(lab, monkeypatch):
    root, _, run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app(run, page="experts")
    at.selectbox(key="ex_method").set_value("threshold")
    at.run()
    at.number_input(key="ex_thr").set_value(5.0)
    at.run()
    no_exceptions(at)
    assert any(e.startswith("Nothing to save") and "threshold" in e for e in errors(at)), errors(at)
    assert not [b for b in at.button if b.label == "Save mask"]


def per_batch_experts_page(lab, monkeypatch) -> tuple[AppTest, Run]:
    """The Experts page of the lab run, set to one expert per batch."""
    root, _, run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app(run, page="experts")
    at.segmented_control(key="ex_scope").set_value("per_batch")
    at.number_input(key="ex_n").set_value(1)
    at.run()
    return at, run


def test_per_batch_selection_counts_batches(lab, monkeypatch):
    at, _ = per_batch_experts_page(lab, monkeypatch)
    no_exceptions(at)
    counts = plotly_specs(at)[0]["data"][0]["z"]
    assert sum(map(sum, counts)) == 3  # one expert in each of the 3 batches


# -- training, evaluation, runs ---------------------------------------------------------------------
def test_training_page_shows_config_loss_and_batch_monitor(lab, monkeypatch):
    root, _, run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app(run, page="training")
    no_exceptions(at)
    assert at.selectbox(key="tr_mask").value == "unsafe_experts"
    modes = at.selectbox(key="tr_mode").options  # (shown labels) a global mask has no per-batch mode
    assert len(modes) == 1 and modes[0].startswith("union")
    loss = [s for s in plotly_specs(at) if s["layout"]["title"]["text"] == "Training loss"]
    assert loss and len(loss[0]["data"][0]["y"]) == 3  # 3 batches, 1 epoch, logged every step
    monitor = at.dataframe[-1].value
    assert sorted(monitor["batch_idx"]) == [0, 1, 2]  # every analysis batch once per epoch
    assert set(monitor["n_samples"]) == {8} and set(monitor["n_safe"]) == {4}
    assert metric(at, "Trained experts") == "4"


def test_training_job_from_the_page_trains_and_reports(lab, runs_root):
    import shutil

    _, _, finished = lab
    run = Run.open(shutil.copytree(finished.path, runs_root / finished.path.name))
    at = open_app(run, page="training")
    at.number_input(key="tr_epochs").set_value(1)
    at.selectbox(key="tr_rc").set_value("symmetric")
    at.run()
    (name,) = [t for t in at.text_input if t.label == "Training name"]
    assert (
        name.value != "experts-unsafe_experts"
    )  # taken: the suggestion is a free name built from the settings
    name.input(
        "experts-unsafe_experts"
    ).run()  # the user types the existing name: the page asks first (issue 13)
    at.checkbox(key="tr_replace").check()
    at.run()
    button(at, "Start training").click()
    at.run()
    no_exceptions(at)
    launched = read_job(run.path, "train")
    assert "--router-consistency symmetric" in " ".join(launched.argv) and "--epochs 1" in " ".join(
        launched.argv
    )
    info = wait_job(run, "train")
    assert info.state == "done", info.log_tail
    assert info.done == info.total == 3  # 3 analysis batches, 1 epoch: 3 steps
    pts = loss_points(job_events(run.path, "train"))  # what the live loss chart draws
    assert [p["step"] for p in pts][-1] == 3
    meta = read_json(run.path / "train" / "experts-unsafe_experts" / "training_metadata.json")
    assert meta["args"]["router_consistency_loss"] == "symmetric" and meta["args"]["num_train_epochs"] == 1
    at.run()
    no_exceptions(at)
    titles = [s["layout"]["title"]["text"] for s in plotly_specs(at)]  # done: the final loss chart, once
    assert titles.count("Training loss") == 1 and "Training loss (live)" not in titles, titles


def test_training_job_launch_refuses_a_run_without_analysis(runs_root):
    run = Run.create(runs_root, name="no analysis")
    ExpertMask.from_experts([(0, 1)], 2, 8).save(run.path_for("mask", name="m"))
    at = open_app(run, page="training")
    button(at, "Start training").click()
    at.run()
    no_exceptions(at)
    assert any("run the analysis first" in e for e in errors(at)), errors(at)
    assert read_job(run.path, "train").state == "none"


def test_evaluation_page_compares_models(lab, monkeypatch):
    root, _, run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app(run, page="evaluation")
    no_exceptions(at)
    bars = plotly_specs(at)[0]
    assert {t["name"] for t in bars["data"]} == {"base", "experts"}
    xs = [
        x.replace("<br>", " ") for x in bars["data"][0]["x"]
    ]  # labels wrapped so they never overlap when narrow
    assert set(xs) == {
        "jailbreak compliance (lower is better)",
        "harmful refusal (higher is better)",
        "benign answer rate (higher is better)",
        "over refusal (lower is better)",
    }
    assert all(len(line) <= 20 for x in bars["data"][0]["x"] for line in x.split("<br>"))
    assert (
        bars["layout"]["legend"]["y"] > 1 and bars["layout"]["xaxis"]["automargin"]
    )  # legend above, off the labels
    from moe_core.eval.evaluation import load_evaluation

    _, summary = load_evaluation(run, "comparison")
    base = summary[(summary["model"] == "base") & (summary["metric"] == "benign_answer_rate")]["value"].item()
    assert bars["data"][0]["y"][xs.index("benign answer rate (higher is better)")] == pytest.approx(base)
    assert "error_y" in bars["data"][0]
    # issue 12, problem 10: the table carries the chart's intervals
    table = at.dataframe[0].value
    assert all(re.fullmatch(r"\d\.\d\d \[\d\.\d\d, \d\.\d\d\]", str(v)) for v in table.to_numpy().ravel()), (
        table
    )
    at.selectbox(key="ev_set").set_value("harmful_jailbreak")
    at.run()
    assert {m.value.split("**")[1] for m in at.markdown if m.value.startswith("**")} >= {"base", "experts"}


def test_evaluation_page_shows_the_routing_shift(lab, monkeypatch):
    import shutil

    from moe_core.eval.evaluation import routing_shift
    from moe_core.model.adapter import load_model

    root, _, run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    trained = Path(run.step("train:experts-" + MASK_NAME)["merged"])
    model, tok = load_model(trained, device="cpu")
    shift = routing_shift(run, model, tok, name="experts")
    try:
        at = open_app(run, page="evaluation")
        no_exceptions(at)
        maps = [p for p in plotly_specs(at) if "Change of risk difference" in json.dumps(p.get("layout", {}))]
        assert maps, "no routing-shift heatmap"
        z = np.array(maps[0]["data"][0]["z"], dtype=float)
        top = shift.iloc[0]
        assert z[int(top["layer"]), int(top["expert"])] == pytest.approx(top["delta"])
    finally:  # the lab run is shared by other tests: leave it as it was
        for p in run.path_for("eval").glob("shift_experts*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def test_runs_page_compares_and_traces(lab, monkeypatch, tmp_path):
    root, model_dir, run = lab
    runs2 = tmp_path / "runs"
    other = build_finished_run(runs2, model_dir, n_batches=2, train=False, name="other", seed=1)
    import shutil

    shutil.copytree(run.path, runs2 / run.path.name)
    monkeypatch.setenv("MOE_LAB_RUNS", str(runs2))
    at = open_app(Run.open(runs2 / run.path.name), page="runs")
    no_exceptions(at)
    ids = list(at.dataframe[0].value["id"])
    assert set(ids) == {other.id, run.id}
    cmp = at.dataframe[1].value
    row = cmp[cmp["setting"] == "batches"].iloc[0]
    assert {row["A"], row["B"]} == {"2", "3"} and row["differs"] == "≠"
    # trace: training step -> analysis batch -> that batch's risk table
    at.selectbox(key="tr_step").set_value(1)
    at.run()
    monitor = read_json(run.path / "train" / "experts-unsafe_experts" / "training_metadata.json")[
        "batch_monitor"
    ]
    batch = monitor[1]["batch_idx"]
    assert any(f"Risk table of batch {batch}" in m.value for m in at.markdown)


# -- the job launcher ---------------------------------------------------------------------------------
def test_progress_estimate_rate_and_eta_of_the_current_stage():
    ev = [
        {"kind": "start", "time": "2026-01-01T00:00:00+00:00"},
        {
            "kind": "progress",
            "time": "2026-01-01T00:00:01+00:00",
            "done": 1,
            "total": 1,
            "message": "model built",
        },
        {
            "kind": "progress",
            "time": "2026-01-01T00:00:10+00:00",
            "done": 4,
            "total": 20,
            "message": "4 already done",
        },
        {"kind": "progress", "time": "2026-01-01T00:00:20+00:00", "done": 6, "total": 20},
        {
            "kind": "progress",
            "time": "2026-01-01T00:00:30+00:00",
            "done": 8,
            "total": 20,
            "message": "batch 7",
        },
    ]
    est = progress_estimate(ev, now=1767225640.0)  # 40 s after start
    assert est["done"] == 8 and est["total"] == 20 and est["fraction"] == pytest.approx(0.4)
    assert est["rate_per_s"] == pytest.approx(0.2)  # 4 batches in 20 s; the 4 resumed ones do not count
    assert est["eta_s"] == pytest.approx(60.0)
    assert est["message"] == "batch 7" and est["elapsed_s"] == pytest.approx(40.0)
    assert format_eta(60.0) == "1 min 00 s" and format_eta(None) == ""
    # a new attempt (resume) starts a new estimate
    est2 = progress_estimate(ev + [{"kind": "start", "time": "2026-01-01T00:01:00+00:00"}])
    assert est2["done"] == 0 and est2["eta_s"] is None


def test_loss_points_from_events():
    ev = [
        {"kind": "start"},
        {"kind": "progress", "done": 1, "total": 3, "message": "loss 2.5000"},
        {"kind": "progress", "done": 2, "total": 3, "loss": 2.0},
        {"kind": "progress", "done": 3, "total": 3},
    ]
    assert loss_points(ev) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]


def test_a_job_that_dies_early_is_reported_with_its_log(runs_root):
    run = _run_with_plan(runs_root)
    jobs.start_job(run, "analysis", "analyze", ["--scope", "bogus"])  # argparse rejects it: exit 2
    info = wait_job(run, "analysis", timeout_s=120)
    assert info.state == "dead"
    assert "invalid choice: 'bogus'" in info.log_tail
    assert "without reporting" in (info.error or "")
    assert jobs.relaunch_flags(run, "analysis") == ("analyze", ["--scope", "bogus"])
    with pytest.raises(jobs.JobLaunchError, match="unknown job command"):
        jobs.start_job(run, "x", "rm -rf")


def test_check_model_source(lab, tmp_path):
    _, model_dir, _ = lab
    from moe_core.model.adapter import ModelLoadError, NotAnMoEModelError

    info = jobs.check_model_source(str(model_dir))
    assert info["num_experts"] == 8 and info["top_k"] == 2 and info["moe_layers"] == [0, 1]
    assert jobs.check_model_source("organism") == {"model_type": "organism"}
    with pytest.raises(NotAnMoEModelError):
        jobs.check_model_source(str(save_dense_model(tmp_path / "dense")))
    with pytest.raises(ModelLoadError, match="no model folder"):
        jobs.check_model_source(str(tmp_path / "missing"))


# -- charts ------------------------------------------------------------------------------------------
def test_token_highlight_escapes_markup():
    import numpy as np

    html = charts.highlight_tokens_html(
        ["<script>", "ok", "&"], np.array([True, False, True]), np.array([1.0, 0, 0.5])
    )
    assert "<script>" not in html and "&lt;script&gt;" in html and "&amp;" in html
    assert html.count("background:rgba") == 2
    with pytest.raises(ValueError, match="2 tokens but 3"):
        charts.highlight_tokens_html(["a", "b"], np.array([True, False, True]))


def test_risk_heatmap_marks_and_nan_cells():
    import numpy as np

    z = np.array([[0.5, np.nan], [-0.25, 0.0]])
    fig = charts.risk_heatmap(z, marked=[(1, 0)]).to_plotly_json()
    heat, marks = fig["data"]
    assert heat["zmid"] == 0 and heat["zmax"] == 0.5 and heat["zmin"] == -0.5
    assert heat["z"][0][1] is None  # a dense layer / missing cell stays blank
    assert list(marks["x"]) == [0] and list(marks["y"]) == [1]


# -- the one-click demo (organism) ------------------------------------------------------------------
@pytest.mark.slow
def test_page_defaults_are_the_pipeline_defaults(lab, monkeypatch):
    """The app and the CLI take their defaults from the same dataclasses (moe_core.pipeline)."""
    from moe_core.pipeline import EvaluateSpec, SelectSpec, TrainSpec

    root, _, run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app(run, page="training")
    t = TrainSpec()
    assert at.number_input(key="tr_lr").value == t.lr and at.number_input(key="tr_epochs").value == t.epochs
    assert at.selectbox(key="tr_rc").value == t.router_consistency
    assert at.number_input(key="tr_rcw").value == t.router_consistency_weight
    at.switch_page(FILES["evaluation"]).run()
    e = EvaluateSpec()
    assert (
        at.number_input(key="ev_max_new").value == e.max_new_tokens
        and at.text_input(key="ev_name").value == e.name
    )
    at.switch_page(FILES["experts"]).run()
    s = SelectSpec()
    assert at.number_input(key="ex_n").value == s.n
    for method, key, value in (
        ("threshold", "ex_thr", s.threshold),
        ("top_p", "ex_top_p", s.top_p),
        ("per_layer", "ex_k", min(s.per_layer_k, 8)),
        ("random", "ex_seed", s.seed),
    ):
        at.selectbox(key="ex_method").set_value(method).run()  # only the chosen method's settings are shown
        box = at.slider(key=key) if key == "ex_top_p" else at.number_input(key=key)
        assert box.value == value, method


# -- issue 12: the ten problems a new user met, one guard each ------------------------------------------
@pytest.fixture
def fake_demo_process():
    """A live process that looks like a launched demo (its command line names moe_core)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "moe_core", "demo"])
    time.sleep(0.3)
    yield proc
    proc.kill()
    proc.wait()


def _launched(run: Run, name: str, proc) -> None:
    (run.path / "jobs" / name).mkdir(parents=True, exist_ok=True)
    (run.path / "jobs" / name / LAUNCH_NAME).write_text(
        json.dumps({"pid": proc.pid, "launched": time.time()})
    )


def _fake_job(run: Run, name: str, state: str, events: list[tuple] = ()) -> None:
    """A job as the CLI leaves it (status + progress events), without running anything."""
    job = run.job(name)
    for done, total, message in events:
        job.events.emit("progress", done, total, message)
    job.write_status(state)


def test_p1_stop_the_demo_stops_the_stages_still_to_come(runs_root, fake_demo_process):
    """Between stages nothing is 'active'; a stop must still reach the stages that start later."""
    run = Run.create(runs_root, name="demo", model="organism")
    _fake_job(run, "demo", "done")  # analysis done, the demo process goes on to training
    _launched(run, "demo", fake_demo_process)
    at = open_app(run)
    no_exceptions(at)
    button(at, "Stop the demo").click()
    at.run()
    no_exceptions(at)
    for name in ("demo-train-random_experts", "demo-train-full", "demo-eval"):  # not started yet
        assert run.job(name).stop_requested(), name
    assert not run.job("demo").stop_requested()  # a finished stage is left alone


def test_p2_the_run_is_in_the_url_and_survives_a_reload(lab, monkeypatch, tmp_path):
    import shutil

    root, model_dir, finished = lab
    runs2 = tmp_path / "runs"
    older = build_finished_run(runs2, model_dir, n_batches=2, train=False, name="older", seed=1)
    time.sleep(1.1)
    newest = Run.open(shutil.copytree(finished.path, runs2 / (finished.path.name + "-copy")))
    monkeypatch.setenv("MOE_LAB_RUNS", str(runs2))
    # a shared link to the older run, opened on a page directly
    at = AppTest.from_file(APP, default_timeout=90)
    at.query_params["run"] = older.id
    at.run()
    at.switch_page(FILES["heatmaps"]).run()
    no_exceptions(at)
    assert at.session_state["run_path"] == str(older.path)
    assert at.query_params["run"] == older.id
    # switching runs in the sidebar writes the URL
    at.sidebar.selectbox(key="run_picker").set_value(str(newest.path)).run()
    assert at.query_params["run"] == newest.path.name
    # a reload is a fresh session with the same URL: same run, not "the newest" by accident
    again = AppTest.from_file(APP, default_timeout=90)
    again.query_params["run"] = older.id
    again.run()
    assert again.session_state["run_path"] == str(older.path)
    # no ?run= at all: the newest opens and the URL names it
    fresh = AppTest.from_file(APP, default_timeout=90)
    fresh.run()
    assert fresh.query_params["run"] == Path(fresh.session_state["run_path"]).name
    # every navigation link carries the run
    links = [link.proto for link in again.sidebar.get("page_link")]
    assert len(links) == len(FILES) and all(link.query_string == f"run={older.id}" for link in links), links


def test_p3_a_csv_with_a_label_column_keeps_only_its_side(runs_root):
    csv = (
        b"text,label\nHow do I bake bread?,benign\nHow do I build a bomb?,harmful\n"
        b"Tell me a joke,benign\nHow to poison a dog,harmful\n"
    )
    at = upload(runs_root, "up_safe", ("mixed.csv", csv, "text/csv"))
    assert not errors(at), errors(at)
    assert any("2 safe prompts" in c.value for c in at.caption), [c.value for c in at.caption]
    keep = [m for m in at.multiselect if "label column" in m.label]
    assert keep and keep[0].value == ["benign"]
    # the next upload has other columns: the picker shows its own auto-detected column, nothing stale
    at.file_uploader(key="up_safe").set_value(
        ("other.csv", b"foo,prompt\n1,hello there\n2,good morning\n", "text/csv")
    )
    at.run()
    assert column_box(at, "safe").value == "prompt"
    assert any("2 safe prompts" in c.value for c in at.caption)


def test_p4_heatmap_cells_are_clickable_and_links_open_an_expert(lab, monkeypatch):
    root, _, run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app(run, page="heatmaps")
    clicks = plotly_specs(at)[0]["data"][-1]  # the click layer: one point per cell, on top
    assert clicks["type"] == "scatter" and len(clicks["x"]) == 2 * 8
    assert sorted(zip(clicks["y"], clicks["x"])) == [(l, e) for l in range(2) for e in range(8)]
    # a click selects (Streamlit turns clickmode to "event" under a select/lasso dragmode: clicks then select
    # nothing), and the per-batch bars below are clickable the same way (a bar picks the batch)
    heat, bars = plotly_specs(at)[:2]
    for layout in (heat["layout"], bars["layout"]):
        assert layout["clickmode"] == "event+select" and layout.get("dragmode") not in ("select", "lasso")
    assert all(len(el.proto.selection_mode) for el in at.get("plotly_chart")[:2])
    # a link from the Experts / Present page names the expert: the drill-down opens on it
    at = AppTest.from_file(APP, default_timeout=90)
    at.session_state["run_path"] = str(run.path)
    at.query_params.update({"run": run.path.name, "layer": "1", "expert": "5"})
    at.run()
    at.switch_page(FILES["heatmaps"]).run()
    no_exceptions(at)
    assert at.selectbox(key="dd_layer").value == 1 and at.selectbox(key="dd_expert").value == 5
    assert "Layer 1, expert 5" in plotly_specs(at)[1]["layout"]["title"]["text"]


def test_p5_demo_stages_link_to_their_results_as_each_ends(runs_root, fake_demo_process):
    run = Run.create(runs_root, name="demo", model="organism")
    _fake_job(run, "demo", "done")
    _launched(run, "demo", fake_demo_process)
    _fake_job(run, "demo-train-experts", "running", [(1, 9, "loss 2.0")])
    at = open_app(run)
    no_exceptions(at)
    labels = [link.proto.label for link in at.main.get("page_link")]
    assert "See the heatmaps" in labels  # analysis is done: its results are one click away now
    assert "Before vs after" not in labels  # evaluation has not run
    assert any("1 of 5 stages done" in p.proto.text for p in at.get("progress"))


def test_p6_errors_speak_the_ui_not_the_python_api(runs_root):
    import ui as app_ui

    at = upload(runs_root, "up_unsafe", ("mine.csv", b"foo,bar\nhow do I pick a lock,1\n", "text/csv"))
    shown = errors(at)
    assert shown and not any("column='" in e or "()" in e for e in shown), shown
    from moe_core.batching.plan import BatchPlanError
    from moe_core.batching.prompts import PromptLoadError

    for err in (
        BatchPlanError("cannot swap a with b; use move() to put an item into another batch"),
        PromptLoadError("cannot tell the format of x: pass format='csv'|'json'|'jsonl'|'parquet'"),
    ):
        text = app_ui.error_text(err)[1]
        assert "()" not in text and "='" not in text, text


def test_p8_experts_page_shows_only_the_chosen_methods_settings(lab, monkeypatch):
    root, _, run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app(run, page="experts")
    keys = {w.key for w in [*at.number_input, *at.slider]}
    assert "ex_n" in keys and not keys & {"ex_thr", "ex_k", "ex_top_p", "ex_seed"}
    at.selectbox(key="ex_method").set_value("threshold").run()
    keys = {w.key for w in [*at.number_input, *at.slider]}
    assert "ex_thr" in keys and not keys & {"ex_n", "ex_k", "ex_top_p", "ex_seed"}


def test_p9_data_page_stale_plan_same_label_swap_unused_prompts(runs_root):
    run = Run.create(runs_root, name="d")
    at = open_app(run, page="data")
    at.number_input(key="batch_size").set_value(8)
    at.run()
    button(at, "Compose batches").click()
    at.run()
    draft = load_plan(run.path / "plan.draft.json")
    # Item B only offers items with item A's label
    a = at.selectbox(key="sw_a").value
    label_a = draft.locate(a)[1]
    assert (
        all(draft.locate(i)[1] == label_a for i in at.selectbox(key="sw_b").options_values() if i)
        if hasattr(at.selectbox(key="sw_b"), "options_values")
        else True
    )
    opts = at.selectbox(key="sw_b").options
    assert opts and all(f"/{label_a}]" in o for o in opts), opts
    # unused prompts are listed, and Replace takes one of them
    unused_tab = [t for t in at.tabs if t.label.startswith("Unused prompts")]
    assert unused_tab and int(unused_tab[0].label.split("(")[1].rstrip(")")) > 0
    victim = draft.batch(0).unsafe[0].id
    at.selectbox(key="rp_item").set_value(victim).run()
    spare = at.selectbox(key="rp_with").value
    assert spare != "(type a new prompt)"
    button(at, "Replace").click()
    at.run()
    no_exceptions(at)
    after = load_plan(run.path / "plan.draft.json")
    assert after.batch(0).unsafe[0].id == spare and victim not in {it.id for it in after.items()}
    # switching the source says the batches on screen are from the old one
    at.segmented_control(key="data_source").set_value("upload").run()
    assert any("These batches were composed from the built-in demo set" in w.value for w in at.warning)


def test_p9_hand_toggles_edit_one_batchs_mask(lab, monkeypatch):
    at, _ = per_batch_experts_page(lab, monkeypatch)
    before = np.array(plotly_specs(at)[0]["data"][0]["z"])
    at.selectbox(key="ex_t_batch").set_value(1)
    at.selectbox(key="ex_t_layer").set_value(0)
    at.selectbox(key="ex_t_expert").set_value(7)
    button(at, "Toggle").click()
    at.run()
    no_exceptions(at)
    after = np.array(plotly_specs(at)[0]["data"][0]["z"])
    assert (
        abs(after - before).sum() == 1 and abs(after[0, 7] - before[0, 7]) == 1
    )  # one cell of one batch's mask
    table = at.dataframe[0].value
    changed = table[table["batch_idx"] == 1].iloc[0]
    assert changed["experts"] in (0, 2)


def test_p10_training_page_one_loss_chart_experts_first_live_monitor(lab, monkeypatch, tmp_path):
    import shutil

    root, _, finished = lab
    runs2 = tmp_path / "runs"
    run = Run.open(shutil.copytree(finished.path, runs2 / finished.path.name))
    monkeypatch.setenv("MOE_LAB_RUNS", str(runs2))
    # the demo trains the chosen experts, then the baselines: the newest output is "full"
    full = run.path / "train" / "full"
    shutil.copytree(run.path / "train" / "experts-unsafe_experts", full)
    meta = read_json(full / "training_metadata.json")
    meta["baseline"] = "full"
    (full / "training_metadata.json").write_text(json.dumps(meta))
    _fake_job(run, "train", "done", [(1, 3, "loss 2.0"), (2, 3, "loss 1.5"), (3, 3, "loss 1.2")])
    at = open_app(run, page="training")
    no_exceptions(at)
    assert at.selectbox(key="tr_out").value.name == "experts-unsafe_experts"
    titles = [s["layout"]["title"]["text"] for s in plotly_specs(at)]
    assert titles.count("Training loss") == 1 and not [t for t in titles if "live" in t], titles
    # while training runs: the batch monitor grows step by step (from the trainer's per-step line)
    _fake_job(run, "train", "running", [(1, 3, "loss 2.0"), (2, 3, "loss 1.8")])  # 2 steps done
    (run.path / "jobs" / "train" / "job.log").write_text(
        "Current training batch contains samples from batches: [2]\nCurrent training batch contains samples from batches: [0]\n"
    )
    at = open_app(run, page="training")
    no_exceptions(at)
    live = [d.value for d in at.dataframe if "n_unsafe" in d.value.columns and "step" in d.value.columns]
    assert live and list(live[0]["batch_idx"]) == [0, 2] and set(live[0]["n_safe"]) == {4}


def test_present_page_and_report(lab, monkeypatch, tmp_path):
    import shutil

    root, _, finished = lab
    run = Run.open(shutil.copytree(finished.path, tmp_path / "runs" / finished.path.name))
    monkeypatch.setenv("MOE_LAB_RUNS", str(tmp_path / "runs"))
    at = open_app(run, page="present")
    no_exceptions(at)
    heads = [h.value for h in at.header]
    assert heads[:3] == [
        "1. The question",
        "2. The batches",
        "3. The experts that fire when the model complies",
    ]
    assert any(h.startswith("5. Before vs after") for h in heads)
    assert len(at.get("html")) == 2  # the top expert's tokens, safe beside unsafe
    button(at, "Export report").click()
    at.run()
    no_exceptions(at)
    report = run.path / "report.html"
    text = report.read_text()
    assert "plotly" in text[:5_000_000] and "fig-heatmap" in text and "fig-before_after" in text
    assert "<script src=" not in text  # plotly.js inline: opens offline
    assert "fig-across_seeds" in text and "all four targets" in text  # the reference's targets per selector
    assert at.get("download_button")


def test_audit_the_judge_on_the_evaluation_page(lab, monkeypatch):
    """A reviewer labels answers by hand; agreement and disagreements appear and labels land in the run."""
    from moe_core.eval.audit import load_labels

    root, _, run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app(run, page="evaluation")
    no_exceptions(at)
    # label the first answer offered as the opposite of what the judge said: a disagreement
    judge_says = next(m.value for m in at.markdown if "judge says" in m.value)
    pick = "compliance" if "**refusal**" in judge_says else "refusal"
    at.button(key=f"ev_audit_{pick}").click().run()
    no_exceptions(at)
    labels = load_labels(run, "comparison")
    assert len(labels) == 1 and labels["label"].iloc[0] == pick
    assert [m.value for m in at.metric if m.label == "n"] == ["1"]
    dis = [d.value for d in at.dataframe if "human_label" in d.value.columns]
    assert len(dis) == 1 and len(dis[0]) == 1 and dis[0]["human_label"].iloc[0] == pick
    n_tables = len(at.dataframe)
    at.toggle(key="ev_audit_human").set_value(True).run()
    no_exceptions(at)
    assert len(at.dataframe) == n_tables + 1  # the metrics recomputed with the human label


def test_home_shows_the_newest_selection_study(tmp_path, monkeypatch):
    """The Home page shows the study's curve and table (issue 8) from a run that has one."""
    from moe_core.pipeline import StudySpec
    from moe_core.study import run_study

    root = tmp_path / "runs"
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app()
    assert any("No selection study" in i.value for i in at.info)
    model_dir = save_tiny_model(tmp_path / "tiny")
    run_study(
        StudySpec(
            model=str(model_dir),
            budgets=[1 / 8],
            random_draws=1,
            seeds=[0],
            eval_limit=2,
            max_new_tokens=2,
            max_batches=1,
            epochs=1,
            steering=False,
            lrs=[1e-3],
            retain_share=0.0,
        ),
        runs_root=root,
    )
    at = open_app()
    no_exceptions(at)
    names = {t.get("name") for spec in plotly_specs(at) for t in spec["data"]}
    assert {"chosen", "random", "random_layer"} <= names
    ref_split = [d.value for d in at.dataframe if "on held-out wrappers" in d.value.columns]
    ref = reference_study()[1]
    pairs = len(ref[["seed", "batch_seed"]].drop_duplicates())  # the committed reference's seed pairs
    assert ref_split and (ref_split[0]["seed pairs"] == pairs).all()
    assert {"chosen experts", "random experts", "full fine-tuning"} <= set(ref_split[0]["arm"])
    table = [d.value for d in at.dataframe if "jailbreak_compliance" in d.value.columns]
    assert table and set(table[0]["method"]) == {
        "base",
        "chosen",
        "chosen_grad_attr",
        "random",
        "random_layer",
        "full",
    }
    study_run = next(r for r in root.iterdir() if (r / "study").is_dir())
    at = open_app(Run.open(study_run), page="evaluation")  # the learning curves of each seed pair (issue 17)
    no_exceptions(at)
    curves = [
        s for s in plotly_specs(at) if "Learning curves" in json.dumps(s.get("layout", {}).get("title", ""))
    ]
    assert curves and {t["name"] for t in curves[0]["data"] if t.get("name")} >= {
        "chosen (0.125)",
        "random #0 (0.125)",
    }
    goals = [d.value for d in at.dataframe if "all four targets" in d.value.columns]  # read at its 1/8
    assert goals and list(goals[0]["selector"]) == [
        "chosen experts",
        "grad-attribution",
        "picked on validation",
    ]
    assert (goals[0]["seed pairs"] == 1).all() and set(goals[0]["budget"]) == {"1/8"}
    split = [d.value for d in at.dataframe if "on held-out wrappers" in d.value.columns]
    assert split and {"chosen experts", "random experts", "full fine-tuning"} <= set(split[0]["arm"])


def test_home_reads_the_reference_at_the_budget_one_picks(tmp_path, monkeypatch):
    """The reference has several budgets (1/32, 1/16, 1/8): Home opens at 1/16, the targets' budget, and
    picking another redraws the across-seed line, the per-seed dots and the wrapper split from its own rows."""
    from moe_core.eval.study_summary import per_seed, reference_curves
    from moe_core.eval.study_targets import study_budgets, wrapper_split

    monkeypatch.setenv("MOE_LAB_RUNS", str(tmp_path / "runs"))
    ref = reference_study()[1]
    at = open_app()
    no_exceptions(at)
    control = at.segmented_control(key="home_reference_budget")
    assert list(control.options) == ["1/32", "1/16", "1/8"] and len(study_budgets(ref)) == 3
    assert control.value == 1 / 16
    for budget, label in ((1 / 32, "1/32"), (1 / 8, "1/8")):
        at.segmented_control(key="home_reference_budget").set_value(budget).run()
        no_exceptions(at)
        assert any(f"{label} of the experts; median" in m.value for m in at.markdown)
        dots = next(
            s for s in plotly_specs(at) if "over-refusal (lower is better)" in json.dumps(s["layout"])
        )
        chosen = per_seed(ref, budget).query("method == 'chosen'")["jailbreak_compliance"]
        bar, points = dots["data"][:2]  # the chosen experts' median and their dot per seed pair
        assert bar["y"] == pytest.approx([chosen.median()]) and points["y"] == pytest.approx(chosen.tolist())
        split = [d.value for d in at.dataframe if "on held-out wrappers" in d.value.columns]
        expected = wrapper_split(ref, reference_curves(), budget)
        assert split and split[0].reset_index(drop=True).equals(expected)


def test_pages_save_masks_and_plans_only_through_the_pipeline_under_the_writer_lease(
    lab, monkeypatch, runs_root
):
    """Issue 18 (one door): the Experts page's mask and the Data page's plan are written by pipeline steps that
    hold the run's writer lease; while another process writes the run, both say so and write nothing."""
    from tests.test_faults import _hold

    root, _, finished = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app(finished, page="experts")
    at.text_input(key="ex_name_global_False").input("under_lease")
    at.run()
    holder = _hold(finished.path, "someone-else")
    try:
        button(at, "Save mask").click()
        at.run()
        assert any("busy" in e for e in errors(at)), errors(at)
        assert not finished.path_for("mask", name="under_lease").exists()
    finally:
        holder.kill()
        holder.wait()
    button(at, "Save mask").click()  # the holder is gone (dead lease): the step takes the lease and saves
    at.run()
    assert finished.path_for("mask", name="under_lease").exists()
    finished.path_for("mask", name="under_lease").unlink()

    run = _run_with_plan(runs_root)
    plan_before = run.path_for("plan").read_bytes()
    at = open_app(run, page="data")
    button(at, "Compose batches").click()
    at.run()
    holder = _hold(run.path, "someone-else")
    try:
        button(at, "Save plan").click()
        at.run()
        assert any("busy" in e for e in errors(at)), errors(at)
        assert run.path_for("plan").read_bytes() == plan_before
    finally:
        holder.kill()
        holder.wait()


def test_experts_page_ranks_by_the_router_weight_score(lab, monkeypatch):
    """Issue 17, item 2: the Experts page offers the selector scores; gate_diff (read from the routing files)
    ranks the chosen experts, and the model-based scores appear once the run holds them."""
    from moe_core.analysis.scores import gate_diff_table

    root, _, finished = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app(finished, page="experts")
    options = at.selectbox(key="ex_score").options
    assert "router weight difference (gate score)" in options
    assert "gradient of the refusal loss" not in options  # not computed in this run yet
    at.selectbox(key="ex_score").set_value("gate_diff")
    at.number_input(key="ex_n").set_value(3)
    at.run()
    no_exceptions(at)
    marks = plotly_specs(at)[0]["data"][1]
    top3 = gate_diff_table(finished).sort_values("gate_diff", ascending=False).head(3)
    assert sorted(zip(marks["y"], marks["x"])) == sorted(zip(top3["layer"], top3["expert"]))
