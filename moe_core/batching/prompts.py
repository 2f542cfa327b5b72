"""Prompt sets: loaders for CSV/JSON/JSONL/Parquet/HF datasets, pairing.

Every function returns ``moe_core.types.PromptItem`` lists, the one spelling the rest of the
pipeline (batches, routing, SFT) reads.

The built-in demo set (our own text) lives in ``moe_core.batching.demo_prompts``.

    items = load_prompts("advbench/harmful_behaviors.csv", label="unsafe")   # column auto-detected
    items = load_prompts(uploaded_bytes, name="mine.jsonl", label="safe", column="question")
    harmful, benign = pair_by_row(jbb_harmful, jbb_benign)

Column auto-detection tries, in order: ``PROMPT_COLUMNS`` (prompt, goal, Goal, instruction,
Behavior, behavior, question, text, query, input, request, content, user_prompt), then the same
names case-insensitively. Category and target columns are kept when present (``CATEGORY_COLUMNS``,
``TARGET_COLUMNS``); every other scalar column goes to ``PromptItem.meta`` (e.g. XSTest ``label``).
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal

from moe_core.errors import MoELabError
from moe_core.types import LABELS, Label, PromptItem

log = logging.getLogger(__name__)

Split = Literal["train", "heldout", "validation", "test", "all"]  # validation + test = heldout
SPLITS = ("train", "heldout", "validation", "test", "all")


class PromptError(MoELabError, ValueError):
    """A prompt set cannot be built as asked (bad split, mode, label, templates, pairing); the message says why."""


class PromptLoadError(PromptError):
    """A prompt set could not be loaded; the message says what to do about it."""


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------

PROMPT_COLUMNS: tuple[str, ...] = (
    "prompt",
    "goal",
    "Goal",
    "instruction",
    "Behavior",
    "behavior",
    "question",
    "text",
    "query",
    "input",
    "request",
    "content",
    "user_prompt",
)
CATEGORY_COLUMNS: tuple[str, ...] = ("category", "Category", "SemanticCategory", "type", "FunctionalCategory")
TARGET_COLUMNS: tuple[str, ...] = ("target", "Target")
FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "txt",  # txt: one prompt per line
}
Source = str | Path | bytes | BinaryIO


def detect_prompt_column(columns: Sequence[str]) -> str | None:
    """The prompt column by ``PROMPT_COLUMNS`` priority (exact, then case-insensitive), or None."""
    cols = [str(c) for c in columns]
    for name in PROMPT_COLUMNS:
        if name in cols:
            return name
    lower = {c.lower(): c for c in reversed(cols)}
    for name in PROMPT_COLUMNS:
        if name.lower() in lower:
            return lower[name.lower()]
    return None


def _pick(columns: Sequence[str], names: Sequence[str]) -> str | None:
    return next((n for n in names if n in columns), None)


def _is_file_like(source: Any) -> bool:
    return hasattr(source, "read")


def _format_for(name: str | None, fmt: str | None, data: bytes | None = None) -> str:
    """Explicit format, else the file suffix, else a sniff of the first bytes (uploads)."""
    if fmt:
        f = fmt.lower().lstrip(".")
        if f in set(FORMATS.values()):
            return f
        raise PromptLoadError(f"unknown format {fmt!r}: use one of {sorted(set(FORMATS.values()))}")
    if name:
        suffix = Path(name).suffix.lower()
        if suffix in FORMATS:
            return FORMATS[suffix]
        if suffix:
            raise PromptLoadError(
                f"cannot read '{name}': unknown file type '{suffix}' (supported: {', '.join(FORMATS)}); "
                "rename the file or pass format=..."
            )
    if data is not None:
        head = data.lstrip()[:1]
        if data[:4] == b"PAR1":
            return "parquet"
        if head == b"[":
            return "json"
        if head == b"{":
            return "jsonl"
        return "csv"
    raise PromptLoadError(
        f"cannot tell the format of {name or 'the input'}: name the file with one of {', '.join(FORMATS)}"
    )


WHAT_TO_LOAD = "use a CSV, JSON, JSONL, Parquet or .txt file of prompts (one prompt per row)"


def _check_readable(data: bytes, fmt: str, where: str) -> None:
    """An empty, binary or non-UTF-8 file is named in plain words with what to do, before a parser
    answers with its own terms ("No columns to parse from file", "'utf-8' codec can't decode...")."""
    if not data.strip():
        raise PromptLoadError(f"{where} is empty: {WHAT_TO_LOAD}")
    if fmt == "parquet":
        return
    head = data[:8192]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise PromptLoadError(
            f"{where} is UTF-16 text: save it as UTF-8 (e.g. 'CSV UTF-8' in Excel) and load it again"
        )
    controls = sum(1 for b in head if b < 32 and b not in b"\t\n\r\f\v")
    if b"\x00" in head or controls * 20 > len(head):
        raise PromptLoadError(f"{where} is not a text file (it looks binary): {WHAT_TO_LOAD}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PromptLoadError(
            f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line} is not UTF-8): save the "
            "file as UTF-8 (e.g. 'CSV UTF-8' in Excel) and load it again"
        ) from None


def _jsonl_rows(data: bytes, where: str) -> list:
    """One JSON value per line; a broken line is named by its own number (not "line 1" of that line)."""
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PromptLoadError(
                    f"{where}: line {n} is not valid JSON ({e.msg}, column {e.colno}); "
                    "fix or delete that line"
                ) from None
    return rows


def _frame_from_bytes(data: bytes, fmt: str, where: str):
    import pandas as pd

    _check_readable(data, fmt, where)
    try:
        if fmt in ("csv", "tsv"):
            return pd.read_csv(io.BytesIO(data), sep="\t" if fmt == "tsv" else ",")
        if fmt == "parquet":
            return pd.read_parquet(io.BytesIO(data))
        if fmt == "txt":  # one prompt per line; blank lines separate nothing and are skipped
            return pd.DataFrame(
                {"text": [ln.strip() for ln in data.decode("utf-8").splitlines() if ln.strip()]}
            )
        if fmt == "jsonl":
            rows = _jsonl_rows(data, where)
        else:
            rows = json.loads(data.decode("utf-8"))
            if isinstance(rows, dict):  # {"data": [...]}-style wrapper: one list inside
                lists = [v for v in rows.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise PromptLoadError(
                        f"{where}: a JSON object must hold exactly one list of prompts "
                        f"(found keys {list(rows)}); pass a JSON list instead"
                    )
                rows = lists[0]
    except PromptLoadError:
        raise
    except Exception as e:  # parser errors of pandas/pyarrow/json: say which file and format
        raise PromptLoadError(f"{where}: could not parse as {fmt}: {e}") from None
    if not isinstance(rows, list):
        raise PromptLoadError(
            f"{where}: expected a JSON list of objects or strings, got {type(rows).__name__}"
        )
    if rows and all(isinstance(r, str) for r in rows):
        return pd.DataFrame({"text": rows})
    if not all(isinstance(r, dict) for r in rows):
        raise PromptLoadError(f"{where}: every JSON entry must be an object (or every entry a string)")
    return pd.DataFrame.from_records(rows)


def _looks_like_path(s: str) -> bool:
    return Path(s).suffix.lower() in FORMATS or s.startswith((".", "/", "~")) or s.count("/") > 1


def _read_table(source: Source, format: str | None, split: str | None, config: str | None, name: str | None):
    """(DataFrame, source name) from a path, bytes, a file-like upload or a HF dataset name."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        fmt = _format_for(name, format, data)
        return _frame_from_bytes(data, fmt, name or "uploaded data"), Path(name).stem if name else "upload"
    if _is_file_like(source):
        fname = name or getattr(source, "name", None)
        data = source.read()
        data = data.encode("utf-8") if isinstance(data, str) else data
        fmt = _format_for(fname, format, data)
        return _frame_from_bytes(data, fmt, fname or "uploaded file"), Path(fname).stem if fname else "upload"
    if not isinstance(source, (str, Path)):
        raise PromptLoadError(
            f"cannot load prompts from a {type(source).__name__}: pass a path, bytes, a file or a dataset name"
        )
    path = Path(source).expanduser()
    if path.is_file():
        fmt = _format_for(path.name, format)
        return _frame_from_bytes(
            path.read_bytes(), fmt, str(path)
        ), name or f"{path.resolve().parent.name}/{path.stem}"
    if path.is_dir():
        raise PromptLoadError(f"{path} is a folder: pass one of the files in it")
    if isinstance(source, Path) or _looks_like_path(str(source)):
        raise PromptLoadError(f"no such file: {path}")
    return _hf_table(str(source), split, config), name or str(source)


