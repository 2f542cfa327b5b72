"""The atlas's token tables merged over every shard: each expert's top tokens and each token's top experts.

Why not a SQL ``GROUP BY``: a batch of a Qwen3-30B-A3B run holds about 1.5 million distinct (layer, expert,
token) counts, so a run of a million tokens sums some 180 million rows, which DuckDB took longer to
aggregate than the whole shard pass (issue 19's build rate). Counts are instead added into a dense
(layer, expert, token) array, a few layers at a time within ``TOKEN_MEMORY``: each shard's token table holds
one Parquet row group per layer, so a pass reads only its layers' rows, and a shard's rows are distinct, so
``acc[rows] += n`` is exact. Rankings break ties like the SQL they replace (count, then the smaller id).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TOKEN_BITS = 24  # (layer * experts + expert) << TOKEN_BITS | token: one int64 key per routing entry
TOP_TOKENS = 32  # per expert: the tokens routed to it most often
TOKEN_EXPERTS = 16  # per (layer, token): the experts it is routed to most often (the search)
BOUND_COLUMNS = 256  # columns a row's top is first bounded on (see _top_per_row)
ROW_GROUP = 2**16  # rows per Parquet row group of the index: a token search reads only the groups of its ids
TOKEN_MEMORY = 512 * 2**20  # bytes of dense (layer, expert, token) counts held at once while merging

TOKENS_SCHEMA = pa.schema(
    [("layer", pa.int32()), ("expert", pa.int32()), ("token_id", pa.int32()), ("n", pa.int64())]
)
TOKEN_EXPERTS_SCHEMA = TOKENS_SCHEMA.append(pa.field("token_n", pa.int64()))


def write_by_layer(table: pa.Table, path: Path) -> None:
    """A shard's token table (sorted by layer) with one row group per layer, so a merge pass reads its layers only."""
    layer = table.column("layer").to_numpy()
    bounds = [0, *(np.flatnonzero(np.diff(layer)) + 1).tolist(), len(layer)]
    with pq.ParquetWriter(path, table.schema) as writer:
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                writer.write_table(table.slice(a, b - a))


def _vocab(files: Sequence[Path], first_layer: int) -> np.ndarray:
    """Every token id of the run, sorted: each token is routed in every MoE layer, so the first layer's rows
    of each shard hold them all (one row group read per shard)."""
    ids = [
        pq.read_table(f, columns=["token_id"], filters=[("layer", "=", first_layer)]).column(0).to_numpy()
        for f in files
    ]
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def _top_per_row(counts: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``counts`` its ``keep`` highest counts, ties to the smaller column, zeros left out
    -> (row, column, count), in no particular order.

    A row with at most ``keep`` nonzero counts keeps them all. For the others only entries at or above a
    lower bound of the row's ``keep``-th count are ranked: the ``keep``-th count among the ``BOUND_COLUMNS``
    columns with the largest totals (a subset of the row, so never above the row's own)."""
    R, C = counts.shape
    wide = np.count_nonzero(counts, axis=1) > keep
    narrow = counts[~wide]
    r, c = np.nonzero(narrow)
    rows, cols, ns = [np.flatnonzero(~wide)[r]], [c], [narrow[r, c]]
    if wide.any():
        sub = top = counts[wide]
        if C > BOUND_COLUMNS:
            sub = sub[:, np.argpartition(sub.sum(axis=0), C - BOUND_COLUMNS)[C - BOUND_COLUMNS :]]
        floor = np.maximum(np.partition(sub, sub.shape[1] - keep, axis=1)[:, sub.shape[1] - keep], 1)
        r, c = np.nonzero(top >= floor[:, None])
        n = top[r, c]
        order = np.lexsort((c, -n, r))
        r, c, n = r[order], c[order], n[order]
        kept = np.arange(r.size) - np.searchsorted(r, r) < keep  # each row's first keep: its best
        rows.append(np.flatnonzero(wide)[r[kept]])
        cols.append(c[kept])
        ns.append(n[kept])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(ns)


def _layer_tables(layer: int, counts: np.ndarray, vocab: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """One layer's dense [expert, token of ``vocab``] counts -> (its experts' top tokens, its tokens' top experts).

    ``vocab`` is sorted, so the smaller column is the smaller token id: the SQL's tie rule."""
    expert, col, n = _top_per_row(counts, TOP_TOKENS)
    tokens = pa.table(
        {
            "layer": np.full(n.size, layer, np.int32),
            "expert": expert.astype(np.int32),
            "token_id": vocab[col].astype(np.int32),
            "n": n.astype(np.int64),
        },
        schema=TOKENS_SCHEMA,
    )
    col, expert, n = _top_per_row(np.ascontiguousarray(counts.T), TOKEN_EXPERTS)
    experts = pa.table(
        {
            "layer": np.full(n.size, layer, np.int32),
            "expert": expert.astype(np.int32),
            "token_id": vocab[col].astype(np.int32),
            "n": n.astype(np.int64),
            "token_n": counts.sum(axis=0, dtype=np.int64)[col],
        },
        schema=TOKEN_EXPERTS_SCHEMA,
    )
    return tokens, experts


def merge_tokens(
    shards: Sequence[Path], moe_layers: Sequence[int], num_experts: int, out: Path, workers: int = 2
) -> None:
    """Every shard's ``tokens.parquet`` -> ``out/tokens.parquet`` and ``out/token_experts.parquet``."""
    files = [p / "tokens.parquet" for p in shards]
    layers = sorted(int(x) for x in moe_layers)
    vocab = _vocab(files, layers[0])
    column = np.zeros(int(vocab[-1]) + 1 if vocab.size else 1, np.int64)
    column[vocab] = np.arange(vocab.size)  # token id -> its column in the dense counts
    group = max(1, TOKEN_MEMORY // (num_experts * max(1, vocab.size) * 4))
    # one buffer for every pass: a fresh array's first touch costs a page fault per 4 KiB, more than the adds
    acc = np.zeros((min(group, len(layers)), num_experts, vocab.size), np.int32)
    flat = acc.reshape(-1)
    row_of = np.zeros(layers[-1] + 1, np.int64)
    with (
        pq.ParquetWriter(out / "tokens.parquet", TOKENS_SCHEMA) as top_tokens,
        pq.ParquetWriter(out / "token_experts.parquet", TOKEN_EXPERTS_SCHEMA) as top_experts,
    ):
        for g in range(0, len(layers), group):
            part = layers[g : g + group]
            acc.fill(0)
            row_of[part] = np.arange(len(part))
            for f in files:
                t = pq.read_table(f, filters=[("layer", ">=", part[0]), ("layer", "<=", part[-1])])
                row = row_of[t.column("layer").to_numpy()]
                expert, token = t.column("expert").to_numpy(), column[t.column("token_id").to_numpy()]
                flat[(row * num_experts + expert) * vocab.size + token] += t.column("n").to_numpy()
            with ThreadPoolExecutor(max_workers=workers) as pool:  # numpy's sorts and scans release the GIL
                for tokens, experts in pool.map(_layer_tables, part, acc[: len(part)], repeat(vocab)):
                    top_tokens.write_table(tokens, row_group_size=ROW_GROUP)
                    top_experts.write_table(experts, row_group_size=ROW_GROUP)
