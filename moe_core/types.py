"""Small value types shared by every step of the pipeline (prompt items, labels).

Kept in one module so that prompts, batches, routing and training agree on one spelling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Label = Literal["safe", "unsafe"]
LABELS: tuple[Label, Label] = ("safe", "unsafe")


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a safe or unsafe set.

    ``text`` is the full user turn sent to the model (for a jailbreak: the wrapped goal).
    ``goal`` is the underlying request, shared by the two items of a pair; ``pair_id`` links a
    safe item to its unsafe twin in paired mode. ``target`` is an optional user-supplied SFT
    target (otherwise training builds one).
    """

    id: str
    text: str
    label: Label
    goal: str | None = None
    pair_id: str | None = None
    source: str = "custom"
    category: str | None = None
    target: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def messages(self, system: str | None = None) -> list[dict[str, str]]:
        """Chat messages for this prompt (optionally with a system turn)."""
        out = [{"role": "system", "content": system}] if system else []
        out.append({"role": "user", "content": self.text})
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptItem:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


Progress = Callable[
    ..., None
]  # progress(done, total, message=""): how every long step reports, never a UI call
ShouldStop = Callable[[], bool]  # asked between units of work: True ends the step (JobStopped)
