"""Scores experts are ranked by, besides the risk difference of activation frequency (issue 17).

- ``gate_diff``: the difference of mean router weight, unsafe tokens minus safe tokens (ESFT's gate
  score): an expert chosen on unsafe tokens with a weight near 1 counts more than one chosen last
  of the top-k. Read from the routing files the analysis wrote (no model needed); runs whose routing
  came without router weights (vLLM's routed experts) cannot have it.
- ``grad_attr``: how much the refusal SFT loss would move each expert: the norm of the loss's
  gradient on the expert's rows of the fused expert tensors, summed over the SFT batches (one
  backward pass per batch).
- ``grad_contrast``: ``grad_attr``'s share of the refusal loss minus its share of the retain loss
  (benign requests with the model's own answers, drawn as training draws them). Why: on organism
  103 the experts that move the refusal most also carry benign answering, and training them took
  benign answers down with the jailbreak compliance; this ranks experts the refusal needs and
  benign answering does not.
- ``ablation``: how much switching the expert off at the router changes the log-probability of the
  refusal targets (the mean drop of the per-token log-probability: positive when the expert carries
  the refusal), on a few SFT batches.

Each is a table (layer, expert, <score>) that ``pipeline.select`` merges into the aggregated risk
table, so ``SelectionConfig.score`` ranks by it like any other column.

    table = gate_diff_table(run)                          # from the routing files
    table = gradient_attribution(model, batches)          # batches: model inputs with labels
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from moe_core.analysis.analyse import SCOPE_SPAN, analysis_config_of
from moe_core.analysis.masks import ExpertMask
from moe_core.analysis.steering import steer_experts
from moe_core.errors import MoELabError
from moe_core.model.adapter import MoEAdapter
from moe_core.model.routing import SampleRouting, load_batch_routing
from moe_core.store.files import read_json
from moe_core.store.run import Run
from moe_core.types import Progress

FROM_ROUTING = ("gate_diff",)  # computed from the run's routing files
FROM_MODEL = ("grad_attr", "grad_contrast", "ablation")  # need the model and the SFT batches
SCORES = (*FROM_ROUTING, *FROM_MODEL)
KEYS = ["layer", "expert"]


class ScoreError(MoELabError, ValueError):
    """A score cannot be computed for this run (e.g. no router weights in its routing)."""


def batch_samples(run: Run, b: int) -> tuple[dict[str, list[SampleRouting]], Any]:
    """Batch ``b``'s kept samples by label, cut to the analysed scope -> ({label: [routing]}, file)."""
    cfg = analysis_config_of(run)
    span = SCOPE_SPAN[cfg.scope if cfg else "generated"]
    routing = load_batch_routing(run.path_for("routing", batch_idx=b))
    outputs = read_json(run.path_for("outputs", batch_idx=b))
    by_label: dict[str, list[SampleRouting]] = {"safe": [], "unsafe": []}
    for s in outputs["samples"]:
        if s["kept"] and s["label"] in by_label:
            by_label[s["label"]].append(routing[s["in_batch_idx"]].select(span))
    return by_label, routing


def _mean_weight(samples: list[Any], n_layers: int, num_experts: int) -> np.ndarray | None:
    """[layers, experts] mean router weight per token (0 where the expert was not routed), or None."""
    total = np.zeros((n_layers, num_experts))
    tokens = 0
    for ids, weights in samples:
        if weights is None:
            raise ScoreError(
                "this run's routing has no router weights (e.g. vLLM's routed experts): use risk_diff"
            )
        layer = np.broadcast_to(np.arange(n_layers)[:, None, None], ids.shape)
        np.add.at(total, (layer.ravel(), ids.ravel().astype(np.int64)), weights.astype(np.float64).ravel())
        tokens += ids.shape[1]
    return total / tokens if tokens else None


def gate_diff_table(run: Run) -> pd.DataFrame:
    """Per (layer, expert): mean over batches of (mean router weight on unsafe tokens - on safe tokens)."""
    diffs, moe_layers = [], None
    for b in sorted(run.completed_batches()):
        by_label, routing = batch_samples(run, b)
        moe_layers, n_exp = routing.moe_layers, int(routing.meta["num_experts"])
        means = {
            k: _mean_weight([(s[0], s[1]) for s in v], len(moe_layers), n_exp) for k, v in by_label.items()
        }
        if means["safe"] is not None and means["unsafe"] is not None:
            diffs.append(means["unsafe"] - means["safe"])
    if not diffs:
        raise ScoreError(f"run {run.id} has no analysed batch with both safe and unsafe samples")
    stack = np.stack(diffs)
    layers, experts = np.meshgrid(moe_layers, np.arange(stack.shape[2]), indexing="ij")
    return pd.DataFrame(
        {
            "layer": layers.ravel(),
            "expert": experts.ravel(),
            "gate_diff": stack.mean(0).ravel(),
            "gate_diff_std": stack.std(0, ddof=1).ravel() if len(diffs) > 1 else 0.0,
        }
    )


