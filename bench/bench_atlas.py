"""The expert atlas at real-model scale: build rate, peak memory, query times, and the naive way for the ratio.

    .venv/bin/python bench/bench_atlas.py                         # OLMoE and Qwen3-30B-A3B shapes, 1M tokens
    .venv/bin/python bench/bench_atlas.py --tokens 200000 --shapes olmoe

Synthetic routing at real shapes (OLMoE-1B-7B: 16 layers x 64 experts, top-8, vocabulary 50,304;
Qwen3-30B-A3B: 48 x 128, top-8, vocabulary 151,936) is written as ordinary analysis batches (routing
files with router weights, outputs with labels: 16 prompts of 512 tokens per batch, half unsafe), then
``python -m moe_core atlas`` indexes the run in a child process whose peak resident memory is read from
the kernel. Queries are timed on the built index (median of repeats), and the same card and search are
done the naive way (every routing file loaded into pandas) for the ratio. Targets (issue 19): >= 5M
routing entries per second, peak memory <= 2 GB, a card <= 200 ms, a search <= 500 ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_core.analysis.analyse import AnalysisConfig  # noqa: E402
from moe_core.analysis.atlas_query import Atlas  # noqa: E402
from moe_core.model.routing import SPAN_PROMPT, SampleRouting, load_batch_routing, save_batch_routing  # noqa: E402
from moe_core.store.atomic import atomic_write_json  # noqa: E402
from moe_core.store.run import Run  # noqa: E402

SHAPES = {"olmoe": (16, 64, 8, 50_304), "qwen3-30b-a3b": (48, 128, 8, 151_936)}
SAMPLES, LENGTH = 16, 512  # per batch: 8 safe and 8 unsafe prompts of 512 tokens


def synthetic_run(root: Path, shape: tuple[int, int, int, int], tokens: int, seed: int = 0) -> Run:
    """A run whose analysed batches hold synthetic routing of ``shape`` (layers, experts, top-k, vocab)."""
    L, E, k, V = shape
    rng = np.random.default_rng(seed)
    run = Run.create(root, name=f"atlas-bench-{E}x{L}")
    run.set_step("analysis", "done", config=dataclasses.asdict(AnalysisConfig(scope="prompt")))
    hot = np.stack([rng.choice(E, size=min(4, E), replace=False) for _ in range(L)])
    for b in range(max(1, tokens // (SAMPLES * LENGTH))):
        samples, outputs = [], []
        for i in range(SAMPLES):
            unsafe = i >= SAMPLES // 2
            start = rng.zipf(1.3, size=(L, LENGTH)) % E  # a skewed load, like real routers
            if unsafe:  # unsafe prompts lean on a few experts per layer: a risk difference to find
                lean = rng.random((L, LENGTH)) < 0.3
                start = np.where(lean, hot[:, :1], start)
            step = 2 * rng.integers(0, E // 2, size=(L, LENGTH, 1)) + 1  # odd: k distinct experts mod 2^n
            ids = (start[..., None] + step * np.arange(k)) % E
            weights = rng.dirichlet(np.ones(k), size=(L, LENGTH)).astype(np.float16)
            toks = (rng.zipf(1.2, size=LENGTH) % V).astype(np.int32)
            samples.append(
                SampleRouting(ids.astype(np.uint8), weights, toks, np.full(LENGTH, SPAN_PROMPT, np.uint8))
            )
            outputs.append({"in_batch_idx": i, "label": "unsafe" if unsafe else "safe", "kept": True})
        meta = {"num_experts": E, "top_k": k}
        save_batch_routing(run.path_for("routing", batch_idx=b), samples, list(range(L)), meta)
        atomic_write_json(run.path_for("outputs", batch_idx=b), {"batch_idx": b, "samples": outputs})
    return run


def build_in_child(run: Run) -> tuple[float, float]:
    """(seconds, peak resident MB) of `python -m moe_core atlas` on the run, in its own process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    argv = [
        sys.executable,
        "-m",
        "moe_core",
        "atlas",
        "--run",
        str(run.path),
        "--writes",
        "false",
    ]  # no model
    subprocess.run(argv, cwd=ROOT, check=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024


def timed(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def naive_card(run: Run, layer: int, expert: int) -> pd.DataFrame:
    """The same card's counts and top tokens, the naive way: every routing file into pandas."""
    frames = []
    for b in sorted(run.completed_batches()):
        routing = load_batch_routing(run.path_for("routing", batch_idx=b))
        for s in routing:
            hit = (s.expert_ids[layer] == expert).any(axis=-1)
            frames.append(pd.DataFrame({"token_id": s.token_ids[hit]}))
    return pd.concat(frames)["token_id"].value_counts().head(32).to_frame()


def measure(name: str, tokens: int, naive: bool) -> dict:
    """One shape: write the synthetic run, build its atlas in a child process, time the queries."""
    L, E, k, _ = SHAPES[name]
    with tempfile.TemporaryDirectory(prefix="bench-atlas-") as tmp:
        run = synthetic_run(Path(tmp), SHAPES[name], tokens)
        n_tokens = len(run.completed_batches()) * SAMPLES * LENGTH
        seconds, peak_mb = build_in_child(run)
        atlas = Atlas.open(run)
        build_s = atlas.meta["indexed_in_s"]  # the pass and the merge, without the child's start-up
        hot = atlas.experts().sort_values("risk_diff").to_dict("records")[-1]
        layer, expert = int(hot["layer"]), int(hot["expert"])
        card_s = timed(lambda: atlas.card(layer, expert))
        search_s = timed(lambda: atlas.search([1, 2, 3, 17, 42]))
        row = {
            "shape": f"{name} ({L}x{E}, top-{k})",
            "tokens": n_tokens,
            "entries": n_tokens * L * k,
            "build_s": build_s,
            "entries_per_s": f"{n_tokens * L * k / build_s / 1e6:.1f}M",
            "process_s": round(seconds, 1),
            "peak_mb": round(peak_mb),
            "card_ms": round(card_s * 1000),
            "search_ms": round(search_s * 1000),
            "index_mb": round(
                sum(p.stat().st_size for p in (run.path / "atlas" / "index").iterdir()) / 2**20, 1
            ),
        }
        if naive:
            naive_s = timed(lambda: naive_card(run, layer, expert), repeats=1)
            row |= {"naive_card_s": round(naive_s, 1), "card_speedup": f"{naive_s / card_s:.0f}x"}
        print(json.dumps(row), flush=True)
        return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument(
        "--naive", action="store_true", help="also time the naive card (loads every routing file)"
    )
    args = ap.parse_args(argv)
    rows = [measure(name, args.tokens, args.naive) for name in args.shapes]
    print("\n" + pd.DataFrame(rows).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
