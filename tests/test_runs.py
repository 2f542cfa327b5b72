"""Run store: run folders, manifest, atomic writes, artifacts, resume and jobs (a few seconds)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest

import moe_core
from moe_core.store import run as runs
from moe_core.store.atomic import atomic_write, atomic_write_json
from moe_core.store.events import (
    JobEvents,
    JobStopped,
    job_state,
    latest_progress,
    pid_alive,
    read_events,
)
from moe_core.store.files import (
    RunError,
    read_json,
    read_parquet,
    write_json,
    write_parquet,
)
from moe_core.store.manifest import default_runs_root, list_runs
from moe_core.store.run import Job, JobBusyError, Run

REPO = Path(__file__).resolve().parents[1]


def utc(s: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(s)
    assert t.utcoffset() == dt.timedelta(0)
    return t


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# -- runs and manifest ----------------------------------------------------------------------
def test_create_open_and_manifest(tmp_path):
    cfg = {"batch_size": 16, "safe_ratio": 0.5, "seed": 3, "split_seed": 9, "scope": "generated"}
    run = Run.create(tmp_path, name="OLMoE on AdvBench!", config=cfg, model="tiny/olmoe")
    assert run.path.parent == tmp_path and run.path.is_dir()
    assert run.id.endswith("-olmoe-on-advbench") and run.id[:8].isdigit() and run.id == run.path.name
    m = json.loads((run.path / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["id"] == run.id and m["name"] == "OLMoE on AdvBench!"
    assert m["config"] == cfg and m["model"] == "tiny/olmoe"
    assert m["seeds"] == {"seed": 3, "split_seed": 9}
    assert utc(m["created"]) == utc(m["updated"])
    assert abs(utc(m["created"]) - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=5)
    v = m["versions"]
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    assert v["moe_core"] == moe_core.__version__
    for pkg in ("torch", "transformers", "datasets", "numpy", "pandas"):
        assert v[pkg] and v[pkg][0].isdigit()
    assert v["numpy"] == np.__version__ and v["pandas"] == pd.__version__
    assert m["steps"] == {} and m["notes"] == ""
    assert Run.open(run.path).manifest == m


def test_ids_are_unique_and_config_must_be_json(tmp_path):
    made = [Run.create(tmp_path, name="same") for _ in range(3)]
    assert len({r.id for r in made}) == 3
    assert Run.create(tmp_path).id.endswith("-run")
    with pytest.raises(RunError, match="run config must be JSON-serialisable"):
        Run.create(tmp_path, config={"model": object()})
    with pytest.raises(RunError, match="run config must be JSON-serialisable"):
        made[0].update(config={"fn": print})
    assert Run.open(made[0].path).manifest == made[0].manifest


def test_set_step_merges_and_updates(tmp_path):
    run = Run.create(tmp_path, name="steps")
    created = run.manifest["created"]
    run.set_step("analysis", "running", job="analysis", total=12)
    run.set_step("analysis", "done", batches=12)
    run.update(notes="layer 7 looks interesting")
    again = Run.open(run.path)
    step = again.step("analysis")
    assert step["status"] == "done" and step["job"] == "analysis" and step["batches"] == 12
    assert utc(step["started"]) <= utc(step["updated"])
    assert again.manifest["notes"] == "layer 7 looks interesting"
    assert utc(again.manifest["updated"]) >= utc(created) and again.manifest["created"] == created
    with pytest.raises(RunError, match="unknown step status"):
        run.set_step("analysis", "finished")
    with pytest.raises(RunError, match="cannot update"):
        run.update(id="other")


# A manifest exactly as the code before the pydantic schema wrote it: it must keep opening.
OLD_MANIFEST = {
    "format": "moe-safety-lab/run@1",
    "format_version": 1,
    "id": "20260105-142233-olmoe-advbench",
    "name": "olmoe advbench",
    "created": "2026-01-05T14:22:33.000+00:00",
    "updated": "2026-01-05T15:00:00.000+00:00",
    "model": "allenai/OLMoE-1B-7B-0125-Instruct",
    "config": {"batch_size": 16, "seed": 0},
    "seeds": {"seed": 0},
    "versions": {"python": "3.11.9", "torch": "2.13.0", "pyarrow": None},
    "steps": {
        "analysis": {"status": "done", "updated": "2026-01-05T15:00:00.000+00:00", "job": "analysis"},
        "train:experts": {"status": "running", "started": "2026-01-05T15:00:00.000+00:00"},
    },
    "notes": "",
    "trainings_note": "a key a later version added",
}


def test_manifest_schema_reads_old_files_and_names_a_bad_field(tmp_path):
    d = tmp_path / OLD_MANIFEST["id"]
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps(OLD_MANIFEST))
    run = Run.open(d)
    assert run.manifest == OLD_MANIFEST  # read as it is, unknown keys kept
    run.set_step("select", "done")
    assert json.loads((d / "manifest.json").read_text())["trainings_note"] == "a key a later version added"

    for field, bad in [
        ("steps", ["analysis"]),
        ("id", 7),
        ("config", "batch_size=16"),
        ("steps", {"a": "done"}),
    ]:
        (d / "manifest.json").write_text(json.dumps({**OLD_MANIFEST, field: bad}))
        with pytest.raises(RunError, match=rf"manifest.json is not a valid run manifest: {field}\b"):
            Run.open(d)
        assert [s.error for s in list_runs(tmp_path)][0].startswith(str(d / "manifest.json"))
    (d / "manifest.json").write_text(json.dumps(OLD_MANIFEST))
    before = (d / "manifest.json").read_bytes()
    with pytest.raises(RunError, match="name"):
        Run.open(d).update(name=["not", "a", "name"])  # refused before anything is written
    assert (d / "manifest.json").read_bytes() == before


def test_a_stuck_lock_is_a_clear_error_not_a_hang(tmp_path, monkeypatch):
    import filelock

    run = Run.create(tmp_path, name="locked")
    monkeypatch.setattr(runs, "LOCK_TIMEOUT_S", 0.2)
    holder = filelock.FileLock(str(run.path / ".manifest.lock"))
    with holder:  # another process in the middle of an update (flock locks conflict across handles)
        with pytest.raises(RunError, match="stayed locked"):
            run.set_step("analysis", "done")
        with pytest.raises(JobBusyError, match="already queued"):  # the job lock is a different file
            run.job("a").queue()
            run.job("a").queue()
    run.set_step("analysis", "done")  # released: works again
    assert Run.open(run.path).step("analysis")["status"] == "done"


def test_pid_checks_guard_against_a_recycled_pid():
    from moe_core.store.jobs import _launched_alive

    now = time.time()
    assert pid_alive(os.getpid()) and pid_alive(os.getpid(), started=now)
    assert not pid_alive(
        os.getpid(), started=now - 3600
    )  # this process began after that job: another program
    assert not pid_alive(-1) and not pid_alive(2**22 + 12345)
    me = {
        "state": "running",
        "pid": os.getpid(),
        "host": os.uname().nodename,
        "heartbeat": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(),
    }
    started_long_ago = dt.datetime.fromtimestamp(now - 3600, dt.timezone.utc).isoformat()
    assert (
        job_state({**me, "started": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat()}, now=now)
        == "running"
    )
    assert job_state({**me, "started": started_long_ago}, now=now) == "dead"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "moe_core-job"])
    try:
        launched = time.time()
        deadline = (
            time.monotonic() + 10
        )  # until exec: a just-forked child still shows the parent's command line
        while (
            "moe_core-job" not in " ".join(psutil.Process(child.pid).cmdline())
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert _launched_alive(child.pid, launched) and _launched_alive(child.pid)
        assert not _launched_alive(child.pid, launched - 3600)  # recorded launch older than the process
        child.kill()
        deadline = time.monotonic() + 10
        while pid_alive(child.pid) and time.monotonic() < deadline:  # a zombie until reaped: not alive
            time.sleep(0.05)
        assert not pid_alive(child.pid) and not _launched_alive(child.pid, launched)
    finally:
        child.kill()
        child.wait()


def test_manifest_survives_a_crash_mid_write(tmp_path, monkeypatch):
    run = Run.create(tmp_path, name="crash")
    before = (run.path / "manifest.json").read_bytes()

    def crash(fd):  # the temp file is fully written, the rename has not happened yet
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(runs.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        run.set_step("analysis", "done")
    monkeypatch.undo()
    assert (run.path / "manifest.json").read_bytes() == before
    assert temp_files(run.path) == []
    assert Run.open(run.path).step("analysis") is None


def test_atomic_write_half_written_file_never_visible(tmp_path):
    target = tmp_path / "risk" / "aggregated.json"
    atomic_write_json(target, {"version": 1})

    def half(p: Path) -> None:
        p.write_text('{"version": 2, "rows": [1, 2,')
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, half)
    assert read_json(target) == {"version": 1}
    assert temp_files(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_atomic_write_under_sigkill_keeps_old_file(tmp_path):
    """A process killed mid-write leaves the old artifact whole; readers ignore its temp file."""
    run = Run.create(tmp_path, name="kill")
    target = run.path_for("outputs", batch_idx=4)
    write_json(target, {"answers": ["old"]})
    child = textwrap.dedent(f"""
        import time
        from moe_core.store.atomic import atomic_write
        def slow(p):
            with open(p, "w") as f:
                f.write('{{"answers": ["new, half')
                f.flush()
                time.sleep(60)
        atomic_write({str(target)!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO)
    try:
        for _ in range(600):
            if temp_files(target.parent) or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert temp_files(target.parent), "the child never started writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert read_json(target) == {"answers": ["old"]}
    assert run.completed_batches() == {4}


# -- listing --------------------------------------------------------------------------------
def test_list_runs_newest_first_and_broken_dirs(tmp_path):
    old = Run.create(tmp_path, name="old")
    new = Run.create(tmp_path, name="new")
    m = json.loads((old.path / "manifest.json").read_text())
    m["created"] = "2020-01-01T00:00:00.000+00:00"
    (old.path / "manifest.json").write_text(json.dumps(m))
    new.set_step("analysis", "error", error="OOM")
    (tmp_path / "no-manifest").mkdir()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "manifest.json").write_text("{not json")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "stray.txt").write_text("x")

    found = list_runs(tmp_path)
    assert {s.id for s in found} == {old.id, new.id, "no-manifest", "garbage"}
    good = [s for s in found if s.error is None]
    assert [s.id for s in good] == [new.id, old.id]
    assert good[0].steps == {"analysis": "error"} and good[0].name == "new"
    broken = {s.id: s.error for s in found if s.error}
    assert "not a run directory" in broken["no-manifest"]
    assert "damaged" in broken["garbage"]
    with pytest.raises(RunError, match="not a run directory"):
        Run.open(tmp_path / "no-manifest")
    assert list_runs(tmp_path / "absent") == []


