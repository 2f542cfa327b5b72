"""Reading and writing a run's files: ``RunError``, ``ArtifactMissingError``, JSON and Parquet
artifacts (written atomically, see ``atomic``) and the UTC time stamps runs and jobs record.
Everything here is also importable from ``moe_core.store.run``.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
from pathlib import Path
from typing import Any

from moe_core.errors import MoELabError
from moe_core.store.atomic import atomic_write, atomic_write_json


class RunError(MoELabError, ValueError):
    """A run directory or artifact is missing or malformed; the message says what to do."""


class ArtifactMissingError(MoELabError, FileNotFoundError):
    """An artifact a step needs is not there yet (run the step that writes it); also a ``FileNotFoundError``."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)


def os_error_message(e: OSError) -> str | None:
    """One line for a disk-full or permission error (what happened, where, what to do); None for others."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in _DISK_FULL:
        return (
            f"the disk is full{where}: free some space (or point MOE_LAB_RUNS at a bigger disk) and run the same "
            "command again; finished batches and steps are kept, nothing was half-written"
        )
    if e.errno in _NO_ACCESS:
        return (
            f"no permission to write{where}: {e.strerror}; make the runs folder writable (or point MOE_LAB_RUNS "
            "elsewhere) and run the same command again"
        )
    return None


def listed(folder: str | Path, pattern: str = "*.json") -> list[Path]:
    """The artifacts of a run folder matching ``pattern``, sorted: hidden names (temp files, a commit's
    journal and stage) are never artifacts."""
    folder = Path(folder)
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith(".")) if folder.is_dir() else []


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_json(path, obj)


def read_json(
    path: str | Path,
    what: str = "file",
    missing: str = "",
    damaged: str = "delete it to let its step write it again",
    error: type[Exception] = RunError,
) -> Any:
    """JSON of an artifact; a missing file is ``ArtifactMissingError``, a broken one ``error``, each with its fix."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactMissingError(f"no {what} at {path}" + (f"; {missing}" if missing else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); {damaged}") from None


def write_parquet(path: str | Path, df: Any) -> Path:
    """Write a DataFrame as Parquet (pyarrow, no index), atomically."""
    return atomic_write(path, lambda p: df.to_parquet(p, engine="pyarrow", index=False))


def read_parquet(path: str | Path, columns: list[str] | None = None) -> Any:
    import pandas as pd
    import pyarrow as pa

    path = Path(path)
    if not path.is_file():
        raise ArtifactMissingError(f"no file at {path}")
    try:
        return pd.read_parquet(path, engine="pyarrow", columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise RunError(f"{path} is not a readable Parquet file ({e}); {_repair_hint(path)}") from e


def _repair_hint(path: Path) -> str:
    """The one-line fix for a damaged artifact: the doctor of the run it lies in (or rewriting it)."""
    run = next((p for p in path.parents if (p / "manifest.json").is_file()), None)
    if run is None:
        return "delete it to let its step write it again"
    return f"`python -m moe_core doctor --run {run}` repairs or removes it (a resume then redoes what is missing)"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _parse_time(s: Any) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(s)).timestamp()
    except (TypeError, ValueError):
        return None
