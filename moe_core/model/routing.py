"""Capture which experts every token is routed to, per MoE layer, from a Hugging Face model.

In transformers 5 every MoE router module returns ``(router_logits [T, E], top_k_weights [T, k],
top_k_index [T, k])`` with ``T = batch * seq`` (pads included). A forward hook on each router
therefore sees exactly the experts the model used; nothing is recomputed from logits (DeepSeek-V3
picks experts with sigmoid + correction bias + group top-k, gpt-oss with top-k before softmax).

    with capture_routing(model) as rec:          # hooks always removed on exit
        model(**batch)
    rec.calls[0].expert_ids                      # [n_moe_layers, T, k], on CPU

    samples = route_batch(model, tok, messages_list, scope="generated", max_new_tokens=64)
    samples[0].routing.select("generated").expert_ids   # [n_moe_layers, T_gen, k]
    save_batch_routing(run_dir / "routing" / "batch_0003.safetensors", samples, adapter.moe_layers, {"batch_idx": 3})

Scopes (what ``route_batch`` runs; every span it produces is kept and marked, the consumer selects):

* ``prompt``: the left-padded chat-templated prompts in one forward (span 0). With
  ``max_new_tokens > 0`` that forward is the prefill of the greedy ``generate_batch`` call, whose
  answer the refusal judge needs anyway; its decode-step routing is kept as span 1.
* ``generated``: the same greedy generation (prefill = span 0, decode steps = span 1).
  A token is routed when it is fed to the model as input, so the generated tokens with routing
  are ``new_ids[:n]`` with ``n = min(len(new_ids), decode_steps)``: every token of an answer that
  stopped at EOS (the EOS itself is not part of the answer and is dropped, as is anything a
  finished sample is fed afterwards), and all but the last token of an answer cut by
  ``max_new_tokens`` (that last token was produced but never fed back).
* ``response``: teacher forcing: prompt ids + ``tokenizer(response)`` ids (the assistant turn,
  no EOS appended) in one left-padded forward; response tokens are span 2.

Storage: one safetensors file per analysis batch (tokens of all samples concatenated, an
``offsets`` array, JSON metadata in the header), written atomically. Expert ids are uint8 when
``num_experts <= 256`` (else int16) and weights float16.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from moe_core.errors import MoELabError
from moe_core.model.adapter import MoEAdapter, model_device
from moe_core.model.generation import (
    MAX_NEW_TOKENS,
    Generation,
    Messages,
    encode_prompts,
    generate_batch,
)
from moe_core.store.atomic import _json_default, atomic_write

log = logging.getLogger(__name__)

SPAN_PROMPT = 0
SPAN_GENERATED = 1
SPAN_RESPONSE = 2
SCOPES: dict[str, int] = {"prompt": SPAN_PROMPT, "generated": SPAN_GENERATED, "response": SPAN_RESPONSE}

FILE_FORMAT = "moe_safety_lab.routing"
FILE_VERSION = "1"


class RoutingError(MoELabError, ValueError):
    """Routing was asked for with inputs that cannot work; the message says what to change."""


class RoutingFileError(RoutingError):
    """A routing file is missing, unreadable, or not one this module wrote."""


def expert_id_dtype(num_experts: int) -> np.dtype:
    """Smallest id dtype for ``num_experts`` (1 byte per id for every common model)."""
    return np.dtype(np.uint8) if num_experts <= 256 else np.dtype(np.int16)


def span_code(scope: str | int) -> int:
    """Span code for a scope name ("prompt"/"generated"/"response") or a span code itself."""
    if isinstance(scope, (int, np.integer)) and int(scope) in SCOPES.values():
        return int(scope)
    if isinstance(scope, str) and scope in SCOPES:
        return SCOPES[scope]
    raise RoutingError(f"unknown routing scope {scope!r}: use one of {', '.join(SCOPES)}")


# -- per-sample records -----------------------------------------------------------------------


class SpanRouting(NamedTuple):
    """One span's arrays; a tuple so ``select(scope)[0]`` is the ``[layers, T, k]`` id array."""

    expert_ids: np.ndarray  # [n_moe_layers, T_span, k]
    weights: np.ndarray | None  # [n_moe_layers, T_span, k] float16, None if saved without weights
    token_ids: np.ndarray  # [T_span] int32


