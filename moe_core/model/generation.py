"""Batched greedy generation for chat prompts (analysis, evaluation, the organism's self-test).

One place renders chat messages with the tokenizer's chat template, left-pads a batch, runs
``model.generate`` greedily and cuts each answer at its first EOS, so every caller agrees on
what "the model's answer" and "its tokens" are. Routing capture wraps this same call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from moe_core.errors import MoELabError
from moe_core.types import PromptItem

Messages = list[dict[str, str]]

log = logging.getLogger(__name__)


class TokenGenerator(Protocol):
    """Another engine that continues exact prompt token ids greedily (e.g. ``backends.VLLMGenerator``).

    ``complete`` returns, per prompt, the generated ids (an EOS may be included; it is cut here)
    and a dict of extras kept in ``Generation.meta`` (finish reason, routed experts, backend).
    """

    name: str

    def complete(
        self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int]
    ) -> list[tuple[list[int], dict[str, Any]]]: ...


@dataclass
class Generation:
    """The model's answer to one prompt, with the exact token ids it saw and produced."""

    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


_CHAT_KWARGS = "moe_lab_chat_template_kwargs"  # the tokenizer attribute render_chat reads

MAX_NEW_TOKENS = 48  # answer length by default: long enough for the judge to read how an answer opens


def use_chat_template_kwargs(tokenizer: Any, kwargs: Mapping[str, Any] | None) -> Any:
    """Options every later rendering with this tokenizer passes to its chat template, e.g. Qwen3's
    ``{"enable_thinking": false}`` or gpt-oss's ``{"reasoning_effort": "low"}``. Set once per loaded tokenizer
    from the run's analysis settings, so analysis, training and evaluation render prompts alike."""
    setattr(tokenizer, _CHAT_KWARGS, dict(kwargs or {}))
    return tokenizer


def render_chat(tokenizer: Any, messages: Messages, add_generation_prompt: bool = True) -> str:
    """One conversation through the chat template (with the tokenizer's ``use_chat_template_kwargs`` options)."""
    return tokenizer.apply_chat_template(
        list(messages),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **getattr(tokenizer, _CHAT_KWARGS, {}),
    )


def render_prompts(tokenizer: Any, messages_list: Sequence[Messages]) -> list[str]:
    """Chat-template each conversation, ending with the assistant's turn opener."""
    return [render_chat(tokenizer, m) for m in messages_list]


