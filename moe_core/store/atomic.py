"""Atomic writes: a file or folder appears whole or not at all.

Every write goes to a temp file in the same folder, is fsynced and renamed into place, so a
killed process never leaves a half-written file (at worst a hidden ``.name.*.tmp`` file, which
every reader in ``moe_core`` ignores). Also importable from ``moe_core.store.run``.

    atomic_write_json(path, {"a": 1}); atomic_write_text(path, "..."); atomic_write_bytes(path, b"...")
    atomic_write(path, lambda tmp: df.to_parquet(tmp))     # any writer that takes a path
    atomic_dir(folder, lambda tmp_dir: ...)                # a whole folder, swapped into place
    commit_files({a: write_a, b: write_b})                 # several files of one folder: one transaction
"""

from __future__ import annotations

import ctypes
import errno
import functools
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


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system cannot, so the caller falls back to two renames."""
    libc = _libc()
    if libc is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no C library to load
        return None
    return libc if hasattr(libc, "renameat2") else None


def atomic_dir(path: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory in a temp sibling, then swap it into place (never a half-written folder).

    Replacing an existing folder is one atomic exchange where the system has one (Linux), so a kill at
    any instant leaves the old folder or the new one; elsewhere two renames, undone on an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        build(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; artifacts are ordinary folders
        if path.exists() and exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous version
            return path
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


_JOURNAL = ".txn-*.json"  # a transaction of commit_files in progress: its stage folder and file names


def commit_files(files: dict[Path, Callable[[Path], None]]) -> None:
    """Write several files of one folder as one transaction: all are written into a stage folder, then a
    journal naming them is written (the commit point), then they are renamed into place.

    A kill before the journal leaves the previous files; after it, the new ones: ``committed`` reads a
    file from the stage until it is renamed, and the next ``commit_files`` in the folder (or ``doctor``)
    finishes the renames (``finish_commits``)."""
    folders = {Path(d).parent for d in files}
    if len(folders) != 1:
        raise ValueError(f"commit_files writes into one folder, got {sorted(map(str, folders))}")
    folder = folders.pop()
    folder.mkdir(parents=True, exist_ok=True)
    finish_commits(folder)  # an older commit cut short must land before this one, never after it
    stage = Path(tempfile.mkdtemp(prefix=".txn-", suffix=".tmp", dir=folder))
    try:
        for dest, write in files.items():
            atomic_write(stage / Path(dest).name, write)
        os.chmod(stage, 0o777 & ~_umask())
        journal = folder / f"{stage.name[: -len('.tmp')]}.json"
        atomic_write_text(journal, json.dumps({"stage": stage.name, "files": [Path(d).name for d in files]}))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _roll_forward(journal)


def finish_commits(folder: Path) -> list[Path]:
    """Finish every commit of ``folder`` that a kill cut between its renames -> the journals finished."""
    done = sorted(Path(folder).glob(_JOURNAL)) if Path(folder).is_dir() else []
    for journal in done:
        _roll_forward(journal)
    return done


def _roll_forward(journal: Path) -> None:
    info = _journal(journal)
    stage = journal.parent / info["stage"] if info else None
    for name in info["files"] if info else ():
        try:
            os.replace(stage / name, journal.parent / name)  # type: ignore[operator]
        except FileNotFoundError:  # renamed already (by the writer, or by an earlier roll-forward)
            pass
    if stage is not None:
        shutil.rmtree(stage, ignore_errors=True)
    journal.unlink(missing_ok=True)


def _journal(journal: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(journal.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a journal is written atomically: unreadable means gone meanwhile
    ok = isinstance(info, dict) and isinstance(info.get("stage"), str) and isinstance(info.get("files"), list)
    return info if ok and "/" not in info["stage"] and all("/" not in str(f) for f in info["files"]) else None


def committed(path: str | Path) -> Path:
    """Where the committed version of ``path`` is now: its stage copy while a cut-short commit still holds
    it (see ``commit_files``), else ``path`` itself. Reads only, so readers need no lease."""
    path = Path(path)
    for journal in sorted(path.parent.glob(_JOURNAL)) if path.parent.is_dir() else ():
        info = _journal(journal)
        if info and path.name in info["files"] and (path.parent / info["stage"] / path.name).exists():
            return path.parent / info["stage"] / path.name
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
