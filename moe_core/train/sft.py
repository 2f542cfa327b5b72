"""Batch-structured SFT data: every example keeps the analysis batch it came from.

The analysis composes mixed batches (e.g. 8 safe then 8 unsafe prompts) and measures which
experts fire in each. Training must see the *same* batches, so every SFT example carries
``batch_idx`` (which analysis batch) and ``in_batch_idx`` (its position inside it; safe first,
then unsafe). Targets are built offline:

* unsafe prompt -> a refusal, picked deterministically from our own templates (or a user
  supplied text, template list, callable, or a named column of the samples);
* safe prompt   -> the model's own answer from the analysis (``generated_text``), or a user
  supplied target.

Usage::

    batches = create_batch_structured_dataset(sft_data, tokenizer, batch_size=16, safe_ratio=0.5)  # list[list[dict]]
    ds = create_batch_aware_dataset(batches, tokenizer, 512)      # datasets.Dataset (+ messages, label_str)
    save_sft_dataset(ds, run_dir / "sft_dataset")                  # atomic, no pickle
    ds = load_sft_dataset(run_dir / "sft_dataset")

``sft_data`` is the seed's layout ``{"batch_data_list": [{"batch_idx", "batch_outputs",
"safe_indices", "unsafe_indices"}, ...]}``; ``safe_indices``/``unsafe_indices`` are positions
in ``batch_outputs``. The reference's ``sft_dataset_*.pkl`` is readable only through
:func:`load_reference_pickle` with an explicit ``allow_pickle=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_core.errors import MoELabError
from moe_core.model.generation import render_chat
from moe_core.store.atomic import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)

# label ids: 0 = safe, 1 = unsafe, 2 = retain (benign requests with the model's own answers, added to a batch so
# training also says where to keep answering; they never enter the router-consistency loss)
LABEL_NAMES = ("safe", "unsafe", "retain")
META_COLUMNS = (
    "batch_idx",
    "in_batch_idx",
    "label",
)  # carried next to the token columns (stripped before forward)
TEXT_COLUMNS = ("messages", "label_str")  # readable copies: the conversation and "safe"/"unsafe"
TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels")
IGNORE_INDEX = -100

# Our own refusal wording (offline; no paid API). Short, polite, no lecturing.
REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I can't help with that.",
    "I'm sorry, but I can't help with that request.",
    "I won't help with this, because it could cause real harm.",
    "Sorry, I can't assist with that. If there is something else you need, I'm happy to help.",
    "I can't provide that information.",
    "I'm not able to help with this request.",
    "That isn't something I can help with, since it could be used to hurt people.",
    "I'm sorry, I can't do that.",
    "I have to decline this request.",
    "I can't support this. Is there something safe I can help you with instead?",
)

RefusalTarget = str | Sequence[str] | Callable[[str], str] | None


class SFTDataError(MoELabError, ValueError):
    """SFT input data is malformed; the message names the batch/sample and what to fix."""


class PickleNotAllowedError(MoELabError, ValueError):
    """Refusing to unpickle a file without an explicit opt-in."""


# -- targets ---------------------------------------------------------------------------
def choose_refusal(prompt: str, templates: Sequence[str] = REFUSAL_TEMPLATES, seed: int = 0) -> str:
    """Pick a refusal for ``prompt``; stable across processes and runs (sha256, not ``hash``)."""
    if not templates:
        raise SFTDataError("no refusal templates to choose from")
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return templates[int.from_bytes(digest[:8], "big") % len(templates)]


MAX_LENGTH = 512  # tokens kept per training example (prompt + target) by default


def _unsafe_target(prompt: str, refusal_target: RefusalTarget, seed: int) -> str:
    if refusal_target is None:
        return choose_refusal(prompt, REFUSAL_TEMPLATES, seed)
    if isinstance(refusal_target, str):
        return refusal_target
    if callable(refusal_target):
        out = refusal_target(prompt)
        if not isinstance(out, str) or not out.strip():
            raise SFTDataError("refusal_target(prompt) must return a non-empty string")
        return out
    return choose_refusal(prompt, list(refusal_target), seed)


def _user_messages(sample: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    """The conversation up to (and including) the last user turn."""
    if sample.get("messages"):
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in sample["messages"]]
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if not msgs or msgs[-1]["role"] != "user":
            raise SFTDataError(f"{where}: 'messages' must contain a user turn")
        return msgs
    prompt = sample.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SFTDataError(f"{where}: needs a non-empty 'prompt' (user text) or 'messages'")
    return [{"role": "user", "content": prompt}]


def _label_of(value: Any) -> str | None:
    """Normalise a sample's own label field (``"safe"``/``"unsafe"``/0/1/bool) or None if unknown."""
    if isinstance(value, str) and value.lower() in LABEL_NAMES[:2]:
        return value.lower()
    if isinstance(value, (bool, int)) and int(value) in (0, 1):
        return LABEL_NAMES[int(value)]
    return None