def test_default_runs_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_LAB_RUNS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_runs_root() == (tmp_path / "runs").resolve()
    monkeypatch.setenv("MOE_LAB_RUNS", str(tmp_path / "elsewhere"))
    assert default_runs_root() == tmp_path / "elsewhere"


# -- artifacts ------------------------------------------------------------------------------
def test_path_for(tmp_path):
    run = Run.create(tmp_path, name="paths")
    p = run.path
    assert run.path_for("plan") == p / "plan.json"
    assert run.path_for("routing", batch_idx=12) == p / "routing" / "batch_00012.safetensors"
    assert run.path_for("outputs", batch_idx=np.int64(12)) == p / "outputs" / "batch_00012.json"
    assert run.path_for("risk", batch_idx=12) == p / "risk" / "batch_00012.parquet"
    assert run.path_for("risk_aggregated") == p / "risk" / "aggregated.parquet"
    assert run.path_for("risk_per_batch") == p / "risk" / "per_batch.parquet"
    assert run.path_for("mask", name="top32") == p / "masks" / "top32.json"
    assert run.path_for("sft") == p / "sft" and run.path_for("eval") == p / "eval"
    assert run.path_for("train", name="experts-top32") == p / "train" / "experts-top32"
    assert run.path_for("routing", batch_idx=123456).name == "batch_123456.safetensors"
    for bad in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(RunError, match="invalid mask name"):
            run.path_for("mask", name=bad)
    for bad_idx in (None, -1, 1.5, True):
        with pytest.raises(RunError, match="pass batch_idx"):
            run.path_for("risk", batch_idx=bad_idx)
    with pytest.raises(RunError, match="unknown artifact kind"):
        run.path_for("weights")


