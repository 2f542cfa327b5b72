"""Integrity checks of the run's artifact files: a file is sound, or we say what is wrong with it.

Why: a kill, a full disk or a hand edit can leave a truncated safetensors file or a broken Parquet
footer; readers would then fail far from the cause. Each check returns None when the file is sound."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_ST_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


# -- checks: None when the file is sound, else what is wrong ------------------------------------
def check_safetensors(path: Path) -> str | None:
    """Header readable, every tensor's byte range matches its shape, and the file is exactly that long."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return "header length is implausible (not a safetensors file)"
            header = json.loads(f.read(n))
        size = path.stat().st_size
        end = 0
        for name, t in header.items():
            if name == "__metadata__":
                continue
            a, b = t["data_offsets"]
            want = int(np.prod(t["shape"], dtype=np.int64)) * _ST_SIZES[t["dtype"]]
            if b - a != want:
                return f"tensor {name} holds {b - a} bytes, its shape needs {want}"
            end = max(end, b)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        return f"unreadable safetensors header ({type(e).__name__}: {e})"
    if size != 8 + n + end:
        return f"truncated or padded: {size} bytes, the header describes {8 + n + end}"
    return None


def check_parquet(path: Path, columns: list[str] | None = None) -> str | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        return f"not a readable Parquet file ({e})"
    missing = [c for c in columns or [] if c not in names]
    return f"columns {missing} are missing" if missing else None


def check_json(path: Path, validate: Callable[[Any], str | None] | None = None) -> str | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"not valid JSON ({e})"
    return validate(d) if validate else None
