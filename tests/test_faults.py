"""Runs you can trust (issue 13, the run store): kills, two writers, a full disk, damaged files, moved runs.

Every case asserts a clear one-line error or an exact resume with nothing lost. Tiny random OLMoEs
(tests/tiny.py) saved as local model folders stand in for the organism; the only subprocesses are a
CLI analysis killed at random points and a lease holder (a few seconds each).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from moe_core import pipeline as P
from moe_core.cli import main
from moe_core.doctor import diagnose
from moe_core.jobs import JobLaunchError, start_step
from moe_core.model.loading import load_any_model
from moe_core.model.routing import load_batch_routing
from moe_core.store.events import JobStopped
from moe_core.store.files import read_parquet, write_parquet
from moe_core.store.lease import LEASE, RunBusyError, holder
from moe_core.store.manifest import list_runs
from moe_core.store.provenance import ProvenanceError
from moe_core.store.run import Run
from moe_core.store.steps import step_outcome
from tests.test_analysis import _items
from tests.tiny import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
N_SAFE = N_UNSAFE = 12  # batches of 4: 6 batches


# -- fixtures ---------------------------------------------------------------------------------
def _save(path: Path, seed: int, **overrides) -> Path:
    tiny_model("olmoe", seed=seed, **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Three local model folders: the run's model, a same-shaped other one, another shape."""
    d = tmp_path_factory.mktemp("models")
    return {
        "a": _save(d / "a", 1),
        "same_shape": _save(d / "b", 2),
        "other_shape": _save(d / "c", 3, num_experts=4),
    }


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("prompts")
    safe, unsafe = d / "safe.csv", d / "unsafe.csv"
    pd.DataFrame({"prompt": [i.text for i in _items("safe", N_SAFE)]}).to_csv(safe, index=False)
    pd.DataFrame({"prompt": [i.text for i in _items("unsafe", N_UNSAFE)]}).to_csv(unsafe, index=False)
    return safe, unsafe


def _argv(root: Path, model: Path, prompts: tuple[Path, Path], *extra: str) -> list[str]:
    return [
        "--runs-root",
        str(root),
        "analyze",
        "--model",
        str(model),
        "--safe",
        str(prompts[0]),
        "--unsafe",
        str(prompts[1]),
        "--batch-size",
        "4",
        "--scope",
        "generated",
        "--max-new-tokens",
        "8",
        "--name",
        "faults",
        *extra,
    ]


