"""A run's jobs as the app sees them: state, progress, rate and ETA, log tail, losses, the launch record.

Why apart from the launcher (moe_core.jobs): reading a job needs no pipeline, so the report and
the pages read jobs from here without importing the steps."""

from __future__ import annotations

import datetime as _dt
import json
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from moe_core.store.events import job_state, log_tail, pid_alive, read_events
from moe_core.store.run import Run

LOG_NAME = "job.log"  # stdout + stderr of the job process, inside jobs/<name>/


LAUNCH_NAME = "launch.json"  # argv, pid and start time of the last launch


ACTIVE_STATES = ("queued", "running")


# Popen handles of the jobs this process started: polling them reaps finished children, so an
# exited job is never mistaken for a live one (a zombie still answers kill(pid, 0)).
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass
class JobInfo:
    """What a page shows about one job (a snapshot; read it again to refresh)."""

    name: str  # job name (folder under the run's jobs/)
    state: str  # none | queued | running | dead | done | error | stopped
    done: int = 0  # units finished in the current stage (batches, steps, ...)
    total: int | None = None  # units of the current stage, when known
    message: str = ""  # latest progress message
    fraction: float | None = None  # done / total in [0, 1]
    eta_s: float | None = None  # seconds left at the current stage's measured rate
    rate_per_s: float | None = None  # units per second of the current stage
    started: str | None = None  # ISO time the job process started running
    elapsed_s: float | None = None  # seconds since the current attempt started
    pid: int | None = None  # job process id (running) or launched process id
    error: str | None = None  # the job's error message, if it failed
    argv: list[str] = field(default_factory=list)  # the command line of the last launch
    log_tail: str = ""  # last lines of job.log
    log_path: Path | None = None  # full log
    process_alive: bool = False  # the launched process still runs (it may run several jobs in turn)
    stopping: bool = False  # a stop was asked and the job still runs: it stops after its current unit

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def finished(self) -> bool:
        return self.state == "done"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["log_path"] = str(self.log_path) if self.log_path else None
        return d


def _run_dir(run: Run | str | Path) -> Path:
    return run.path if isinstance(run, Run) else Path(run)