@dataclass
class SampleRouting:
    """Routing of one sample's real (non-pad) tokens, in sequence order."""

    expert_ids: np.ndarray  # [n_moe_layers, T, k] uint8 (int16 when num_experts > 256): chosen experts
    weights: np.ndarray | None  # [n_moe_layers, T, k] float16 gate weights; None if saved without them
    token_ids: np.ndarray  # [T] int32: the input token at each routed position
    spans: np.ndarray  # [T] uint8: SPAN_PROMPT / SPAN_GENERATED / SPAN_RESPONSE

    def __post_init__(self) -> None:
        if self.expert_ids.ndim != 3:
            raise RoutingError(f"expert_ids must be [layers, tokens, k], got shape {self.expert_ids.shape}")
        t = self.expert_ids.shape[1]
        if self.token_ids.shape != (t,) or self.spans.shape != (t,):
            raise RoutingError(
                f"token_ids {self.token_ids.shape} and spans {self.spans.shape} must both be ({t},) "
                "to match expert_ids"
            )
        if self.weights is not None and self.weights.shape != self.expert_ids.shape:
            raise RoutingError(f"weights {self.weights.shape} must match expert_ids {self.expert_ids.shape}")

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    def count(self, scope: str | int) -> int:
        return int(np.count_nonzero(self.spans == span_code(scope)))

    def select(self, scope: str | int) -> SpanRouting:
        """Arrays of one span only (e.g. what the risk module counts for the chosen scope)."""
        keep = self.spans == span_code(scope)
        w = None if self.weights is None else self.weights[:, keep]
        return SpanRouting(self.expert_ids[:, keep], w, self.token_ids[keep])

    def subset(self, scope: str | int) -> SampleRouting:
        """The same record restricted to one span (keeps the type, e.g. to save a single scope)."""
        keep = self.spans == span_code(scope)
        return SampleRouting(*self.select(scope), self.spans[keep])


@dataclass
class RoutedSample:
    """One prompt's answer (or teacher-forced response) together with its routing."""

    generation: Generation
    routing: SampleRouting


# -- the recorder -----------------------------------------------------------------------------


@dataclass
class RoutingCall:
    """Routing of one model forward: rows are the flattened ``batch * seq`` positions, pads included."""

    expert_ids: torch.Tensor  # [n_moe_layers, T, k] small int dtype
    weights: torch.Tensor  # [n_moe_layers, T, k] float16


@dataclass
class RoutingRecorder:
    """Collects every router's (top_k_index, top_k_weights) per forward call, in layer order.

    Tensors stay on the model's device while the context is open (no GPU->CPU sync per layer or
    step) and move to the CPU in one transfer when it closes.
    """

    moe_layers: list[int]  # decoder-layer index of each recorded row
    num_experts: int  # router width (decides the id dtype)
    _pending: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, init=False, repr=False)
    _calls: list[RoutingCall] = field(default_factory=list, init=False, repr=False)

    @property
    def calls(self) -> list[RoutingCall]:
        return self._calls

    def clear(self) -> None:
        self._pending.clear()
        self._calls.clear()

    def _observe(self) -> Any:
        """The router-hook function (``MoEAdapter.router_hooks``) that records one layer per call."""
        id_dtype = torch.uint8 if self.num_experts <= 256 else torch.int16
        position = {layer: pos for pos, layer in enumerate(self.moe_layers)}
        last = len(self.moe_layers) - 1

        def observe(layer: int, module: nn.Module, args: Any, output: Any) -> None:
            pos = position[layer]
            if pos != len(self._pending):
                self._pending.clear()
                raise RoutingError(
                    f"router of layer {layer} ran out of order: capture_routing records "
                    "whole inference forwards (no gradient checkpointing, no layer-by-layer calls)"
                )
            self._pending.append((output[2].detach(), output[1].detach()))
            if pos == last:
                dev = self._pending[0][0].device
                ids = torch.stack([i.to(dev) for i, _ in self._pending]).to(id_dtype)
                w = torch.stack([w.to(dev) for _, w in self._pending]).to(torch.float16)
                self._pending.clear()
                self._calls.append(RoutingCall(ids, w))

        return observe

    def _to_cpu(self) -> None:
        if self._calls and any(c.expert_ids.device.type != "cpu" for c in self._calls):
            self._calls = gather_to_cpu(self._calls)


def gather_to_cpu(calls: list[RoutingCall]) -> list[RoutingCall]:
    """Move calls to the CPU with one transfer (one sync for a whole generation, not one per step)."""
    dev = calls[0].expert_ids.device
    shapes = [c.expert_ids.shape for c in calls]
    sizes = [c.expert_ids.numel() for c in calls]
    ids = torch.cat([c.expert_ids.to(dev).reshape(-1) for c in calls]).cpu().split(sizes)
    w = torch.cat([c.weights.to(dev).reshape(-1) for c in calls]).cpu().split(sizes)
    return [RoutingCall(i.view(shape), x.view(shape)) for i, x, shape in zip(ids, w, shapes)]


