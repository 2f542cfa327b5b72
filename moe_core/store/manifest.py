"""The manifest of a run (``manifest.json``): its schema, how it is read and checked, the package
versions it records, and the table of every run under a root. Also importable from ``moe_core.store.run``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moe_core import __version__
from moe_core.errors import describe_validation_error
from moe_core.store.events import step_status
from moe_core.store.files import RunError, _parse_time

MANIFEST = "manifest.json"
RUN_FORMAT = "moe-safety-lab/run@1"
FORMAT_VERSION = 1
_VERSIONED = ("torch", "transformers", "datasets", "accelerate", "numpy", "pandas", "pyarrow", "safetensors")


def package_versions() -> dict[str, str | None]:
    """Versions that decide whether a run can be reproduced (read from metadata, no imports)."""

    out: dict[str, str | None] = {"python": platform.python_version(), "moe_core": __version__}
    for pkg in _VERSIONED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def source_commit() -> str | None:
    """The git commit of this moe_core checkout ("<sha>+dirty" with uncommitted changes), None outside git:
    what a stored reference result records so that it can be reproduced."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "moe_core"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def default_runs_root() -> Path:
    """``$MOE_LAB_RUNS`` or ``./runs``, absolute so a job in another cwd agrees with the app."""
    return Path(os.environ.get("MOE_LAB_RUNS") or "runs").expanduser().resolve()


class RunManifest(BaseModel):
    """``manifest.json`` of a run, as ``Run.create`` writes it; keys it does not name are kept as they are."""

    model_config = ConfigDict(extra="allow")

    format: str = RUN_FORMAT
    format_version: int = Field(default=FORMAT_VERSION, ge=1)
    id: str = Field(min_length=1)  # the run folder's name
    name: str | None = None  # display name
    created: str | None = None  # ISO time (UTC)
    updated: str | None = None  # ISO time of the last manifest change
    model: str | None = None  # model id or folder
    config: dict[str, Any] = Field(default_factory=dict)  # what the run was started with
    seeds: dict[str, Any] = Field(default_factory=dict)  # seed name -> value
    versions: dict[str, str | None] = Field(default_factory=dict)  # package -> version (package_versions)
    steps: dict[str, dict[str, Any]] = Field(default_factory=dict)  # step -> {"status", "updated", ...}
    notes: str = ""

    @field_validator("steps", mode="before")
    @classmethod
    def _no_steps(cls, v: Any) -> Any:
        """``"steps": []`` or ``null`` (hand-edited, or written by other tools) means no step yet."""
        return {} if v in ([], None) else v


def _read_manifest(path: Path) -> dict[str, Any]:
    mf = path / MANIFEST
    if not mf.is_file():
        raise RunError(f"{path} is not a run directory (no {MANIFEST}); pick a folder made by Run.create")
    try:
        m = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{mf} is damaged ({e}); restore it or delete the run") from e
    if not isinstance(m, dict) or "id" not in m:
        raise RunError(f"{mf} is not a run manifest (no 'id')")
    version = m.get("format_version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise RunError(f"{path} was written by a newer moe_core (format {version}); upgrade to open it")
    return _validated_manifest(m, mf)


def _validated_manifest(m: dict[str, Any], where: Path) -> dict[str, Any]:
    """The manifest checked field by field (``RunManifest``), as a plain dict; RunError naming the field."""
    try:
        return RunManifest.model_validate(m).model_dump()
    except ValidationError as e:
        raise RunError(describe_validation_error(e, f"{where} is not a valid run manifest")) from None


@dataclass
class RunSummary:
    """One row of the runs table; ``error`` is set (and the rest mostly empty) for a broken dir."""

    id: str
    path: Path
    name: str | None = None
    created: str | None = None
    updated: str | None = None
    model: str | None = None
    steps: dict[str, str] = field(default_factory=dict)  # step -> status
    error: str | None = None


def list_runs(root: str | Path | None = None) -> list[RunSummary]:
    """Every run under ``root``, newest first; unreadable folders are listed with ``error`` set."""
    root = Path(root) if root is not None else default_runs_root()
    if not root.is_dir():
        return []
    out: list[tuple[float, RunSummary]] = []
    for d in root.iterdir():
        if not d.is_dir() or d.name.startswith("."):
            continue
        try:
            m = _read_manifest(d)
            steps = {k: step_status(v) for k, v in (m.get("steps") or {}).items() if isinstance(v, dict)}
            s = RunSummary(
                str(m["id"]), d, m.get("name"), m.get("created"), m.get("updated"), m.get("model"), steps
            )
            t = _parse_time(s.created) or d.stat().st_mtime
        except (RunError, OSError) as e:
            s, t = RunSummary(d.name, d, error=str(e)), d.stat().st_mtime
        out.append((t, s))
    out.sort(key=lambda ts: (ts[0], ts[1].id), reverse=True)
    return [s for _, s in out]
