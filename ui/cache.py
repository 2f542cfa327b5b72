"""Cached readers of run artifacts, keyed on path + mtime so a new artifact invalidates the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from moe_core.analysis.atlas import atlas_dir
from moe_core.analysis.atlas_query import Atlas
from moe_core.analysis.scores import gate_diff_table
from moe_core.errors import MoELabError
from moe_core.pipeline import score_path
from moe_core.store.files import read_json
from moe_core.store.run import Run
from ui.messages import guard
from ui.navigation import link


# -- cached readers (keyed on path + mtime: a new artifact invalidates the cache) -------------------
def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


@st.cache_data(max_entries=64, show_spinner=False)
def _parquet(path: str, mtime_ns: int) -> pd.DataFrame:
    from moe_core.store.files import read_parquet

    return read_parquet(path)


def read_table(path: Path) -> pd.DataFrame | None:
    """A Parquet artifact, cached until the file changes; None when it does not exist."""
    return _parquet(str(path), _mtime(path)) if path.is_file() else None


@st.cache_data(max_entries=16, show_spinner=False)
def _budget_targets(path: str, mtime_ns: int) -> pd.DataFrame:
    from moe_core.eval.study_targets import budget_targets

    return budget_targets(_parquet(path, mtime_ns))


def study_targets_of(results_path: Path) -> pd.DataFrame:
    """Issue 17's targets per budget of a study's ``results.parquet``, computed once per version of the file:
    bootstraps over every seed pair, budget and selector take seconds, and Home draws them on every rerun."""
    return _budget_targets(str(results_path), _mtime(results_path))


def risk_tables_or_stop(run: Run) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's aggregated and per-batch risk tables, or a pointer to the Analysis page and stop."""
    agg = per_batch = None
    with guard("The risk tables cannot be read: "):
        agg = read_table(run.path_for("risk_aggregated"))
        per_batch = read_table(run.path_for("risk_per_batch"))
    if agg is None or per_batch is None:
        st.info("No risk tables yet: run the analysis first.", icon=":material/info:")
        link("analysis", "Go to Analysis", ":material/arrow_back:")
        st.stop()
    return agg, per_batch


@st.cache_data(max_entries=64, show_spinner=False)
def _json(path: str, mtime_ns: int) -> Any:
    return read_json(path)


def read_json_cached(path: Path) -> Any:
    return _json(str(path), _mtime(path)) if path.is_file() else None


@st.cache_data(max_entries=4, show_spinner="Preparing the batch x layer x expert tensor...")
def _risk_tensor(path: str, mtime_ns: int, num_layers: int, num_experts: int, value: str):
    from moe_core.analysis.risk import per_batch_tensor
    from moe_core.store.files import read_parquet

    return per_batch_tensor(read_parquet(path), value, num_layers, num_experts)


def risk_tensor(run: Run, num_layers: int, num_experts: int, value: str = "risk_diff"):
    """(batch_ids [B], values [B, L, E]) of the run's per-batch risk, computed once per file version."""
    p = run.path_for("risk_per_batch")
    return _risk_tensor(str(p), _mtime(p), num_layers, num_experts, value)


@st.cache_data(max_entries=8, show_spinner=False)
def _plan(path: str, mtime_ns: int):
    from moe_core.batching.plan import load_plan

    return load_plan(path)


def load_plan_cached(path: Path):
    return _plan(str(path), _mtime(path)) if path.is_file() else None


@st.cache_resource(max_entries=1, show_spinner="Loading the tokenizer...")
def tokenizer_for(model_spec: str):
    """The tokenizer of a run's model (organism, local folder or HF id), to show routed tokens."""
    from transformers import AutoTokenizer

    source = model_spec
    if model_spec == "organism":
        from moe_core.model.organism import organism_dir

        source = str(organism_dir())
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:  # transformers: missing files / a tokenizer class it cannot build
        raise MoELabError(f"cannot load the tokenizer of {model_spec!r}: {e}") from e


@st.cache_resource(max_entries=1)
def device_name() -> str:
    import torch

    return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"


@st.cache_data(max_entries=8, show_spinner="Scoring every expert...")
def _score_table(run_path: str, score: str, mtime_ns: int) -> pd.DataFrame:
    run = Run.open(run_path)
    path = score_path(run, score)
    return read_table(path) if path.is_file() else gate_diff_table(run)


def score_table_cached(run: Run, score: str) -> pd.DataFrame:
    """A selector score of every expert: the run's stored table, or gate_diff read from the routing files."""
    return _score_table(str(run.path), score, _mtime(run.path_for("risk_aggregated")))


@st.cache_resource(max_entries=4)
def _atlas(run_path: str, mtime_ns: int) -> Atlas:
    return Atlas.open(Run.open(run_path))


def atlas_for(run: Run) -> Atlas:
    """The run's expert atlas (reopened when its index is rebuilt); ``AtlasError`` when there is none yet."""
    meta = atlas_dir(run) / "index" / "meta.json"
    if not meta.is_file():
        return Atlas.open(run)  # raises the AtlasError that says how to build it
    return _atlas(str(run.path), _mtime(meta))