@contextmanager
def capture_routing(model: nn.Module, adapter: MoEAdapter | None = None) -> Iterator[RoutingRecorder]:
    """Record the experts chosen by every router during the forwards run inside the block.

    Raises NotAnMoEModelError for a dense model. An ``"observe"`` router hook
    (``MoEAdapter.router_hooks``): it sees the steered choice when ``steer_experts`` is active, and
    is removed in ``finally``, also when the block raises, so a model is never left instrumented.
    """
    adapter = adapter or MoEAdapter.for_model(model)
    rec = RoutingRecorder(moe_layers=list(adapter.moe_layers), num_experts=adapter.num_experts)
    try:
        with adapter.router_hooks(rec._observe(), stage="observe"):
            yield rec
        rec._to_cpu()
    finally:
        rec._pending.clear()


# -- scopes -----------------------------------------------------------------------------------


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each sample's first real token, exactly as ``generate`` builds them."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


@torch.no_grad()
def _forward_routing(
    model: nn.Module, adapter: MoEAdapter, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> RoutingCall:
    """One routed forward over a left-padded batch (logits only for the last position: unused)."""
    kwargs: dict[str, Any] = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_position_ids(attention_mask),
        use_cache=False,
    )
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    with capture_routing(model, adapter) as rec:
        model(**kwargs)
    if len(rec.calls) != 1:
        raise RuntimeError(f"expected one routed forward, recorded {len(rec.calls)}")
    return rec.calls[0]


def _sample(ids: torch.Tensor, w: torch.Tensor, tokens: Sequence[int], spans: np.ndarray) -> SampleRouting:
    return SampleRouting(
        np.ascontiguousarray(ids.numpy()),
        np.ascontiguousarray(w.numpy()),
        np.asarray(tokens, dtype=np.int32),
        spans.astype(np.uint8),
    )


def _split_left_padded(
    call: RoutingCall, lengths: Sequence[int], tokens: Sequence[Sequence[int]], spans: Sequence[np.ndarray]
) -> list[SampleRouting]:
    """Rows of a left-padded [B, S] forward -> one record per sample with only its real tokens."""
    n_layers, rows, k = call.expert_ids.shape
    b = len(lengths)
    s = rows // b
    ids = call.expert_ids.reshape(n_layers, b, s, k)
    w = call.weights.reshape(n_layers, b, s, k)
    return [_sample(ids[:, i, s - n :], w[:, i, s - n :], tokens[i], spans[i]) for i, n in enumerate(lengths)]


def route_sequences(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_token_id: int | None = None,
    adapter: MoEAdapter | None = None,
) -> list[SampleRouting]:
    """Teacher-forced routing of exact token ids: prompt tokens are span 0, response tokens span 2.

    Used by the ``response`` scope and to check generated-scope routing against a single forward.
    """
    if len(prompt_ids) != len(response_ids):
        raise RoutingError(
            f"{len(prompt_ids)} prompts but {len(response_ids)} responses: give one response per prompt"
        )
    if not prompt_ids:
        return []
    adapter = adapter or MoEAdapter.for_model(model)
    seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    if min(len(x) for x in seqs) == 0:
        raise RoutingError("an empty sequence cannot be routed: every prompt needs at least one token")
    width = max(len(x) for x in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, x in enumerate(seqs):
        input_ids[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x) :] = 1
    dev = model_device(model)
    call = _forward_routing(model, adapter, input_ids.to(dev), mask.to(dev))
    kinds = np.array([SPAN_PROMPT, SPAN_RESPONSE], np.uint8)
    spans = [np.repeat(kinds, [len(p), len(r)]) for p, r in zip(prompt_ids, response_ids)]
    return _split_left_padded(call, [len(x) for x in seqs], seqs, spans)