def _hf_table(name: str, split: str | None, config: str | None):
    """A Hugging Face dataset by name; offline or unknown -> PromptLoadError saying what to do."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a hard dependency
        raise PromptLoadError(
            "the 'datasets' package is needed to load Hugging Face datasets by name"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the hub raises many types (offline, 404, gated, missing config)
        what = (
            f"Hugging Face dataset '{name}'"
            f"{f' (config {config!r})' if config else ''}{f' split {split!r}' if split else ''}"
        )
        offline = (
            isinstance(e, (ConnectionError, TimeoutError)) or "offline" in f"{type(e).__name__} {e}".lower()
        )
        if offline:
            raise PromptLoadError(
                f"could not load {what}: the Hugging Face hub is unreachable from this machine "
                f"({type(e).__name__}: {e}). Download the data where there is internet and pass the local "
                "file (CSV, JSON, JSONL, Parquet or one prompt per line in .txt) instead."
            ) from None
        raise PromptLoadError(
            f"could not load {what}: {type(e).__name__}: {e}. Check the dataset name, config and split, "
            "or pass a local file (CSV, JSON, JSONL, Parquet or .txt); if you meant a file, check its path."
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        chosen = "train" if "train" in ds else next(iter(ds))
        log.info("dataset %s has splits %s; using %r (pass split=... to choose)", name, list(ds), chosen)
        ds = ds[chosen]
    return ds.to_pandas()


def list_columns(
    source: Source,
    *,
    format: str | None = None,
    split: str | None = None,
    config: str | None = None,
    name: str | None = None,
) -> list[str]:
    """Column names of a prompt file/upload/dataset (for the app's column picker)."""
    df, _ = _read_table(source, format, split, config, name)
    return [str(c) for c in df.columns]


def _scalar(v: Any) -> Any:
    """JSON-friendly scalar or None for missing values (NaN, None, pandas NA)."""
    if v is None:
        return None
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        v = v.tolist()  # numpy scalars -> python scalars, arrays (parquet lists) -> lists
    if isinstance(v, (list, tuple, dict)):
        return json.loads(json.dumps(v, default=str))
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (str, int, float, bool)):
        return v
    try:
        import pandas as pd

        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    return str(v)


