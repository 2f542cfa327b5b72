"""What a job has done and whether it is still alive: the append-only ``events.jsonl`` log
(``JobEvents``, ``read_events``, ``latest_progress``) and the liveness checks (``pid_alive``,
``job_state``), importable from ``moe_core.store.run`` too; ``log_tail`` reads the end of a job's or a
server's log. The job directory itself is ``moe_core.store.run.Job``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import psutil

from moe_core.store.atomic import _json_default
from moe_core.store.files import RunError, _now, _parse_time

log = logging.getLogger(__name__)

EVENT_KINDS = ("start", "progress", "log", "done", "error", "stopped")


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
    tail = events[starts[-1] :] if starts else events
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

    def emit(
        self, kind: str, done: int | None = None, total: int | None = None, message: str = "", **extra: Any
    ) -> dict[str, Any]:
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


PID_CLOCK_SLACK_S = 2.0  # process start times (psutil) and wall-clock stamps may disagree by about a tick


def pid_alive(pid: int, started: float | None = None) -> bool:
    """Is process ``pid`` (on this machine) still running, and is it the one we mean?

    A zombie (exited, not yet reaped) is not running. With ``started`` (a ``time.time()`` taken
    by or after the process started, e.g. the job's recorded start), a process created later
    than that holds a recycled pid: it is some other program, so the answer is False.
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is not None and proc.create_time() > started + PID_CLOCK_SLACK_S:
            return False
    except (psutil.NoSuchProcess, ValueError):  # ValueError: a negative pid
        return False
    except psutil.AccessDenied:  # it exists, but belongs to another user
        return True
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
        started = _parse_time(status.get("started"))
        if isinstance(pid, int) and host in (None, socket.gethostname()) and not pid_alive(pid, started):
            return "dead"
    return state


INTERRUPTED = "interrupted"  # shown (never stored) for a "running" step whose process is gone


def recorded_process_alive(record: dict[str, Any]) -> bool:
    """Does the process a record names ({"pid", "host", "started"}: a step, a writer lease) still run?
    On another host we cannot tell: it counts as alive."""
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    if record.get("host") not in (None, socket.gethostname()):
        return True
    return pid_alive(pid, _parse_time(record.get("started")))


def step_status(step: dict[str, Any]) -> str:
    """The status a reader should show: a "running" step of a dead process (pid check) is "interrupted"."""
    status = str(step.get("status", "pending"))
    if status == "running" and isinstance(step.get("pid"), int) and not recorded_process_alive(step):
        return INTERRUPTED
    return status


def log_tail(path: str | Path, lines: int = 25, max_bytes: int = 64_000) -> str:
    """The last ``lines`` non-empty lines of a log (read from its last ``max_bytes`` only); "" when unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    # tqdm redraws with carriage returns: keep only the last state of each line
    rows = [r.rsplit("\r", 1)[-1] for r in data.replace("\r\n", "\n").split("\n")]
    rows = [r for r in rows if r.strip()]
    return "\n".join(rows[-lines:])


class JobStopped(Exception):
    """Raised by a job's own loop when it sees the STOP flag (``Job.running`` records 'stopped')."""
