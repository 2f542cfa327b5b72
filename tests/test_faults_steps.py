"""Issue 13, steps / training / validation: faults reproduced, each answered by a clear error or an exact resume.

* every step is a transaction: a failed (full-disk) re-train leaves the previous training intact;
* a SIGKILLed training resumes from its last checkpoint and equals an uninterrupted run, bit for bit;
* no silent overwrite of masks, trainings, evaluations (a read-only mask is never replaced);
* no silent wrong results: numeric options range-checked at parse time, names and masks before any
  model loads, ``demo --safe/--unsafe`` uses the given files.

One tiny OLMoE run (2 analysis batches of 8) is analysed once per module and copied per test.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from moe_core import pipeline as P
from moe_core.analysis.masks import ExpertMask, MaskError
from moe_core.cli import main
from moe_core.errors import MoELabError
from moe_core.store.run import Run
from moe_core.train.expert_rows import save_merged
from tests.tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TRAINING = "experts-unsafe_experts"


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """(model dir, run dir): a tiny model analysed on 2 demo batches, with the mask ``unsafe_experts``."""
    base = tmp_path_factory.mktemp("faults_steps")
    model_dir = base / "model"
    tiny_model("olmoe", seed=1).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    root = base / "runs"
    assert (
        main(
            [
                "--runs-root",
                str(root),
                "analyze",
                "--model",
                str(model_dir),
                "--demo-sets",
                "--batch-size",
                "8",
                "--max-batches",
                "2",
                "--scope",
                "prompt",
                "--max-new-tokens",
                "2",
                "--name",
                "fs",
            ]
        )
        == 0
    )
    (run_dir,) = list(root.iterdir())
    assert main(["--runs-root", str(root), "select", "--run", str(run_dir), "--n", "3"]) == 0
    return model_dir, run_dir


@pytest.fixture
def run(analysed, tmp_path) -> Run:
    """A private copy of the analysed run."""
    dst = tmp_path / "runs" / analysed[1].name
    shutil.copytree(analysed[1], dst)
    return Run.open(dst)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


# -- validation before work -------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, flag",
    [
        (["analyze", "--max-batches", "0"], "--max-batches"),
        (["analyze", "--max-batches", "-1"], "--max-batches"),
        (["analyze", "--batch-size", "1"], "--batch-size"),
        (["analyze", "--safe-ratio", "1.5"], "--safe-ratio"),
        (["train", "--run", "nowhere", "--epochs", "0"], "--epochs"),
        (["train", "--run", "nowhere", "--epochs", "-2"], "--epochs"),
        (["train", "--run", "nowhere", "--weight-decay", "-5"], "--weight-decay"),
        (["train", "--run", "nowhere", "--lr", "0"], "--lr"),
        (["train", "--run", "nowhere", "--name", "../escape"], "--name"),
        (["evaluate", "--run", "nowhere", "--eval-max-new-tokens", "0"], "--max-new-tokens"),
        (["evaluate", "--run", "nowhere", "--name", "bad/name"], "--name"),
        (["evaluate", "--run", "nowhere", "--eval-limit", "0"], "--eval-limit"),
        (["select", "--run", "nowhere", "--n", "0"], "--n"),
        (["select", "--run", "nowhere", "--budget", "2"], "--budget"),
        (["demo", "--epochs", "0"], "--epochs"),
        (["demo", "--eval-limit", "-1"], "--eval-limit"),
        (["study", "--epochs", "0"], "--epochs"),
        (["study", "--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_numeric_options_and_names_are_checked_at_parse_time(tmp_path, capsys, argv, flag):
    """Refused before the run is even opened ("nowhere" does not exist) and before any model loads."""
    rc, err = cli(capsys, "--runs-root", str(tmp_path), *argv)
    assert rc == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert flag in err and "no run at" not in err, err
    assert not any(tmp_path.iterdir()), "a refused command wrote something"


@pytest.mark.parametrize(
    "spec",
    [
        P.TrainSpec(overwrite=True, checkpoint_every=3),
        P.SelectSpec(overwrite=True),
        P.EvaluateSpec(overwrite=True),
        P.DemoSpec(overwrite=True),
    ],
)
def test_overwrite_travels_from_a_page_spec_to_the_job_command_line(spec):
    """The app launches specs as CLI jobs (jobs.start_step -> to_argv): the user's "overwrite" answer must survive."""
    from moe_core.cli import build_parser, spec_from_args

    argv = P.to_argv(spec)
    assert "--overwrite" in argv
    assert spec_from_args(build_parser().parse_args([P.command_of(spec), "--run", "r", *argv])) == spec
    assert (
        P.DemoSpec(overwrite=True).train_spec("full").overwrite
        and P.DemoSpec(overwrite=True).evaluate_spec().overwrite
    )