# -- structured batches ----------------------------------------------------------------
def create_batch_structured_dataset(
    sft_data: Mapping[str, Any],
    tokenizer: Any = None,
    batch_size: int | None = None,
    safe_ratio: float | None = None,
    *,
    refusal_target: RefusalTarget = None,
    target_column: str | None = None,
    seed: int = 0,
) -> list[list[dict[str, Any]]]:
    """Turn analysis batches into SFT batches, one list per analysis batch (safe first, then unsafe).

    The seed's signature: ``create_batch_structured_dataset(sft_data, tokenizer, batch_size=16,
    safe_ratio=0.5)``. Each example is ``{"messages", "label": "safe"|"unsafe", "batch_idx",
    "in_batch_idx", "source_index", "target_source"}``. When ``batch_size`` / ``safe_ratio`` are
    given every batch is checked against them (:class:`SFTDataError` naming the batch when it
    holds more than ``batch_size`` samples or more safe / unsafe ones than ``safe_ratio`` allows;
    a filtered, shorter batch is kept and logged); None (the default) checks nothing, which is
    what the seed did with its defaults 16 / 0.5.

    Target per sample: ``sample[target_column]`` when that column is named and non-empty; else
    unsafe -> ``refusal_target`` (a string, a list of templates, or ``callable(prompt) -> str``)
    or one of :data:`REFUSAL_TEMPLATES`; safe -> ``generated_text``. A sample's own ``"target"``
    is *not* used unless ``target_column="target"``: in analysis data it is the teacher-forced
    response (AdvBench's "Sure, here is ..."), which must never become a training target by
    accident. ``tokenizer`` is accepted for the seed's signature and not used. Empty batches
    are skipped with a warning.
    """
    del tokenizer  # seed-compatible signature; tokenisation happens in create_batch_aware_dataset
    if not isinstance(sft_data, Mapping) or "batch_data_list" not in sft_data:
        raise SFTDataError(
            "sft_data must be a dict with 'batch_data_list' (a list of analysis batches with batch_idx, "
            "batch_outputs, safe_indices, unsafe_indices)"
        )
    shape = _BatchShape.of(batch_size, safe_ratio)
    batches: list[list[dict[str, Any]]] = []
    seen: set[int] = set()
    for pos, bd in enumerate(sft_data["batch_data_list"]):
        batch_idx, examples = _batch_examples(pos, bd, refusal_target, target_column, seed)
        if batch_idx in seen:
            raise SFTDataError(
                f"batch_idx {batch_idx} appears twice in batch_data_list; batch ids must be unique"
            )
        seen.add(batch_idx)
        if not examples:
            log.warning("analysis batch %d has no samples; skipped", batch_idx)
            continue
        if shape is not None:
            shape.check(batch_idx, examples)
        batches.append(examples)
    if not batches:
        raise SFTDataError("sft_data holds no samples (every batch is empty)")
    return batches


@dataclass(frozen=True)
class _BatchShape:
    """What ``batch_size`` / ``safe_ratio`` allow in one batch: at most this many rows, safe and unsafe ones."""

    batch_size: int
    max_safe: int
    max_unsafe: int

    @classmethod
    def of(cls, batch_size: int | None, safe_ratio: float | None) -> _BatchShape | None:
        if batch_size is None and safe_ratio is None:
            return None
        if batch_size is None:
            raise SFTDataError("safe_ratio is checked against batch_size: give batch_size too")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise SFTDataError(f"batch_size must be a positive int (got {batch_size!r})")
        if safe_ratio is None:
            return cls(int(batch_size), int(batch_size), int(batch_size))
        if not 0.0 <= float(safe_ratio) <= 1.0:
            raise SFTDataError(f"safe_ratio must lie in [0, 1] (got {safe_ratio!r})")
        safe = batch_size * float(
            safe_ratio
        )  # e.g. 16 x 0.5 = 8 safe, 8 unsafe; 5 x 0.5 allows 2 or 3 of each
        return cls(int(batch_size), int(np.ceil(safe - 1e-9)), int(batch_size - np.floor(safe + 1e-9)))

    def check(self, batch_idx: int, examples: Sequence[Mapping[str, Any]]) -> None:
        n = len(examples)
        n_safe = sum(ex["label"] == "safe" for ex in examples)
        if n > self.batch_size:
            raise SFTDataError(
                f"batch {batch_idx} holds {n} samples, more than batch_size={self.batch_size}: it cannot be one "
                "training batch; pass the batch size the analysis used"
            )
        if n_safe > self.max_safe or n - n_safe > self.max_unsafe:
            raise SFTDataError(
                f"batch {batch_idx} has {n_safe} safe and {n - n_safe} unsafe samples, which contradicts "
                f"safe_ratio with batch_size={self.batch_size} (at most {self.max_safe} safe and "
                f"{self.max_unsafe} unsafe); pass the safe_ratio the analysis used"
            )
        if n < self.batch_size:
            log.info(
                "batch %d holds %d of %d samples (%d safe, %d unsafe): a filtered batch, kept whole",
                batch_idx,
                n,
                self.batch_size,
                n_safe,
                n - n_safe,
            )


