"""The expert atlas index: every expert of a run at once, built by one streaming pass over the routing files.

Why: a researcher asking "what does expert 7 of layer 3 do?" needs the whole run, not one batch. Each
analysis batch becomes a shard (``atlas/shards/<batch>/``: per-expert counts and router weights on safe
and unsafe tokens, (expert, token) counts, the batch's top contexts per expert, co-activation matrices),
computed with array operations and written whole; shards of batches already indexed are kept, so the
index is resumable and grows with the run. The shards are then merged into ``atlas/index/`` (DuckDB,
in-process within a memory limit, for the per-expert tables; dense counts a few layers at a time for the
token tables: ``analysis.atlas_tokens``), swapped in as one folder. Memory is bounded by one batch and the
merge's limit, whatever the run's size. Reading (``analysis.atlas_query``) needs no lease.

    build_atlas(run)                     # python -m moe_core atlas --run R (pipeline.atlas holds the lease)
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from moe_core.analysis.analyse import SCOPE_SPAN, analysis_config_of
from moe_core.analysis.atlas_tokens import TOKEN_BITS, TOKENS_SCHEMA, merge_tokens, write_by_layer
from moe_core.errors import MoELabError
from moe_core.model.routing import BatchRouting, load_batch_routing
from moe_core.store.atomic import atomic_dir, atomic_write_json
from moe_core.store.files import read_json
from moe_core.store.run import Run
from moe_core.types import Progress

TOP_CONTEXTS = 8  # per expert: the routed tokens with the highest router weight
WORKERS = 2  # batches indexed at once
MERGE_MEMORY = "1GB"  # DuckDB's memory limit while merging the shards (it spills to disk beyond it)
INDEX_FILES = ("experts.parquet", "tokens.parquet", "token_experts.parquet", "contexts.parquet", "coact.npy")


class AtlasError(MoELabError, ValueError):
    """The atlas cannot be built or read as asked; the message says what to do."""


def atlas_dir(run: Run) -> Path:
    return run.path_for("atlas")


def writes_path(run: Run) -> Path:
    """What each expert writes (``analysis.expert_writes``): beside the index, kept when the index is rebuilt."""
    return atlas_dir(run) / "writes.parquet"


def _shard_dir(run: Run, b: int) -> Path:
    return atlas_dir(run) / "shards" / f"{b:05d}"


# -- one batch -----------------------------------------------------------------------------------
def batch_shard(
    routing: BatchRouting, samples: Sequence[dict[str, Any]], span: int, num_experts: int, batch_idx: int
) -> dict[str, Any]:
    """One batch's part of the atlas from its routing file and its kept samples (``in_batch_idx``, ``label``).

    -> experts (layer, expert, safe_n, unsafe_n, weight_sum), tokens (layer, expert, token_id, n),
    contexts (the batch's top ``TOP_CONTEXTS`` per expert by router weight), coact [2, L, E, E] (same
    token: same layer; layer l with l+1), totals."""
    parts = [(s, routing[s["in_batch_idx"]].select(span)) for s in samples]
    parts = [(s, r) for s, r in parts if r.token_ids.size]
    num_layers, E = len(routing.moe_layers), num_experts
    if not parts:
        return _empty(num_layers, E)
    ids = np.concatenate([r.expert_ids for _, r in parts], axis=1).astype(np.int64)  # [L, N, k]
    has_w = all(r.weights is not None for _, r in parts)
    weights = np.concatenate([r.weights for _, r in parts], axis=1).astype(np.float32) if has_w else None
    tokens = np.concatenate([r.token_ids for _, r in parts]).astype(np.int64)
    unsafe = np.concatenate([np.full(r.token_ids.size, s["label"] == "unsafe") for s, r in parts])
    sample = np.concatenate([np.full(r.token_ids.size, s["in_batch_idx"]) for s, r in parts])
    position = np.concatenate([np.arange(r.token_ids.size) for _, r in parts])
    L, N, k = ids.shape
    layer_of = np.asarray(routing.moe_layers, np.int32)  # row -> decoder layer (the index every table uses)
    le = ids + (np.arange(L) * E)[:, None, None]  # [L, N, k] flat (row, expert)
    flat = le.ravel()
    n_unsafe = np.bincount(le[:, unsafe].ravel(), minlength=L * E)
    n_all = np.bincount(flat, minlength=L * E)
    w_sum = np.bincount(flat, weights=weights.ravel(), minlength=L * E) if has_w else np.zeros(L * E)
    experts = pd.DataFrame(
        {
            "layer": np.repeat(layer_of, E),
            "expert": np.tile(np.arange(E), L).astype(np.int32),
            "safe_n": (n_all - n_unsafe).astype(np.int64),
            "unsafe_n": n_unsafe.astype(np.int64),
            "weight_sum": w_sum.astype(np.float64),
        }
    )
    keys, counts = np.unique((le << TOKEN_BITS | tokens[None, :, None]).ravel(), return_counts=True)
    tok = pa.table(  # sorted by (layer, expert, token): np.unique sorts its keys
        {
            "layer": layer_of[(keys >> TOKEN_BITS) // E],
            "expert": ((keys >> TOKEN_BITS) % E).astype(np.int32),
            "token_id": (keys & ((1 << TOKEN_BITS) - 1)).astype(np.int32),
            "n": counts.astype(np.int64),
        },
        schema=TOKENS_SCHEMA,
    )
    return {
        "experts": experts,
        "tokens": tok,
        "contexts": _top_contexts(le, weights, tokens, unsafe, sample, position, batch_idx, E, layer_of),
        "coact": _coactivation(ids, E),
        "totals": {
            "safe_tokens": int((~unsafe).sum()),
            "unsafe_tokens": int(unsafe.sum()),
            "has_weights": has_w,
        },
    }


def _top_contexts(
    le: np.ndarray,
    weights: np.ndarray | None,
    tokens: np.ndarray,
    unsafe: np.ndarray,
    sample: np.ndarray,
    position: np.ndarray,
    batch_idx: int,
    E: int,
    layer_of: np.ndarray,
) -> pd.DataFrame:
    """Per expert the ``TOP_CONTEXTS`` routing entries with the highest weight (without weights: the first).

    One sort of packed int64 keys (expert | 65535 - weight as float16 bits | entry), not a lexsort: the
    float16 bit pattern of a weight in [0, 1] orders like the weight. Only the candidates are sorted."""
    L, N, k = le.shape
    flat = le.ravel()
    w16 = (weights.ravel() if weights is not None else np.zeros(flat.size, np.float32)).astype(np.float16)
    cand = _candidates(flat, w16.view(np.uint16), L * E)
    rank = 0xFFFF - w16.view(np.uint16)[cand].astype(np.int64)
    index_bits = max(1, int(flat.size - 1).bit_length())
    packed = np.sort((flat[cand].astype(np.int64) << (16 + index_bits)) | (rank << index_bits) | cand)
    order = packed & ((1 << index_bits) - 1)
    grouped = packed >> (16 + index_bits)
    new_group = np.empty(grouped.size, bool)
    new_group[0], new_group[1:] = True, grouped[1:] != grouped[:-1]
    starts = np.flatnonzero(new_group)
    place = np.arange(grouped.size) - np.repeat(starts, np.diff(np.append(starts, grouped.size)))
    keep = order[place < TOP_CONTEXTS]  # each expert's first TOP_CONTEXTS entries: its highest weights
    w = w16.astype(np.float32)
    t = keep // k % N  # entry (layer, token, slot) -> its token
    return pd.DataFrame(
        {
            "layer": layer_of[flat[keep] // E],
            "expert": (flat[keep] % E).astype(np.int32),
            "weight": w[keep].astype(np.float32),
            "batch_idx": np.full(keep.size, batch_idx, np.int32),
            "in_batch_idx": sample[t].astype(np.int32),
            "position": position[t].astype(np.int32),
            "label": np.where(unsafe[t], "unsafe", "safe"),
            "token_id": tokens[t].astype(np.int32),
        }
    )


def _candidates(flat: np.ndarray, bits: np.ndarray, groups: int) -> np.ndarray:
    """Entries that surely hold every group's ``TOP_CONTEXTS`` highest weights: those at or above the weight
    of the ``4 * TOP_CONTEXTS * groups``-th highest entry, and every entry of a group with fewer above it.

    Why: sorting a batch's every entry (3 million for Qwen3-30B-A3B) was the shard's largest cost."""
    want = 4 * TOP_CONTEXTS * groups
    if flat.size <= 2 * want:
        return np.arange(flat.size)
    above = bits >= np.partition(bits, flat.size - want)[flat.size - want]
    short = np.bincount(flat[above], minlength=groups) < TOP_CONTEXTS
    return np.flatnonzero(above | short[flat] if short.any() else above)


def _coactivation(ids: np.ndarray, E: int) -> np.ndarray:
    """[2, L, E, E] counts of tokens routed to both experts: [0] within a layer, [1] MoE layer row l -> row l+1.

    One ``bincount`` of (expert, expert) pair codes per layer, no E x E matmul. Within a layer a token's
    experts are distinct, so the k (k - 1) / 2 slot pairs i < j, mirrored, give the off-diagonal and the
    per-expert counts the diagonal."""
    L, N, k = ids.shape
    out = np.zeros((2, L, E, E), np.int64)
    i, j = np.triu_indices(k, 1)
    diag = np.arange(E)
    for layer in range(L):
        a = ids[layer]
        pairs = np.bincount((a[:, i] * E + a[:, j]).ravel(), minlength=E * E).reshape(E, E)
        out[0, layer] = pairs + pairs.T
        out[0, layer, diag, diag] = np.bincount(a.ravel(), minlength=E)
        if layer + 1 < L:
            b = ids[layer + 1]
            out[1, layer] = np.bincount((a[:, :, None] * E + b[:, None, :]).ravel(), minlength=E * E).reshape(
                E, E
            )
    return out


def _empty(L: int, E: int) -> dict[str, Any]:
    cols = {"layer": [], "expert": []}
    return {
        "experts": pd.DataFrame({**cols, "safe_n": [], "unsafe_n": [], "weight_sum": []}),
        "tokens": TOKENS_SCHEMA.empty_table(),
        "contexts": pd.DataFrame(
            {
                **cols,
                "weight": [],
                "batch_idx": [],
                "in_batch_idx": [],
                "position": [],
                "label": [],
                "token_id": [],
            }
        ),
        "coact": np.zeros((2, L, E, E), np.int64),
        "totals": {"safe_tokens": 0, "unsafe_tokens": 0, "has_weights": True},
    }


def write_shard(path: Path, shard: dict[str, Any]) -> None:
    """A shard folder, whole or not at all."""

    def build(tmp: Path) -> None:
        for name in ("experts", "contexts"):
            shard[name].to_parquet(tmp / f"{name}.parquet", index=False)
        write_by_layer(shard["tokens"], tmp / "tokens.parquet")
        np.save(tmp / "coact.npy", shard["coact"])
        atomic_write_json(tmp / "totals.json", shard["totals"])  # last: a shard is read only when it is there

    atomic_dir(path, build)


# -- the run -------------------------------------------------------------------------------------
def build_atlas(
    run: Run, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None
) -> dict[str, Any]:
    """Index every analysed batch not indexed yet, then merge all shards into ``atlas/index`` -> its meta.

    Call it through ``pipeline.atlas`` (which holds the run's writer lease)."""
    cfg = analysis_config_of(run)
    if cfg is None or not run.completed_batches():
        raise AtlasError(f"run {run.id} has no analysed batch yet: run `python -m moe_core analyze` first")
    batches = sorted(run.completed_batches())
    todo = [b for b in batches if not (_shard_dir(run, b) / "totals.json").is_file()]
    first = load_batch_routing(run.path_for("routing", batch_idx=batches[0]))
    shape = {"num_experts": int(first.meta["num_experts"]), "moe_layers": list(first.moe_layers)}
    shape["top_k"] = int(first.meta.get("top_k") or first[0].expert_ids.shape[-1])
    span, t0 = SCOPE_SPAN[cfg.scope], time.perf_counter()

    def index(b: int) -> int:
        routing = load_batch_routing(run.path_for("routing", batch_idx=b))
        samples = [s for s in read_json(run.path_for("outputs", batch_idx=b))["samples"] if s["kept"]]
        write_shard(_shard_dir(run, b), batch_shard(routing, samples, span, shape["num_experts"], b))
        return b

    # two batches at a time: numpy, the Parquet writer and the file reads release the GIL (two cores)
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        pending = iter(todo)
        running = {pool.submit(index, b) for b in itertools.islice(pending, WORKERS)}
        done = 0
        while running:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                done += 1
                if progress:
                    progress(done, len(todo) + 1, f"batch {f.result()} indexed")
            if should_stop is None or not should_stop():
                running |= {pool.submit(index, b) for b in itertools.islice(pending, len(finished))}
    meta = merge_shards(atlas_dir(run), {**shape, "scope": cfg.scope, "indexed_in_s": 0.0})
    meta["indexed_in_s"] = round(time.perf_counter() - t0, 2)  # the bench's figure (the whole pass and merge)
    atomic_write_json(atlas_dir(run) / "index" / "meta.json", meta)
    if progress:
        progress(len(todo) + 1, len(todo) + 1, f"atlas of {len(meta['shards'])} batches")
    return meta


def merge_shards(root: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Every complete shard under ``root/shards`` -> ``root/index`` (one folder swap) -> the index's meta."""
    import duckdb

    shards = sorted(p.parent for p in (root / "shards").glob("*/totals.json"))
    if not shards:
        raise AtlasError(f"no atlas shard under {root}: index the run first")
    totals = [json.loads((p / "totals.json").read_text()) for p in shards]
    meta = {
        **info,
        "format": 1,
        "shards": [int(p.name) for p in shards],
        "safe_tokens": sum(t["safe_tokens"] for t in totals),
        "unsafe_tokens": sum(t["unsafe_tokens"] for t in totals),
        "has_weights": all(t["has_weights"] for t in totals),
    }

    def src(name: str) -> str:
        return "read_parquet([" + ", ".join(f"'{p / name}'" for p in shards) + "])"

    def build(tmp: Path) -> None:
        con = duckdb.connect()
        con.execute(f"SET memory_limit='{MERGE_MEMORY}'; SET temp_directory='{root / '.duckdb_tmp'}'")
        con.execute(f"""COPY (SELECT layer, expert, sum(safe_n)::BIGINT AS safe_n, sum(unsafe_n)::BIGINT AS unsafe_n,
            sum(weight_sum) AS weight_sum FROM {src("experts.parquet")} GROUP BY ALL ORDER BY layer, expert)
            TO '{tmp / "experts.parquet"}' (FORMAT parquet)""")
        con.execute(f"""COPY (SELECT * FROM {src("contexts.parquet")} QUALIFY row_number() OVER
            (PARTITION BY layer, expert ORDER BY weight DESC, batch_idx, in_batch_idx, position) <= {TOP_CONTEXTS})
            TO '{tmp / "contexts.parquet"}' (FORMAT parquet)""")
        con.close()
        merge_tokens(shards, info["moe_layers"], info["num_experts"], tmp, WORKERS)
        coact = None
        for p in shards:  # one shard's matrices in memory at a time
            m = np.load(p / "coact.npy")
            coact = m if coact is None else coact + m
        np.save(tmp / "coact.npy", coact)
        atomic_write_json(tmp / "meta.json", meta)

    atomic_dir(root / "index", build)
    return meta