def test_a_mask_with_experts_as_a_string_is_refused_before_training(run, capsys):
    path = run.path_for("mask", name="hand")
    path.write_text(json.dumps({"num_layers": 2, "num_experts": 8, "experts": {"0": "12"}}))
    with pytest.raises(MaskError, match="hand.json"):
        ExpertMask.load(path)
    rc, err = cli(capsys, "train", "--run", str(run.path), "--mask", "hand")
    assert rc == 2 and "experts.0" in err
    assert not run.path_for("train", name="experts-hand").exists()


def test_a_mask_of_another_shape_is_refused_before_the_model_loads(run, monkeypatch):
    ExpertMask.from_experts([(0, 1)], 3, 8).save(run.path_for("mask", name="wide"))
    monkeypatch.setattr(P, "load_any_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(MaskError, match=r"\(3, 8\).*2 layers x 8 experts"):
        P.train(P.TrainSpec(mask="wide"), run)


def test_demo_uses_the_given_prompt_files_and_refuses_a_missing_one(tmp_path, capsys):
    safe, unsafe = tmp_path / "safe.csv", tmp_path / "unsafe.csv"
    pd.DataFrame({"prompt": [f"how do I bake loaf {i}" for i in range(4)]}).to_csv(safe, index=False)
    pd.DataFrame({"prompt": [f"how do I pick lock {i}" for i in range(4)]}).to_csv(unsafe, index=False)
    plan = P.compose(P.DemoSpec(safe=str(safe), unsafe=str(unsafe), batch_size=4))
    texts = {s.text for b in plan.batches for s in b.items}
    assert texts == {f"how do I bake loaf {i}" for i in range(4)} | {
        f"how do I pick lock {i}" for i in range(4)
    }
    rc, err = cli(
        capsys,
        "--runs-root",
        str(tmp_path / "runs"),
        "demo",
        "--safe",
        str(tmp_path / "missing.csv"),
        "--unsafe",
        str(unsafe),
    )
    assert rc == 2 and "missing.csv" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# -- no overwrite without asking ---------------------------------------------------------------
def test_select_refuses_an_existing_mask_and_never_replaces_a_read_only_one(run, capsys):
    path = run.path_for("mask", name="unsafe_experts")
    before = path.read_bytes()
    rc, err = cli(capsys, "select", "--run", str(run.path), "--n", "5")
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert path.read_bytes() == before
    assert cli(capsys, "select", "--run", str(run.path), "--n", "5", "--overwrite")[0] == 0
    assert ExpertMask.load(path).count() == 5
    path.chmod(0o444)
    try:
        rc, err = cli(capsys, "select", "--run", str(run.path), "--n", "2", "--overwrite")
        assert rc == 2 and "read-only" in err
        assert ExpertMask.load(path).count() == 5
    finally:
        path.chmod(0o644)


def test_a_full_disk_during_select_keeps_the_previous_mask(run, monkeypatch):
    from moe_core.store import atomic as A

    path = run.path_for("mask", name="unsafe_experts")
    before = path.read_bytes()
    real = A.os.fsync
    monkeypatch.setattr(
        A.os, "fsync", lambda fd: _full_disk()
    )  # the new mask is written, then the disk is full
    with pytest.raises(OSError, match="No space left"):  # the CLI prints it as one error line (cli.main)
        P.select(P.SelectSpec(n=5, overwrite=True), run)
    monkeypatch.setattr(A.os, "fsync", real)
    assert path.read_bytes() == before and not [p for p in path.parent.iterdir() if p != path]


def test_evaluate_refuses_an_existing_name_and_a_bad_steer_mask_before_generating(run, monkeypatch):
    from moe_core.eval import evaluation as E

    monkeypatch.setattr(E, "compare_models", lambda *a, **k: pytest.fail("the evaluation ran"))
    E.save_evaluation(
        run, pd.DataFrame({"model": ["base"]}), pd.DataFrame({"model": ["base"]}), name="comparison"
    )
    with pytest.raises(MoELabError, match="already exists.*--overwrite"):
        P.evaluate(P.EvaluateSpec(), run)
    ExpertMask.from_experts([(0, 1)], 4, 8).save(run.path_for("mask", name="wide"))
    with pytest.raises(MoELabError, match="steer mask 'wide'"):
        P.evaluate(P.EvaluateSpec(name="other", steer_mask="wide"), run)
    with pytest.raises(MoELabError, match="no_such_mask"):
        P.evaluate(P.EvaluateSpec(name="other", steer_mask="no_such_mask"), run)


def test_a_failed_evaluation_save_keeps_the_previous_one(run, monkeypatch):
    from moe_core.eval import evaluation as E

    E.save_evaluation(
        run, pd.DataFrame({"model": ["base"]}), pd.DataFrame({"model": ["old"]}), name="comparison"
    )
    before = files_of(run.path_for("eval"))
    from moe_core.store import atomic

    monkeypatch.setattr(atomic, "atomic_write_text", lambda *a, **k: _full_disk())  # the commit point
    with pytest.raises(OSError):
        E.save_evaluation(
            run, pd.DataFrame({"model": ["x"]}), pd.DataFrame({"model": ["new"]}), name="comparison"
        )
    monkeypatch.undo()
    assert files_of(run.path_for("eval")) == before, "the previous evaluation was touched"
    assert E.load_evaluation(run)[1]["model"].tolist() == ["old"]


def _full_disk(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# -- training: transaction, overwrite, resume --------------------------------------------------
def train_spec(**kw) -> P.TrainSpec:
    return P.TrainSpec(**{"epochs": 2.0, "lr": 1e-2, "weight_decay": 0.1, "checkpoint_every": 1, **kw})


def test_a_finished_training_is_not_replaced_without_overwrite(run, capsys):
    rc, _ = cli(capsys, "train", "--run", str(run.path), "--epochs", "1")
    assert rc == 0
    out = run.path_for("train", name=TRAINING)
    before = files_of(out)
    assert not (out / "checkpoints").exists() and not list(out.parent.glob(".*")), (
        "stage or checkpoints left behind"
    )
    rc, err = cli(capsys, "train", "--run", str(run.path), "--epochs", "1", "--lr", "0.05")
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert files_of(out) == before
    rc, _ = cli(capsys, "train", "--run", str(run.path), "--epochs", "1", "--lr", "0.05", "--overwrite")
    assert rc == 0 and files_of(out) != before
    assert json.loads((out / "training_metadata.json").read_text())["args"]["learning_rate"] == 0.05


def test_a_full_disk_during_a_retrain_leaves_the_previous_training_intact(run, monkeypatch):
    from moe_core.train import training as T

    P.train(train_spec(), run)
    out = run.path_for("train", name=TRAINING)
    before = files_of(out)
    real = save_merged
    monkeypatch.setattr(T, "save_merged", _full_disk)  # the delta is already written when this fails
    with pytest.raises(MoELabError, match="previous training of that name is unchanged"):
        P.train(train_spec(lr=2e-2, overwrite=True), run)
    assert files_of(out) == before, "the previous training was touched"
    assert run.reload()["steps"][f"train:{TRAINING}"]["status"] != "running"
    monkeypatch.setattr(T, "save_merged", real)
    result = P.train(
        train_spec(lr=2e-2, overwrite=True), run
    )  # the space is back: resumes, nothing retrained
    assert run.reload()["steps"][f"train:{TRAINING}"]["resumed_from"] == "checkpoint-4"
    assert result.merged_path == out / "merged_model" and files_of(out) != before
    assert result.metrics["train_loss"] > 0, "a resumed training reports the loss of all its steps, not 0"


def test_a_commit_cut_between_its_renames_loses_nothing(run, monkeypatch):
    """Killed after moving the old training aside: the next `train` puts it back (and asks before replacing it)."""
    from moe_core.train import training as T

    P.train(train_spec(epochs=1.0), run)
    out = run.path_for("train", name=TRAINING)
    before = files_of(out)
    aside = out.parent / f".{TRAINING}.old-999"
    os.replace(out, aside)  # where commit_training moves it just before renaming the new one in
    with pytest.raises(MoELabError, match="already exists"):
        P.train(train_spec(epochs=1.0), run)
    assert files_of(out) == before and not aside.exists()
    monkeypatch.setattr(T, "save_merged", _full_disk)  # an unfinished attempt now waits in the stage ...
    with pytest.raises(MoELabError):
        P.train(train_spec(epochs=1.0, overwrite=True), run)
    monkeypatch.undo()
    os.replace(out, aside)  # ... and the commit of its resume is the one cut short
    P.train(train_spec(epochs=1.0, overwrite=True), run)
    assert out.is_dir() and not aside.exists() and not list(out.parent.glob(".*"))


def test_an_unfinished_training_with_other_settings_is_refused_not_mixed(run, monkeypatch):
    from moe_core.train import training as T

    monkeypatch.setattr(T, "save_merged", _full_disk)
    with pytest.raises(MoELabError):
        P.train(train_spec(), run)
    with pytest.raises(MoELabError, match=r"other settings \(lr\).*--overwrite"):
        P.train(train_spec(lr=0.5), run)


KILLED = """
import sys, time, torch
torch.set_num_threads(1)
from moe_core import pipeline as P
from moe_core.store.run import Run
def slow(done, total, message=""):
    time.sleep(0.2 if done < 4 else 60)  # after step 4 wait for the kill: it always lands mid-training
P.train(P.TrainSpec(epochs=3.0, lr=1e-2, weight_decay=0.1, checkpoint_every=1), Run.open(sys.argv[1]), progress=slow)
"""


def test_a_killed_training_resumes_and_equals_an_uninterrupted_run(run, analysed, tmp_path):
    spec = train_spec(epochs=3.0)  # 2 batches x 3 epochs = 6 steps, reshuffled each epoch
    stage = run.path_for("train", name=TRAINING).parent / f".{TRAINING}.partial"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(run.path)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120  # a generous bound on a busy machine, not a measured time
        while not (stage / "checkpoints" / "checkpoint-3" / "trainer_state.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not run.path_for("train", name=TRAINING).exists(), "a killed training must not look finished"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = P.train(spec, run)
        fresh_run = Run.open(shutil.copytree(analysed[1], tmp_path / "fresh" / analysed[1].name))
        fresh = P.train(spec, fresh_run)
    finally:
        torch.set_num_threads(threads)
    step = run.reload()["steps"][f"train:{TRAINING}"]
    assert step["status"] == "done" and step["resumed_from"] in {"checkpoint-3", "checkpoint-4"}
    assert same_tensors(tensors(resumed.merged_path), tensors(fresh.merged_path)), "resumed model differs"
    assert same_tensors(load_file(str(resumed.delta_path)), load_file(str(fresh.delta_path)))
    monitor = [
        (r["step"], r["batch_idx"])
        for r in map(json.loads, (resumed.output_dir / "batch_monitor.jsonl").open())
    ]
    assert monitor == [
        (r["step"], r["batch_idx"])
        for r in map(json.loads, (fresh.output_dir / "batch_monitor.jsonl").open())
    ]
    assert len(monitor) == 6 and not stage.exists()
    assert resumed.metrics["train_loss"] == pytest.approx(
        fresh.metrics["train_loss"], abs=1e-3
    )  # logged losses are rounded


# -- the app asks before it overwrites ---------------------------------------------------------
def test_the_pages_ask_before_overwriting_a_mask_a_training_or_an_evaluation(run, monkeypatch):
    from moe_core import jobs
    from tests.test_app import FILES, open_app

    started = []
    monkeypatch.setattr(jobs, "start_step", lambda path, job, spec: started.append(spec))
    monkeypatch.setenv("MOE_LAB_RUNS", str(run.path.parent))
    P.train(train_spec(epochs=1.0), run)
    P.evaluate(P.EvaluateSpec(eval_limit=1, templates_per_goal=1, max_new_tokens=1), run)
    mask = run.path_for("mask", name="unsafe_experts")
    before = mask.read_bytes()

    at = open_app(run, page="experts")  # the default name is the mask the run already has
    next(b for b in at.button if b.label == "Save mask").click().run()
    assert any("already exists" in e.value for e in at.error) and mask.read_bytes() == before
    at.checkbox(key="ex_replace").check().run()
    next(b for b in at.button if b.label == "Save mask").click().run()
    assert not at.exception and not at.error and mask.read_bytes() != before

    for page, box, label in (
        ("training", "tr_replace", "Start training"),
        ("evaluation", "ev_replace", "Evaluate"),
    ):
        at = open_app(run, page=page)
        for t in at.text_input:  # the training page suggests a free name: type the existing one
            if t.label == "Training name":
                t.input("experts-unsafe_experts").run()
        next(b for b in at.button if b.label == label).click().run()
        assert any("already exists" in e.value for e in at.error), (page, [e.value for e in at.error])
        assert not started, f"{page}: launched without asking"
        at.checkbox(key=box).check().run()
        next(b for b in at.button if b.label == label).click().run()
        assert not at.exception, [e.value for e in at.exception]
        assert len(started) == 1 and started.pop().overwrite, f"{page}: not launched with overwrite"
    assert FILES["training"].endswith("5_training.py")


def test_a_stopped_per_batch_training_resumes_exactly(run, analysed, tmp_path):
    """Per-batch masks: each resumed step still updates only its own batch's experts (same result as one run)."""
    from moe_core.store.events import JobStopped

    P.select(P.SelectSpec(per_batch=True, n=2, name="pb"), run)
    spec = train_spec(mask="pb", mask_mode="per_batch", epochs=3.0)

    def stop_at_4(done, total, message=""):
        if done == 4:
            raise JobStopped("stopped on request")

    with pytest.raises(JobStopped):
        P.train(spec, run, progress=stop_at_4)
    assert run.reload()["steps"]["train:experts-pb"]["status"] == "stopped"
    resumed = P.train(spec, run)
    fresh_run = Run.open(
        shutil.copytree(run.path, tmp_path / "fresh" / run.path.name, ignore=shutil.ignore_patterns("train"))
    )
    fresh = P.train(spec, fresh_run)
    assert (
        run.reload()["steps"]["train:experts-pb"]["resumed_from"] == "checkpoint-3"
    )  # step 4 stopped before its save
    assert same_tensors(load_file(str(resumed.delta_path)), load_file(str(fresh.delta_path)))
    meta = json.loads((resumed.output_dir / "training_metadata.json").read_text())
    assert (
        meta["batch_masks"]
        == json.loads((fresh.output_dir / "training_metadata.json").read_text())["batch_masks"]
    )


def test_an_unsupported_combination_is_a_message_on_the_training_page(run, monkeypatch):
    from tests.test_app import open_app

    with pytest.raises(MoELabError, match="--mask-mode.*--baseline full"):
        P.TrainSpec(baseline="full", mask_mode="per_batch")
    P.select(P.SelectSpec(per_batch=True, n=2, name="pb"), run)
    monkeypatch.setenv("MOE_LAB_RUNS", str(run.path.parent))
    at = open_app(run, page="training")
    at.selectbox(key="tr_mask").set_value("pb").run()
    at.selectbox(key="tr_mode").set_value("per_batch").run()
    at.selectbox(key="tr_baseline").set_value("full").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("--baseline full" in e.value for e in at.error), [e.value for e in at.error]
    assert next(b for b in at.button if b.label == "Start training").disabled