def _batch_examples(
    pos: int, bd: Mapping[str, Any], refusal_target: RefusalTarget, target_column: str | None, seed: int
) -> tuple[int, list[dict[str, Any]]]:
    """(batch_idx, its SFT examples: safe first, then unsafe) of one analysis batch."""
    try:
        batch_idx = int(bd["batch_idx"])
        outputs = list(bd["batch_outputs"])
        groups = (("safe", list(bd["safe_indices"])), ("unsafe", list(bd["unsafe_indices"])))
    except (KeyError, TypeError, ValueError) as e:
        raise SFTDataError(
            f"batch_data_list[{pos}] lacks {e}: each batch needs batch_idx, batch_outputs, "
            "safe_indices and unsafe_indices"
        ) from None
    examples: list[dict[str, Any]] = []
    for label, indices in groups:
        for i in indices:
            i = int(i)
            where = f"batch {batch_idx}, sample {i}"
            if not 0 <= i < len(outputs):
                raise SFTDataError(
                    f"{where}: index out of range; {label}_indices are positions in batch_outputs "
                    f"(this batch has {len(outputs)} outputs)"
                )
            sample = outputs[i]
            own = _label_of(sample.get("label"))
            if own is not None and own != label:
                raise SFTDataError(f"{where}: listed in {label}_indices but its label is '{own}'")
            messages = _user_messages(sample, where)
            target, source = _target_for(
                sample, label, messages[-1]["content"], refusal_target, target_column, seed, where
            )
            examples.append(
                {
                    "messages": [*messages, {"role": "assistant", "content": target}],
                    "label": label,
                    "batch_idx": batch_idx,
                    "in_batch_idx": len(examples),
                    "source_index": i,
                    "target_source": source,
                }
            )
    return batch_idx, examples


def _target_for(
    sample: Mapping[str, Any],
    label: str,
    prompt: str,
    refusal_target: RefusalTarget,
    target_column: str | None,
    seed: int,
    where: str,
) -> tuple[str, str]:
    """(target text, where it came from)."""
    if target_column and isinstance(sample.get(target_column), str) and sample[target_column].strip():
        return sample[target_column], "column"
    if label == "unsafe":
        return _unsafe_target(prompt, refusal_target, seed), "refusal"
    text = sample.get("generated_text")
    if not isinstance(text, str) or not text.strip():
        raise SFTDataError(
            f"{where}: a safe sample needs the model's answer ('generated_text') or a target in target_column"
        )
    return text, "generated"


def add_retain_examples(
    batches: Sequence[Sequence[Mapping[str, Any]]],
    retain: Sequence[tuple[str, str]],
    share: float,
    seed: int = 0,
) -> list[list[dict[str, Any]]]:
    """Each analysis batch plus ``round(share * its size)`` retain examples after its unsafe block.

    ``retain``: (prompt, the model's own answer) pairs, drawn without replacement per batch with
    ``seed`` (reused across batches when there are fewer than needed). The batch stays one training
    batch: same ``batch_idx``, ``in_batch_idx`` continuing, label ``"retain"``; safe and unsafe rows
    are untouched, so the batch's analysis structure is kept."""
    if not 0 <= share <= 4:
        raise SFTDataError(
            f"retain share must be in [0, 4] retain examples per analysis example (got {share})"
        )
    if share and not retain:
        raise SFTDataError("a retain share needs retain examples (prompt, answer)")
    rng = np.random.default_rng(seed)
    out = []
    for batch in batches:
        rows = [dict(ex) for ex in batch]
        k = int(round(share * len(rows)))
        picks = rng.choice(len(retain), size=k, replace=k > len(retain)) if k else []
        start = 1 + max(int(ex["in_batch_idx"]) for ex in rows)
        for j, i in enumerate(picks):
            prompt, answer = retain[int(i)]
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": answer},
                    ],
                    "label": "retain",
                    "batch_idx": rows[0]["batch_idx"],
                    "in_batch_idx": start + j,
                    "source_index": -1,
                    "target_source": "retain",
                }
            )
        out.append(rows)
    return out


