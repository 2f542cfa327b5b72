"""Checks of step settings and step outputs, shared by the pipeline's specs and steps.

Validation before work: every numeric option is range-checked when its spec is built (the CLI
builds specs right after parsing, the app when a form is submitted), and artifact names are
checked as file names, so a bad value never reaches a model load. No overwrite without asking:
:func:`check_free` refuses an existing result unless ``--overwrite`` was given, and never replaces
a read-only one.

    check_range(spec, lr=POSITIVE, epochs=POSITIVE, max_batches=AT_LEAST_1)
    check_free(run.path_for("mask", name="m"), "mask 'm'", overwrite=False)
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_core.errors import MoELabError
from moe_core.store.run import _check_name

Rule = tuple[Callable[[Any], bool], str]  # (test, what the value must be)


class SpecError(MoELabError, ValueError):
    """A step setting outside its range: refused when the spec is built (CLI parse time), before any work."""


def check_range(spec: Any, **rules: Rule) -> None:
    """Raise SpecError naming the first field whose value breaks its rule (``field=(test, "what it must be")``).

    None passes (an unset optional). Flags are spelled as on the command line, so the message is actionable.
    """
    for name, rule in rules.items():
        test, want = rule
        value = getattr(spec, name)
        if value is not None and (isinstance(value, bool) or not test(value)):
            raise SpecError(f"--{name.replace('_', '-')} {value!r} is not allowed: {name} must be {want}")


def check_names(spec: Any, *names: str) -> None:
    """Artifact names (masks, trainings, evaluations) must be usable as file names: checked before any work."""

    for n in names:
        value = getattr(spec, n)
        if value is not None:
            try:
                _check_name(value, f"--{n.replace('_', '-')}")
            except MoELabError as e:
                raise SpecError(str(e)) from None


POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
AT_LEAST_1 = (lambda v: v >= 1, "a whole number >= 1")
SHARE = (lambda v: 0 < v <= 1, "a share in (0, 1]")
SHARE_OR_ZERO = (lambda v: 0 <= v <= 1, "a share in [0, 1]")


def json_object(text: str | None) -> dict[str, Any] | None:
    """The dict a JSON-object option holds (None when unset or not an object: JSON_OBJECT refuses those)."""
    import json

    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


JSON_OBJECT = (lambda v: json_object(v) is not None, "a JSON object, e.g. '{\"enable_thinking\": false}'")


def check_free(path: Path, what: str, overwrite: bool, *also: Path) -> None:
    """No silent overwrite: an existing result is replaced only with ``overwrite``, and never a read-only one."""
    existing = [p for p in (path, *also) if p.exists()]
    if existing and not overwrite:
        raise MoELabError(
            f"{what} already exists ({existing[0]}); pass --overwrite to replace it, or choose another --name"
        )
    # marked read-only by its owner (the mode bit: root may write anything, but is still asked not to)
    locked = [p for p in existing if not p.stat().st_mode & stat.S_IWUSR or not os.access(p, os.W_OK)]
    if locked:
        raise MoELabError(
            f"{what} is read-only ({locked[0]}); it is not replaced. Make it writable "
            "(chmod u+w) to replace it, or choose another --name"
        )
