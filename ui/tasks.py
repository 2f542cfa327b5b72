"""Short page work run beside the script thread (composing thousands of batches): the page stays live and
shows its progress; the result is picked up on a later run of the page.

Why not a background job: a job is a process that needs the run's writer lease and loads the model;
composing writes only the run's draft area and takes seconds to a minute.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import streamlit as st

from ui.messages import error_message

TASK_POLL_S = 0.5  # seconds between refreshes of a running task's progress bar
TASK_INLINE_S = 3.0  # a task done within this many seconds shows no progress bar (the page just waits)
_KEY = "task::"


@dataclass
class Task:
    """A function running in a thread, with the progress it reports (``progress(done, total, text)``)."""

    label: str
    done: int = 0
    total: int = 0
    text: str = "starting"
    result: Any = None
    error: str | None = None
    finished: bool = False

    def progress(self, done: int, total: int, text: str = "") -> None:
        self.done, self.total, self.text = done, total, text or self.text

    @property
    def running(self) -> bool:
        return not self.finished


def start_task(
    key: str,
    label: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    error_prefix: str = "",
) -> Task:
    """Run ``fn(*args, progress=..., **kwargs)`` in a thread; its Task is kept in the session under ``key``.

    Waits up to ``TASK_INLINE_S`` for it: a quick task ends before the page draws again, a long one shows
    its progress bar (``task_panel``)."""
    task = Task(label)

    def body() -> None:
        try:
            task.result = fn(*args, progress=task.progress, **(kwargs or {}))
        except Exception as e:  # shown by task_panel, in page words
            task.error = error_message(e, error_prefix)
        finally:
            task.finished = True

    thread = threading.Thread(target=body, name=f"task-{key}", daemon=True)
    st.session_state[_KEY + key] = task
    thread.start()
    thread.join(TASK_INLINE_S)
    return task


def running_task(key: str) -> Task | None:
    task = st.session_state.get(_KEY + key)
    return task if isinstance(task, Task) and task.running else None


def task_panel(key: str, on_done: Callable[[Task], None]) -> None:
    """The progress bar of task ``key`` while it runs (refreshing itself); when it ends, its error once, or
    ``on_done(task)``, then the whole page again."""

    @st.fragment(run_every=TASK_POLL_S if running_task(key) else None)
    def panel() -> None:
        task = st.session_state.get(_KEY + key)
        if not isinstance(task, Task):
            return
        if task.running:
            fraction = task.done / task.total if task.total else 0.0
            st.progress(fraction, text=f"{task.label}: {task.text} ({task.done} / {task.total or '?'})")
            return
        del st.session_state[_KEY + key]
        if task.error:
            st.error(task.error, icon=":material/error:")
            return
        on_done(task)
        st.rerun()

    panel()
