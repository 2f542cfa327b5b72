"""One base class for every error a user can fix.

Why: the CLI and the app catch :class:`MoELabError` only and show its message as one clear line;
anything else is a bug and is shown (and logged) with its traceback instead of being passed off
as a "user error". Subclasses also derive from ``ValueError`` where they did before, so existing
``except ValueError`` callers keep working.

    class RunError(MoELabError, ValueError): ...

``describe_validation_error`` turns a pydantic ``ValidationError`` about a JSON artifact into one
line that names the file and each bad field, for the artifact readers (masks, run manifest).
"""

from __future__ import annotations

from typing import Any


class MoELabError(Exception):
    """A problem the user can fix (bad input, missing artifact, impossible setting); the message says how."""


def describe_validation_error(err: Any, what: str, max_fields: int = 4) -> str:
    """``"<what>: field.path: message (got 'x'); ..."`` from a pydantic ``ValidationError``.

    ``what`` names the file (or object) being read, e.g. ``"masks/top8.json is not a valid expert mask"``.
    """
    parts = []
    errors = err.errors(include_url=False)
    for e in errors[:max_fields]:
        loc = ".".join(str(p) for p in e.get("loc", ()))
        if e.get("type") == "value_error":  # our own validators: their message already names the field
            msg, shown = str((e.get("ctx") or {}).get("error", e.get("msg"))), ""
        else:
            got = e.get("input")
            msg = e.get("msg", "invalid")
            shown = "" if e.get("type") == "missing" or len(repr(got)) > 80 else f" (got {_short(got)})"
        parts.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    more = f"; and {len(errors) - max_fields} more" if len(errors) > max_fields else ""
    return f"{what}: " + "; ".join(parts) + more


def _short(value: Any, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."
