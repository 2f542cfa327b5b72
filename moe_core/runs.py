"""Run directory: one folder per run, a manifest, one file per artifact, atomic writes, jobs.

Every write goes to a temp file in the same folder, is fsynced and renamed into place, so a
killed process never leaves a half-written artifact (at worst a hidden ``.name.*.tmp`` file,
which every reader here ignores). Layout of one run (all paths come from ``Run.path_for``)::

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
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RUN_FORMAT = "moe-safety-lab/run@1"
FORMAT_VERSION = 1
STEP_STATUSES = ("pending", "running", "done", "error", "stopped", "skipped")
JOB_STATES = ("queued", "running", "done", "error", "stopped")
EVENT_KINDS = ("start", "progress", "log", "done", "error", "stopped")
_VERSIONED = ("torch", "transformers", "datasets", "accelerate", "numpy", "pandas", "pyarrow", "safetensors")

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
    "job": "jobs/{name}",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class RunError(ValueError):
    """A run directory or artifact is missing or malformed; the message says what to do."""


class JobBusyError(RunError):
    """A job of that name is already queued or running in this run."""


class JobStopped(Exception):
    """Raised by a job's own loop when it sees the STOP flag (``Job.running`` records 'stopped')."""


# -- atomic writes --------------------------------------------------------------------------
def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename tmp over ``path`` (same directory, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_dir(path: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory in a temp sibling, then swap it into place (never a half-written folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        build(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "x").exists() and not path.exists():
            os.replace(old / "x", path)  # put the previous version back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


# -- artifact helpers -----------------------------------------------------------------------
def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_json(path, obj)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is not valid JSON ({e}); delete it to let its step write it again") from e


def write_parquet(path: str | Path, df: Any) -> Path:
    """Write a DataFrame as Parquet (pyarrow, no index), atomically."""
    return atomic_write(path, lambda p: df.to_parquet(p, engine="pyarrow", index=False))


def read_parquet(path: str | Path, columns: list[str] | None = None) -> Any:
    import pandas as pd
    import pyarrow as pa

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        return pd.read_parquet(path, engine="pyarrow", columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise RunError(f"{path} is not a readable Parquet file ({e}); delete it to let its step write it again") from e


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _parse_time(s: Any) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(s)).timestamp()
    except (TypeError, ValueError):
        return None


def _check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise RunError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-' (max 100 chars, no '/' or '..')"
        )
    return name


def _slug(name: str | None) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", (name or "").lower()).strip("-")[:32].strip("-")
    return s or "run"


def package_versions() -> dict[str, str | None]:
    """Versions that decide whether a run can be reproduced (read from metadata, no imports)."""
    from . import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "moe_core": __version__}
    for pkg in _VERSIONED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so the app and a job process never lose each other's updates."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: best effort
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# -- runs -----------------------------------------------------------------------------------
def default_runs_root() -> Path:
    """``$MOE_LAB_RUNS`` or ``./runs``, absolute so a job in another cwd agrees with the app."""
    return Path(os.environ.get("MOE_LAB_RUNS") or "runs").expanduser().resolve()


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
    ) -> "Run":
        """New run folder ``<UTC time>-<slug of name>`` (``-2``, ``-3``... if taken).

        ``seeds`` defaults to the config's top-level keys that contain "seed".
        """
        config = dict(config or {})
        _check_jsonable(config=config, seeds=seeds)
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
        manifest = {
            "format": RUN_FORMAT,
            "format_version": FORMAT_VERSION,
            "id": run_id,
            "name": name or run_id,
            "created": now,
            "updated": now,
            "model": model,
            "config": config,
            "seeds": dict(seeds),
            "versions": package_versions(),
            "steps": {},
            "notes": notes,
        }
        run = cls(root / run_id, manifest)
        atomic_write_json(run.path / MANIFEST, manifest)
        return run

    @classmethod
    def open(cls, path: str | Path) -> "Run":
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
            atomic_write_json(self.path / MANIFEST, m)
        self.manifest = m
        return m

    def update(self, **fields: Any) -> dict[str, Any]:
        """Change name, model, config, seeds or notes."""
        allowed = {"name", "model", "config", "seeds", "notes"}
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
            if status == "running":
                step["started"] = now
            step.update(info, status=status, updated=now)

        return self._update(change)

    def step(self, name: str) -> dict[str, Any] | None:
        return self.manifest.get("steps", {}).get(name)

    # -- artifacts ---------------------------------------------------------------------------
    def path_for(self, kind: str, batch_idx: int | None = None, name: str | None = None) -> Path:
        """Path of an artifact kind (see ``ARTIFACTS``); per-batch kinds need ``batch_idx``."""
        if kind not in ARTIFACTS:
            raise RunError(f"unknown artifact kind {kind!r}; known: {sorted(ARTIFACTS)}")
        tmpl = ARTIFACTS[kind]
        if "{batch_idx" in tmpl and (
            batch_idx is None or isinstance(batch_idx, bool) or int(batch_idx) != batch_idx or batch_idx < 0
        ):
            raise RunError(f"artifact {kind!r} is per batch: pass batch_idx (an integer >= 0), got {batch_idx!r}")
        if "{name}" in tmpl:
            _check_name(name, f"{kind} name")  # type: ignore[arg-type]
        return self.path / tmpl.format(batch_idx=int(batch_idx or 0), name=name)

    def completed_batches(self, kind: str = "outputs") -> set[int]:
        """Batches whose ``kind`` file exists; outputs are written last, so these are done."""
        tmpl = ARTIFACTS.get(kind, "")
        if "{batch_idx" not in tmpl:
            raise RunError(f"{kind!r} is not a per-batch artifact; use one of "
                           f"{[k for k, t in ARTIFACTS.items() if '{batch_idx' in t]}")
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

    def job(self, name: str) -> "Job":
        return Job(self.job_dir(name))


