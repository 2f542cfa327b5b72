"""One error base: every user-facing error class of moe_core is a MoELabError, and the app tells a
user error (its message) from a bug (a short note, traceback in the log). Fast: imports only."""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil

import pytest

import moe_core
from moe_core.errors import MoELabError, describe_validation_error

# Exceptions that are control flow, not errors shown to a user.
CONTROL_FLOW = {"moe_core.store.events.JobStopped"}

# Classes that were ValueErrors before the common base: they must stay ValueErrors, so callers that
# catch ValueError keep working.
STILL_VALUE_ERRORS = [
    "moe_core.store.files.RunError",
    "moe_core.store.run.JobBusyError",
    "moe_core.jobs.JobLaunchError",
    "moe_core.judge.verdicts.JudgeError",
    "moe_core.analysis.masks.MaskError",
    "moe_core.batching.prompts.PromptError",
    "moe_core.batching.prompts.PromptLoadError",
    "moe_core.batching.plan.BatchPlanError",
    "moe_core.analysis.risk.RiskInputError",
    "moe_core.analysis.selection.SelectionError",
    "moe_core.analysis.selection.NothingSelectedError",
    "moe_core.analysis.analyse.AnalysisError",
    "moe_core.eval.evaluation.EvaluationError",
]


def _modules() -> list[str]:
    return sorted(
        m.name for m in pkgutil.walk_packages(moe_core.__path__, "moe_core.") if m.name != "moe_core.__main__"
    )


def _error_classes() -> list[type[BaseException]]:
    found = []
    for name in _modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == name
                and not attr.startswith("_")
            ):
                found.append(obj)
    return found


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def test_every_public_error_class_derives_from_moelaberror() -> None:
    classes = _error_classes()
    assert len(classes) >= 15, [_qualname(c) for c in classes]  # the walk found the package's errors
    offenders = [
        _qualname(c) for c in classes if _qualname(c) not in CONTROL_FLOW and not issubclass(c, MoELabError)
    ]
    assert not offenders, f"user-facing errors without the MoELabError base: {offenders}"


def test_control_flow_exceptions_are_not_user_errors() -> None:
    from moe_core.store.events import JobStopped

    assert not issubclass(JobStopped, MoELabError)


@pytest.mark.parametrize("qualname", STILL_VALUE_ERRORS)
def test_former_value_errors_keep_their_value_error_base(qualname: str) -> None:
    module, name = qualname.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, MoELabError) and issubclass(cls, ValueError)


def test_a_missing_artifact_is_both_a_user_error_and_a_file_not_found(tmp_path) -> None:
    from moe_core.analysis.masks import ExpertMask
    from moe_core.batching.plan import load_plan
    from moe_core.store.files import read_json

    for read in (read_json, load_plan, ExpertMask.load):
        with pytest.raises(MoELabError) as info:
            read(tmp_path / "absent.json")
        assert isinstance(info.value, FileNotFoundError) and "absent.json" in str(info.value)


def test_validation_errors_name_the_file_and_the_field() -> None:
    from pydantic import BaseModel, ValidationError

    class Row(BaseModel):
        experts: dict[int, list[int]]
        n: int

    with pytest.raises(ValidationError) as info:
        Row.model_validate({"experts": {"0": "12"}})
    text = describe_validation_error(info.value, "m.json is not a valid mask")
    assert text.startswith("m.json is not a valid mask: ")
    assert "experts.0: Input should be a valid list (got '12')" in text and "n: Field required" in text


# -- the app's error boundary ----------------------------------------------------------------------
@pytest.fixture
def ui(monkeypatch):
    """ui with st.error captured (no Streamlit script run needed)."""
    pytest.importorskip("streamlit")
    import ui as _ui

    shown: list[str] = []
    monkeypatch.setattr(_ui.messages.st, "error", lambda text, **kw: shown.append(text))
    _ui.shown = shown  # type: ignore[attr-defined]
    return _ui


def test_error_text_sorts_user_errors_from_bugs(ui) -> None:
    from moe_core.store.files import RunError

    assert ui.error_text(RunError("pick a folder made by Run.create"), "Not opened: ") == (
        False,
        "Not opened: pick a folder made by Run.create",
    )
    assert ui.error_text(FileNotFoundError(2, "No such file or directory", "/x/plan.json")) == (
        False,
        "No such file or directory: /x/plan.json",
    )
    assert ui.error_text(PermissionError("cannot write /x")) == (False, "cannot write /x")
    for bug in (KeyError("layer"), ValueError("a ValueError from a library"), TypeError("bad operand")):
        is_bug, text = ui.error_text(bug, "Not saved: ")
        assert is_bug and text.startswith("Internal error (a bug): ") and type(bug).__name__ in text, text
        assert "Not saved" not in text  # never dressed up as the user's problem


def test_guard_shows_a_user_error_and_logs_a_bug_with_its_traceback(ui, caplog) -> None:
    from moe_core.analysis.selection import NothingSelectedError

    with caplog.at_level(logging.INFO, logger="moe_app"):
        with ui.guard("Nothing to save: "):
            raise NothingSelectedError("no expert passed threshold 5.0")
        with ui.guard("Nothing to save: "):
            {}["layer"]  # a bug in a page helper
    assert ui.shown[0] == "Nothing to save: no expert passed threshold 5.0"
    assert ui.shown[1].startswith("Internal error (a bug): KeyError") and "log" in ui.shown[1]
    bugs = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(bugs) == 1 and bugs[0].exc_info and bugs[0].exc_info[0] is KeyError  # the traceback is logged


def test_guard_lets_streamlit_control_flow_through(ui) -> None:
    from streamlit.runtime.scriptrunner_utils.exceptions import StopException

    with pytest.raises(StopException):
        with ui.guard():
            raise StopException()
    assert ui.shown == []