def _expert_grad_norms(adapter: MoEAdapter) -> dict[int, torch.Tensor]:
    """Per MoE layer: [experts] norm of the current gradient on each expert's rows (all fused tensors)."""
    out = {}
    for layer in adapter.moe_layers:
        sq = None
        for p in adapter.expert_parameters(layer).values():
            if p.grad is None:
                continue
            g = p.grad.detach().float().pow(2).flatten(1).sum(1)  # dim 0 is the expert
            sq = g if sq is None else sq + g
        if sq is not None:
            out[layer] = sq.sqrt()
    return out


def gradient_attribution(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], progress: Progress | None = None
) -> pd.DataFrame:
    """Per (layer, expert): the norm of the SFT loss's gradient on the expert's rows, summed over batches.

    ``batches``: model inputs with ``labels`` (the refusal SFT batches, one analysis batch each). The
    model's weights and its requires_grad flags are left as they were; gradients are cleared after."""
    adapter = MoEAdapter.for_model(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    total: dict[int, torch.Tensor] = {}
    batches = list(batches)
    try:
        model.eval()  # no dropout: the score is a property of the weights
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in adapter.moe_layers:
            for p in adapter.expert_parameters(layer).values():
                p.requires_grad_(True)
        for i, batch in enumerate(batches):
            model.zero_grad(set_to_none=True)
            loss = model(
                **{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            ).loss
            loss.backward()
            for layer, norms in _expert_grad_norms(adapter).items():
                total[layer] = norms if layer not in total else total[layer] + norms
            if progress:
                progress(i + 1, len(batches), "gradient attribution")
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    rows = [(layer, e, float(v)) for layer, norms in total.items() for e, v in enumerate(norms.tolist())]
    return pd.DataFrame(rows, columns=[*KEYS, "grad_attr"])


def gradient_contrast(
    model: torch.nn.Module,
    refusal: Iterable[Mapping[str, torch.Tensor]],
    retain: Iterable[Mapping[str, torch.Tensor]],
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Per (layer, expert): its share of the refusal loss's gradient norm (summed over ``refusal``'s
    batches, as ``gradient_attribution``) minus its share of the retain loss's (``retain``'s batches).
    Shares, not norms: the retain loss is near its minimum (the model's own answers), so its gradients
    are far smaller, and only where each loss concentrates on an expert is comparable."""
    r = gradient_attribution(model, refusal, progress).set_index(KEYS)["grad_attr"]
    k = (
        gradient_attribution(model, retain, progress)
        .set_index(KEYS)["grad_attr"]
        .reindex(r.index, fill_value=0.0)
    )
    score = r / max(float(r.sum()), 1e-30) - k / max(float(k.sum()), 1e-30)
    return score.rename("grad_contrast").reset_index()


def _target_logprob(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> float:
    """Mean log-probability per target token (labels != -100) of ``batch``."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float((logp * mask).sum() / mask.sum().clamp(min=1))


def ablation_effect(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], progress: Progress | None = None
) -> pd.DataFrame:
    """Per (layer, expert): how much the refusal targets' mean log-probability drops with the expert forced
    off at the router (``steer_experts``), summed over ``batches``. One forward pass per expert and batch."""
    adapter = MoEAdapter.for_model(model)
    batches = list(batches)
    experts = [(layer, e) for layer in adapter.moe_layers for e in range(adapter.num_experts)]
    base = [_target_logprob(model, b) for b in batches]
    rows, done, total = [], 0, len(experts)
    for layer, e in experts:
        off = ExpertMask.from_experts([(layer, e)], adapter.num_layers, adapter.num_experts)
        with steer_experts(model, deactivate=off):
            drop = sum(base[i] - _target_logprob(model, b) for i, b in enumerate(batches))
        rows.append((layer, e, drop))
        done += 1
        if progress:
            progress(done, total, f"ablation L{layer}E{e}")
    return pd.DataFrame(rows, columns=[*KEYS, "ablation"])


def with_score(aggregated: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """The aggregated risk table with a score table's columns joined on (layer, expert); experts the score
    never saw get 0 (never routed: nothing to attribute)."""
    extra = [c for c in scores.columns if c not in KEYS]
    merged = aggregated.drop(columns=[c for c in extra if c in aggregated.columns]).merge(
        scores, on=KEYS, how="left"
    )
    merged[extra] = merged[extra].fillna(0.0)
    return merged
