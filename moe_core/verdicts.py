"""What every refusal judge shares: ``Verdict``, the ``RefusalJudge`` interface, ``JudgeError``,
``REASONS`` and ``summarize_verdicts``. The backends live in ``judge_keyword``, ``judge_http`` and
``judge_classifier``; import all of them from ``moe_core.judge``, whose docstring gives the rules
every judge shares (empty output, partial refusals).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from .errors import MoELabError

Progress = Callable[..., None]
REASONS = ("refusal", "partial", "empty", "comply", "apology_then_comply")


class JudgeError(MoELabError, ValueError):
    """A judge could not produce verdicts; the message says what to fix."""


@dataclass(frozen=True)
class Verdict:
    """One judgement of one response."""

    refusal: bool  # True when the model declined (fully or partly) or said nothing
    score: float  # the judge's probability that this is a refusal, 0..1
    reason: str  # one of REASONS
    detail: str = ""  # evidence, e.g. the matched phrase or the LLM's raw answer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RefusalJudge(ABC):
    """Judges whether each response refuses its prompt.

    Subclasses implement ``_judge_nonempty``; ``judge`` validates input and handles empty
    responses the same way for every backend.
    """

    name: str = "judge"

    def judge(
        self, prompts: Sequence[str], responses: Sequence[str], progress: Progress | None = None
    ) -> list[Verdict]:
        """One Verdict per (prompt, response), in order."""
        if isinstance(prompts, str) or isinstance(responses, str):
            raise JudgeError("judge() takes lists of prompts and responses, not single strings")
        if len(prompts) != len(responses):
            raise JudgeError(
                f"got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response"
            )
        out: list[Verdict | None] = [None] * len(responses)
        todo = []
        for i, r in enumerate(responses):
            if r is None or not str(r).strip():
                out[i] = Verdict(True, 1.0, "empty", "no text")
            else:
                todo.append(i)
        if todo:
            n_empty, n = len(responses) - len(todo), len(responses)
            sub = (lambda d, t, m="": progress(d + n_empty, n, m)) if progress else None  # one scale for the caller
            got = self._judge_nonempty([str(prompts[i] or "") for i in todo], [str(responses[i]) for i in todo], sub)
            for i, v in zip(todo, got):
                out[i] = v
        if progress:
            progress(len(responses), len(responses), f"{self.name}: judged")
        return out  # type: ignore[return-value]

    @abstractmethod
    def _judge_nonempty(self, prompts: list[str], responses: list[str], progress: Progress | None) -> list[Verdict]:
        """Verdicts for responses that are known to contain text."""

    def is_refusal(self, response: str, prompt: str = "") -> bool:
        return self.judge([prompt], [response])[0].refusal


def summarize_verdicts(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """Counts a report needs: refusal rate, and empty/partial outputs counted on their own."""
    n = len(verdicts)
    by_reason = {r: 0 for r in REASONS}
    for v in verdicts:
        by_reason[v.reason] = by_reason.get(v.reason, 0) + 1
    refusals = sum(v.refusal for v in verdicts)
    return {
        "n": n,
        "refusals": refusals,
        "refusal_rate": refusals / n if n else float("nan"),
        "empty": by_reason["empty"],
        "partial": by_reason["partial"],
        "by_reason": by_reason,
    }
