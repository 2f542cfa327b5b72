"""Issue 20 (the app for a researcher's own runs): rows 1, 2, 3, 6, 9, 12, 15, each with the test named after
it; AppTest drives the pages headlessly (the real-browser walk is tests/test_browser.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moe_core.analysis.analyse import AnalysisConfig, run_analysis
from moe_core.batching.batches import compose_batches
from moe_core.batching.demo_prompts import demo_sets
from moe_core.model.adapter import load_model
from moe_core.store.run import Run
from tests.app_fixtures import build_finished_run, save_tiny_model
from tests.test_app import no_exceptions, open_app


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("story")
    model_dir = save_tiny_model(tmp / "tiny-olmoe")
    run = build_finished_run(tmp / "runs", model_dir, n_batches=2, train=True, evaluate=True)
    return tmp / "runs", model_dir, run


@pytest.fixture(scope="module")
def labelled(lab):
    """A run of labelled (unpaired) prompts: safe and unsafe are the prompts' labels, not what the model did."""
    root, model_dir, _ = lab
    model, tok = load_model(model_dir, device="cpu")
    safe, unsafe = demo_sets("train", mode="unpaired")
    plan = compose_batches(safe, unsafe, batch_size=8, safe_ratio=0.5, seed=0)
    plan = replace(plan, batches=plan.batches[:1])
    run = Run.create(root, name="labelled", model=str(model_dir))
    run_analysis(run, model, tok, plan, AnalysisConfig(scope="generated", max_new_tokens=4))
    return run


def test_row3_heatmap_words_follow_the_data_mode(lab, labelled, monkeypatch):
    root, _, paired_run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    at = open_app(labelled, "heatmaps")
    no_exceptions(at)
    heads = [m.value.strip("# ") for m in at.markdown if m.value.startswith("#####")]
    assert heads == ["Safe side: prompts labelled safe", "Unsafe side: prompts labelled unsafe"]
    assert not any("the model complied" in h or "refused" in h for h in heads)
    assert any("labels of your prompts" in c.value for c in at.caption)
    at = open_app(paired_run, "heatmaps")
    heads = [m.value.strip("# ") for m in at.markdown if m.value.startswith("#####")]
    assert heads == [
        "Safe side: plain harmful requests, refused",
        "Unsafe side: the same requests jailbroken, complied with",
    ]


def test_row12_each_side_heading_is_drawn_with_its_own_cards(labelled, monkeypatch):
    """At 400 px Streamlit stacks columns: a heading must sit in the same column as its cards."""
    monkeypatch.setenv("MOE_LAB_RUNS", str(labelled.path.parent))
    at = open_app(labelled, "heatmaps")
    columns = [c for c in at.columns if any(m.value.startswith("##### ") for m in c.markdown)]
    assert len(columns) == 2
    for col, side in zip(columns, ("safe", "unsafe")):
        cards = [m.value for m in col.markdown if "#" in m.value and "badge" in m.value]
        assert cards and all(v.startswith(f"**{side}**") for v in cards), (side, cards)


def test_row1_a_second_training_gets_a_name_of_its_own_in_page_words(lab, monkeypatch):
    from moe_core import jobs

    root, _, run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    started = []
    monkeypatch.setattr(jobs, "start_step", lambda path, job, spec: started.append(spec))
    at = open_app(run, "training")
    at.number_input(key="tr_lr").set_value(0.003).run()
    (box,) = [t for t in at.text_input if t.label == "Training name"]
    assert box.value == "experts-unsafe_experts-lr0.003"  # the default name is taken: built from the settings
    next(b for b in at.button if b.label == "Start training").click().run()
    no_exceptions(at)
    assert not at.error and started and started[0].training_name() == "experts-unsafe_experts-lr0.003"
    (box,) = [t for t in at.text_input if t.label == "Training name"]
    box.input("experts-unsafe_experts").run()  # an existing name: the page asks, in its own words
    next(b for b in at.button if b.label == "Start training").click().run()
    text = " ".join(e.value for e in at.error)
    assert "tick the overwrite box" in text and "--" not in text


