"""Launch long pipeline steps as detached CLI processes and read their progress back.

The app never runs analysis, training or evaluation in its own script thread: it starts
``python -m moe_core <command> --run RUN_DIR --job NAME ...`` as a separate process in its own
session, with stdout/stderr going to ``jobs/<name>/job.log`` of the run. The process writes
status, heartbeats and progress events through ``moe_core.runs.Job``; the page only reads those
files. So a browser refresh, a second tab or leaving the page neither kills nor duplicates a
job, and the same job can be started from a terminal with the CLI.

    info = start_job(run, "analysis", "analyze", ["--model", "organism", "--scope", "generated"])
    info = read_job(run, "analysis")        # state, done/total, fraction, eta_s, log_tail, ...
    request_stop(run, "analysis")           # the job stops between batches
    start_job(run, "analysis", ...)         # resume: the analysis skips finished batches

``start_job`` refuses to start a second live job of the same name in a run and returns the
existing one instead; while another job writes the run (``run_lock``) it raises ``JobLaunchError``
saying which job holds it. ``check_model_source`` validates a model choice (local dir / HF id) from
its config alone, so the page can show a clear error before anything is launched.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import psutil

from .errors import MoELabError
from .pipeline import COMMANDS as PIPELINE_STEPS
from .pipeline import command_of, to_argv
from .job_events import log_tail
from .runs import JobBusyError, Run, pid_alive, atomic_write_json, job_state, read_events

log = logging.getLogger(__name__)

LOG_NAME = "job.log"  # stdout + stderr of the job process, inside jobs/<name>/
LAUNCH_NAME = "launch.json"  # argv, pid and start time of the last launch
COMMANDS = tuple(PIPELINE_STEPS)  # CLI subcommands a job may run: the pipeline's steps
ACTIVE_STATES = ("queued", "running")
_PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # so the child imports this same moe_core
# Popen handles of the jobs this process started: polling them reaps finished children, so an
# exited job is never mistaken for a live one (a zombie still answers kill(pid, 0)).
_CHILDREN: dict[int, subprocess.Popen] = {}


class JobLaunchError(MoELabError, ValueError):
    """A job cannot be launched as asked; the message says what to change."""


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


def job_command(command: str, run: Run | str | Path, name: str, flags: Sequence[str] = ()) -> list[str]:
    """``[python, -m, moe_core, command, --run, RUN_DIR, --job, NAME, *flags]``."""
    if command not in COMMANDS:
        raise JobLaunchError(f"unknown job command {command!r}; use one of {', '.join(COMMANDS)}")
    bad = [f for f in flags if not isinstance(f, str)]
    if bad:
        raise JobLaunchError(f"job flags must be strings; got {bad!r}")
    return [sys.executable, "-m", "moe_core", command, "--run", str(_run_dir(run).resolve()), "--job", name, *flags]


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
    started = float(launched) if isinstance(launched, (int, float)) and not isinstance(launched, bool) else None
    if not pid_alive(pid, started):
        return False
    try:
        return any("moe_core" in part for part in psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:  # gone meanwhile (or a zombie)
        return False
    except psutil.AccessDenied:  # it exists and we may not look: trust the pid and start time
        return True


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    parts = [str(_PACKAGE_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start_job(
    run: Run | str | Path,
    name: str,
    command: str,
    flags: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> JobInfo:
    """Start ``command`` for ``run`` as a detached process, unless job ``name`` is already live.

    Returns the job's state right after launch (or the live job's state, unchanged). The
    process runs in its own session, so it outlives the Streamlit script run (and the server).
    """
    from .run_lock import RunBusyError, check_not_busy

    run = _as_run(run)
    argv = job_command(command, run, name, flags)
    current = read_job(run, name)
    if current.active:
        log.info("job %s of run %s is already %s; not starting another", name, run.id, current.state)
        return current
    try:
        check_not_busy(run.path)  # another job writes this run: say so now, not in a log after the launch
    except RunBusyError as e:
        raise JobLaunchError(str(e)) from None
    job = run.job(name)
    try:
        job.queue(command=argv[3:], launcher_pid=os.getpid())
    except JobBusyError:  # another tab launched it a moment ago
        return read_job(run, name)
    _launch_path(job.path).unlink(missing_ok=True)  # the previous launch's pid must not judge this one
    log_path = job.path / LOG_NAME
    with open(log_path, "ab") as out:
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        out.write(f"\n===== {stamp} launching: {' '.join(argv[1:])}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=str(_PACKAGE_PARENT), env={**_child_env(), **(env or {})}, start_new_session=True,
            )
        except OSError as e:
            job.write_status("error", error=f"could not start the job process: {e}")
            raise JobLaunchError(f"could not start {' '.join(argv[1:4])}: {e}") from e
    _CHILDREN[proc.pid] = proc
    atomic_write_json(_launch_path(job.path), {"argv": argv, "command": command, "flags": list(flags),
                                              "pid": proc.pid, "launched": time.time(), "log": str(log_path)})
    log.info("started job %s (pid %d): %s", name, proc.pid, " ".join(argv[1:]))
    return read_job(run, name)


def start_step(run: Run | str | Path, name: str, spec: Any, env: dict[str, str] | None = None) -> JobInfo:
    """Start the pipeline step ``spec`` (a ``pipeline`` spec dataclass) as job ``name`` of ``run``.

    The command line is derived from the spec (``pipeline.to_argv``), so pages never build flags.
    """
    return start_job(run, name, command_of(spec), to_argv(spec), env=env)


def request_stop(run: Run | str | Path, name: str) -> None:
    """Ask job ``name`` to stop at its next checkpoint (between batches or steps)."""
    _as_run(run).job(name).request_stop()


def relaunch_flags(run: Run | str | Path, name: str) -> tuple[str, list[str]] | None:
    """(command, flags) of the last launch of job ``name`` (resume = start it again), or None."""
    d = _read_launch(_run_dir(run) / "jobs" / name)
    if not d.get("command"):
        return None
    return str(d["command"]), [str(f) for f in d.get("flags", [])]


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
    attempt = events[starts[-1]:] if starts else events
    prog = [e for e in attempt if e.get("kind") == "progress" and e.get("done") is not None]
    out: dict[str, Any] = {"done": 0, "total": None, "message": "", "fraction": None, "eta_s": None,
                           "rate_per_s": None, "elapsed_s": None}
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
        name=name, state=state, done=est["done"], total=est["total"], message=est["message"],
        fraction=est["fraction"], eta_s=est["eta_s"] if state in ACTIVE_STATES else None,
        rate_per_s=est["rate_per_s"], started=status.get("started"), elapsed_s=est["elapsed_s"],
        pid=status.get("pid") or launch.get("pid"), error=error, argv=list(launch.get("argv") or []),
        log_tail=log_tail(log_path, log_lines), log_path=log_path if log_path.exists() else None, process_alive=alive,
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
    for e in events[starts[-1]:] if starts else events:
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


def check_model_source(source: str) -> dict[str, Any]:
    """Validate a model choice before launching a job: 'organism', a local dir or a HF id.

    Reads only the config (no weights): the model is instantiated on the ``meta`` device and
    handed to ``MoEAdapter``, so a dense model is refused here with ``NotAnMoEModelError`` and
    a missing folder or unreachable hub id with ``ModelLoadError``. Returns the adapter's
    ``describe()`` (layers, experts, top-k), or ``{"model_type": "organism"}``.
    """
    from .models import ModelLoadError, MoEAdapter, is_local_model_dir

    source = (source or "").strip()
    if not source:
        raise ModelLoadError("no model given: choose the organism, a local model folder or a Hugging Face id")
    if source == "organism":
        return {"model_type": "organism"}
    p = Path(source).expanduser()
    looks_local = p.is_absolute() or source.startswith((".", "~")) or p.exists()
    if looks_local and not is_local_model_dir(p):
        raise ModelLoadError(f"no model folder at {p} (a model folder holds config.json); check the path")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(p) if looks_local else source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not read the config of '{source}': {e}. If this is a Hugging Face id, this machine may be "
            "offline: download the model elsewhere and give its local folder."
        ) from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"'{source}' is not a causal language model this tool can load: {e}") from None
    return MoEAdapter.for_model(model).describe()