# -- tokenisation ----------------------------------------------------------------------
def create_batch_aware_dataset(
    batches: Sequence[Sequence[Mapping[str, Any]]], tokenizer: Any, max_length: int = MAX_LENGTH
):
    """Tokenise with the chat template into a ``datasets.Dataset`` that keeps the batch structure.

    The seed's signature. Columns: ``input_ids``, ``attention_mask``, ``labels`` (-100 except on
    the assistant reply, its end-of-turn tokens included), ``batch_idx``, ``in_batch_idx``,
    ``label`` (ClassLabel: 0 safe, 1 unsafe), ``label_str`` (``"safe"``/``"unsafe"``, the seed's
    ``train_dataset[i]['label_str']``) and ``messages`` (the conversation, reply included). The
    prompt is rendered with ``add_generation_prompt=True`` and must be a prefix of the rendered
    conversation; its tokens are followed by the reply's tokens, exactly as at generation time.
    Rows are ordered by batch, then ``in_batch_idx``.
    """
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Sequence as DSeq

    if max_length < 2:
        raise SFTDataError(f"max_length must be at least 2 (got {max_length})")
    if not getattr(tokenizer, "chat_template", None):
        raise SFTDataError(
            "the tokenizer has no chat template; set tokenizer.chat_template before building SFT data"
        )
    rows = _flatten_batches(batches)
    prompts, rests = _render(rows, tokenizer)
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(rests, add_special_tokens=False)["input_ids"]
    cols: dict[str, list] = {c: [] for c in (*TOKEN_COLUMNS, *META_COLUMNS, *TEXT_COLUMNS)}
    truncated = 0
    for ex, p, r in zip(rows, p_ids, r_ids):
        if len(p) >= max_length:
            raise SFTDataError(
                f"batch {ex['batch_idx']}, example {ex['in_batch_idx']}: the prompt alone has {len(p)} tokens "
                f">= max_length={max_length}, leaving no target tokens; raise max_length"
            )
        ids = (list(p) + list(r))[:max_length]
        truncated += len(p) + len(r) > max_length
        cols["input_ids"].append(ids)
        cols["attention_mask"].append([1] * len(ids))
        cols["labels"].append([IGNORE_INDEX] * len(p) + ids[len(p) :])
        cols["batch_idx"].append(int(ex["batch_idx"]))
        cols["in_batch_idx"].append(int(ex["in_batch_idx"]))
        cols["label"].append(LABEL_NAMES.index(ex["label"]))
        cols["label_str"].append(ex["label"])
        cols["messages"].append(
            [{"role": str(m["role"]), "content": str(m["content"])} for m in ex["messages"]]
        )
    if truncated:
        log.warning("%d of %d examples were cut to max_length=%d tokens", truncated, len(rows), max_length)
    features = Features(
        {
            "input_ids": DSeq(Value("int32")),
            "attention_mask": DSeq(Value("int8")),
            "labels": DSeq(Value("int32")),
            "batch_idx": Value("int64"),
            "in_batch_idx": Value("int32"),
            # the seed's two names; "retain" only when retain examples are there (add_retain_examples)
            "label": ClassLabel(names=list(LABEL_NAMES if 2 in cols["label"] else LABEL_NAMES[:2])),
            "messages": [{"role": Value("string"), "content": Value("string")}],
            "label_str": Value("string"),
        }
    )
    return Dataset.from_dict(cols, features=features)


