"""Run directory: one folder per run, a manifest, one file per artifact, atomic writes, jobs.

Every write goes to a temp file in the same folder, is fsynced and renamed into place, so a
killed process never leaves a half-written artifact (at worst a hidden ``.name.*.tmp`` file,
which every reader here ignores). Manifest updates and job claims hold an inter-process lock
(``filelock``); the manifest is checked field by field (``RunManifest``, pydantic) on every read
and write; a job's process is checked with ``psutil``, start time included (a recycled pid is
not the job). Layout of one run (all paths come from ``Run.path_for``)::

    runs/20260105-142233-olmoe-advbench/
      manifest.json                      id, name, times, config, seeds, model, versions, steps, notes
      plan.json                          BatchPlan            path_for("plan")
      routing/batch_00012.safetensors    routing of batch 12  path_for("routing", batch_idx=12)
      risk/batch_00012.parquet           risk of batch 12     path_for("risk", batch_idx=12)
      outputs/batch_00012.json           answers (written last: the batch is complete)
      risk/per_batch.parquet, risk/aggregated.parquet
      masks/<name>.json, sft/, train/<name>/, eval/
      jobs/<name>/{events.jsonl,status.json,STOP}

Usage::

    run = Run.create(default_runs_root(), name="olmoe advbench", config={...}, model="allenai/...")
    run.set_step("analysis", "running", job="analysis")
    write_parquet(run.path_for("risk", batch_idx=3), df)
    todo = set(plan.batch_indices) - run.completed_batches()     # resume
    job = run.job("analysis")
    with job.running(total=len(todo)) as events:                 # status + events + errors
        for i, b in enumerate(todo):
            if job.stop_requested(): raise JobStopped
            ...; events.progress(i + 1, len(todo), f"batch {b}")

The rest of the store lives beside this module: ``store.atomic`` (atomic writes), ``store.files``
(RunError, JSON/Parquet artifacts, time stamps), ``store.manifest`` (the manifest, ``list_runs``,
``default_runs_root``), ``store.events`` (events log, ``pid_alive``, ``job_state``, ``JobStopped``),
``store.lease`` (the one-writer lease); this module holds ``Run``, ``Job``, the artifact registry
and the locks.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock

# What moved to the modules below is re-exported: ``from moe_core.store.run import X`` keeps working.
from moe_core.store.atomic import (
    _json_default,
    atomic_write_json,
    atomic_write_text,
)
from moe_core.store.events import (
    JobEvents,
    JobStopped,
    job_state,
    step_status,
)
from moe_core.store.files import (
    RunError,
    _now,
    read_json,
)
from moe_core.store.lease import writing
from moe_core.store.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    RUN_FORMAT,
    _read_manifest,
    _validated_manifest,
    package_versions,
)

log = logging.getLogger(__name__)

# "failed" (with the reason) is what a step records when it ends in an error; "error" is read from old runs
STEP_STATUSES = ("pending", "running", "done", "failed", "error", "stopped", "skipped")
JOB_STATES = ("queued", "running", "done", "error", "stopped")

# kind -> path template inside a run; the single place artifact paths are spelled
ARTIFACTS: dict[str, str] = {
    "manifest": MANIFEST,
    "plan": "plan.json",
    "routing": "routing/batch_{batch_idx:05d}.safetensors",
    "outputs": "outputs/batch_{batch_idx:05d}.json",
    "risk": "risk/batch_{batch_idx:05d}.parquet",
    "risk_per_batch": "risk/per_batch.parquet",
    "risk_aggregated": "risk/aggregated.parquet",
    "mask": "masks/{name}.json",
    "sft": "sft",
    "train": "train/{name}",
    "eval": "eval",
    "study": "study/{name}",
    "study_analyses": "study_analyses/{name}",
    "atlas": "atlas",  # the expert atlas: shards per batch and the merged index (analysis.atlas)  # each seed pair's analysis run, reused when a study resumes
    "job": "jobs/{name}",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class JobBusyError(RunError):
    """A job of that name is already queued or running in this run."""


def _check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise RunError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-' (max 100 chars, no '/' or '..')"
        )
    return name


def _slug(name: str | None) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", (name or "").lower()).strip("-")[:32].strip("-")
    return s or "run"


LOCK_TIMEOUT_S = 60.0  # a lock is held for one small read-modify-write; longer means a hung process


@contextlib.contextmanager
def _locked(lock_path: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Exclusive inter-process lock (``filelock``), so the app and a job never lose each other's updates.

    The OS drops the lock when its holder dies, so a crash never leaves a stale lock behind.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    timeout = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    lock = filelock.FileLock(str(lock_path), timeout=timeout)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RunError(
            f"{lock_path} stayed locked for {timeout:.0f}s: another process (a job or a second app) is stuck "
            "while updating this run; stop it and try again"
        ) from None
    try:
        yield
    finally:
        lock.release()


# -- runs ----------------------------------------------------------------------------------
@dataclass
class Run:
    """Handle to one run directory; ``manifest`` is the last copy read or written."""

    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return str(self.manifest.get("id", self.path.name))

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.id))

    @classmethod
    def create(
        cls,
        root: str | Path,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        model: str | None = None,
        seeds: dict[str, int] | None = None,
        notes: str = "",
        provenance: dict[str, Any] | None = None,
    ) -> Run:
        """New run folder ``<UTC time>-<slug of name>`` (``-2``, ``-3``... if taken).

        ``seeds`` defaults to the config's top-level keys that contain "seed"; ``provenance`` is what
        the run is made from (``moe_core.store.provenance``), written with the first manifest.
        """
        config = dict(config or {})
        _check_jsonable(config=config, seeds=seeds, provenance=provenance)
        if seeds is None:
            seeds = {k: v for k, v in config.items() if "seed" in k.lower() and isinstance(v, int)}
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        base = f"{stamp}-{_slug(name)}"
        for k in range(1, 10_000):
            run_id = base if k == 1 else f"{base}-{k}"
            try:
                (root / run_id).mkdir()
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 10k runs in one second
            raise RunError(f"could not find a free run id under {root}")
        now = _now()
        try:
            manifest = _validated_manifest(
                {
                    "format": RUN_FORMAT,
                    "format_version": FORMAT_VERSION,
                    "id": run_id,
                    "name": name or run_id,
                    "created": now,
                    "updated": now,
                    "model": str(model) if isinstance(model, Path) else model,
                    "config": config,
                    "seeds": dict(seeds),
                    "versions": package_versions(),
                    "steps": {},
                    "notes": notes,
                    **({"provenance": provenance} if provenance else {}),
                },
                root / run_id / MANIFEST,
            )
        except RunError:
            (root / run_id).rmdir()  # nothing was written into it yet
            raise
        run = cls(root / run_id, manifest)
        atomic_write_json(run.path / MANIFEST, manifest)
        return run

    @classmethod
    def open(cls, path: str | Path) -> Run:
        path = Path(path)
        return cls(path, _read_manifest(path))

    def reload(self) -> dict[str, Any]:
        self.manifest = _read_manifest(self.path)
        return self.manifest

    def _update(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read-modify-write of the manifest under a lock, written atomically."""
        with _locked(self.path / ".manifest.lock"):
            m = _read_manifest(self.path)
            change(m)
            m["updated"] = _now()
            m = _validated_manifest(m, self.path / MANIFEST)  # a bad change is refused, never written
            atomic_write_json(self.path / MANIFEST, m)
        self.manifest = m
        return m

    def update(self, **fields: Any) -> dict[str, Any]:
        """Change name, model, config, seeds, notes or provenance (see ``provenance.record``)."""
        allowed = {"name", "model", "config", "seeds", "notes", "provenance"}
        bad = set(fields) - allowed
        if bad:
            raise RunError(f"cannot update {sorted(bad)} in the manifest; allowed: {sorted(allowed)}")
        _check_jsonable(**fields)
        return self._update(lambda m: m.update(fields))

    def set_step(self, name: str, status: str, **info: Any) -> dict[str, Any]:
        """Record a pipeline step's status (info is merged into what was there)."""
        if status not in STEP_STATUSES:
            raise RunError(f"unknown step status {status!r}; use one of {STEP_STATUSES}")

        def change(m: dict[str, Any]) -> None:
            step = m.setdefault("steps", {}).setdefault(name, {})
            now = _now()
            if status == "running":  # pid + host: a reader can tell a live step from a killed one
                step.update(started=now, pid=os.getpid(), host=socket.gethostname(), reason=None)
            step.update(info, status=status, updated=now)

        return self._update(change)

    def step(self, name: str) -> dict[str, Any] | None:
        return self.manifest.get("steps", {}).get(name)

    def status(self) -> dict[str, str]:
        """Status of every recorded step, e.g. ``{"analysis": "done", "train:experts-x": "running"}``.

        A "running" step whose process is gone (pid check) reads "interrupted": resume it.
        """
        return {k: step_status(v) for k, v in sorted(self.manifest.get("steps", {}).items())}

    def discard_if_empty(self) -> None:
        """Remove this run when nothing was finished in it (a new run whose first step failed)."""
        import shutil

        if not self.completed_batches() and not self.trainings(status=None):
            shutil.rmtree(self.path, ignore_errors=True)

    def writing(self, job: str) -> Any:
        """Hold this run as its one writer while a block writes it (``store.lease.writing``)."""

        return writing(self.path, job)

    def resolve(self, stored: str | Path | None) -> Path | None:
        """A path the manifest stores (relative to the run; old runs: absolute) as a path in THIS run.

        An absolute path of an artifact (``.../train/x/merged``) written where the run lived before
        it was moved or copied is mapped to the same artifact here, so a copy never uses the original's.
        A path that leads outside the run (``../other-run/...``, a link) is a ``RunError``: outside inputs
        (a local model folder, prompt files) are checked by their fingerprints, never resolved here.
        """
        if stored in (None, ""):
            return None
        p = Path(stored)
        if not p.is_absolute():
            return self._inside(self.path / p, stored)
        parts = p.parts
        for anchor in ("train", "eval", "masks", "study", "sft"):
            if anchor in parts:
                i = len(parts) - 1 - parts[::-1].index(anchor)
                return self._inside(self.path.joinpath(*parts[i:]), stored)
        return self._inside(p, stored)

    def _inside(self, p: Path, stored: str | Path) -> Path:
        """``p`` if it lies inside this run (after resolving ``..`` and links), else a RunError: an artifact
        this run produced never lives in another run or elsewhere on disk."""
        try:
            p.resolve().relative_to(self.path.resolve())
        except ValueError:
            raise RunError(
                f"run {self.id}: {stored} points outside the run; a run's own artifacts live "
                f"inside it: run `python -m moe_core doctor --run {self.path}` to see the damage"
            ) from None
        return p

    def relative(self, path: str | Path) -> str:
        """``path`` relative to the run when it lies inside it (what the manifest stores), else as given."""
        p = Path(path)
        try:
            return p.resolve().relative_to(self.path.resolve()).as_posix()
        except ValueError:
            return str(p)

    def trainings(self, status: str | None = "done") -> dict[str, dict[str, Any]]:
        """Trainings of this run by name (``train:<name>`` steps), only those with ``status`` (None: all)."""
        steps = self.manifest.get("steps", {})
        out = {
            k.split(":", 1)[1]: dict(v)
            for k, v in sorted(steps.items())
            if k.startswith("train:") and (status is None or v.get("status") == status)
        }
        for info in out.values():  # stored relative to the run: absolute paths where the run is now
            if info.get("merged"):
                info["merged"] = str(self.resolve(info["merged"]))
        return out

    # -- artifacts ---------------------------------------------------------------------------
    def path_for(self, kind: str, batch_idx: int | None = None, name: str | None = None) -> Path:
        """Path of an artifact kind (see ``ARTIFACTS``); per-batch kinds need ``batch_idx``."""
        if kind not in ARTIFACTS:
            raise RunError(f"unknown artifact kind {kind!r}; known: {sorted(ARTIFACTS)}")
        tmpl = ARTIFACTS[kind]
        if "{batch_idx" in tmpl and (
            batch_idx is None or isinstance(batch_idx, bool) or int(batch_idx) != batch_idx or batch_idx < 0
        ):
            raise RunError(
                f"artifact {kind!r} is per batch: pass batch_idx (an integer >= 0), got {batch_idx!r}"
            )
        if "{name}" in tmpl:
            _check_name(name, f"{kind} name")  # type: ignore[arg-type]
        path = self.path / tmpl.format(batch_idx=int(batch_idx or 0), name=name)
        if path.is_symlink() or path.parent.is_symlink():  # a link inside the run may lead out of it
            self._inside(path, path.relative_to(self.path))
        return path

    def completed_batches(self, kind: str = "outputs") -> set[int]:
        """Batches whose ``kind`` file exists; outputs are written last, so these are done."""
        tmpl = ARTIFACTS.get(kind, "")
        if "{batch_idx" not in tmpl:
            raise RunError(
                f"{kind!r} is not a per-batch artifact; use one of "
                f"{[k for k, t in ARTIFACTS.items() if '{batch_idx' in t]}"
            )
        folder, pattern = tmpl.split("/")
        rx = re.compile("^" + re.escape(pattern).replace(re.escape("{batch_idx:05d}"), r"(\d{5,})") + "$")
        d = self.path / folder
        if not d.is_dir():
            return set()
        return {int(m.group(1)) for p in d.iterdir() if (m := rx.match(p.name)) and p.is_file()}

    # -- jobs --------------------------------------------------------------------------------
    def job_dir(self, name: str) -> Path:
        d = self.path_for("job", name=name)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def job(self, name: str) -> Job:
        return Job(self.job_dir(name))


