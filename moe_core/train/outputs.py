"""The trainings saved in a run, read without torch: their folders (newest first) and a table to compare them.

Why: a run holds many named trainings (the demo's three, then the researcher's own with other settings);
the Training page lists and compares them, and a damaged one must not hide the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from moe_core.store.run import Run

METADATA = "training_metadata.json"
COMPARE_COLUMNS = {  # column -> header the page shows
    "name": "Training",
    "baseline": "Experts trained",
    "mask_mode": "Mask mode",
    "trained_experts": "Trained experts",
    "learning_rate": "Learning rate",
    "epochs": "Epochs",
    "steps": "Steps",
    "final_loss": "Final loss",
}


def training_outputs(run: Run) -> list[Path]:
    """Folders of the run's finished trainings (those with their metadata), newest first."""
    root = run.path / "train"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if not p.name.startswith(".") and (p / METADATA).is_file()]
    return sorted(done, key=lambda p: p.stat().st_mtime, reverse=True)


def _row(out: Path) -> dict[str, Any]:
    try:
        meta = json.loads((out / METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        return {"name": out.name, "baseline": "damaged: delete it and train again"}
    report, args = meta.get("report") or {}, meta.get("args") or {}
    history = [h for h in meta.get("loss_history") or [] if isinstance(h, dict)]
    losses = [h["loss"] for h in history if "loss" in h]
    steps = [h["step"] for h in history if isinstance(h.get("step"), int)]
    return {
        "name": out.name,
        "baseline": meta.get("baseline"),
        "mask_mode": meta.get("mask_mode"),
        "trained_experts": "all" if meta.get("baseline") == "full" else report.get("trained_experts"),
        "learning_rate": args.get("learning_rate"),
        "epochs": args.get("num_train_epochs"),
        "steps": max(steps, default=None),
        "final_loss": losses[-1] if losses else None,
    }


def trainings_table(run: Run) -> pd.DataFrame:
    """One row per finished training, newest first: what it trained, with which settings, its final loss."""
    rows = [_row(p) for p in training_outputs(run)]
    return pd.DataFrame(rows, columns=list(COMPARE_COLUMNS)).astype({"trained_experts": object})