def _split_generation(calls: list[RoutingCall], gens: list[Generation]) -> list[SampleRouting]:
    """Prefill rows -> prompt tokens; decode step j (one row per sample) -> generated token j-1."""
    b = len(gens)
    width = max(len(g.prompt_ids) for g in gens)
    if (
        not calls
        or calls[0].expert_ids.shape[1] != b * width
        or any(c.expert_ids.shape[1] != b for c in calls[1:])
    ):
        shapes = [tuple(c.expert_ids.shape) for c in calls[:3]]
        raise RuntimeError(
            f"generate() did not run as one prefill of {b}x{width} tokens then one token per sample per step "
            f"(recorded {len(calls)} forwards, first shapes {shapes}); prefill chunking, assisted decoding "
            "and use_cache=False are unsupported"
        )
    prefill = _split_left_padded(
        calls[0],
        [len(g.prompt_ids) for g in gens],
        [g.prompt_ids for g in gens],
        [np.zeros(len(g.prompt_ids), np.uint8) for g in gens],
    )
    steps = len(calls) - 1
    if steps == 0:
        return prefill
    n_layers, _, k = calls[1].expert_ids.shape
    dec_ids = torch.cat([c.expert_ids for c in calls[1:]], dim=1).view(n_layers, steps, b, k)
    dec_w = torch.cat([c.weights for c in calls[1:]], dim=1).view(n_layers, steps, b, k)
    out = []
    for i, (g, p) in enumerate(zip(gens, prefill)):
        n = min(len(g.new_ids), steps)
        out.append(
            SampleRouting(
                np.concatenate([p.expert_ids, dec_ids[:, :n, i].numpy()], axis=1),
                np.concatenate([p.weights, dec_w[:, :n, i].numpy()], axis=1),
                np.asarray(list(g.prompt_ids) + list(g.new_ids[:n]), dtype=np.int32),
                np.concatenate([p.spans, np.full(n, SPAN_GENERATED, np.uint8)]),
            )
        )
    return out


def route_batch(
    model: nn.Module,
    tokenizer: Any,
    messages_list: Sequence[Messages],
    scope: str = "prompt",
    max_new_tokens: int = MAX_NEW_TOKENS,
    responses: Sequence[str] | None = None,
    adapter: MoEAdapter | None = None,
) -> list[RoutedSample]:
    """Routing of one analysis batch (padded together, as the analysis batch is) in the given scope.

    ``prompt``: a prompt forward, plus the greedy answer (span 1) when ``max_new_tokens > 0``;
    ``generated``: routing captured during greedy generation; ``response``: teacher-forced
    ``responses`` (one per conversation, ``max_new_tokens`` unused). See the module docstring for
    exactly which tokens get routing.
    """
    code = span_code(scope)
    if code == SPAN_RESPONSE:
        if responses is None or len(responses) != len(messages_list):
            got = "none" if responses is None else len(responses)
            raise RoutingError(
                f"scope 'response' needs one response text per conversation ({len(messages_list)}), got {got}"
            )
    elif responses is not None:
        raise RoutingError(f"responses are only used with scope='response' (scope is {scope!r})")
    if max_new_tokens < 0 or (code == SPAN_GENERATED and max_new_tokens < 1):
        raise RoutingError(
            f"max_new_tokens={max_new_tokens}: use >= 1 for scope 'generated' (>= 0 otherwise)"
        )
    if not messages_list:
        return []
    adapter = adapter or MoEAdapter.for_model(model)

    if code == SPAN_RESPONSE or max_new_tokens == 0:
        enc = encode_prompts(tokenizer, messages_list, "cpu")
        prompts = [row[m].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"].bool())]
        if code == SPAN_RESPONSE:
            new = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]  # type: ignore[union-attr]
            gens = [Generation(p, n, r, {"teacher_forced": True}) for p, n, r in zip(prompts, new, responses)]  # type: ignore
        else:
            new = [[] for _ in prompts]
            gens = [Generation(p, [], "") for p in prompts]
        # Re-padding the exact ids on the left reproduces encode_prompts' batch (same ids, mask, positions).
        routings = route_sequences(model, prompts, new, tokenizer.pad_token_id, adapter)
    else:
        with capture_routing(model, adapter) as rec:
            gens = generate_batch(model, tokenizer, messages_list, max_new_tokens)
        routings = _split_generation(rec.calls, gens)
    return [RoutedSample(g, r) for g, r in zip(gens, routings)]


def routing_to_seed_arrays(
    samples: Sequence[SampleRouting | RoutedSample], scope: str | int
) -> list[np.ndarray]:
    """Per sample, the top-k expert ids of one span as int64 ``[layers, T_scope, k]``.

    This is the "top-k id" form the risk module accepts; int64 so that arithmetic on ids
    (e.g. ``layer * E + id``) cannot overflow a uint8.
    """
    return [_routing(s).select(scope).expert_ids.astype(np.int64) for s in samples]