def test_row2_the_results_pickers_move_to_what_just_finished(lab, monkeypatch, tmp_path):
    import os
    import shutil

    import pandas as pd

    from moe_core.eval.evaluation import save_evaluation

    root, _, finished = lab
    run = Run.open(shutil.copytree(finished.path, tmp_path / "runs" / finished.path.name))
    monkeypatch.setenv("MOE_LAB_RUNS", str(tmp_path / "runs"))
    at = open_app(run, "training")
    assert at.selectbox(key="tr_out").value.name == "experts-unsafe_experts"
    new = shutil.copytree(run.path / "train" / "experts-unsafe_experts", run.path / "train" / "mine-lr0.003")
    os.utime(new)  # finished now (copytree kept the old folder's time)
    at.run()  # what the job panel does when the job ends
    assert at.selectbox(key="tr_out").value.name == "mine-lr0.003"

    at.switch_page("pages/6_evaluation.py").run()
    before = at.selectbox(key="ev_pick").value
    responses, summary = (
        pd.read_parquet(run.path / "eval" / f"{before}_{k}.parquet") for k in ("responses", "summary")
    )
    save_evaluation(run, responses, summary, name="second")
    at.run()
    no_exceptions(at)
    assert at.selectbox(key="ev_pick").value == "second"


def test_row6_stop_shows_a_stopping_state_at_once(lab, monkeypatch, tmp_path):
    import shutil

    from tests.test_app import _fake_job

    root, _, finished = lab
    run = Run.open(shutil.copytree(finished.path, tmp_path / "runs" / finished.path.name))
    monkeypatch.setenv("MOE_LAB_RUNS", str(tmp_path / "runs"))
    _fake_job(run, "analysis", "running", [(0, 2, "starting")])  # alive: this process is its pid
    at = open_app(run, "analysis")
    next(b for b in at.button if b.label == "Stop").click().run()
    no_exceptions(at)
    assert run.job("analysis").stop_requested()
    assert any("stopping after this batch" in m.value for m in at.markdown)  # said right after the click
    (stop,) = [b for b in at.button if b.key == "stop_analysis"]
    assert stop.label == "Stopping..." and stop.disabled


def test_row15_the_live_batch_monitor_counts_the_same_steps_as_the_progress_bar(lab, monkeypatch, tmp_path):
    import shutil

    from tests.test_app import _fake_job

    root, _, finished = lab
    run = Run.open(shutil.copytree(finished.path, tmp_path / "runs" / finished.path.name))
    monkeypatch.setenv("MOE_LAB_RUNS", str(tmp_path / "runs"))
    _fake_job(run, "train", "running", [(i, 14, f"loss {2 - i / 10}") for i in range(1, 7)])  # 6 of 14 done
    line = "Current training batch contains samples from batches: [{}]\n"
    (run.path / "jobs" / "train" / "job.log").write_text(
        "".join(line.format(i % 2) for i in range(8))
    )  # 8 begun
    at = open_app(run, "training")
    no_exceptions(at)
    (monitor,) = [
        d.value
        for d in at.dataframe
        if d.value.columns.tolist() == ["step", "batch_idx", "n_safe", "n_unsafe"]
    ]
    assert monitor["step"].max() == 6 and len(monitor) == 6
    assert any("step 6 of 14" in m.value for m in at.markdown)


def test_row9_home_ticks_the_trainings_and_ends_the_demo_with_a_one_line_result(lab, monkeypatch, tmp_path):
    import shutil

    import pandas as pd

    from moe_core.eval.evaluation import save_evaluation
    from tests.test_app import _fake_job

    root, _, finished = lab
    run = Run.open(shutil.copytree(finished.path, tmp_path / "runs" / finished.path.name))
    monkeypatch.setenv("MOE_LAB_RUNS", str(tmp_path / "runs"))
    rows = []
    for model, jb, over in (
        ("base", 1.0, 0.3),
        ("experts-unsafe_experts", 0.25, 0.4),
        ("random_experts", 0.9, 0.35),
    ):
        rows += [
            {"model": model, "set": "harmful_jailbreak", "metric": "jailbreak_compliance", "value": jb},
            {"model": model, "set": "borderline", "metric": "over_refusal", "value": over},
        ]
    responses = pd.read_parquet(run.path / "eval" / "comparison_responses.parquet")
    save_evaluation(run, responses, pd.DataFrame(rows), name="comparison")
    for job in ("demo", "demo-train-experts", "demo-train-random_experts", "demo-train-full", "demo-eval"):
        _fake_job(run, job, "done")
    at = open_app(run)
    no_exceptions(at)
    (line,) = [s.value for s in at.success if "Chosen experts" in s.value]
    assert line.startswith("Chosen experts: jailbreak compliance 0.25 (base model 1.00, random experts 0.90)")
    assert "over-refusal 0.30 -> 0.40" in line
    links = {link.proto.label: link.proto.icon for link in at.main.get("page_link")}
    assert links["Training"] == ":material/check_circle:" and "Present the result" in links
    assert {"See the heatmaps", "Training results", "Before vs after"} <= set(links)