def _only_run(root: Path) -> Path:
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return run_dir


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of a run (name -> sha256), so a refused command can be shown to have written nothing."""
    return {
        p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def error_line(capsys) -> str:
    """The one ``error:`` line a refused command printed (progress bars aside), and no traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tables(run_dir: Path) -> pd.DataFrame:
    df = read_parquet(run_dir / "risk" / "per_batch.parquet")
    return df.sort_values(["batch_idx", "layer", "expert"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models, prompts) -> Path:
    """An uninterrupted analysis through the CLI: what every resume must reproduce exactly."""
    root = tmp_path_factory.mktemp("reference")
    assert main(_argv(root, models["a"], prompts)) == 0
    return _only_run(root)


def _partial(tmp_path: Path, models, prompts, batches: int = 2) -> Path:
    """A run stopped after its first ``batches`` batches (the rest still to do), as the Stop button leaves it."""
    done = [0]

    def progress(n: int, total: int, message: str = "") -> None:
        done[0] = n

    spec = P.AnalyseSpec(
        model=str(models["a"]),
        safe=str(prompts[0]),
        unsafe=str(prompts[1]),
        batch_size=4,
        max_new_tokens=8,
        name="faults",
    )
    with pytest.raises(JobStopped):
        P.analyse(
            spec, runs_root=tmp_path / "runs", progress=progress, should_stop=lambda: done[0] >= batches
        )
    run_dir = _only_run(tmp_path / "runs")
    assert Run.open(run_dir).completed_batches() == set(range(batches))
    return run_dir


# -- 1. provenance: another model or other settings are refused before a byte is written --------
@pytest.mark.parametrize("other", ["same_shape", "other_shape"])
def test_resume_with_another_model_is_refused_and_writes_nothing(tmp_path, models, prompts, capsys, other):
    run_dir = _partial(tmp_path, models, prompts)
    before = snapshot(run_dir)
    rc = main(
        [
            "--runs-root",
            str(tmp_path / "runs"),
            "analyze",
            "--run",
            str(run_dir),
            "--model",
            str(models[other]),
        ]
    )
    err = error_line(capsys)
    assert rc == 2 and err.startswith("error: run ")
    assert "mix two models" in err and "start a new run" in err
    assert snapshot(run_dir) == before  # the manifest's model was not rewritten either


def test_later_steps_with_another_model_are_refused(tmp_path, models, prompts, capsys):
    run_dir = _partial(tmp_path, models, prompts)
    before = snapshot(run_dir)
    for step in ("train", "evaluate"):
        assert main([step, "--run", str(run_dir), "--model", str(models["same_shape"])]) == 2
        assert "would mix that model's experts" in error_line(capsys)
    assert snapshot(run_dir) == before


def test_same_named_model_with_other_weights_is_refused_by_fingerprint(tmp_path, models, prompts):
    run_dir = _partial(tmp_path, models, prompts)
    model_dir = Path(json.loads((run_dir / "manifest.json").read_text())["model"])
    assert model_dir == models["a"]
    swapped = tmp_path / "swapped"
    _save(swapped, seed=7)
    run = Run.open(run_dir)
    before = snapshot(run_dir)
    with pytest.raises(ProvenanceError, match="fingerprint"):
        P.analyse(
            P.AnalyseSpec(scope="generated", max_new_tokens=8), run, loaded=load_any_model(str(swapped))
        )
    assert snapshot(run_dir) == before


def test_resume_with_other_settings_is_refused_before_the_manifest_changes(tmp_path, models, prompts, capsys):
    run_dir = _partial(tmp_path, models, prompts)
    before = snapshot(run_dir)
    rc = main(["analyze", "--run", str(run_dir), "--scope", "prompt"])
    err = error_line(capsys)
    assert rc == 2 and "scope: 'generated' (run) vs 'prompt' (now)" in err and "new run" in err
    rc = main(
        [
            "analyze",
            "--run",
            str(run_dir),
            "--scope",
            "generated",
            "--max-new-tokens",
            "8",
            "--batch-size",
            "6",
        ]
    )
    assert rc == 2 and "batch_size: 4 (run) vs 6 (now)" in error_line(capsys)
    assert snapshot(run_dir) == before


def test_a_plan_changed_after_analysis_is_refused(tmp_path, models, prompts, capsys):
    run_dir = _partial(tmp_path, models, prompts)
    plan = json.loads((run_dir / "plan.json").read_text())
    plan["batches"] = plan["batches"][::-1]  # e.g. re-saved on the Data page
    (run_dir / "plan.json").write_text(json.dumps(plan))
    before = snapshot(run_dir)
    assert main(["analyze", "--run", str(run_dir), "--max-new-tokens", "8"]) == 2
    assert "batch plan changed" in error_line(capsys)
    assert snapshot(run_dir) == before


def test_a_kill_before_the_plan_resumes_with_the_users_files(tmp_path, models, prompts, reference):
    root = tmp_path / "runs"
    spec = P.AnalyseSpec(
        model=str(models["a"]),
        safe=str(prompts[0]),
        unsafe=str(prompts[1]),
        batch_size=4,
        max_new_tokens=8,
        name="faults",
    )
    run, _ = P.analysis_run(spec, None, root)
    run.path_for("plan").unlink()  # as if killed between the manifest and the plan
    rc = main(["--runs-root", str(root), "analyze", "--run", str(run.path), "--max-new-tokens", "8"])
    assert rc == 0
    plan = json.loads(run.path_for("plan").read_text())
    assert plan["batch_size"] == 4 and len(plan["batches"]) == 6
    assert (
        plan["batches"] == json.loads((reference / "plan.json").read_text())["batches"]
    )  # the user's prompts
    pd.testing.assert_frame_equal(tables(run.path), tables(reference))


# -- 2. one writer per run -----------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from moe_core.store.lease import writing
    with writing(sys.argv[1], sys.argv[2]):
        print("held", flush=True)
        time.sleep(120)
""")


def _hold(run_dir: Path, job: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), job],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_a_dead_writers_lease_is_taken_over(tmp_path, models, prompts, capsys):
    run_dir = _partial(tmp_path, models, prompts)
    proc = _hold(run_dir, "analysis")
    try:
        before = snapshot(run_dir)
        for argv in (
            ["analyze", "--run", str(run_dir)],
            ["select", "--run", str(run_dir), "--n", "3"],
            ["train", "--run", str(run_dir), "--job", "analysis"],
            ["doctor", "--run", str(run_dir)],
        ):
            assert main(argv) == 2, argv
            err = error_line(capsys)
            assert f"is busy with job 'analysis' (pid {proc.pid}" in err and "started " in err, err
        with pytest.raises(RunBusyError, match=f"pid {proc.pid}"):
            P.select(P.SelectSpec(n=3), Run.open(run_dir))
        with pytest.raises(JobLaunchError, match="busy with job 'analysis'"):  # the app's launch
            start_step(run_dir, "select", P.SelectSpec(n=3))
        assert snapshot(run_dir) == before  # no job status, no mask: nothing written by the refused ones
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (run_dir / LEASE).exists() and holder(run_dir) is None  # stale: its process is gone
    assert main(["doctor", "--run", str(run_dir)]) == 0  # taken over; the stopped run's tables are computed
    assert main(["select", "--run", str(run_dir), "--n", "3"]) == 0
    assert not (run_dir / LEASE).exists()


def test_a_second_job_of_the_same_name_does_not_touch_the_first(tmp_path, models, prompts, capsys):
    run_dir = _partial(tmp_path, models, prompts)
    proc = _hold(run_dir, "train-x")
    try:
        status = run_dir / "jobs" / "train-x" / "status.json"
        status.parent.mkdir(parents=True)
        status.write_text('{"state": "running"}')
        assert main(["train", "--run", str(run_dir), "--job", "train-x"]) == 2
        assert "busy with job 'train-x'" in error_line(capsys)
        assert status.read_text() == '{"state": "running"}'
        assert (
            main(["select", "--run", str(run_dir), "--job", "select"]) == 2
        )  # another name: its refusal is recorded
        st = json.loads((run_dir / "jobs" / "select" / "status.json").read_text())
        assert st["state"] == "error" and "busy with job 'train-x'" in st["error"]
    finally:
        proc.kill()
        proc.wait()


# -- 3. SIGKILL at random points, then an exact resume ----------------------------------------
def test_sigkill_at_random_points_resumes_exactly(tmp_path, models, prompts, reference):
    root = tmp_path / "runs"
    rng = random.Random(int(os.environ.get("FAULT_SEED", "13")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "moe_core", *_argv(root, models["a"], prompts)]
    killed: list[bool] = []
    for attempt in range(2):
        kill_after = rng.randint(1, 4)  # routing files seen: mid-batch or between batches
        proc = subprocess.Popen(
            argv
            if attempt == 0
            else [
                *argv[:3],
                "--runs-root",
                str(root),
                "analyze",
                "--run",
                _only_run(root).name,
                "--max-new-tokens",
                "8",
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            routed = list(root.glob("*/routing/batch_*.safetensors"))
            if len(routed) >= kill_after + 2 * attempt:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        killed.append(proc.wait() == -signal.SIGKILL)
        run = Run.open(_only_run(root))
        assert run.status().get("analysis") in ("interrupted", "done"), (
            run.status()
        )  # never "running" for a dead pid
    assert killed[0] and Run.open(_only_run(root)).completed_batches() != set(
        range(6)
    )  # really cut mid-analysis
    assert (
        main(["--runs-root", str(root), "analyze", "--run", _only_run(root).name, "--max-new-tokens", "8"])
        == 0
    )
    run = Run.open(_only_run(root))
    assert run.status()["analysis"] == "done" and not list(run.path.rglob("*.tmp"))
    pd.testing.assert_frame_equal(tables(run.path), tables(reference))
    assert snapshot(run.path)["risk/aggregated.parquet"] == snapshot(reference)["risk/aggregated.parquet"]


# -- 7. errors that are errors ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "code,words", [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "no permission to write")]
)
def test_full_disk_and_permission_errors_are_one_line_and_resumable(
    tmp_path, models, prompts, reference, monkeypatch, capsys, code, words
):
    from moe_core.analysis import analyse as analysis

    real, calls = write_parquet, []

    def failing(path, df):
        calls.append(path)
        if len(calls) == 3:  # the third batch's risk table: the disk fills up mid-analysis
            raise OSError(code, os.strerror(code), str(path))
        return real(path, df)

    monkeypatch.setattr(analysis, "write_parquet", failing)
    root = tmp_path / "runs"
    assert main(_argv(root, models["a"], prompts)) == 2
    err = error_line(capsys)
    assert err.startswith(f"error: {words}") and "batch_00002.parquet" in err
    run = Run.open(_only_run(root))
    step = run.step("analysis")
    assert step["status"] == "failed" and "Errno" in step["reason"]
    assert run.completed_batches() == {0, 1} and not list(run.path.rglob("*.tmp"))
    monkeypatch.setattr(analysis, "write_parquet", real)
    assert main(["--runs-root", str(root), "analyze", "--run", run.id, "--max-new-tokens", "8"]) == 0
    pd.testing.assert_frame_equal(tables(run.path), tables(reference))


def test_a_failed_new_analysis_leaves_no_empty_run(tmp_path, prompts, capsys):
    root = tmp_path / "runs"
    rc = main(_argv(root, tmp_path / "no-such-model", prompts))
    assert rc == 2 and "no-such-model" in error_line(capsys)
    assert not root.exists() or not [p for p in root.iterdir() if p.is_dir()]


def test_steps_record_failed_and_running_only_for_a_live_process(tmp_path):
    run = Run.create(tmp_path, name="steps")
    run.set_step("old", "error", error="from an older version")
    run.set_step("dead", "running")
    m = json.loads(run.path_for("manifest").read_text())
    m["steps"]["dead"]["pid"] = 2**22 + 12345  # no such process
    run.path_for("manifest").write_text(json.dumps(m))
    run = Run.open(run.path)
    run.set_step("live", "running")
    assert run.status() == {"dead": "interrupted", "live": "running", "old": "error"}
    assert list_runs(tmp_path)[0].steps["dead"] == "interrupted"
    with pytest.raises(ZeroDivisionError):
        with run.writing("x"), step_outcome(run):
            raise ZeroDivisionError("division by zero")  # a bug in a step
    assert run.reload()["steps"]["live"]["status"] == "failed"
    assert run.step("live")["reason"] == "ZeroDivisionError: division by zero"
    assert diagnose(run, repair=True) and Run.open(run.path).status()["dead"] == "failed"


def test_runs_lists_readable_lines_and_names_broken_ones(tmp_path, capsys):
    run = Run.create(tmp_path, name="listed", model="organism")
    run.set_step("analysis", "done")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    assert main(["--runs-root", str(tmp_path), "runs"]) == 0
    out = capsys.readouterr().out
    assert f"{run.id}  'listed'  model organism" in out and "analysis done" in out
    assert "broken  DAMAGED:" in out and "doctor --run" in out and "RunSummary(" not in out


def test_a_broken_jsonl_line_is_named_by_its_number(tmp_path):
    from moe_core.batching.prompts import PromptLoadError, load_prompts

    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)) + '{"prompt": "x"\n')
    with pytest.raises(PromptLoadError, match="line 6 is not valid JSON"):
        load_prompts(f, label="safe")


def test_an_invalid_mask_file_is_named(tmp_path, reference, capsys):
    run = _damaged_copy(reference, tmp_path)
    (run.path / "masks").mkdir()
    (run.path / "masks" / "unsafe_experts.json").write_text('{"experts": {"0": [1,')
    assert main(["train", "--run", str(run.path)]) == 2
    assert "masks/unsafe_experts.json is not valid JSON" in error_line(capsys)


# -- 8. damaged runs: noticed, named, repaired --------------------------------------------------
def _damaged_copy(reference: Path, tmp_path: Path) -> Run:
    dst = tmp_path / "runs" / reference.name
    shutil.copytree(reference, dst)
    return Run.open(dst)


def test_truncated_routing_and_deleted_risk_are_redone_on_resume(tmp_path, reference):
    run = _damaged_copy(reference, tmp_path)
    routing = run.path_for("routing", batch_idx=2)
    routing.write_bytes(routing.read_bytes()[:-40])
    run.path_for("risk", batch_idx=4).unlink()  # what an older message advised for a damaged table
    assert main(["analyze", "--run", str(run.path), "--max-new-tokens", "8"]) == 0
    for b in (2, 4):
        redone, ref = (
            load_batch_routing(r / f"routing/batch_{b:05d}.safetensors") for r in (run.path, reference)
        )
        assert all((x.expert_ids == y.expert_ids).all() for x, y in zip(redone, ref)) and len(redone) == len(
            ref
        )
    pd.testing.assert_frame_equal(tables(run.path), tables(reference))


def test_doctor_lists_and_repairs_damaged_pieces(tmp_path, reference, capsys):
    run = _damaged_copy(reference, tmp_path)
    run.path_for("risk", batch_idx=1).write_bytes(b"PAR1 broken")
    out = run.path_for("outputs", batch_idx=3)
    out.write_text(out.read_text()[:50])
    run.path_for("risk_aggregated").write_bytes(b"")
    (run.path / "risk" / ".batch_00005.parquet.x1.tmp").write_bytes(b"half")
    (run.path / "masks").mkdir()
    (run.path / "masks" / "broken.json").write_text("{")
    capsys.readouterr()
    rc = main(["doctor", "--run", str(run.path), "--check-only"])
    printed = capsys.readouterr()
    assert rc == 2 and "problem(s)" in printed.err
    for piece in (
        "risk/batch_00001.parquet",
        "outputs/batch_00003.json",
        "risk/aggregated.parquet",
        "risk/.batch_00005.parquet.x1.tmp",
        "masks/broken.json",
    ):
        assert piece in printed.out, piece
    assert main(["doctor", "--run", str(run.path)]) == 2  # the mask needs a hand fix; the rest is repaired
    printed = capsys.readouterr().out
    assert "select --run" in printed and "masks/broken.json" in printed
    assert not list(run.path.rglob("*.tmp")) and run.completed_batches() == {0, 1, 2, 4, 5}
    ref_risk = read_parquet(reference / "risk" / "batch_00001.parquet")
    pd.testing.assert_frame_equal(
        read_parquet(run.path_for("risk", batch_idx=1)), ref_risk
    )  # recomputed exactly
    assert main(["analyze", "--run", str(run.path), "--max-new-tokens", "8"]) == 0  # redoes batch 3 only
    pd.testing.assert_frame_equal(tables(run.path), tables(reference))
    (run.path / "masks" / "broken.json").unlink()
    assert main(["doctor", "--run", str(run.path)]) == 0 and "no problems found" in capsys.readouterr().out


def test_doctor_writes_a_damaged_plan_again_from_the_recorded_prompts(tmp_path, reference, prompts, capsys):
    run = _damaged_copy(reference, tmp_path)
    original = run.path_for("plan").read_bytes()
    run.path_for("plan").write_text('{"batches": [')
    assert main(["select", "--run", str(run.path), "--n", "3"]) == 0  # select does not need the plan
    assert main(["doctor", "--run", str(run.path)]) == 0
    assert "repaired  plan.json" in capsys.readouterr().out
    assert json.loads(run.path_for("plan").read_text()) == json.loads(original)


def test_damaged_tables_and_steps_list_are_clear_errors(tmp_path, reference, capsys):
    run = _damaged_copy(reference, tmp_path)
    m = json.loads(run.path_for("manifest").read_text())
    m["steps"] = []
    run.path_for("manifest").write_text(json.dumps(m))
    assert Run.open(run.path).status() == {} and list_runs(tmp_path / "runs")[0].error is None
    run.path_for("risk_aggregated").write_bytes(b"PAR1 truncated")
    assert main(["select", "--run", str(run.path), "--n", "3"]) == 2
    err = error_line(capsys)
    assert "aggregated.parquet" in err and "doctor --run" in err
    assert main(["doctor", "--run", str(run.path)]) == 0
    assert json.loads(run.path_for("manifest").read_text())["steps"] == {}
    assert main(["select", "--run", str(run.path), "--n", "3"]) == 0


def test_moved_and_copied_runs_use_their_own_artifacts(tmp_path, reference, models):
    run = _damaged_copy(reference, tmp_path)
    merged = run.path / "train" / "t" / "merged_model"
    shutil.copytree(models["a"], merged)
    run.set_step("train:t", "done", merged=run.relative(merged))
    run.set_step("train:old", "done", merged=str(merged))  # how older versions stored it: absolute
    assert run.manifest["steps"]["train:t"]["merged"] == "train/t/merged_model"
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(run.path), moved)
    copied = tmp_path / "copy"
    shutil.copytree(moved, copied)
    for where in (moved, copied):
        entries = P.eval_entries(P.EvaluateSpec(), Run.open(where))
        paths = {e.name: Path(e.model_dir) for e in entries if e.name != "base"}
        assert paths == {"t": where / "train/t/merged_model", "old": where / "train/t/merged_model"}
        assert all((p / "config.json").is_file() for p in paths.values())
        assert diagnose(Run.open(where)) == []


def test_shipped_streamlit_config_hides_tracebacks():
    import tomllib

    cfg = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert cfg["client"]["showErrorDetails"] == "none"


def test_runs_page_names_damaged_files_and_repairs_them(tmp_path, reference, monkeypatch):
    """The Runs page with damaged files: messages naming them (tracebacks hidden), and the doctor button."""
    from tests.test_app import button, errors, no_exceptions, open_app

    monkeypatch.setenv("MOE_LAB_RUNS", str(tmp_path / "runs"))
    run = _damaged_copy(reference, tmp_path)
    run.path_for("outputs", batch_idx=0).write_text('{"batch_idx": 0, "samples": [')
    (run.path / "train" / "t").mkdir(parents=True)
    (run.path / "train" / "t" / "training_metadata.json").write_text("{")
    other = Run.create(tmp_path / "runs", name="no steps")
    m = json.loads(other.path_for("manifest").read_text())
    m["steps"] = []
    other.path_for("manifest").write_text(json.dumps(m))
    at = open_app(run, page="runs")
    no_exceptions(at)
    shown = " ".join(errors(at))
    assert "training_metadata.json is not valid JSON" in shown and "outputs/batch_00000.json" in shown
    table = at.dataframe[0].value  # the runs table lists both runs, the one without steps too
    assert set(table["id"]) == {run.id, other.id}
    doctor = [d.value for d in at.dataframe if "piece" in d.value.columns][0]
    assert {"outputs/batch_00000.json", "train/t/training_metadata.json"} <= set(doctor["piece"])
    button(at, "Repair what can be recomputed").click()
    at.run()
    no_exceptions(at)
    assert any("Repaired" in s.value for s in at.success)
    assert 0 not in Run.open(run.path).completed_batches()  # removed: a resume redoes it


def test_analysis_page_resumes_a_local_model_run_with_that_model(tmp_path, models, prompts, monkeypatch):
    """The page relaunched runs made with a local model as `--model organism`; now the run's model is fixed."""
    from moe_core import jobs
    from moe_core.analysis.analyse import analysis_config_of
    from tests.test_app import button, no_exceptions, open_app

    monkeypatch.setenv("MOE_LAB_RUNS", str(tmp_path / "runs"))
    run_dir = _partial(tmp_path, models, prompts)
    launched = []
    monkeypatch.setattr(jobs, "start_step", lambda run, name, spec, env=None: launched.append(spec))
    at = open_app(Run.open(run_dir), page="analysis")
    no_exceptions(at)
    assert not [
        r for r in at.radio if r.key == "an_model_kind"
    ]  # no model choice for a run with finished batches
    box = at.number_input(key="an_max_new")  # the run's recorded setting, fixed for a resume (issue 20 row 8)
    assert box.disabled and box.value == analysis_config_of(Run.open(run_dir)).max_new_tokens
    button(at, "Resume analysis").click()
    at.run()
    no_exceptions(at)
    assert [s.model for s in launched] == [str(models["a"])]


DAMAGE = {  # artifact (relative to the run) -> what a torn write or a bad edit leaves in it
    "plan.json": "{",
    "outputs/batch_00000.json": '{"batch_idx": 0, "samples": [',
    "risk/per_batch.parquet": b"PAR1 torn",
    "risk/aggregated.parquet": b"PAR1 torn",
    "masks/unsafe_experts.json": '{"experts": {"0": "12"}}',
    "train/experts-unsafe_experts/training_metadata.json": "[1, 2]",
    "train/experts-unsafe_experts/batch_monitor.jsonl": "{",
    "eval/comparison_responses.parquet": b"PAR1 torn",
}


@pytest.mark.parametrize("piece", sorted(DAMAGE))
def test_every_page_names_a_damaged_artifact_instead_of_crashing(piece, tmp_path_factory, monkeypatch):
    """Each kind of damaged file, on every page of the app: a message (or the page's other content), no exception."""
    from tests.app_fixtures import MASK_NAME, build_finished_run, save_tiny_model
    from tests.test_app import FILES, open_app

    assert MASK_NAME == "unsafe_experts"
    base = tmp_path_factory.getbasetemp() / "finished_for_damage"
    if not base.exists():  # one trained and evaluated run, copied for each kind of damage
        build_finished_run(base / "runs", save_tiny_model(base / "tiny"), n_batches=2, evaluate=True)
    src = next((base / "runs").iterdir())
    run = _damaged_copy(src, tmp_path_factory.mktemp("damaged"))
    target = run.path / piece
    assert target.exists(), sorted(str(p.relative_to(run.path)) for p in run.path.rglob("*") if p.is_file())
    data = DAMAGE[piece]
    target.write_bytes(data) if isinstance(data, bytes) else target.write_text(data)
    monkeypatch.setenv("MOE_LAB_RUNS", str(run.path.parent))
    for page in FILES:
        at = open_app(run, page=None if page == "home" else page)
        assert not at.exception, (page, [e.value for e in at.exception])


def test_the_weight_fingerprint_sees_one_trained_expert_in_every_family():
    """Provenance must tell a model from the same model with one expert fine-tuned (what this lab makes)."""
    import torch

    from moe_core.store.provenance import model_fingerprint
    from tests.tiny import tiny_model

    many = {
        "olmoe": {"num_experts": 128},
        "qwen3_moe": {"num_experts": 128},
        "gpt_oss": {"num_local_experts": 128},
    }
    for family, experts in many.items():  # as many experts as Qwen3-MoE: more than values sampled per tensor
        model = tiny_model(family, **experts)
        before = model_fingerprint(model)
        assert model_fingerprint(model) == before
        fused = [(n, p) for n, p in model.named_parameters() if n.endswith("experts.gate_up_proj")]
        name, p = fused[-1]
        with torch.no_grad():
            p[1] += 1e-3  # expert 1 of the last layer, every value nudged as training does
        assert model_fingerprint(model) != before, (family, name)


# -- issue 21: inputs mean one thing --------------------------------------------------------------
def test_r8_a_mask_key_written_twice_is_refused_not_dropped(tmp_path):
    """Row 8: {"1": [1, 2], "01": [3]} used to keep one of the two silently; now the file is refused, naming
    both keys, and the same holds inside per-batch masks."""
    from moe_core.analysis.masks import ExpertMask, MaskError, load_batch_masks

    path = tmp_path / "m.json"
    path.write_text(json.dumps({"num_layers": 4, "num_experts": 8, "experts": {"1": [1, 2], "01": [3]}}))
    with pytest.raises(MaskError, match="'1' and '01' both mean 1"):
        ExpertMask.load(path)
    batches = {"0": {"2": [1]}, "00": {"2": [2]}}
    fmt = "moe-safety-lab/batch-expert-masks@1"
    path.write_text(json.dumps({"format": fmt, "num_layers": 4, "num_experts": 8, "batches": batches}))
    with pytest.raises(MaskError, match="both mean 0"):
        load_batch_masks(path)
    assert (
        ExpertMask.from_json_dict({"num_layers": 4, "num_experts": 8, "experts": {"1": [1, 2]}}).count() == 2
    )


def test_r10_a_mask_claiming_a_huge_shape_is_refused_before_anything_is_allocated(tmp_path, capsys):
    """Row 10: num_layers / num_experts of 1e6 gave numpy's memory error; now one line, nothing allocated."""
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"num_layers": 10**6, "num_experts": 10**6, "experts": {"1": [1]}}))
    import tracemalloc

    from moe_core.analysis.masks import ExpertMask, MaskError

    tracemalloc.start()
    with pytest.raises(MaskError, match="less than or equal to 4096"):
        ExpertMask.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50_000_000  # a 1e6 x 1e6 bool grid would need a terabyte


