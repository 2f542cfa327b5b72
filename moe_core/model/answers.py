"""Greedy answers to named sets of prompts, judged: one row per (set, prompt).

Why here, below evaluation: the organism measures its own behaviour when it is built (model layer) and
the evaluation step measures every model the same way (``eval.evaluation.evaluate_model``, which adds
steering around the generation); both use this one loop.

    rows = judged_answers(model, tok, {"benign": items}, KeywordJudge())   # set, id, ..., refusal, reason
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import pandas as pd

from moe_core.judge.verdicts import RefusalJudge
from moe_core.model.generation import MAX_NEW_TOKENS, generate
from moe_core.types import Progress, PromptItem

RESPONSE_COLUMNS = ["set", "id", "category", "prompt", "response", "refusal", "reason"]


def judged_answers(
    model: Any,
    tokenizer: Any,
    sets: Mapping[str, Sequence[PromptItem]],
    judge: RefusalJudge,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 16,
    progress: Progress | None = None,
    generator: Any = None,
    system_prompt: str | None = None,
    around: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> pd.DataFrame:
    """Columns ``RESPONSE_COLUMNS``; ``around()`` wraps each set's generation (e.g. steering hooks)."""
    total, done, frames = sum(len(v) for v in sets.values()), 0, []
    for name, items in sets.items():
        sub = (
            (lambda d, t, m="", _o=done, _n=name: progress(_o + d, total, f"{_n}: {d}/{t}"))
            if progress
            else None
        )
        with around():
            messages = [it.messages(system_prompt) for it in items]
            texts = [
                g.text
                for g in generate(model, tokenizer, messages, max_new_tokens, batch_size, sub, generator)
            ]
        verdicts = judge.judge([it.text for it in items], texts)
        frames.append(
            pd.DataFrame(
                {
                    "set": name,
                    "id": [it.id for it in items],
                    "category": [it.category for it in items],
                    "prompt": [it.text for it in items],
                    "response": texts,
                    "refusal": [v.refusal for v in verdicts],
                    "reason": [v.reason for v in verdicts],
                }
            )
        )
        done += len(items)
    return pd.concat(frames, ignore_index=True)[RESPONSE_COLUMNS]