def test_parquet_round_trip(tmp_path):
    df = pd.DataFrame(
        {
            "layer": np.array([0, 0, 3], dtype=np.int64),
            "expert": np.array([5, 7, 1], dtype=np.int32),
            "risk_diff": np.array([0.25, -0.125, 0.5], dtype=np.float32),
            "label": ["unsafe", "safe", "unsafe"],
            "consistent": [True, False, True],
            "note": ["a", None, "c"],
        }
    )
    subset = df[df.layer == 0]  # index 0, 1 and ...
    df = df.iloc[[2, 0, 1]]  # ... a shuffled index must not be written either
    path = write_parquet(tmp_path / "risk" / "aggregated.parquet", df)
    assert pq.read_schema(path).names == list(df.columns)  # no __index_level_0__
    back = read_parquet(path)
    pd.testing.assert_frame_equal(back, df.reset_index(drop=True))
    assert read_parquet(path, columns=["expert"]).expert.tolist() == [1, 5, 7]
    write_parquet(path, subset)
    assert len(read_parquet(path)) == 2 and temp_files(tmp_path) == []
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(RunError, match="not a readable Parquet file"):
        read_parquet(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError):
        read_parquet(tmp_path / "none.parquet")


def test_json_helpers(tmp_path):
    path = write_json(
        tmp_path / "outputs" / "batch_00001.json", {"n": np.int64(3), "x": np.float32(0.5), "a": np.arange(2)}
    )
    assert read_json(path) == {"n": 3, "x": 0.5, "a": [0, 1]}
    path.write_text('{"n": 3, "x"')
    with pytest.raises(RunError, match="not valid JSON"):
        read_json(path)