def test_r9_a_prompt_column_holding_other_types_than_text_is_refused_naming_the_rows(tmp_path):
    """Row 9: JSONL with 123 / true / a list, and a Parquet list or struct column, became prompts like
    "['a', 'b']"; now the file is refused, naming the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moe_core.batching.prompts import PromptLoadError, load_prompts

    jsonl = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "How do I bake bread?"}, {"prompt": 123}, {"prompt": True}, {"prompt": ["a", "b"]}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(
        PromptLoadError, match=r"3 row\(s\) hold something else: row 1 \(int\), row 2 \(bool\), row 3"
    ):
        load_prompts(jsonl, label="safe")
    for name, column in (
        ("list", pa.array([["a", "b"], ["c"]])),
        ("struct", pa.array([{"text": "x", "n": 0}] * 2)),
    ):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"prompt": column}), path)
        with pytest.raises(PromptLoadError, match="must hold text"):
            load_prompts(path, label="unsafe")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": None}) + "\n")
    assert [it.text for it in load_prompts(good, label="safe")] == ["Hi"]  # a missing prompt is still dropped


def test_r7_a_manifest_path_into_another_run_is_refused_and_named_by_doctor(tmp_path, capsys):
    """Row 7: a trained-model path pointing into another run (../../X/train/...) was evaluated under this run's
    name and doctor found nothing; now every path to the run's own artifacts must resolve inside the run."""
    from moe_core.cli import main
    from moe_core.doctor import diagnose
    from moe_core.store.files import RunError

    root = tmp_path / "runs"
    other = Run.create(root, name="other")
    (other.path / "train" / "theirs" / "merged").mkdir(parents=True)
    run = Run.create(root, name="mine")
    run.set_step("train:stolen", "done", merged=f"../{other.path.name}/train/theirs/merged")
    with pytest.raises(RunError, match="points outside the run"):
        run.reload()
        run.trainings()
    found = diagnose(run)
    assert [f.path for f in found] == ["manifest.json (steps.train:stolen.merged)"]
    assert main(["--runs-root", str(root), "evaluate", "--run", run.path.name, "--eval-limit", "1"]) == 2
    assert "points outside the run" in capsys.readouterr().err
    run.set_step("train:stolen", "done", merged="train/stolen/merged")  # inside: fine again
    assert run.trainings()["stolen"]["merged"] == str(run.path / "train" / "stolen" / "merged")


