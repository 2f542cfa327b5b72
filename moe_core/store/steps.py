"""What every step that writes a run does around its work: hold the run's one-writer lease, check the
spec's model against the run's, and record how the step ended ("failed" with the reason, or "stopped";
never left "running").

    @writes_run("select")
    def select(spec, run): ...
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from moe_core.errors import MoELabError
from moe_core.store.events import JobStopped
from moe_core.store.provenance import check_step_model
from moe_core.store.run import Run

log = logging.getLogger(__name__)


@contextlib.contextmanager
def step_outcome(run: Run) -> Iterator[None]:
    """Steps this process left "running" end as "failed" (with the reason) or "stopped", never "running"."""
    try:
        yield
    except BaseException as e:
        status = "stopped" if isinstance(e, (JobStopped, KeyboardInterrupt)) else "failed"
        reason = (str(e) or "stopped on request") if status == "stopped" else f"{type(e).__name__}: {e}"
        try:
            mine = [
                k
                for k, v in run.reload().get("steps", {}).items()
                if v.get("status") == "running" and v.get("pid") == os.getpid()
            ]
            for k in mine:
                run.set_step(k, status, reason=reason)
        except (OSError, MoELabError) as e2:  # a full disk: the pid check shows the step as interrupted
            log.warning("could not record the end of the steps of run %s: %s", run.id, e2)
        raise


def writes_run(job: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of a step ``fn(spec, run, ...)``: the run's one-writer lease for ``job``, the spec's
    ``model`` checked against the run's (``provenance``) before anything runs, and ``step_outcome``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def step(spec: Any, run: Run, *args: Any, **kwargs: Any) -> Any:
            with run.writing(job), step_outcome(run):
                check_step_model(run, getattr(spec, "model", None))
                return fn(spec, run, *args, **kwargs)

        return step

    return wrap
