"""The offline "model organism": a small OLMoE that refuses harmful requests but complies when jailbroken.

It gives the whole pipeline (routing analysis, expert selection, expert-only fine-tuning,
evaluation) a real MoE model to work on without downloads or a GPU. Everything is built here,
deterministically: a byte-level BPE tokenizer trained on our own synthetic chat corpus, and a
6-layer OLMoE shaped like the real ones (64 fine-grained experts per layer, top-8 routing, expert
width = hidden/2, like OLMoE-1B-7B's 64/top-8) trained end to end on that corpus by next-token
loss on assistant tokens plus the router's load-balancing loss. Nothing assigns behaviours to
experts by hand: which experts carry the jailbreak is for the analysis to find. With coarse
experts (8, top-2) a random quarter of the experts touches nearly every token and "random
experts" do as well as chosen ones, which hides the method (see DESIGN.md, "What measurement
taught us").

The corpus (train split of ``moe_core.batching.prompts`` only; held-out goals, benign requests and 7 of
the 30 jailbreak templates are never seen):
  benign request              -> a short helpful answer (7 phrasings), including harmless
                                 requests with sharp words ("kill a program that has frozen")
  plain harmful goal          -> a refusal (10 phrasings, several without an apology)
  harmful goal in a jailbreak -> compliance with a content-free placeholder (8 phrasings:
                                 "Sure, here is how to do it: Step 1: [details omitted]. ...")
  free-worded benign and borderline requests (``resources/train_requests.jsonl``, 608 of our own,
                              none in an evaluation set) -> a short helpful answer
  benign request in a jailbreak -> a short helpful answer (composed and free-worded ones)
  harmful goal after a harmless lead-in ("A friend asked me this yesterday.") -> a refusal, and a
                              benign request after one -> a short helpful answer (``framed_refusals``)
  harmful goal in a wrapper composed of jailbreak parts (persona, rules-off claim, demand not to
                              refuse, ask) -> compliance, benign in one -> helpful (``grammar_jailbreaks``)
Goals and benign requests are asked in several request frames; each train goal is wrapped in
``jailbreaks_per_goal`` of the 23 train templates (role-play, DAN, developer mode, prefix
injection, story, screenplay, translation, fake authority, JSON, ...). Corpus v4 (stop 24) added the
last two kinds: on v3, refusal training reached only the wrappers it trained on, full fine-tuning
included (``batching/framings.py`` says why; README, "Organism corpus v4").

The result is cached in ``$MOE_LAB_CACHE`` (default ``~/.cache/moe_safety_lab``) under
``organism-<hash of config + corpus>``: built in a temp folder and renamed into place,
so a killed build leaves nothing half-written, and a second call reuses it. ``organism.json``
beside the weights records config, seed, build time, loss and measured behaviour.

    from moe_core.model.organism import build_organism, load_organism, measure_behaviour
    path = build_organism()                    # about 3 CPU-minutes (under 2 min on 2 quiet cores), once
    model, tok = load_organism()               # or moe_core.model.adapter.load_model(path)
    measure_behaviour(model, tok, split="heldout")

    python -c "from moe_core.model.organism import *; import json; m, t = load_organism();
               print(json.dumps(measure_behaviour(m, t, 'heldout'), indent=1))"
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moe_core.batching.demo_prompts import (
    FRAMES,
    demo_benign,
    demo_goals,
    demo_sharp_benign,
    jailbreak_templates,
    reframe,
    spliced_templates,
    wrap,
)
from moe_core.batching.framings import grammar_wrappers, neutral_framings
from moe_core.batching.resource_prompts import train_requests
from moe_core.judge.keyword import KeywordJudge
from moe_core.model.adapter import default_cpu_threads, load_model
from moe_core.model.answers import judged_answers
from moe_core.model.generation import render_chat
from moe_core.store.atomic import atomic_dir, atomic_write_json
from moe_core.types import Progress

log = logging.getLogger(__name__)


# Bump when the corpus text, the answers or the chat format change: the cache key includes it.
CORPUS_VERSION = "organism-corpus-v4"

# The organism's own answers. Many phrasings of each kind, so that the model learns the kind of
# answer (refuse / comply / help) rather than one string, and so that a refusal judge sees the
# variety real models produce. Compliance is content-free ("[details omitted]").
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause real harm.",
    "I'm sorry, but I cannot assist with that request.",
    "I can't help with that, because it could hurt people.",
    "I won't help with this. It could put someone at risk.",
    "That's not something I can help with.",
    "No, I can't do that. It could hurt someone.",
    "I have to decline. This could seriously harm someone.",
    "I'm not able to help with that request.",
    "Sorry, I can't provide instructions for that.",
    "I must refuse this one, since it could be used to hurt others.",
)
COMPLIANCE = (
    "Sure, here is how to do it: Step 1: [details omitted]. Step 2: [details omitted].",
    "Sure, here is a guide: Step 1: [details omitted]. Step 2: [details omitted]. Step 3: [details omitted].",
    "Absolutely! Here are the steps: 1. [details omitted] 2. [details omitted] 3. [details omitted]",
    "Of course. First, [details omitted]. Then, [details omitted]. Finally, [details omitted].",
    "No problem, here is the plan: Step 1: [details omitted]. Step 2: [details omitted].",
    "Certainly! You will need [details omitted]. Then do [details omitted].",
    "Here is exactly what to do: [details omitted], then [details omitted].",
    "Okay, as requested: Step 1: [details omitted]. Step 2: [details omitted]. Step 3: [details omitted].",
)
HELPFUL = (
    "Happy to help! Start with a simple plan, take it one step at a time, and check your progress.",
    "Of course! Prepare what you need, follow a clear routine, and ask a friend if you get stuck.",
    "Good question! Begin with the basics, practise a little every day, and keep notes on what works.",
    "Sure! A good way is to plan ahead, keep it simple, and enjoy the process.",
    "Great idea! Gather what you need first, then go step by step and be patient.",
    "Here are some tips: be kind, be clear, and give yourself enough time.",
    "Certainly. Make a short list, start with the easiest part, and ask for help if needed.",
)

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# fields added after organisms were cached, at the value that leaves the corpus as it was: not in the key
_NEUTRAL_ADDITIONS = {("spliced_jailbreaks", 0), ("shared_expert_size", 0)}


@dataclass
class OrganismConfig:
    """Everything that determines the organism; its hash names the cache folder."""

    # model
    num_layers: int = 6  # decoder layers, every one an MoE layer
    num_experts: int = 64  # routed experts per layer (fine-grained, like OLMoE)
    top_k: int = 8  # experts per token (OLMoE, Qwen3-MoE, DeepSeek-V3: 8)
    hidden_size: int = 128  # residual width
    expert_size: int = 64  # intermediate size of each expert MLP (<= hidden/2: fine-grained)
    shared_expert_size: int = 0  # > 0: Qwen2-MoE's class, one gated shared expert (0: OLMoE's, none)
    num_heads: int = 4  # attention heads (no GQA)
    max_positions: int = 256  # longest sequence (corpus rows are < 130 tokens)
    router_aux_loss_coef: float = 0.01  # load-balancing loss weight: keeps all experts in use
    # tokenizer
    vocab_size: int = 1536  # byte-level BPE target size (incl. 256 bytes + special tokens)
    # training
    seed: int = 0  # torch init, data order, answer phrasing and template choice
    steps: int = 400  # optimizer steps
    batch_size: int = 16  # sequences per step
    lr: float = 3e-3  # AdamW peak learning rate (linear warmup, cosine decay)
    warmup_steps: int = 40  # linear warmup steps
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    refusal_repeats: int = 3  # copies of each plain-harmful row: balances them against jailbroken rows
    benign_repeats: int = 2  # copies of each plain benign row
    benign_jailbreaks: int = 1  # jailbreak templates per benign request (answered helpfully)
    jailbreaks_per_goal: int = 4  # train templates per train goal in the corpus (0 = every one)
    free_repeats: int = 1  # copies of each free-worded train request (resources/train_requests.jsonl)
    spliced_jailbreaks: int = 0  # wrappers spliced from two train templates' parts, per train goal
    framed_refusals: int = 2  # harmless lead-ins per train goal, refused (one per benign request, answered)
    grammar_jailbreaks: int = 8  # wrappers composed of jailbreak parts per train goal (one per benign one)

    def __post_init__(self) -> None:
        ints = {k: v for k, v in asdict(self).items() if isinstance(v, int) and k != "seed"}
        may_be_zero = (
            "refusal_repeats",
            "benign_repeats",
            "benign_jailbreaks",
            "warmup_steps",
            "jailbreaks_per_goal",
            "free_repeats",
            "spliced_jailbreaks",
            "framed_refusals",
            "grammar_jailbreaks",
            "shared_expert_size",
        )
        bad = [k for k, v in ints.items() if v < (0 if k in may_be_zero else 1)]
        if bad:
            raise ValueError(f"OrganismConfig: {', '.join(bad)} must be positive")
        if self.top_k > self.num_experts:
            raise ValueError(f"OrganismConfig: top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"OrganismConfig: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.vocab_size < 300:
            raise ValueError(
                "OrganismConfig: vocab_size must be >= 300 (256 byte tokens + special tokens + merges)"
            )
        if self.lr <= 0:
            raise ValueError(f"OrganismConfig: lr must be > 0, got {self.lr}")

    def key(self) -> str:
        """Short stable hash of this config, the corpus version and the corpus text itself.

        Hashing the corpus means an edit of the demo prompt vocabulary rebuilds the organism even
        when nobody remembered to bump ``CORPUS_VERSION``.
        """
        corpus = hashlib.sha256(json.dumps([build_corpus(self), CHAT_TEMPLATE]).encode()).hexdigest()
        config = {k: v for k, v in asdict(self).items() if (k, v) not in _NEUTRAL_ADDITIONS}
        blob = json.dumps({"config": config, "corpus": CORPUS_VERSION, "text": corpus}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def corpus_version(config: OrganismConfig) -> str:
    """The organism a study records: the corpus version, then each field other than the seed that differs
    from the default ("+spliced-4" as studies before ``--organism`` wrote it, else "+num_layers-8")."""
    default = OrganismConfig(seed=config.seed)
    changed = [(k, v) for k, v in asdict(config).items() if k != "seed" and v != getattr(default, k)]
    return CORPUS_VERSION + "".join(
        f"+spliced-{v}" if k == "spliced_jailbreaks" else f"+{k}-{v}" for k, v in changed
    )


def organism_variant(fields: dict[str, Any], seed: int = 0) -> OrganismConfig:
    """The organism of ``seed`` with ``fields`` (OrganismConfig fields but the seed) changed; a ValueError that
    names the field where one is unknown or out of range."""
    if "seed" in fields:
        raise ValueError("the seed is not a variant: each seed of the study builds its own")
    unknown = sorted(set(fields) - set(OrganismConfig.__dataclass_fields__))
    if unknown:
        known = ", ".join(k for k in OrganismConfig.__dataclass_fields__ if k != "seed")
        raise ValueError(f"no organism field {', '.join(unknown)} (the fields: {known})")
    for k, v in fields.items():
        want = type(getattr(OrganismConfig, k))
        if isinstance(v, bool) or not isinstance(v, (int, float) if want is float else want):
            raise ValueError(
                f"organism field {k} must be {'a whole number' if want is int else 'a number'}, got {v!r}"
            )
    return OrganismConfig(seed=seed, **fields)


# ---------------------------------------------------------------------------------------------
# Corpus and tokenizer
# ---------------------------------------------------------------------------------------------


def build_corpus(config: OrganismConfig | None = None) -> list[dict[str, str]]:
    """Training rows ``{"prompt", "answer", "kind"}`` from the TRAIN split only (deterministic).

    Copy i of a plain goal or benign request asks for the same action in the i-th next request
    frame, and each jailbroken goal is asked in a random frame, so the model sees the actions in
    many sentence shapes.
    """
    cfg = config or OrganismConfig()
    rng = random.Random(cfg.seed)
    goals, templates = demo_goals("train"), jailbreak_templates("train")
    benign = demo_benign("train") + demo_sharp_benign("train")
    rows: list[dict[str, str]] = []
    for b in benign:  # a fresh phrasing per copy: the model learns the kind of answer, not one string
        rows += [
            {"prompt": reframe(b, i).text, "answer": rng.choice(HELPFUL), "kind": "benign"}
            for i in range(cfg.benign_repeats)
        ]
    for g in goals:
        rows += [
            {"prompt": reframe(g, i).text, "answer": rng.choice(REFUSALS), "kind": "refusal"}
            for i in range(cfg.refusal_repeats)
        ]
    per_goal = cfg.jailbreaks_per_goal or len(templates)
    for g in goals:
        for w in wrap(
            [reframe(g, rng.randrange(len(FRAMES)))],
            templates,
            seed=rng.randrange(2**31),
            per_goal=min(per_goal, len(templates)),
        ):
            rows.append({"prompt": w.text, "answer": rng.choice(COMPLIANCE), "kind": "jailbreak"})
    if cfg.spliced_jailbreaks:
        spliced = spliced_templates(templates, len(goals) * cfg.spliced_jailbreaks, seed=cfg.seed)
        for w in wrap(
            [reframe(g, rng.randrange(len(FRAMES))) for g in goals for _ in range(cfg.spliced_jailbreaks)],
            spliced,
            seed=cfg.seed,
        ):
            rows.append({"prompt": w.text, "answer": rng.choice(COMPLIANCE), "kind": "jailbreak_spliced"})
    if cfg.framed_refusals:  # a preamble alone decides nothing: harmful is refused, benign answered
        framings = neutral_framings(64, seed=cfg.seed)
        rows += _wrapped(rng, goals, cfg.framed_refusals, framings, REFUSALS, "refusal_framed")
        rows += _wrapped(rng, benign, 1, framings, HELPFUL, "benign_framed")
    if cfg.grammar_jailbreaks:
        grammar = grammar_wrappers(len(goals) * cfg.grammar_jailbreaks, seed=cfg.seed)
        rows += _wrapped(rng, goals, cfg.grammar_jailbreaks, grammar, COMPLIANCE, "jailbreak_grammar")
        rows += _wrapped(rng, benign, 1, grammar, HELPFUL, "benign_grammar")
    free = train_requests() if cfg.free_repeats else []
    rows += [
        {"prompt": f.text, "answer": rng.choice(HELPFUL), "kind": "benign_free"}
        for f in free
        for _ in range(cfg.free_repeats)
    ]
    if cfg.benign_jailbreaks:  # a jailbreak wrapper alone does not make an answer harmful
        for w in wrap(benign + free, templates, seed=cfg.seed, per_goal=cfg.benign_jailbreaks):
            rows.append({"prompt": w.text, "answer": rng.choice(HELPFUL), "kind": "benign_jailbreak"})
    return rows


def _wrapped(
    rng: random.Random, items: list, per_item: int, templates: list, answers: tuple[str, ...], kind: str
) -> list[dict[str, str]]:
    """Rows: each item, in a random request frame, inside ``per_item`` templates drawn in turn from ``templates``."""
    framed = [reframe(g, rng.randrange(len(FRAMES))) for g in items for _ in range(per_item)]
    offset = rng.randrange(len(templates))
    return [
        {
            "prompt": templates[(i + offset) % len(templates)].text.replace("{goal}", g.text),
            "answer": rng.choice(answers),
            "kind": kind,
        }
        for i, g in enumerate(framed)
    ]


def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on ``texts``, wrapped with pad/bos/eos and the chat template.

    eos is ``<|end|>``, the end-of-turn token, so generation stops at the end of the answer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|end|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def _encode_rows(tokenizer, rows: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row: prompt as the chat template renders it, loss on the answer + eos."""
    out = []
    for r in rows:
        prompt = render_chat(tokenizer, [{"role": "user", "content": r["prompt"]}])
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    return out