def _routing(s: SampleRouting | RoutedSample) -> SampleRouting:
    return s.routing if isinstance(s, RoutedSample) else s


# -- storage ----------------------------------------------------------------------------------


@dataclass
class BatchRouting(Sequence[SampleRouting]):
    """What one routing file holds; indexable like the list of its samples (``br[in_batch_idx]``)."""

    samples: list[SampleRouting]  # in the batch's order (in_batch_idx)
    moe_layers: list[int]  # decoder-layer index of each row of expert_ids
    meta: dict[str, Any]  # what the writer passed as ``meta``

    def __getitem__(self, i):  # type: ignore[override]
        return self.samples[i]

    def __len__(self) -> int:
        return len(self.samples)


def save_batch_routing(
    path: str | Path,
    samples: Sequence[SampleRouting | RoutedSample],
    moe_layers: Sequence[int],
    meta: dict[str, Any] | None = None,
    keep_weights: bool = True,
) -> Path:
    """Write one analysis batch's routing as a single safetensors file, atomically.

    Tokens of all samples are concatenated (``offsets[i]:offsets[i+1]`` is sample i); ``meta``
    (JSON-serialisable) goes in the header. ``keep_weights=False`` drops the float16 weights
    (risk differences only need ids), a third of the size.
    """
    from safetensors.numpy import save_file

    recs = [_routing(s) for s in samples]
    if not recs:
        raise RoutingError("no samples to save: a routing file holds at least one sample")
    layers, k, dtype = recs[0].num_layers, recs[0].top_k, recs[0].expert_ids.dtype
    if layers != len(moe_layers):
        raise RoutingError(f"samples have {layers} MoE layers but moe_layers lists {len(moe_layers)}")
    for i, r in enumerate(recs):
        if (r.num_layers, r.top_k, r.expert_ids.dtype) != (layers, k, dtype):
            raise RoutingError(
                f"sample {i} has shape/dtype {r.expert_ids.shape}/{r.expert_ids.dtype}, unlike sample 0"
            )
        if keep_weights and r.weights is None:
            raise RoutingError(f"sample {i} has no weights: save with keep_weights=False")
    try:
        meta_json = json.dumps(meta or {}, default=_json_default)
    except TypeError as e:
        raise RoutingError(f"routing metadata must be JSON-serialisable: {e}") from None
    tensors = {
        "expert_ids": np.ascontiguousarray(np.concatenate([r.expert_ids for r in recs], axis=1)),
        "token_ids": np.concatenate([r.token_ids for r in recs]).astype(np.int32),
        "spans": np.concatenate([r.spans for r in recs]).astype(np.uint8),
        "offsets": np.concatenate([[0], np.cumsum([r.num_tokens for r in recs])]).astype(np.int64),
    }
    if keep_weights:
        weights = np.concatenate([r.weights for r in recs], axis=1)  # type: ignore[misc]
        tensors["weights"] = np.ascontiguousarray(weights.astype(np.float16))
    header = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "moe_layers": json.dumps([int(x) for x in moe_layers]),
        "meta": meta_json,
    }
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=header))


def load_batch_routing(path: str | Path) -> BatchRouting:
    """Read a file written by ``save_batch_routing`` (safetensors: no code runs on load)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise RoutingFileError(f"no routing file at {path}")
    try:
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
            if header.get("format") != FILE_FORMAT:
                raise RoutingFileError(
                    f"{path} is a safetensors file but not a routing file (format {header.get('format')!r})"
                )
            if header.get("version") != FILE_VERSION:
                raise RoutingFileError(
                    f"{path} has routing format version {header.get('version')!r}; this code reads {FILE_VERSION}"
                )
            arr = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise RoutingFileError(
            f"{path} is not a readable safetensors file ({e}); re-run the analysis batch"
        ) from None
    try:
        off = arr["offsets"]
        ids, tokens, spans, w = arr["expert_ids"], arr["token_ids"], arr["spans"], arr.get("weights")
        moe_layers, meta = json.loads(header["moe_layers"]), json.loads(header["meta"])
        samples = [
            SampleRouting(ids[:, a:b], None if w is None else w[:, a:b], tokens[a:b], spans[a:b])
            for a, b in zip(off[:-1].tolist(), off[1:].tolist())
        ]
    except (KeyError, ValueError) as e:
        raise RoutingFileError(
            f"{path} is a damaged routing file ({type(e).__name__}: {e}); re-run the analysis batch"
        ) from None
    return BatchRouting(samples, moe_layers, meta)