def _as_run(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else Run.open(run)


def _launch_path(job_dir: Path) -> Path:
    return job_dir / LAUNCH_NAME


def _read_launch(job_dir: Path) -> dict[str, Any]:
    try:
        d = json.loads(_launch_path(job_dir).read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _launched_alive(pid: Any, launched: Any = None) -> bool:
    """Is a process we (or an earlier app process) launched still running?

    ``launched`` is the ``time.time()`` recorded right after the launch: a process with that pid
    created later is a recycled pid, some other program, and so is one not running ``moe_core``.
    """
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        _CHILDREN.pop(pid, None)
        return False
    started = (
        float(launched) if isinstance(launched, (int, float)) and not isinstance(launched, bool) else None
    )
    if not pid_alive(pid, started):
        return False
    try:
        return any("moe_core" in part for part in psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:  # gone meanwhile (or a zombie)
        return False
    except psutil.AccessDenied:  # it exists and we may not look: trust the pid and start time
        return True


def _ts(s: Any) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(s)).timestamp()
    except (TypeError, ValueError):
        return None


def progress_estimate(events: list[dict[str, Any]], now: float | None = None) -> dict[str, Any]:
    """done/total/fraction/rate/ETA of the latest attempt's current stage.

    A stage is the trailing run of progress events with the same ``total`` (and ``stage``, when
    the job names one): a demo job moves from building to analysis to training. The rate is
    measured from the first event of that stage, so batches skipped on resume do not inflate it.
    """
    starts = [i for i, e in enumerate(events) if e.get("kind") == "start"]
    attempt = events[starts[-1] :] if starts else events
    prog = [e for e in attempt if e.get("kind") == "progress" and e.get("done") is not None]
    out: dict[str, Any] = {
        "done": 0,
        "total": None,
        "message": "",
        "fraction": None,
        "eta_s": None,
        "rate_per_s": None,
        "elapsed_s": None,
    }
    if attempt:
        t0 = _ts(attempt[0].get("time"))
        if t0 is not None:
            out["elapsed_s"] = max(0.0, (time.time() if now is None else now) - t0)
        msgs = [e.get("message") for e in attempt if e.get("message")]
        out["message"] = msgs[-1] if msgs else ""
    if not prog:
        return out
    last = prog[-1]
    key = (last.get("total"), last.get("stage"))
    stage = []
    for e in reversed(prog):
        if (e.get("total"), e.get("stage")) != key:
            break
        stage.append(e)
    stage.reverse()
    done, total = int(last["done"]), last.get("total")
    out.update(done=done, total=total)
    if total:
        out["fraction"] = min(1.0, max(0.0, done / float(total)))
    first = stage[0]
    t_first, t_last = _ts(first.get("time")), _ts(last.get("time"))
    gained = done - int(first["done"])
    if t_first is not None and t_last is not None and t_last > t_first and gained > 0:
        rate = gained / (t_last - t_first)
        out["rate_per_s"] = rate
        if total:
            out["eta_s"] = max(0.0, (float(total) - done) / rate)
    return out


def read_job(run: Run | str | Path, name: str, log_lines: int = 30) -> JobInfo:
    """State, progress, ETA and log tail of job ``name`` (cheap: a few small file reads)."""
    job_dir = _run_dir(run) / "jobs" / name
    if not job_dir.is_dir():
        return JobInfo(name=name, state="none")
    status = None
    try:
        status = json.loads((job_dir / "status.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        status = None
    launch = _read_launch(job_dir)
    state = job_state(status if isinstance(status, dict) else None)
    queued = isinstance(status, dict) and status.get("state") == "queued"
    if queued and launch.get("pid"):
        # alive: still importing (a slow start is not a dead job); gone: it died before it could
        # report, e.g. on bad arguments (see the log)
        state = "queued" if _launched_alive(launch.get("pid"), launch.get("launched")) else "dead"
    elif state == "running" and isinstance(status, dict) and status.get("pid") in _CHILDREN:
        if not _launched_alive(status.get("pid"), _ts(status.get("started"))):
            state = "dead"
    events = read_events(job_dir / "events.jsonl")
    est = progress_estimate(events)
    log_path = job_dir / LOG_NAME
    status = status if isinstance(status, dict) else {}
    error = status.get("error") if state == "error" else None
    if state == "dead" and not error:
        error = "the job process ended without reporting a result; see the log below, then resume"
    alive = _launched_alive(launch.get("pid"), launch.get("launched")) or (state == "running")
    return JobInfo(
        name=name,
        state=state,
        done=est["done"],
        total=est["total"],
        message=est["message"],
        fraction=est["fraction"],
        eta_s=est["eta_s"] if state in ACTIVE_STATES else None,
        rate_per_s=est["rate_per_s"],
        started=status.get("started"),
        elapsed_s=est["elapsed_s"],
        pid=status.get("pid") or launch.get("pid"),
        error=error,
        argv=list(launch.get("argv") or []),
        log_tail=log_tail(log_path, log_lines),
        log_path=log_path if log_path.exists() else None,
        process_alive=alive,
        stopping=state in ACTIVE_STATES and (job_dir / "STOP").is_file(),
    )


def list_jobs(run: Run | str | Path, prefix: str = "") -> list[JobInfo]:
    """Jobs of ``run`` whose name starts with ``prefix``, in the order they first started.

    One process can run several jobs in turn (the demo writes ``demo``, ``demo-train-...``,
    ``demo-eval``), so a page follows a pipeline by listing its jobs.
    """
    d = _run_dir(run) / "jobs"
    if not d.is_dir():
        return []

    def first_time(p: Path) -> float:
        evs = read_events(p / "events.jsonl")
        t = _ts(evs[0].get("time")) if evs else None
        return t if t is not None else p.stat().st_mtime

    dirs = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(prefix)]
    return [read_job(run, p.name, log_lines=5) for p in sorted(dirs, key=first_time)]


_LOSS_RE = re.compile(r"\bloss[ =:]+(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


def loss_points(events: list[dict[str, Any]]) -> list[dict[str, float]]:
    """(step, loss) pairs of the latest attempt: an event's ``loss`` field, else 'loss X' in its message."""
    starts = [i for i, e in enumerate(events) if e.get("kind") == "start"]
    out = []
    for e in events[starts[-1] :] if starts else events:
        if e.get("kind") != "progress" or e.get("done") is None:
            continue
        loss = e.get("loss")
        if loss is None:
            m = _LOSS_RE.search(str(e.get("message") or ""))
            loss = float(m.group(1)) if m else None
        if loss is not None:
            out.append({"step": int(e["done"]), "loss": float(loss)})
    return out


def job_events(run: Run | str | Path, name: str) -> list[dict[str, Any]]:
    return read_events(_run_dir(run) / "jobs" / name / "events.jsonl")


def format_eta(seconds: float | None) -> str:
    """'2 min 05 s' style, or '' when unknown."""
    if seconds is None:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"
