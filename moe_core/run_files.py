"""Reading and writing a run's files: ``RunError``, ``ArtifactMissingError``, JSON and Parquet
artifacts (written atomically, see ``atomic``) and the UTC time stamps runs and jobs record.
Everything here is also importable from ``moe_core.runs``.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from .atomic import atomic_write, atomic_write_json
from .errors import MoELabError


class RunError(MoELabError, ValueError):
    """A run directory or artifact is missing or malformed; the message says what to do."""


class ArtifactMissingError(MoELabError, FileNotFoundError):
    """An artifact a step needs is not there yet (run the step that writes it); also a ``FileNotFoundError``."""


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_json(path, obj)


def read_json(path: str | Path, what: str = "file", missing: str = "",
              damaged: str = "delete it to let its step write it again", error: type[Exception] = RunError) -> Any:
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
        raise RunError(f"{path} is not a readable Parquet file ({e}); delete it to let its step write it again") from e


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _parse_time(s: Any) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(s)).timestamp()
    except (TypeError, ValueError):
        return None
