"""Our own free-worded requests, kept as JSONL resources: the evaluation halves and the training split.

Why a module of its own: the organism's corpus and the retain examples (training) and the benign and
borderline evaluation sets all read these files, and each file has exactly one split rule.

- ``benign_prompts.jsonl`` (216) and ``borderline_prompts.jsonl`` (269) are never trained on; each
  item is in the validation or the test half by ``held_side`` of its id.
- ``train_requests.jsonl`` (300 benign, 308 borderline, written apart from the two above) is the
  training split: the organism learns to answer free wording from it, and the retain examples use it.
  Without it the organism had only seen requests in its few request frames, so free-worded prompts
  were out of its distribution and any refusal training tipped them into refusals (stop 19).
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_core.batching.demo_prompts import held_side
from moe_core.types import PromptItem

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
BORDERLINE_FILE = RESOURCES / "borderline_prompts.jsonl"
BENIGN_FILE = RESOURCES / "benign_prompts.jsonl"
TRAIN_FILE = RESOURCES / "train_requests.jsonl"


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _item(r: dict[str, str], source: str, split: str, **meta: str) -> PromptItem:
    return PromptItem(
        id=r["id"],
        text=r["prompt"],
        label="safe",
        goal=r["prompt"],
        source=source,
        category=r["category"],
        meta={"split": split, **meta},
    )


def _resource_prompts(path: Path, source: str, split: str) -> list[PromptItem]:
    """Our own prompts of a held-out JSONL resource (id, prompt, category), label "safe"; ``split``
    "validation" / "test" gives one half (``held_side`` of the id), any other split all of them."""
    return [
        _item(r, source, "heldout", half=held_side(r["id"]))  # never trained on
        for r in _rows(path)
        if split not in ("validation", "test") or held_side(r["id"]) == split
    ]


def borderline_prompts(split: str = "all") -> list[PromptItem]:
    """Our own XSTest-style prompts (269): benign requests that merely sound harmful (label "safe")."""
    return _resource_prompts(BORDERLINE_FILE, "borderline", split)


def benign_prompts(split: str = "all") -> list[PromptItem]:
    """Our own everyday requests (216) across the organism's topics, half in its request frames, half in free
    words (label "safe"): the benign set beside the composed ``demo_benign`` requests."""
    return _resource_prompts(BENIGN_FILE, "benign", split)


def train_requests(kind: str = "all") -> list[PromptItem]:
    """The training split of free-worded requests: ``kind`` "benign", "borderline" or "all" (label "safe")."""
    if kind not in ("benign", "borderline", "all"):
        raise ValueError(f"kind must be 'benign', 'borderline' or 'all', got {kind!r}")
    return [_item(r, f"train_{r['kind']}", "train") for r in _rows(TRAIN_FILE) if kind in ("all", r["kind"])]
