"""Launch long pipeline steps as detached CLI processes and read their progress back.

The app never runs analysis, training or evaluation in its own script thread: it starts
``python -m moe_core <command> --run RUN_DIR --job NAME ...`` as a separate process in its own
session, with stdout/stderr going to ``jobs/<name>/job.log`` of the run. The process writes
status, heartbeats and progress events through ``moe_core.store.run.Job``; the page only reads those
files. So a browser refresh, a second tab or leaving the page neither kills nor duplicates a
job, and the same job can be started from a terminal with the CLI.

    info = start_job(run, "analysis", "analyze", ["--model", "organism", "--scope", "generated"])
    info = read_job(run, "analysis")        # state, done/total, fraction, eta_s, log_tail, ...
    request_stop(run, "analysis")           # the job stops between batches
    start_job(run, "analysis", ...)         # resume: the analysis skips finished batches

``start_job`` refuses to start a second live job of the same name in a run and returns the
existing one instead; while another job writes the run (``store.lease``) it raises ``JobLaunchError``
saying which job holds it. ``check_model_source`` validates a model choice (local dir / HF id) from
its config alone, so the page can show a clear error before anything is launched.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moe_core.errors import MoELabError
from moe_core.model.adapter import ModelLoadError, MoEAdapter, is_local_model_dir
from moe_core.pipeline import COMMANDS as PIPELINE_STEPS
from moe_core.pipeline import command_of, to_argv
from moe_core.store.atomic import atomic_write_json
from moe_core.store.jobs import (
    _CHILDREN,
    LOG_NAME,
    JobInfo,
    _as_run,
    _launch_path,
    _read_launch,
    _run_dir,
    read_job,
)
from moe_core.store.lease import RunBusyError, check_not_busy
from moe_core.store.run import JobBusyError, Run

log = logging.getLogger(__name__)

COMMANDS = tuple(PIPELINE_STEPS)  # CLI subcommands a job may run: the pipeline's steps
_PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # so the child imports this same moe_core


class JobLaunchError(MoELabError, ValueError):
    """A job cannot be launched as asked; the message says what to change."""


def job_command(command: str, run: Run | str | Path, name: str, flags: Sequence[str] = ()) -> list[str]:
    """``[python, -m, moe_core, command, --run, RUN_DIR, --job, NAME, *flags]``."""
    if command not in COMMANDS:
        raise JobLaunchError(f"unknown job command {command!r}; use one of {', '.join(COMMANDS)}")
    bad = [f for f in flags if not isinstance(f, str)]
    if bad:
        raise JobLaunchError(f"job flags must be strings; got {bad!r}")
    return [
        sys.executable,
        "-m",
        "moe_core",
        command,
        "--run",
        str(_run_dir(run).resolve()),
        "--job",
        name,
        *flags,
    ]


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
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(_PACKAGE_PARENT),
                env={**_child_env(), **(env or {})},
                start_new_session=True,
            )
        except OSError as e:
            job.write_status("error", error=f"could not start the job process: {e}")
            raise JobLaunchError(f"could not start {' '.join(argv[1:4])}: {e}") from e
    _CHILDREN[proc.pid] = proc
    atomic_write_json(
        _launch_path(job.path),
        {
            "argv": argv,
            "command": command,
            "flags": list(flags),
            "pid": proc.pid,
            "launched": time.time(),
            "log": str(log_path),
        },
    )
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


def check_model_source(source: str) -> dict[str, Any]:
    """Validate a model choice before launching a job: 'organism', a local dir or a HF id.

    Reads only the config (no weights): the model is instantiated on the ``meta`` device and
    handed to ``MoEAdapter``, so a dense model is refused here with ``NotAnMoEModelError`` and
    a missing folder or unreachable hub id with ``ModelLoadError``. Returns the adapter's
    ``describe()`` (layers, experts, top-k), or ``{"model_type": "organism"}``.
    """

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