@dataclass(frozen=True)
class LoadedPrompts:
    """What ``load_prompt_set`` read: the items, and how many rows it skipped for an empty prompt (the
    app says so on the page: a count only in the log is a row silently lost)."""

    items: list[PromptItem]
    skipped: int
    column: str


def load_prompts(
    source: Source,
    *,
    column: str | None = None,
    label: Label,
    limit: int | None = None,
    format: str | None = None,
    split: str | None = None,
    config: str | None = None,
    name: str | None = None,
) -> list[PromptItem]:
    """Prompt items from a CSV/TSV/JSON/JSONL/Parquet file, bytes/upload, or a HF dataset name.

    ``column`` picks the prompt column (else auto-detected, see module doc). ``label`` is the
    set's label for every item. ``name`` names an upload (its suffix tells the format) and the
    items' ``source``; ids are ``{source}:{row}`` with the row number in the file. Rows whose
    prompt is empty or missing are dropped (count logged; ``load_prompt_set`` returns it);
    ``limit`` keeps the first N after that. ``split``/``config`` go to ``datasets.load_dataset``
    for a dataset name.
    """
    return load_prompt_set(
        source, column=column, label=label, limit=limit, format=format, split=split, config=config, name=name
    ).items


def load_prompt_set(
    source: Source,
    *,
    column: str | None = None,
    label: Label,
    limit: int | None = None,
    format: str | None = None,
    split: str | None = None,
    config: str | None = None,
    name: str | None = None,
) -> LoadedPrompts:
    """``load_prompts`` with the count of rows skipped for an empty prompt (see ``LoadedPrompts``)."""
    if label not in LABELS:
        raise PromptError(f"label must be one of {LABELS}, got {label!r}")
    if limit is not None and limit < 1:
        raise PromptError(f"limit must be a positive number of prompts, got {limit}")
    df, src = _read_table(source, format, split, config, name)
    cols = [str(c) for c in df.columns]
    df.columns = cols
    if column is None:
        column = detect_prompt_column(cols)
        if column is None:
            raise PromptLoadError(
                f"{src}: no prompt column found among {cols} (looked for {', '.join(PROMPT_COLUMNS)}); "
                "pass column='<name>' to say which column holds the prompts"
            )
    elif column not in cols:
        raise PromptLoadError(f"{src}: column {column!r} not found; columns are {cols}")
    records = df.to_dict("records")
    _check_text_column(records, column, src)
    items, dropped = _items(records, cols, column, label, src, limit)
    if dropped:
        log.warning("%s: dropped %d row(s) with an empty or missing '%s'", src, dropped, column)
    if not items:
        raise PromptLoadError(
            f"{src}: no prompts in column {column!r} ({len(df)} rows, all empty or missing)"
        )
    return LoadedPrompts(items, dropped, column)


