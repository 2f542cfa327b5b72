"""Atomic writes: a file or folder appears whole or not at all.

Every write goes to a temp file in the same folder, is fsynced and renamed into place, so a
killed process never leaves a half-written file (at worst a hidden ``.name.*.tmp`` file, which
every reader in ``moe_core`` ignores). Also importable from ``moe_core.store.run``.

    atomic_write_json(path, {"a": 1}); atomic_write_text(path, "..."); atomic_write_bytes(path, b"...")
    atomic_write(path, lambda tmp: df.to_parquet(tmp))     # any writer that takes a path
    atomic_dir(folder, lambda tmp_dir: ...)                # a whole folder, swapped into place
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)\)?(?: at path \"([^\"]*)\")?")


def as_os_error(e: BaseException) -> OSError | None:
    """``e`` as the OSError it carries: itself, or a library's own error type wrapping one (safetensors raises
    ``SafetensorError("... No space left on device (os error 28) at path ...")`` on a full disk). None otherwise."""
    if isinstance(e, OSError):
        return e
    m = _OS_ERROR_IN_TEXT.search(str(e))
    if m is None:
        return None
    code = int(m.group(1))
    return OSError(code, os.strerror(code), m.group(2))


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename tmp over ``path`` (same directory, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        os_error = as_os_error(e)
        if os_error is not None and os_error is not e:  # a full disk is a full disk, whoever wrote the file
            raise os_error from e
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_dir(path: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory in a temp sibling, then swap it into place (never a half-written folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        build(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "x").exists() and not path.exists():
            os.replace(old / "x", path)  # put the previous version back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(
        path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    )


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")