def _check_jsonable(**values: Any) -> None:
    for key, v in values.items():
        try:
            json.dumps(v, default=_json_default)
        except (TypeError, ValueError) as e:
            raise RunError(
                f"the run {key} must be JSON-serialisable (plain values, lists, dicts): {e}"
            ) from e


# -- jobs ----------------------------------------------------------------------------------
class Job:
    """One job directory: events.jsonl, status.json and the STOP flag.

    The page calls ``queue()`` / ``request_stop()`` / ``state()``; the worker wraps its loop in
    ``with job.running(total=...) as events:`` and checks ``stop_requested()`` between batches.
    """

    def __init__(self, path: str | Path, heartbeat_every_s: float = 5.0) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.heartbeat_every_s = heartbeat_every_s  # seconds between heartbeats while running()
        self.events = JobEvents(self.path / "events.jsonl")
        self._status_lock = threading.Lock()  # the heartbeat thread and the loop both write status

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def stop_path(self) -> Path:
        return self.path / "STOP"

    def read_status(self) -> dict[str, Any] | None:
        try:
            st = read_json(self.status_path)
        except (FileNotFoundError, RunError):
            return None
        return st if isinstance(st, dict) else None

    def write_status(self, state: str, **info: Any) -> dict[str, Any]:
        """Set the state (merging info); stamps ``updated``/``heartbeat`` and this process."""
        if state not in JOB_STATES:
            raise RunError(f"unknown job state {state!r}; use one of {JOB_STATES}")
        with self._status_lock:
            st = self.read_status() or {}
            now = _now()
            st.update(info, state=state, updated=now, heartbeat=now)
            if state == "running":
                st.setdefault("started", now)
                st.update(pid=os.getpid(), host=socket.gethostname())
            atomic_write_json(self.status_path, st)
        return st

    def heartbeat(self) -> None:
        """Tell readers this process is alive (the status is otherwise unchanged)."""
        with self._status_lock:
            st = self.read_status()
            if st is not None and st.get("state") == "running":
                st["heartbeat"] = _now()
                atomic_write_json(self.status_path, st)

    def _beat_until(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_every_s):
            try:
                self.heartbeat()
            except OSError as e:  # a full disk must not kill the job itself
                log.warning("job %s: heartbeat failed: %s", self.name, e)

    def state(self, stale_after_s: float = 120.0) -> str:
        return job_state(self.read_status(), stale_after_s)

    def queue(self, stale_after_s: float = 120.0, **info: Any) -> dict[str, Any]:
        """Claim the job for a new attempt; raises ``JobBusyError`` if one is queued or running."""
        with _locked(self.path / ".lock"):
            state = self.state(stale_after_s)
            if state in ("queued", "running"):
                raise JobBusyError(
                    f"job {self.name!r} is already {state}; wait for it, or request_stop() and wait"
                )
            self.stop_path.unlink(missing_ok=True)
            fresh = {"state": "queued", "updated": _now(), "heartbeat": _now(), **info}
            atomic_write_json(self.status_path, fresh)
            return fresh

    def request_stop(self) -> None:
        atomic_write_text(self.stop_path, _now() + "\n")

    def stop_requested(self) -> bool:
        return self.stop_path.exists()

    @contextlib.contextmanager
    def running(self, total: int | None = None, message: str = "") -> Iterator[JobEvents]:
        """Status 'running' + a start event; then 'done', 'stopped' (on ``JobStopped``) or 'error'."""
        self.write_status("running", started=_now(), total=total, error=None)
        self.events.emit("start", 0, total, message, pid=os.getpid())
        stop_beat = threading.Event()
        beater = threading.Thread(target=self._beat_until, args=(stop_beat,), daemon=True)
        beater.start()
        try:
            try:
                yield self.events
            finally:
                stop_beat.set()
                beater.join()
        except JobStopped as e:
            self.events.emit("stopped", message=str(e) or "stopped on request")
            self.write_status("stopped")
            self.stop_path.unlink(missing_ok=True)
        except BaseException as e:
            msg = f"{type(e).__name__}: {e}"
            self.events.emit("error", message=msg)
            self.write_status("error", error=msg)
            raise
        else:
            self.events.emit("done", message="done")
            self.write_status("done")