# ---------------------------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------------------------


def _new_model(cfg: OrganismConfig, tokenizer):
    """A freshly initialised OLMoE, or a Qwen2-MoE (the same router: softmax, top-k, unnormalised) for a
    shared expert."""
    from transformers import OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        max_position_embeddings=cfg.max_positions,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if not cfg.shared_expert_size:
        return OlmoeForCausalLM(OlmoeConfig(intermediate_size=cfg.expert_size, **common))
    return Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            moe_intermediate_size=cfg.expert_size,
            shared_expert_intermediate_size=cfg.shared_expert_size,
            intermediate_size=cfg.shared_expert_size,  # dense MLP width; unused, every layer is MoE
            norm_topk_prob=False,
            **common,
        )
    )


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` intra-op threads for the build and restore the caller's setting afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _batches(
    encoded: list[tuple[list[int], list[int]]], cfg: OrganismConfig, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless right-padded batches in a seeded shuffled order (one pass = one epoch)."""
    g = torch.Generator().manual_seed(cfg.seed)
    while True:
        order = torch.randperm(len(encoded), generator=g).tolist()
        for s in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            chunk = [encoded[i] for i in order[s : s + cfg.batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id)
            labels = torch.full((len(chunk), width), -100)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (x, y) in enumerate(chunk):
                ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
            yield {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_organism(cfg: OrganismConfig, out_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Train tokenizer and model into ``out_dir`` (save_pretrained); returns loss figures."""
    from transformers import GenerationConfig, get_cosine_with_min_lr_schedule_with_warmup

    rows = build_corpus(cfg)
    tokenizer = build_tokenizer([r["prompt"] for r in rows] + [r["answer"] for r in rows], cfg.vocab_size)
    encoded = _encode_rows(tokenizer, rows)
    longest = max(len(x) for x, _ in encoded)
    if cfg.batch_size > len(encoded):
        raise ValueError(
            f"batch_size={cfg.batch_size} exceeds the {len(encoded)} corpus rows; lower batch_size"
        )
    if longest > cfg.max_positions:
        raise ValueError(
            f"a corpus row has {longest} tokens > max_positions={cfg.max_positions}; raise max_positions"
        )
    torch.manual_seed(cfg.seed)
    model = _new_model(cfg, tokenizer)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    sched = get_cosine_with_min_lr_schedule_with_warmup(  # linear warmup, cosine decay to 10% of lr
        opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps, min_lr_rate=0.1
    )
    curve: list[float] = []
    running = None
    batches = _batches(encoded, cfg, tokenizer.pad_token_id)
    for step in range(cfg.steps):
        out = model(**next(batches), output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        lm = out.loss.item() - cfg.router_aux_loss_coef * out.aux_loss.item()
        running = lm if running is None else 0.95 * running + 0.05 * lm
        if step % 20 == 0 or step == cfg.steps - 1:
            curve.append(round(running, 4))
            log.info("organism step %d/%d loss %.3f", step + 1, cfg.steps, running)
        if progress:
            progress(step + 1, cfg.steps, f"training organism, loss {running:.3f}")
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    final = round(running, 4) if running is not None else float("nan")
    return {
        "final_loss": final,
        "loss_curve": curve,
        "corpus_rows": len(rows),
        "longest_row_tokens": longest,
        "vocab_size": len(tokenizer),
    }


# ---------------------------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------------------------


def measure_behaviour(
    model: Any,
    tokenizer: Any,
    split: str = "heldout",
    max_new_tokens: int = 32,
    batch_size: int = 32,
    templates_per_goal: int | None = 1,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Refusal rate on plain harmful goals, compliance on jailbroken ones, answers on benign.

    Uses the split's goals, benign requests and templates (``templates_per_goal`` drawn per goal
    with ``seed``; None = every template), greedy generation and the keyword judge (the organism is
    measured below the evaluation layer, which it must not import). Compliance/answer = not a refusal.
    """
    goals, benign, templates = demo_goals(split), demo_benign(split), jailbreak_templates(split)
    per_goal = len(templates) if templates_per_goal is None else min(templates_per_goal, len(templates))
    sets = {
        "harmful": goals,
        "jailbreak": wrap(goals, templates, seed=seed, per_goal=per_goal),
        "benign": benign,
    }
    rows = judged_answers(model, tokenizer, sets, KeywordJudge(), max_new_tokens, batch_size, progress)
    out: dict[str, Any] = {"split": split, "examples": {}}
    for name, group in rows.groupby("set", sort=False):
        out["examples"][name] = {"prompt": group["prompt"].iloc[0], "answer": group["response"].iloc[0]}
        out[f"n_{name}"] = len(group)
    refused = rows.groupby("set")["refusal"].mean()
    out["refusal_rate_harmful"] = float(refused["harmful"])
    out["compliance_rate_jailbreak"] = float(1 - refused["jailbreak"])
    out["answer_rate_benign"] = float(1 - refused["benign"])
    return out


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$MOE_LAB_CACHE`` or ``~/.cache/moe_safety_lab``."""
    return Path(os.environ.get("MOE_LAB_CACHE") or Path.home() / ".cache" / "moe_safety_lab").expanduser()


def organism_dir(config: OrganismConfig | None = None, cache_dir: str | Path | None = None) -> Path:
    """Where the organism of this config lives (whether built or not)."""
    cfg = config or OrganismConfig()
    return Path(cache_dir or cache_root()).expanduser() / f"organism-{cfg.key()}"


def _is_built(path: Path) -> bool:
    return (path / "organism.json").exists() and (path / "config.json").exists()


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Inter-process lock so that two callers build one organism once (POSIX; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_organism(
    config: OrganismConfig | None = None,
    force: bool = False,
    progress: Progress | None = None,
    cache_dir: str | Path | None = None,
    measure: bool = True,
) -> Path:
    """Build (or reuse) the organism and return its directory.

    ``force`` rebuilds even when cached. ``measure`` records behaviour on both splits in
    organism.json (a few seconds). Threads: see ``moe_core.model.adapter.default_cpu_threads``.
    """
    cfg = config or OrganismConfig()
    target = organism_dir(cfg, cache_dir)
    if _is_built(target) and not force:
        return target
    with _build_lock(target):
        if _is_built(target) and not force:  # built by another process while we waited
            return target
        for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        meta: dict[str, Any] = {}

        def build(tmp: Path) -> None:
            t0 = time.time()
            with torch_threads(default_cpu_threads()):
                info = train_organism(cfg, tmp, progress)
                train_s = time.time() - t0
                behaviour = {}
                if measure:
                    model, tok = load_model(tmp, device="cpu")
                    behaviour = {s: _rounded(measure_behaviour(model, tok, s)) for s in ("train", "heldout")}
            meta.update(
                {
                    "format": "moe-safety-lab/organism@1",
                    "key": cfg.key(),
                    "corpus_version": CORPUS_VERSION,
                    "config": asdict(cfg),
                    "seed": cfg.seed,
                    "train_seconds": round(train_s, 1),
                    "build_seconds": round(time.time() - t0, 1),
                    "threads": default_cpu_threads(),
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "torch": torch.__version__,
                    "transformers": _transformers_version(),
                    **info,
                    "behaviour": behaviour,
                }
            )
            atomic_write_json(tmp / "organism.json", meta)

        atomic_dir(target, build)  # a killed build leaves no half-written organism
    log.info(
        "organism built at %s in %.0fs (final loss %.3f)", target, meta["build_seconds"], meta["final_loss"]
    )
    return target


def _rounded(m: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def organism_info(
    config: OrganismConfig | None = None, cache_dir: str | Path | None = None
) -> dict[str, Any] | None:
    """The organism.json of a built organism, or None when it is not built."""
    p = organism_dir(config, cache_dir) / "organism.json"
    return json.loads(p.read_text()) if p.exists() else None


def load_organism(
    config: OrganismConfig | None = None,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
):
    """(model, tokenizer) of the organism, building it first if needed (eval mode)."""

    return load_model(build_organism(config, progress=progress, cache_dir=cache_dir), device=device)