def test_completed_batches_counts_only_final_artifacts(tmp_path):
    run = Run.create(tmp_path, name="resume")
    assert run.completed_batches() == set()
    for b in (0, 1, 2):
        atomic_write(run.path_for("routing", batch_idx=b), lambda p: p.write_bytes(b"\0"))
    for b in (0, 1):
        write_parquet(run.path_for("risk", batch_idx=b), pd.DataFrame({"x": [b]}))
    write_json(run.path_for("outputs", batch_idx=0), [])
    out = run.path_for("outputs", batch_idx=0).parent
    (out / ".batch_00001.json.k2j3.tmp").write_text("{")  # a writer died mid-write
    (out / "batch_7.json").write_text("[]")  # not our naming
    (out / "notes.txt").write_text("x")
    (out / "batch_00009.json").mkdir()  # not a file
    assert run.completed_batches() == {0}
    assert run.completed_batches("risk") == {0, 1}
    assert run.completed_batches("routing") == {0, 1, 2}
    with pytest.raises(RunError, match="not a per-batch artifact"):
        run.completed_batches("risk_aggregated")


# -- jobs -----------------------------------------------------------------------------------
def test_events_written_and_read_back(tmp_path):
    run = Run.create(tmp_path, name="events")
    d = run.job_dir("analysis")
    assert d == run.path / "jobs" / "analysis" and d.is_dir()
    ev = JobEvents(d / "events.jsonl")
    ev.emit("start", 0, 3, "go")
    for i in range(1, 4):
        ev.progress(i, 3, f"batch {i}")
    ev.log("note")
    got = read_events(d / "events.jsonl")
    assert [e["kind"] for e in got] == ["start", "progress", "progress", "progress", "log"]
    assert [e["done"] for e in got[1:4]] == [1, 2, 3] and got[3]["total"] == 3
    assert got[3]["message"] == "batch 3"
    assert all(set(e) >= {"time", "kind", "done", "total", "message"} for e in got)
    utc(got[0]["time"])
    assert latest_progress(got) == {"kind": "log", "done": 3, "total": 3, "message": "note"}
    with pytest.raises(RunError, match="unknown event kind"):
        ev.emit("finished")


def test_read_events_tolerates_a_torn_line(tmp_path):
    path = tmp_path / "events.jsonl"
    ev = JobEvents(path)
    ev.progress(1, 4, "a")
    with open(path, "ab") as f:  # a writer killed mid-line
        f.write(b'{"time": "2026-01-01T00:00:00+00:00", "kind": "progr')
    assert [e["done"] for e in read_events(path)] == [1]
    ev.progress(2, 4, "b")  # the next writer starts on a fresh line
    assert [e["done"] for e in read_events(path)] == [1, 2]
    assert read_events(tmp_path / "none.jsonl") == []


def test_job_lifecycle_done_error_and_stop(tmp_path):
    run = Run.create(tmp_path, name="jobs")
    job = run.job("analysis")
    assert job.state() == "none"
    job.queue(batches=4)
    assert job.state() == "queued" and job.read_status()["batches"] == 4
    with pytest.raises(JobBusyError, match="already queued"):
        job.queue()
    with job.running(total=2, message="analysis") as events:
        st = job.read_status()
        assert st["state"] == "running" and st["pid"] == os.getpid()
        assert job.state() == "running"
        events.progress(1, 2)
        events.progress(2, 2)
    assert job.state() == "done"
    assert [e["kind"] for e in job.events.read()] == ["start", "progress", "progress", "done"]

    job.queue()
    with pytest.raises(ValueError, match="bad input"):
        with job.running(total=2):
            raise ValueError("bad input")
    st = job.read_status()
    assert st["state"] == "error" and "ValueError: bad input" in st["error"]
    assert job.events.read()[-1]["kind"] == "error"

    job.queue()
    assert not job.stop_requested()
    job.request_stop()
    assert job.stop_requested() and (job.path / "STOP").is_file()
    done = 0
    with job.running(total=10) as events:
        for i in range(10):
            if job.stop_requested():
                raise JobStopped(f"stopped at batch {i}")
            done += 1
    assert done == 0 and job.state() == "stopped" and not job.stop_requested()
    assert latest_progress(job.events.read())["kind"] == "stopped"
    job.request_stop()
    job.queue()  # a new attempt clears an old stop request
    assert not job.stop_requested()