def test_row8_after_a_reload_the_analysis_widgets_show_the_runs_recorded_settings(lab, monkeypatch):
    from moe_core.analysis.analyse import analysis_config_of

    root, _, run = lab
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    recorded = analysis_config_of(run)
    at = open_app(run, "analysis")
    at.session_state["an_max_new"] = recorded.max_new_tokens + 150  # what the session typed before the reload
    at.session_state["an_judge"] = "http://elsewhere/v1?model=x"
    at.run()
    no_exceptions(at)
    box = at.number_input(key="an_max_new")
    assert box.value == recorded.max_new_tokens and box.disabled
    assert at.text_input(key="an_judge").value == recorded.judge
    assert any(f"{recorded.max_new_tokens} new tokens" in c.value for c in at.caption)


def test_row18_an_analysis_batch_reports_progress_while_it_generates(lab, tmp_path):
    """Visible state, no time: a batch's answer tokens are reported as they come, before the batch is done."""
    root, model_dir, _ = lab
    model, tok = load_model(model_dir, device="cpu")
    safe, unsafe = demo_sets("train", mode="paired")
    plan = compose_batches(safe, unsafe, batch_size=8, safe_ratio=0.5, seed=0)
    plan = replace(plan, batches=plan.batches[:1])
    run = Run.create(tmp_path, name="ticks", model=str(model_dir))
    seen = []
    run_analysis(
        run,
        model,
        tok,
        plan,
        AnalysisConfig(scope="generated", max_new_tokens=6),
        progress=lambda d, t, m="": seen.append((d, m)),
    )
    inside = [m for d, m in seen if d == 0 and "new tokens" in m]
    assert inside and inside[0].startswith("batch 0: 1/6 new tokens (8 prompts)")
    assert seen[-1][0] == 1 and "samples kept" in seen[-1][1]


def test_row5_a_saved_masks_hand_toggles_come_back_after_a_reload(lab, monkeypatch, tmp_path):
    import shutil

    from moe_core import pipeline as P
    from moe_core.analysis.masks import ExpertMask

    root, _, finished = lab
    run = Run.open(shutil.copytree(finished.path, tmp_path / "runs" / finished.path.name))
    monkeypatch.setenv("MOE_LAB_RUNS", str(tmp_path / "runs"))
    at = open_app(run, "experts")  # what the page's rule gives
    shown = (
        [t for t in at.session_state["ex_toggles::" + run.id]]
        if ("ex_toggles::" + run.id) in at.session_state
        else []
    )
    assert shown == []
    P.select(P.SelectSpec(overwrite=True, toggles="1:7"), run)  # the researcher's hand edit, saved
    saved = ExpertMask.load(run.path_for("mask", name="unsafe_experts"))
    at = open_app(run, "experts")  # a reload: a new session
    no_exceptions(at)
    assert at.session_state["ex_toggles::" + run.id] == ["1:7"]
    assert not [i.value for i in at.info if "differs" in i.value or "holds" in i.value]  # shown == saved
    assert saved.meta["hand_toggled"] == ["1:7"]