def _check_jsonable(**values: Any) -> None:
    for key, v in values.items():
        try:
            json.dumps(v, default=_json_default)
        except (TypeError, ValueError) as e:
            raise RunError(f"the run {key} must be JSON-serialisable (plain values, lists, dicts): {e}") from e


def _read_manifest(path: Path) -> dict[str, Any]:
    mf = path / MANIFEST
    if not mf.is_file():
        raise RunError(f"{path} is not a run directory (no {MANIFEST}); pick a folder made by Run.create")
    try:
        m = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{mf} is damaged ({e}); restore it or delete the run") from e
    if not isinstance(m, dict) or "id" not in m:
        raise RunError(f"{mf} is not a run manifest (no 'id')")
    if int(m.get("format_version", 1)) > FORMAT_VERSION:
        raise RunError(f"{path} was written by a newer moe_core (format {m['format_version']}); upgrade to open it")
    return m


@dataclass
class RunSummary:
    """One row of the runs table; ``error`` is set (and the rest mostly empty) for a broken dir."""

    id: str
    path: Path
    name: str | None = None
    created: str | None = None
    updated: str | None = None
    model: str | None = None
    steps: dict[str, str] = field(default_factory=dict)  # step -> status
    error: str | None = None


def list_runs(root: str | Path | None = None) -> list[RunSummary]:
    """Every run under ``root``, newest first; unreadable folders are listed with ``error`` set."""
    root = Path(root) if root is not None else default_runs_root()
    if not root.is_dir():
        return []
    out: list[tuple[float, RunSummary]] = []
    for d in root.iterdir():
        if not d.is_dir() or d.name.startswith("."):
            continue
        try:
            m = _read_manifest(d)
            steps = {k: str(v.get("status")) for k, v in (m.get("steps") or {}).items() if isinstance(v, dict)}
            s = RunSummary(str(m["id"]), d, m.get("name"), m.get("created"), m.get("updated"), m.get("model"), steps)
            t = _parse_time(s.created) or d.stat().st_mtime
        except (RunError, OSError, ValueError, TypeError, AttributeError) as e:
            s, t = RunSummary(d.name, d, error=str(e)), d.stat().st_mtime
        out.append((t, s))
    out.sort(key=lambda ts: (ts[0], ts[1].id), reverse=True)
    return [s for _, s in out]


# -- jobs -----------------------------------------------------------------------------------
def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Events of an ``events.jsonl``; a torn (half-written) line is skipped, not fatal."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if i < len(lines) - 1:  # a torn line in the middle: a writer died, the next one went on
                log.warning("skipping unreadable line %d of %s", i + 1, path)
            continue
        if isinstance(ev, dict):
            out.append(ev)
    return out


def latest_progress(events: list[dict[str, Any]]) -> dict[str, Any]:
    """State of the latest attempt (events after the last 'start'): last kind, done, total, message."""
    starts = [i for i, e in enumerate(events) if e.get("kind") == "start"]
    tail = events[starts[-1]:] if starts else events
    out: dict[str, Any] = {"kind": None, "done": 0, "total": None, "message": ""}
    for e in tail:
        out["kind"] = e.get("kind")
        for k in ("done", "total"):
            if e.get(k) is not None:
                out[k] = e[k]
        if e.get("message"):
            out["message"] = e["message"]
    return out


class JobEvents:
    """Append-only event log of one job; ``progress`` is the pipeline's progress callable."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, kind: str, done: int | None = None, total: int | None = None, message: str = "", **extra: Any) -> dict[str, Any]:
        if kind not in EVENT_KINDS:
            raise RunError(f"unknown event kind {kind!r}; use one of {EVENT_KINDS}")
        ev = {"time": _now(), "kind": kind, "done": done, "total": total, "message": message, **extra}
        line = json.dumps(ev, ensure_ascii=False, default=_json_default).encode("utf-8") + b"\n"
        with open(self.path, "ab+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:  # a writer killed mid-line left no newline: start on a fresh line
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return ev

    def progress(self, done: int, total: int, message: str = "") -> None:
        self.emit("progress", done, total, message)

    def log(self, message: str) -> None:
        self.emit("log", message=message)

    def read(self) -> list[dict[str, Any]]:
        return read_events(self.path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:  # a zombie (exited, not yet reaped) is not running
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def job_state(status: dict[str, Any] | None, stale_after_s: float = 120.0, now: float | None = None) -> str:
    """'none', 'queued', 'running', 'dead', 'done', 'error' or 'stopped'.

    A 'running' job whose process is gone (same host) or whose heartbeat is older than
    ``stale_after_s`` is 'dead'; so is a 'queued' job nobody picked up within that time.
    """
    if not status:
        return "none"
    state = status.get("state")
    if state not in ("queued", "running"):
        return str(state)
    now = time.time() if now is None else now
    beat = _parse_time(status.get("heartbeat") or status.get("updated"))
    if beat is None or now - beat > stale_after_s:
        return "dead"
    if state == "running":
        pid, host = status.get("pid"), status.get("host")
        if isinstance(pid, int) and host in (None, socket.gethostname()) and not pid_alive(pid):
            return "dead"
    return state


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
