"""One writer per run: the lease a job holds while it writes a run directory.

Why: two jobs writing one run (two analyses with different settings, two trainings of one name)
silently mixed their results. Every pipeline step holds ``writing(run_path, job)``; a second
writer gets ``RunBusyError`` ("run R is busy with job J (pid P, started T)") before it writes a
byte. The lease is a small ``writer.json`` (job, pid, host, start time) whose check-and-take runs
under a short ``filelock``; a lease whose process is gone (``psutil``, start time included, so a
recycled pid does not count) is stale and taken over. The same thread may nest leases (the demo
holds the run while its analysis, selection and trainings take it again); another thread may not.

    with writing(run.path, "analysis"):
        ...                                  # RunBusyError if another live process writes the run
    holder(run.path)                         # {"job", "pid", "host", "started"} of a live writer, or None
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock

from moe_core.errors import MoELabError
from moe_core.store.atomic import atomic_write_json
from moe_core.store.events import recorded_process_alive
from moe_core.store.files import _now

log = logging.getLogger(__name__)

LEASE = "writer.json"  # who writes the run now (absent: nobody)
_GUARD = ".writer.lock"  # held only for the check-and-take of the lease
_GUARD_TIMEOUT_S = 30.0
_HELD: dict[tuple[str, int], int] = {}  # (run path, thread) -> nesting depth of the lease this thread holds


class RunBusyError(MoELabError, RuntimeError):
    """Another live process is writing this run; wait for it, stop it, or use another run."""


def _read_lease(run_path: Path) -> dict[str, Any] | None:
    import json

    try:
        d = json.loads((run_path / LEASE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no lease, or a torn one: nobody can prove they hold the run
    return d if isinstance(d, dict) else None


def holder(run_path: str | Path) -> dict[str, Any] | None:
    """The live writer of a run (its lease), or None when nobody (alive) writes it."""
    lease = _read_lease(Path(run_path))
    return lease if lease and recorded_process_alive(lease) else None


def busy_message(run_path: str | Path, lease: dict[str, Any]) -> str:
    host = lease.get("host")
    where = "" if host in (None, socket.gethostname()) else f" on {host}"
    return (
        f"run {Path(run_path).name} is busy with job {lease.get('job')!r} (pid {lease.get('pid')}{where}, "
        f"started {str(lease.get('started', '?'))[:19].replace('T', ' ')} UTC); wait for it to finish, "
        "stop it on its page, or start a new run"
    )


def check_not_busy(run_path: str | Path) -> None:
    """``RunBusyError`` if another process writes the run now (a cheap look, takes nothing)."""
    lease = holder(run_path)
    if lease is not None and not _mine(Path(run_path), lease):
        raise RunBusyError(busy_message(run_path, lease))


def _key(run_path: Path) -> tuple[str, int]:
    """Leases nest per thread: two app sessions (threads of one process) are two writers."""
    return str(run_path.resolve()), threading.get_ident()


def _mine(run_path: Path, lease: dict[str, Any]) -> bool:
    return lease.get("pid") == os.getpid() and _key(run_path) in _HELD


@contextlib.contextmanager
def _guard(run_path: Path) -> Iterator[None]:
    lock = filelock.FileLock(str(run_path / _GUARD), timeout=_GUARD_TIMEOUT_S)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RunBusyError(
            f"{run_path / _GUARD} stayed locked for {_GUARD_TIMEOUT_S:.0f}s; "
            "another process is stuck taking this run; stop it and try again"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _take(run_path: Path, job: str) -> None:
    with _guard(run_path):
        lease = _read_lease(run_path)
        if lease and recorded_process_alive(lease):
            raise RunBusyError(busy_message(run_path, lease))
        if lease:
            log.warning(
                "run %s: taking over the stale lease of job %r (pid %s is gone)",
                run_path.name,
                lease.get("job"),
                lease.get("pid"),
            )
        # started: a time taken after this process began, so pid_alive can tell a recycled pid
        atomic_write_json(
            run_path / LEASE,
            {
                "job": job,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": _now(),
                "taken": time.time(),
            },
        )


def _give_back(run_path: Path) -> None:
    with _guard(run_path):
        lease = _read_lease(run_path)
        if lease and lease.get("pid") == os.getpid():
            (run_path / LEASE).unlink(missing_ok=True)


def world_size() -> int:
    """Processes of this distributed launch (``accelerate launch``/``torchrun`` set WORLD_SIZE); 1 alone."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def secondary_rank() -> bool:
    """A process of a distributed launch other than rank 0: it does not take the lease; rank 0 holds it
    for the launch (and only rank 0 may write the run's files)."""
    try:
        return world_size() > 1 and int(os.environ.get("RANK", "0")) != 0
    except ValueError:
        return False


@contextlib.contextmanager
def writing(run_path: str | Path, job: str) -> Iterator[None]:
    """Hold the run for ``job`` while the block writes it (re-entrant within one process)."""
    run_path = Path(run_path)
    key = _key(run_path)
    if secondary_rank():  # one launch, one writer: rank 0 holds the run for every rank of `accelerate launch`
        yield
        return
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    _take(run_path, job)
    _HELD[key] = 1
    try:
        yield
    finally:
        _HELD.pop(key, None)
        try:
            _give_back(run_path)
        except (OSError, RunBusyError) as e:  # a stale lease is taken over by the next writer anyway
            log.warning("run %s: could not release the writer lease: %s", run_path.name, e)