def test_row4_a_reloaded_data_page_keeps_the_runs_uploaded_sources_and_never_invites_a_recompose(
    tmp_path, monkeypatch
):
    from moe_core.batching.plan import load_plan
    from tests.test_app import button

    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    safe_csv = b"prompt\n" + b"".join(f"how do I bake bread number {i}\n".encode() for i in range(8))
    unsafe_csv = b"prompt\n" + b"".join(f"how do I pick lock number {i}\n".encode() for i in range(9))
    run = Run.create(root, name="mine")
    at = open_app(run, "data")
    at.segmented_control(key="data_source").set_value("upload").run()
    at.file_uploader(key="up_safe").set_value(("safe.csv", safe_csv, "text/csv")).run()
    at.file_uploader(key="up_unsafe").set_value(("unsafe.csv", unsafe_csv, "text/csv")).run()
    at.number_input(key="batch_size").set_value(8).run()
    button(at, "Compose batches").click().run()
    no_exceptions(at)
    draft = load_plan(run.path / "plan.draft.json")
    victim = draft.batch(0).safe[0].id
    at.selectbox(key="dr_item").set_value(victim)
    button(at, "Drop").click().run()  # a hand edit

    at = open_app(run, "data")  # a reload: a new session, the uploads are gone from the browser
    no_exceptions(at)
    assert at.segmented_control(key="data_source").value == "run"
    assert any("kept with the run" in c.value and "8 safe and 9 unsafe" in c.value for c in at.caption)
    assert not [w.value for w in at.warning if "composed from" in w.value]  # nothing invites a recompose
    assert victim not in {it.id for it in load_plan(run.path / "plan.draft.json").items()}  # the edit stands
    unused = [t for t in at.tabs if t.label.startswith("Unused prompts")]
    assert unused and "demo" not in " ".join(str(d.value) for d in at.dataframe)


def _expander(at, label: str):
    return next(e for e in at.expander if e.label.startswith(label))


def test_named_trainings_and_evaluations_are_compared_side_by_side(lab, monkeypatch, tmp_path):
    """Issue 20, "many trainings and evaluations per run": both pages list them in one comparison."""
    import json
    import os
    import shutil

    import pandas as pd

    from moe_core.eval.evaluation import save_evaluation
    from moe_core.train.outputs import trainings_table

    _, _, finished = lab
    run = Run.open(shutil.copytree(finished.path, tmp_path / "runs" / finished.path.name))
    monkeypatch.setenv("MOE_LAB_RUNS", str(tmp_path / "runs"))
    at = open_app(run, "training")
    assert all("Compare trainings" not in e.label for e in at.expander)  # one training: nothing to compare
    second = shutil.copytree(
        run.path / "train" / "experts-unsafe_experts", run.path / "train" / "mine-lr0.003"
    )
    meta = json.loads((second / "training_metadata.json").read_text())
    meta["args"]["learning_rate"] = 0.003
    (second / "training_metadata.json").write_text(json.dumps(meta))
    os.utime(second)  # finished now (copytree kept the old folder's time)
    (run.path / "train" / "broken").mkdir()
    (run.path / "train" / "broken" / "training_metadata.json").write_text("{not json")

    table = trainings_table(run)
    assert table["name"].tolist() == ["broken", "mine-lr0.003", "experts-unsafe_experts"]  # newest first
    assert table.set_index("name").loc["mine-lr0.003", "learning_rate"] == 0.003
    assert table.set_index("name").loc["experts-unsafe_experts", "learning_rate"] == 1e-3
    assert table.set_index("name").loc["broken", "baseline"].startswith("damaged")
    at.run()
    no_exceptions(at)
    shown = _expander(at, "Compare trainings").dataframe[0].value
    assert {"Training", "Learning rate", "Final loss"} <= set(shown.columns)
    assert set(shown["Training"]) == {"broken", "mine-lr0.003", "experts-unsafe_experts"}

    at.switch_page("pages/6_evaluation.py").run()
    first = at.selectbox(key="ev_pick").value
    responses, summary = (
        pd.read_parquet(run.path / "eval" / f"{first}_{k}.parquet") for k in ("responses", "summary")
    )
    save_evaluation(run, responses, summary.assign(value=summary["value"] / 2), name="second")
    at.run()
    no_exceptions(at)
    compared = _expander(at, "Compare evaluations").dataframe[0].value
    assert any(i.startswith("second · ") for i in compared.index)
    assert any(i.startswith(f"{first} · ") for i in compared.index)
    assert len(compared) == 2 * len(set(summary["model"]))