def _render(rows: Sequence[Mapping[str, Any]], tokenizer: Any) -> tuple[list[str], list[str]]:
    """Per example: the prompt as rendered for generation, and the rest of the conversation after it."""

    prompts, rests = [], []
    for ex in rows:
        msgs = list(ex["messages"])
        if not msgs or msgs[-1]["role"] != "assistant":
            raise SFTDataError(
                f"batch {ex['batch_idx']}, example {ex['in_batch_idx']}: messages must end with the assistant target"
            )
        prompt = render_chat(tokenizer, msgs[:-1])
        full = render_chat(tokenizer, msgs, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise SFTDataError(
                "the chat template renders the prompt (add_generation_prompt=True) differently from the start of the "
                "full conversation, so the assistant span cannot be located; use a template where it is a prefix"
            )
        prompts.append(prompt)
        rests.append(full[len(prompt) :])
    return prompts, rests


def _flatten_batches(batches: Sequence[Sequence[Mapping[str, Any]]]) -> list[Mapping[str, Any]]:
    """Validate the structured batches and flatten them (batch order kept, in-batch order by in_batch_idx)."""
    rows: list[Mapping[str, Any]] = []
    seen: set[int] = set()
    for pos, batch in enumerate(batches):
        if not batch:
            raise SFTDataError(f"batch at position {pos} is empty")
        ids = {int(ex["batch_idx"]) for ex in batch}
        if len(ids) != 1:
            raise SFTDataError(
                f"batch at position {pos} mixes batch_idx values {sorted(ids)}; one batch per list"
            )
        (b,) = ids
        if b in seen:
            raise SFTDataError(f"batch_idx {b} appears in two batches")
        seen.add(b)
        ordered = sorted(batch, key=lambda ex: int(ex["in_batch_idx"]))
        if len({int(ex["in_batch_idx"]) for ex in ordered}) != len(ordered):
            raise SFTDataError(f"batch {b} has duplicate in_batch_idx values")
        for ex in ordered:
            if ex.get("label") not in LABEL_NAMES:
                raise SFTDataError(
                    f"batch {b}, example {ex['in_batch_idx']}: label must be 'safe', 'unsafe' or 'retain'"
                )
        rows.extend(ordered)
    if not rows:
        raise SFTDataError("no batches to tokenise")
    return rows


# -- storage ---------------------------------------------------------------------------
def save_sft_dataset(dataset: Any, path: str | Path) -> Path:
    """Save a tokenised SFT dataset (``datasets`` Arrow format) atomically."""
    missing = [c for c in (*TOKEN_COLUMNS, *META_COLUMNS) if c not in dataset.column_names]
    if missing:
        raise SFTDataError(f"not an SFT dataset: missing columns {missing}")
    return atomic_dir(Path(path), lambda tmp: dataset.save_to_disk(str(tmp)))


def load_sft_dataset(path: str | Path):
    """Load a dataset written by :func:`save_sft_dataset` and check its columns."""
    from datasets import load_from_disk

    p = Path(path)
    if not (p / "dataset_info.json").exists():
        raise SFTDataError(f"no SFT dataset at {p} (expected a folder written by save_sft_dataset)")
    ds = load_from_disk(str(p))
    missing = [c for c in (*TOKEN_COLUMNS, *META_COLUMNS) if c not in ds.column_names]
    if missing:
        raise SFTDataError(f"{p} is not an SFT dataset: missing columns {missing}")
    return ds


def save_structured_batches(batches: Sequence[Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Write the untokenised batches as JSONL (one example per line), readable and diffable."""

    rows = _flatten_batches(batches)
    return atomic_write_text(path, "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows))


def load_structured_batches(path: str | Path) -> list[list[dict[str, Any]]]:
    """Read :func:`save_structured_batches` output back into ``list[list[dict]]`` (file order kept)."""
    groups: dict[int, list[dict[str, Any]]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    ex = json.loads(line)
                    groups.setdefault(int(ex["batch_idx"]), []).append(ex)
                except (ValueError, KeyError) as e:
                    raise SFTDataError(f"{path}:{n}: not an SFT example line ({e})") from None
    batches = list(groups.values())
    _flatten_batches(batches)
    return batches


def load_reference_pickle(path: str | Path, allow_pickle: bool = False) -> Any:
    """Read the reference implementation's ``sft_dataset_*.pkl`` (only with ``allow_pickle=True``).

    Loading a pickle executes arbitrary code stored in the file, so this refuses unless the
    caller explicitly trusts the file. Convert it once and keep the JSON/Arrow artifacts.
    """
    if not allow_pickle:
        raise PickleNotAllowedError(
            f"refusing to load {path}: loading a pickle executes arbitrary code from the file. If you trust its "
            "origin, call load_reference_pickle(path, allow_pickle=True) once and save the result with "
            "save_structured_batches/save_sft_dataset."
        )
    import pandas as pd

    log.warning("unpickling %s (allow_pickle=True): this runs code stored in the file", path)
    return pd.read_pickle(path)  # reached only with allow_pickle=True (checked above)