def test_heartbeat_thread_keeps_a_long_step_alive(tmp_path):
    job = Job(tmp_path / "train", heartbeat_every_s=0.05)
    with job.running(total=1):
        first = job.read_status()["heartbeat"]
        deadline = time.monotonic() + 30
        while job.read_status()["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.02)  # a long batch that emits nothing
        assert job.read_status()["heartbeat"] != first
    assert job.read_status()["state"] == "done"  # the beater never overwrote the final state


def test_job_state_from_pid_and_heartbeat():
    now = time.time()
    fresh = dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat()
    me = {"state": "running", "pid": os.getpid(), "host": os.uname().nodename, "heartbeat": fresh}
    assert job_state(None) == "none"
    assert job_state(me, now=now) == "running"
    assert job_state(me, stale_after_s=60, now=now + 61) == "dead"  # hung: no heartbeat
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert job_state({**me, "pid": gone.pid}, now=now) == "dead"  # process exited
    assert job_state({**me, "pid": gone.pid, "host": "another-machine"}, now=now) == "running"
    assert job_state({"state": "queued", "heartbeat": fresh}, stale_after_s=60, now=now + 61) == "dead"
    for final in ("done", "error", "stopped"):
        assert job_state({**me, "state": final}, now=now + 1e6) == final


def test_background_job_stops_on_request(tmp_path):
    """The app's path: queue, start a worker process, ask it to stop, see it stop between batches."""
    run = Run.create(tmp_path, name="bg")
    job = run.job("analysis")
    job.queue()
    worker = textwrap.dedent(f"""
        import time
        from moe_core.store.run import Run; from moe_core.store.events import JobStopped
        job = Run.open({str(run.path)!r}).job("analysis")
        with job.running(total=10_000) as events:
            for b in range(10_000):
                if job.stop_requested():
                    raise JobStopped(f"stopped before batch {{b}}")
                time.sleep(0.01)
                events.progress(b + 1, 10_000, f"batch {{b}}")
    """)
    proc = subprocess.Popen([sys.executable, "-c", worker], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while latest_progress(job.events.read())["done"] < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, "worker died"
            time.sleep(0.05)
        assert job.state() == "running"
        job.request_stop()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert job.state() == "stopped"
    last = job.events.read()[-1]
    assert last["kind"] == "stopped" and last["message"].startswith("stopped before batch")
    assert 3 <= latest_progress(job.events.read())["done"] < 10_000


def test_writer_lease_nests_in_one_thread_and_refuses_another(tmp_path):
    import threading

    from moe_core.store.lease import LEASE, RunBusyError, holder

    run = Run.create(tmp_path, name="lease")
    with run.writing("outer"):
        with run.writing("inner"):  # the demo: its steps take the run again
            assert holder(run.path)["job"] == "outer"
        assert (run.path / LEASE).exists()  # still held by the outer block
        seen = []
        t = threading.Thread(
            target=lambda: seen.append(pytest.raises(RunBusyError, run.writing("x").__enter__))
        )
        t.start()
        t.join()
        assert seen and "busy with job 'outer'" in str(seen[0].value)
    assert not (run.path / LEASE).exists() and holder(run.path) is None


def test_manifest_paths_are_relative_and_resolve_where_the_run_is(tmp_path):
    run = Run.create(tmp_path / "a", name="paths")
    inside = run.path / "train" / "x" / "merged_model"
    assert run.relative(inside) == "train/x/merged_model"
    assert run.relative("/models/base") == "/models/base"  # outside the run: kept as given
    assert run.resolve("train/x/merged_model") == inside
    assert (
        run.resolve("/old/place/runs/r1/train/x/merged_model") == inside
    )  # an older absolute path, moved run
    assert run.resolve(None) is None
    with pytest.raises(
        RunError, match="points outside the run"
    ):  # a run's own artifact never lives elsewhere
        run.resolve("/models/base")


def test_ranks_of_one_distributed_launch_share_rank_0s_lease(tmp_path, monkeypatch):
    from moe_core.store.lease import LEASE

    run = Run.create(tmp_path, name="ranks")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with run.writing("train"):  # rank 1 takes nothing
        assert not (run.path / LEASE).exists()
    monkeypatch.setenv("RANK", "0")
    with run.writing("train"):
        assert json.loads((run.path / LEASE).read_text())["job"] == "train"