def encode_prompts(tokenizer: Any, messages_list: Sequence[Messages], device: torch.device | str = "cpu"):
    """Left-padded ``input_ids``/``attention_mask`` for a batch of conversations."""
    texts = render_prompts(tokenizer, messages_list)
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def prompt_token_ids(tokenizer: Any, messages_list: Sequence[Messages]) -> list[list[int]]:
    """The exact ids ``encode_prompts`` gives each conversation, without padding."""
    enc = encode_prompts(tokenizer, messages_list, "cpu")
    return [row[m].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"].bool())]


def finish(
    tokenizer: Any,
    prompt_ids: list[int],
    new_ids: Sequence[int],
    eos: set[int],
    meta: dict[str, Any] | None = None,
) -> Generation:
    """Cut an answer at its first EOS and decode it: the one stop rule every backend shares."""
    new = list(new_ids)
    cut = next((j for j, t in enumerate(new) if t in eos), None)
    new = new[:cut] if cut is not None else new
    return Generation(
        prompt_ids, new, tokenizer.decode(new, skip_special_tokens=True).strip(), dict(meta or {})
    )


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends an answer: the model's generation config, its config, the tokenizer."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


CHARS_PER_TOKEN_BOUND = (
    50  # no tokenizer makes tokens this long: more characters than this x context cannot fit
)


class PromptTooLongError(MoELabError, ValueError):
    """A prompt does not fit the model's context (refused before any model call)."""


def context_length(model: Any) -> int | None:
    """The model's context in tokens (``max_position_embeddings``), or None when it does not say."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def fit_context(model: Any, tokenizer: Any, messages_list: Sequence[Messages], max_new_tokens: int) -> int:
    """Check every conversation fits the model's context; -> ``max_new_tokens`` capped to what is left.

    A prompt longer than the context is refused, naming it, before anything is sent to the model (a
    5 MB line is refused by its length alone, without tokenizing it). Memory and time per batch are
    then bounded by the context, whatever the input."""
    context = context_length(model)
    if context is None or not messages_list:
        return max_new_tokens
    for i, messages in enumerate(messages_list):
        chars = sum(len(str(m.get("content", ""))) for m in messages)
        if chars > context * CHARS_PER_TOKEN_BOUND:
            raise PromptTooLongError(
                f"prompt {i} has {chars:,} characters, more than the model's context of {context} tokens can hold; "
                "shorten it or drop it from the prompt set (or analyse with --long-prompts cut)"
            )
    lengths = [  # tokenized 64 at a time: one call per chunk, padding bounded by the chunk
        len(ids)
        for start in range(0, len(messages_list), 64)
        for ids in prompt_token_ids(tokenizer, list(messages_list[start : start + 64]))
    ]
    longest = 0
    for i, n in enumerate(lengths):
        if n >= context:
            raise PromptTooLongError(
                f"prompt {i} is {n} tokens, the model's context is {context}: shorten it or drop it from the "
                "prompt set (or analyse with --long-prompts cut)"
            )
        longest = max(longest, n)
    capped = max(1, min(max_new_tokens, context - longest))
    if capped < max_new_tokens:
        log.info(
            "max_new_tokens %d capped to %d by the model's context (%d)", max_new_tokens, capped, context
        )
    return capped


_TICK: ContextVar[Callable[[int, int], None] | None] = ContextVar("generation_tick", default=None)


CUT_MARGIN = 64  # tokens kept free for the chat template around a cut prompt


def cut_to_fit(
    items: Sequence[PromptItem], tokenizer: Any, context: int, max_new_tokens: int
) -> list[PromptItem]:
    """Prompts longer than the model's context allows cut to fit (``--long-prompts cut``): the text is
    tokenized from a prefix of bounded length (a 5 MB line is never tokenized whole), kept to
    ``context - max_new_tokens - CUT_MARGIN`` tokens and decoded; the item's meta records ``cut_from_chars``."""
    limit = max(1, context - max_new_tokens - CUT_MARGIN)
    out = []
    for it in items:
        if len(it.text.encode("utf-8")) <= limit:  # a byte-level tokenizer makes at most one token per byte
            out.append(it)
            continue
        ids = tokenizer(it.text[: limit * CHARS_PER_TOKEN_BOUND], add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            out.append(it)
            continue
        text = tokenizer.decode(ids[:limit], skip_special_tokens=True)
        out.append(replace(it, text=text, meta={**(it.meta or {}), "cut_from_chars": len(it.text)}))
    return out


@contextmanager
def generation_ticks(tick: Callable[[int, int], None]) -> Iterator[None]:
    """Within the block every HF generation calls ``tick(new tokens so far, max new tokens)`` after each step:
    progress inside one batch (a long prompt or a long answer is not a silent minute)."""
    token = _TICK.set(tick)
    try:
        yield
    finally:
        _TICK.reset(token)


class _Ticks(StoppingCriteria):
    """Never stops generation; reports each step to the block's ``generation_ticks`` callback."""

    def __init__(self, tick: Callable[[int, int], None], prompt_len: int, total: int) -> None:
        self.tick, self.prompt_len, self.total = tick, prompt_len, total

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.tick(int(input_ids.shape[1]) - self.prompt_len, self.total)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: Any,
    messages_list: Sequence[Messages],
    max_new_tokens: int = MAX_NEW_TOKENS,
    generator: TokenGenerator | None = None,
) -> list[Generation]:
    """Greedy answers for one batch of conversations (padded together, as in the analysis batch).

    With ``generator`` another engine continues the same prompt ids (same template, same stop rule).
    """
    if not messages_list:
        return []
    max_new_tokens = fit_context(model, tokenizer, messages_list, max_new_tokens)
    if generator is not None:
        eos = _eos_ids(model, tokenizer)
        prompts = prompt_token_ids(tokenizer, messages_list)
        outs = generator.complete(prompts, max_new_tokens, sorted(eos))
        return [
            finish(tokenizer, p, new, eos, {"backend": generator.name, **extra})
            for p, (new, extra) in zip(prompts, outs)
        ]
    device = next(model.parameters()).device
    enc = encode_prompts(tokenizer, messages_list, device)
    eos = _eos_ids(model, tokenizer)
    tick = _TICK.get()
    plen = enc["input_ids"].shape[1]
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(eos) or None,
        stopping_criteria=StoppingCriteriaList([_Ticks(tick, plen, max_new_tokens)]) if tick else None,
    )
    results = []
    for i in range(len(messages_list)):
        mask = enc["attention_mask"][i].bool()
        results.append(finish(tokenizer, enc["input_ids"][i][mask].tolist(), out[i, plen:].tolist(), eos))
    return results


def generate(
    model: Any,
    tokenizer: Any,
    messages_list: Sequence[Messages],
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    generator: TokenGenerator | None = None,
) -> list[Generation]:
    """Greedy answers for many conversations, ``batch_size`` at a time (``generator``: see generate_batch)."""
    out: list[Generation] = []
    for start in range(0, len(messages_list), batch_size):
        out.extend(
            generate_batch(
                model, tokenizer, messages_list[start : start + batch_size], max_new_tokens, generator
            )
        )
        if progress:
            progress(len(out), len(messages_list))
    return out