# -- issue 21: bounded work ---------------------------------------------------------------------------
def test_r4_a_prompt_longer_than_the_context_is_refused_before_any_model_call(tmp_path, capsys):
    """Row 4: a 5 MB line took 72 s and 12 GB before a traceback, a 380 KB one was killed by the OOM killer.
    Now both are one line (exit 2) before the model sees a batch, the 5 MB one without even tokenizing it,
    and a failed new analysis leaves no run behind."""
    import time
    import tracemalloc

    from moe_core.cli import main
    from tests.app_fixtures import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")  # max_position_embeddings 256
    safe = tmp_path / "safe.txt"
    safe.write_text("\n".join(f"How do I bake bread number {i}?" for i in range(4)) + "\n")
    root = tmp_path / "runs"
    for size, why in ((5_000_000, "characters, more than the model's context"), (380_000, "characters")):
        unsafe = tmp_path / f"unsafe-{size}.txt"
        unsafe.write_text("How to " + "x " * (size // 2) + "\nTell me a secret.\n")
        argv = ["--runs-root", str(root), "analyze", "--model", str(model_dir), "--safe", str(safe)]
        argv += ["--unsafe", str(unsafe), "--batch-size", "2", "--max-new-tokens", "2"]
        tracemalloc.start()
        t0 = time.monotonic()
        assert main(argv) == 2
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err, err
        assert peak < 500_000_000 and time.monotonic() - t0 < 120  # bounded by the context, not the input
    assert not root.exists() or not any(root.iterdir())
    mid = tmp_path / "unsafe-mid.txt"
    mid.write_text("Explain " + "word " * 300 + "\n")  # fewer characters than the bound, more tokens than fit
    argv = ["--runs-root", str(root), "analyze", "--model", str(model_dir), "--safe", str(safe)]
    assert main(argv + ["--unsafe", str(mid), "--batch-size", "2"]) == 2
    assert "tokens, the model's context is 256" in capsys.readouterr().err


def test_r5_max_new_tokens_is_capped_by_the_model_context():
    """Row 5: --max-new-tokens 100000 with a model whose answers never stop ran for 11 minutes; the answer
    now ends where the context does."""
    from moe_core.model.generation import fit_context, generate
    from tests.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model("olmoe", seed=5), tiny_tokenizer()
    model.generation_config.eos_token_id = None  # answers that never stop
    tok_eos, tok.eos_token = tok.eos_token, None
    try:
        messages = [[{"role": "user", "content": "Tell me a long story."}]]
        cap = fit_context(model, tok, messages, 100_000)
        assert 1 <= cap < 256
        (answer,) = generate(model, tok, messages, max_new_tokens=100_000)
        assert len(answer.prompt_ids) + len(answer.new_ids) <= 256
    finally:
        tok.eos_token = tok_eos


# -- issue 21: a real full disk -------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    """A real 8 MB tmpfs (as root; the test says why it skips elsewhere); ``_fill`` fills it up."""
    mnt = tmp_path / "tiny-disk"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("a real full disk needs a tmpfs mount (root); this machine refused it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path) -> None:
    with open(mnt / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


def test_r2_a_real_full_disk_under_safetensors_is_a_disk_full_error(tiny_disk, tmp_path, capsys):
    """Row 2: safetensors raises its own SafetensorError on a full disk, which the disk-full handler never saw
    (traceback, "internal error", exit 1). Real fault: a full tmpfs. Now it is an OSError(ENOSPC) wherever we
    write safetensors (routing files, expert deltas, merged models) and the CLI prints one line, exit 2."""
    import numpy as np

    from moe_core.cli import main
    from moe_core.model.routing import SampleRouting, save_batch_routing
    from moe_core.store.files import os_error_message
    from tests.app_fixtures import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")
    common = ["--runs-root", str(tiny_disk)]
    argv = ["analyze", "--model", str(model_dir), "--demo-sets", "--batch-size", "8", "--max-batches", "2"]
    assert main(common + argv + ["--max-new-tokens", "2", "--name", "d"]) == 0
    (run_dir,) = [p for p in tiny_disk.iterdir() if p.is_dir()]
    assert main(common + ["select", "--run", run_dir.name, "--n", "2"]) == 0
    _fill(tiny_disk)
    ids = np.zeros((2, 4000, 8), dtype=np.uint8)
    sample = SampleRouting(ids, None, np.zeros(4000, dtype=np.int32), np.zeros(4000, dtype=np.uint8))
    with pytest.raises(OSError) as e:
        save_batch_routing(tiny_disk / "routing.safetensors", [sample], moe_layers=[0, 1], keep_weights=False)
    assert e.value.errno == errno.ENOSPC and "disk is full" in os_error_message(e.value)
    assert not list(tiny_disk.glob(".routing*"))  # no temp file left
    capsys.readouterr()
    train = common + ["train", "--run", run_dir.name, "--epochs", "1", "--checkpoint-every", "1000"]
    assert main(train) == 2
    err = capsys.readouterr().err
    assert ("No space left on device" in err or "disk is full" in err) and "internal error" not in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    (tiny_disk / "filler").unlink()  # space again: the same command now trains
    assert main(train) == 0
