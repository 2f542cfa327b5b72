"""An analysed batch's three files (routing, risk, outputs): which are sound, and dropping damaged ones.

Why here: the analysis calls intact_batches under the run's writer lease before it resumes, so a
resume redoes exactly the damaged batches; doctor reports the same problems."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from moe_core.analysis.risk import SEED_COLUMNS
from moe_core.store.integrity import check_json, check_parquet, check_safetensors
from moe_core.store.run import Run

log = logging.getLogger(__name__)

PER_BATCH = ("routing", "risk", "outputs")


def _outputs_shape(batch_idx: int) -> Callable[[Any], str | None]:
    def validate(d: Any) -> str | None:
        if (
            not isinstance(d, dict)
            or d.get("batch_idx") != batch_idx
            or not isinstance(d.get("samples"), list)
        ):
            return f"not the outputs of batch {batch_idx} (needs batch_idx and a samples list)"
        bad = [
            i
            for i, s in enumerate(d["samples"])
            if not isinstance(s, dict) or not {"label", "kept"} <= set(s)
        ]
        return f"samples {bad[:5]} lack label/kept" if bad else None

    return validate


def batch_problems(run: Run, b: int) -> dict[str, str]:
    """kind -> problem for batch ``b``'s routing, risk and outputs files (missing counts as a problem)."""
    out = {}
    for kind in PER_BATCH:
        p = run.path_for(kind, batch_idx=b)
        if not p.is_file():
            out[kind] = "missing"
        elif kind == "routing":
            out[kind] = check_safetensors(p)
        elif kind == "risk":
            out[kind] = check_parquet(p, SEED_COLUMNS)
        else:
            out[kind] = check_json(p, _outputs_shape(b))
    return {k: v for k, v in out.items() if v}


def drop_batch(run: Run, b: int) -> None:
    """Remove a batch's files (outputs first: it marks the batch done), so a resume redoes it."""
    for kind in ("outputs", "risk", "routing"):
        run.path_for(kind, batch_idx=b).unlink(missing_ok=True)


def intact_batches(run: Run) -> set[int]:
    """Finished batches whose three files are sound; damaged ones and stale temp files are removed.

    Called by the analysis under the run's writer lease, so a resume redoes exactly the damaged batches.
    """
    done = set()
    for kind in PER_BATCH:  # the analysis is the one writer of these folders: every temp file is stale
        folder = run.path_for(kind, batch_idx=0).parent
        for p in folder.glob(".*.tmp") if folder.is_dir() else ():
            p.unlink(missing_ok=True)
    for b in sorted(run.completed_batches()):
        problems = batch_problems(run, b)
        if problems:
            log.warning("run %s: batch %d is damaged (%s); it will be analysed again", run.id, b, problems)
            drop_batch(run, b)
        else:
            done.add(b)
    return done
