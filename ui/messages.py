"""What a page tells the user: errors sorted into the user's and bugs, page words for library terms,
literal user text, and the one message that survives a rerun.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import streamlit as st

from moe_core.errors import MoELabError

log = logging.getLogger("moe_app")


FLASH_KEY = "flash"  # session_state: one message to show after a rerun


# -- errors ---------------------------------------------------------------------------------
BUG_TEXT = "Internal error (a bug): {kind}: {message}. Details are in the app's log; please report it."


UI_WORDS = [  # how moe_core's messages (written for Python callers) name things, and how a page names them
    (
        re.compile(r"use move\(\) to put an item into another batch"),
        "use the Move tab to put an item into another batch",
    ),
    (
        re.compile(r"pass column='<name>' to say which column holds the prompts"),
        "pick the column that holds the prompts",
    ),
    (
        re.compile(r"pass format='csv'\|'json'\|'jsonl'\|'parquet'"),
        "use a file whose name ends in .csv, .json, .jsonl or .parquet",
    ),
    (
        re.compile(r"pass --overwrite to replace it, or choose another --name"),
        "tick the overwrite box to replace it, or give it another name",
    ),
    (re.compile(r"or choose another --name"), "or give it another name"),
    (re.compile(r"\b(\w+)='([^']*)'"), r"\1 \2"),  # any other keyword=value
    (re.compile(r"\b([a-z_]+)\(\)"), r"\1"),  # any other call()
]


def ui_words(text: str) -> str:
    """A user error's text with Python API words (``move()``, ``column='<name>'``) in the UI's words."""
    for pattern, repl in UI_WORDS:
        text = pattern.sub(repl, text)
    return text


def error_text(e: BaseException, prefix: str = "") -> tuple[bool, str]:
    """(is_bug, text to show) for an exception that reached a page.

    A ``MoELabError`` is the user's to fix: its message, as it is. An ``OSError`` from a file
    operation on user input (a path typed or a file removed meanwhile) is shown with the file it
    names. Anything else is a bug in the lab: a short note with the exception type, never passed
    off as a user error (the traceback goes to the log, see ``report_error``).
    """
    if isinstance(e, MoELabError):
        return False, f"{prefix}{ui_words(str(e))}"
    if isinstance(e, OSError):
        if e.strerror and e.filename:
            return False, f"{prefix}{e.strerror}: {e.filename}"
        return False, f"{prefix}{e}"
    message = str(e).strip().splitlines()[0][:200] if str(e).strip() else "(no message)"
    return True, BUG_TEXT.format(kind=type(e).__name__, message=message)


def error_message(e: BaseException, prefix: str = "") -> str:
    """The text to show for ``e`` (see ``error_text``); a bug's traceback is logged here.

    Call it inside the ``except`` block that caught ``e`` (callbacks keep the text for the next run).
    """
    is_bug, text = error_text(e, prefix)
    if is_bug:
        log.exception(
            "bug behind a page (shown to the user as an internal error): %s: %s", type(e).__name__, e
        )
    else:
        log.info("shown to the user: %s", text)
    return text


def report_error(e: BaseException, prefix: str = "") -> None:
    """Show ``e`` with st.error (see ``error_text``); a bug's traceback goes to the log."""
    st.error(error_message(e, prefix), icon=":material/error:")


@contextlib.contextmanager
def guard(prefix: str = "") -> Iterator[None]:
    """Error boundary of a page section: a user-fixable ``MoELabError`` (or a file ``OSError``) becomes
    one st.error line; any other exception is reported as a bug (short message, traceback logged).

    Streamlit's own ``st.rerun``/``st.stop`` are ``BaseException``s and pass through.
    """
    try:
        yield
    except Exception as e:  # noqa: BLE001 - the boundary: sorted into user errors and bugs, never swallowed silently
        report_error(e, prefix)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:])")


def md_escape(text: str) -> str:
    """User text (prompts, answers) shown literally inside st.markdown/st.caption."""
    return _MD_SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")


COLUMN_WORDS = {  # library column names (risk tables, plans) -> the headers a page shows
    "batch_idx": "batch",
    "in_batch_idx": "position in batch",
    "Layer_Expert": "expert id",
    "risk_diff": "risk difference",
    "risk_diff_abs": "risk difference (absolute)",
    "risk_diff_std": "risk difference spread (std)",
    "risk_diff_min": "lowest risk difference",
    "risk_diff_max": "highest risk difference",
    "sign_consistency": "sign consistency",
    "pos_frac": "share of batches with a positive difference",
    "t_score": "t-score",
    "n_batches": "batches",
    "a_safe": "safe tokens routed",
    "a_unsafe": "unsafe tokens routed",
    "d_safe": "safe tokens not routed",
    "d_unsafe": "unsafe tokens not routed",
    "a_safe_n": "share of safe tokens routed",
    "a_unsafe_n": "share of unsafe tokens routed",
    "n_safe_tokens": "safe tokens",
    "n_unsafe_tokens": "unsafe tokens",
}


def column_labels(columns: Iterable[str], formats: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``column_config`` for st.dataframe: readable headers for library column names (``a_safe_n`` is
    "share of safe tokens routed"; the raw name stays in the header's tooltip, as the files spell it),
    and a number format for the columns in ``formats``."""
    formats = formats or {}
    out: dict[str, Any] = {}
    for c in columns:
        label = COLUMN_WORDS.get(c, c)
        tip = f"column `{c}` of the run's files" if label != c else None
        if c in formats:
            out[c] = st.column_config.NumberColumn(label, help=tip, format=formats[c])
        elif label != c:
            out[c] = st.column_config.Column(label, help=tip)
    return out


def flash(message: str) -> None:
    """Remember a success message to show on the next run (survives st.rerun)."""
    st.session_state[FLASH_KEY] = message


def show_flash() -> None:
    """The remembered message, in a slot that is there with or without one: the elements below keep
    their place, so a tab or a table selection survives the rerun that clears the message."""
    msg, slot = st.session_state.pop(FLASH_KEY, None), st.empty()
    if msg:
        slot.success(msg, icon=":material/check_circle:")