def _check_text_column(records: list[dict[str, Any]], column: str, src: str) -> None:
    """123, True, a list or a struct is no prompt: a str() of it would be used as one."""
    not_text = [
        (row, type(raw).__name__)
        for row, rec in enumerate(records)
        if (raw := rec.get(column)) is not None and not isinstance(raw, str) and _scalar(raw) is not None
    ]
    if not_text:
        rows = ", ".join(f"row {r} ({kind})" for r, kind in not_text[:5]) + (
            " ..." if len(not_text) > 5 else ""
        )
        raise PromptLoadError(
            f"{src}: column {column!r} must hold text, but {len(not_text)} row(s) hold something else: {rows}; "
            "fix those rows or pick the column that holds the prompts"
        )


def _items(
    records: list[dict[str, Any]], cols: list[str], column: str, label: Label, src: str, limit: int | None
) -> tuple[list[PromptItem], int]:
    """(items, rows dropped for an empty prompt) of a table's records; the first ``limit`` items at most."""
    cat_col = _pick(cols, CATEGORY_COLUMNS)
    tgt_col = _pick(cols, TARGET_COLUMNS)
    meta_cols = [c for c in cols if c not in (column, cat_col, tgt_col) and c and not c.startswith("Unnamed")]
    items: list[PromptItem] = []
    dropped = 0
    for row, rec in enumerate(records):
        text = _scalar(rec.get(column))
        text = str(text).strip() if text is not None else ""
        if not text:
            dropped += 1
            continue
        cat, tgt = (_scalar(rec.get(c)) if c else None for c in (cat_col, tgt_col))
        meta = {c: v for c in meta_cols if (v := _scalar(rec.get(c))) is not None}
        items.append(
            PromptItem(
                id=f"{src}:{row}",
                text=text,
                label=label,
                goal=text,
                source=src,
                category=str(cat) if cat is not None else None,
                target=str(tgt) if tgt is not None else None,
                meta={**meta, "row": row},
            )
        )
        if limit is not None and len(items) >= limit:
            break
    return items, dropped


# --------------------------------------------------------------------------------------------
# Pairing
# --------------------------------------------------------------------------------------------


def pair_by_row(
    safe: Sequence[PromptItem], unsafe: Sequence[PromptItem]
) -> tuple[list[PromptItem], list[PromptItem]]:
    """Pair the i-th safe item with the i-th unsafe one (e.g. JailbreakBench harmful vs benign rows).

    Both get ``pair_id = "{safe id}~{unsafe id}"``. The sets must be the same length.
    """
    if len(safe) != len(unsafe):
        raise PromptError(
            f"pair_by_row needs sets of the same length (safe {len(safe)}, unsafe {len(unsafe)}); "
            "trim them with limit=... or pair by goal"
        )
    s_out, u_out = [], []
    for s, u in zip(safe, unsafe):
        pid = f"{s.id}~{u.id}"
        s_out.append(replace(s, pair_id=pid))
        u_out.append(replace(u, pair_id=pid))
    return s_out, u_out


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".?!")


def pair_by_goal(
    safe: Sequence[PromptItem], unsafe: Sequence[PromptItem]
) -> tuple[list[PromptItem], list[PromptItem]]:
    """Pair items whose ``goal`` (else text) is the same, ignoring case, spacing and end punctuation.

    One-to-one in ``safe`` order; ``pair_id`` = the safe item's id. Unmatched items are dropped
    with a logged count; no match at all raises.
    """
    by_goal: dict[str, list[PromptItem]] = {}
    for u in unsafe:
        by_goal.setdefault(_norm(u.goal or u.text), []).append(u)
    s_out, u_out = [], []
    for s in safe:
        twins = by_goal.get(_norm(s.goal or s.text))
        if twins:
            u = twins.pop(0)
            s_out.append(replace(s, pair_id=s.id))
            u_out.append(replace(u, pair_id=s.id))
    if not s_out:
        raise PromptError("pair_by_goal: no safe item shares a goal with an unsafe item; pair by row instead")
    if len(s_out) < len(safe) or len(u_out) < len(unsafe):
        log.warning(
            "pair_by_goal: %d pairs; dropped %d safe and %d unsafe items without a twin",
            len(s_out),
            len(safe) - len(s_out),
            len(unsafe) - len(u_out),
        )
    return s_out, u_out
