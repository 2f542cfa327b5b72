"""Inference-time expert steering (SteerMoE): force experts off or on at the router, no weights changed.

    from moe_core.analysis.steering import steer_experts
    with steer_experts(model, deactivate=mask) as plan:        # ExpertMask, [(layer, expert)], {layer: [e]}
        out = generate(model, tok, prompts)                     # routed as if those experts were the worst
    # hooks removed here, also when the block raised: the model is exactly as before

    with steer_experts(model, activate=[(3, 7)], deactivate=[(3, 1), (5, 0)]):
        ...

How: a ``"steer"`` router hook (``MoEAdapter.router_hooks``) on each steered layer takes the
router's output ``(router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])`` and
recomputes the weights and indices with that family's own routing rule (``ROUTING_RULES``, keyed
by ``MoEFamily.router_kind``), after moving, per token, every deactivated expert just below the
lowest-scoring expert and every forced expert just above the highest (by ``margin``), as
SteerMoE does on log-probabilities. So a deactivated expert is never chosen, a forced one always
is, and a forced expert's weight stays close to the natural top weight instead of taking all of
it. Where the family picks experts on a score other than its logits (DeepSeek-V3: sigmoid + bias,
group-limited) the push happens on that choice score and the groups of forced experts are always
selected; its weights stay the family's (sigmoid affinity, normalised, scaled). The returned
``router_logits`` are left as the model computed them.

Steer hooks run before every ``"observe"`` hook (the order is fixed in ``models.ROUTER_HOOK_STAGES``):
routing capture (``capture_routing``) and the router-consistency loss see the steered choice
whichever ``with`` block is outermost.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from moe_core.analysis.masks import ExpertMask
from moe_core.errors import MoELabError
from moe_core.model.adapter import MoEAdapter

log = logging.getLogger(__name__)

ExpertSpec = Union[ExpertMask, Iterable[tuple[int, int]], Mapping[int, Iterable[int]], None]
_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models with steering hooks on right now


class SteeringError(MoELabError, ValueError):
    """A steering request the router cannot honour; the message says what to change."""


@dataclass(frozen=True)
class LayerSteering:
    """What to do to one MoE layer's router."""

    layer: int  # decoder-layer index
    forced: tuple[int, ...]  # experts every token must use (at most top_k)
    deactivated: tuple[int, ...]  # experts no token may use


@dataclass
class SteeringPlan:
    """A validated steering request for one model; ``layers`` holds only layers that change."""

    num_layers: int  # decoder layers of the model (ExpertMask rows)
    num_experts: int  # experts per MoE layer
    top_k: int  # experts each token uses
    router_kind: str  # MoEFamily.router_kind: which routing rule recomputes the choice
    margin: float  # how far past the extreme score steered experts are placed
    layers: dict[int, LayerSteering] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """A small JSON-able summary (for run manifests and the app)."""
        return {
            "router_kind": self.router_kind,
            "margin": self.margin,
            "forced": {str(l): list(s.forced) for l, s in self.layers.items() if s.forced},
            "deactivated": {str(l): list(s.deactivated) for l, s in self.layers.items() if s.deactivated},
        }


# ---------------------------------------------------------------------------------------
# Routing rules, one per MoEFamily.router_kind. Each mirrors its family's router forward in
# transformers 5 and returns (top_k_weights, top_k_index); with nothing steered it reproduces the
# router's own output exactly (tested against every tiny family).
# ---------------------------------------------------------------------------------------
RoutingRule = Callable[
    [nn.Module, torch.Tensor, int, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
]


def _push(scores: torch.Tensor, forced: torch.Tensor, deact: torch.Tensor, margin: float) -> torch.Tensor:
    """Per token: deactivated experts to (min - margin), forced ones to (max + margin).

    ``scores`` [T, E] float32; ``forced``/``deact`` bool [E]. Extremes are taken over all experts
    before editing, so every deactivated expert ends strictly below every other one and every
    forced expert strictly above.
    """
    lo = scores.min(dim=-1, keepdim=True).values - margin
    hi = scores.max(dim=-1, keepdim=True).values + margin
    out = torch.where(deact, lo, scores)
    return torch.where(forced, hi, out)


def _force_groups(group_scores: torch.Tensor, forced: torch.Tensor, num_group: int) -> torch.Tensor:
    """Groups holding a forced expert always win the group-limited pre-selection."""
    forced_groups = forced.view(num_group, -1).any(dim=-1)
    return group_scores.masked_fill(forced_groups, float("inf"))


def _softmax_topk(router, logits, top_k, forced, deact, margin):
    """OLMoE, Qwen2/3-MoE, Mixtral: softmax over all experts, top-k, optional renormalisation."""
    probs = torch.softmax(_push(logits.float(), forced, deact, margin), dim=-1)
    weights, index = torch.topk(probs, top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):  # Mixtral has no flag: it always renormalises
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, index


def _topk_softmax(router, logits, top_k, forced, deact, margin):
    """gpt-oss: top-k on the logits, softmax over the k chosen logits only."""
    pushed = _push(logits.float(), forced, deact, margin)
    _, index = torch.topk(pushed, top_k, dim=-1)
    top = pushed.gather(1, index).to(logits.dtype)
    return torch.softmax(top, dim=1, dtype=top.dtype), index


def _sigmoid_bias_group_topk(router, logits, top_k, forced, deact, margin):
    """DeepSeek-V3: sigmoid scores; choose on score + correction bias within the top groups."""
    scores = logits.float().sigmoid()
    choice = _push(scores + router.e_score_correction_bias, forced, deact, margin)
    n_group, n_experts = router.num_group, scores.shape[-1]
    group_scores = choice.view(-1, n_group, n_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_scores = _force_groups(group_scores, forced, n_group)
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, n_experts // n_group).reshape(-1, n_experts)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    index = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, index)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, index


def _softmax_group_topk(router, logits, top_k, forced, deact, margin):
    """DeepSeek-V2: softmax scores, greedy or group-limited greedy (groups ranked by their best expert)."""
    scores = torch.softmax(_push(logits.float(), forced, deact, margin), dim=-1, dtype=torch.float32)
    if router.topk_method == "group_limited_greedy":
        n_group, n_experts = router.num_group, scores.shape[-1]
        group_scores = _force_groups(
            scores.view(-1, n_group, n_experts // n_group).max(dim=-1).values, forced, n_group
        )
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, n_experts // n_group).reshape(-1, n_experts)
        scores = scores.masked_fill(~score_mask.bool(), 0.0)
    weights, index = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    return weights * router.routed_scaling_factor, index


ROUTING_RULES: dict[str, RoutingRule] = {
    "softmax-topk": _softmax_topk,
    "topk-softmax": _topk_softmax,
    "sigmoid-bias-group-topk": _sigmoid_bias_group_topk,
    "softmax-group-topk": _softmax_group_topk,
}
_GROUPED = {"sigmoid-bias-group-topk", "softmax-group-topk"}


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------
def _pairs(spec: ExpertSpec, what: str, adapter: MoEAdapter) -> set[tuple[int, int]]:
    if spec is None:
        return set()
    if isinstance(spec, ExpertMask):
        if spec.shape != (adapter.num_layers, adapter.num_experts):
            raise SteeringError(
                f"the {what} mask is {spec.shape[0]} layers x {spec.shape[1]} experts but the model has "
                f"{adapter.num_layers} x {adapter.num_experts}: it was made for another model"
            )
        return set(spec.experts())
    if isinstance(spec, Mapping):
        spec = [(int(l), int(e)) for l, es in spec.items() for e in es]
    try:
        pairs = {(int(l), int(e)) for l, e in spec}
    except (TypeError, ValueError):
        raise SteeringError(
            f"{what} must be an ExpertMask, (layer, expert) pairs or {{layer: [experts]}}"
        ) from None
    for l, e in sorted(pairs):
        if l not in adapter.moe_layers:
            raise SteeringError(
                f"{what}: layer {l} is not an MoE layer of this model (MoE layers: {adapter.moe_layers})"
            )
        if not 0 <= e < adapter.num_experts:
            raise SteeringError(
                f"{what}: expert {e} of layer {l} does not exist (experts 0..{adapter.num_experts - 1})"
            )
    return pairs


def plan_steering(
    model_or_adapter: nn.Module | MoEAdapter,
    deactivate: ExpertSpec = None,
    activate: ExpertSpec = None,
    margin: float = 0.01,
) -> SteeringPlan:
    """Validate a steering request against a model; SteeringError says what cannot be honoured."""
    ad = (
        model_or_adapter
        if isinstance(model_or_adapter, MoEAdapter)
        else MoEAdapter.for_model(model_or_adapter)
    )
    kind = ad.family.router_kind
    if kind not in ROUTING_RULES:
        raise SteeringError(
            f"steering {ad.model_type} routers ({kind!r}) is not supported; supported routing rules: {sorted(ROUTING_RULES)}"
        )
    if not margin > 0:
        raise SteeringError(
            f"margin must be > 0 (got {margin}): steered experts must end strictly past the others"
        )
    off, on = _pairs(deactivate, "deactivate", ad), _pairs(activate, "activate", ad)
    both = sorted(off & on)
    if both:
        raise SteeringError(f"experts both forced and deactivated (layer, expert): {both}; pick one for each")
    plan = SteeringPlan(ad.num_layers, ad.num_experts, ad.top_k, kind, margin)
    for layer in sorted({l for l, _ in off | on}):
        forced = tuple(sorted(e for l, e in on if l == layer))
        deact = tuple(sorted(e for l, e in off if l == layer))
        if len(forced) > ad.top_k:
            raise SteeringError(
                f"layer {layer}: {len(forced)} experts forced but each token uses only top_k={ad.top_k}; force at most {ad.top_k}"
            )
        if ad.num_experts - len(deact) < ad.top_k:
            raise SteeringError(
                f"layer {layer}: {len(deact)} of {ad.num_experts} experts deactivated leaves fewer than top_k={ad.top_k} to route to"
            )
        if kind in _GROUPED:
            _check_groups(ad, layer, forced, deact)
        plan.layers[layer] = LayerSteering(layer, forced, deact)
    return plan


def _check_groups(ad: MoEAdapter, layer: int, forced: tuple[int, ...], deact: tuple[int, ...]) -> None:
    """Group-limited routers choose within ``topk_group`` groups: both requests must fit in them."""
    router = ad.router(layer)
    n_group, topk_group = int(router.num_group), int(router.topk_group)
    if ad.family.router_kind == "softmax-group-topk" and router.topk_method != "group_limited_greedy":
        return
    size = ad.num_experts // n_group
    forced_groups = sorted({e // size for e in forced})
    if len(forced_groups) > topk_group:
        raise SteeringError(
            f"layer {layer}: forced experts {list(forced)} lie in groups {forced_groups}, but this router picks experts "
            f"from only topk_group={topk_group} of its {n_group} groups (each {size} experts): force experts of at most "
            f"{topk_group} group(s)"
        )
    usable = np.full(n_group, size) - np.bincount([e // size for e in deact], minlength=n_group)
    if np.sort(usable)[:topk_group].sum() < ad.top_k:
        raise SteeringError(
            f"layer {layer}: after deactivating {list(deact)}, some choice of topk_group={topk_group} groups holds fewer "
            f"than top_k={ad.top_k} usable experts (usable per group: {usable.tolist()}); deactivate fewer experts per group"
        )


# ---------------------------------------------------------------------------------------
# The context manager
# ---------------------------------------------------------------------------------------
def _make_hook(rule: RoutingRule, plan: SteeringPlan):
    """The ``"steer"`` router-hook function: recompute (weights, index) of a steered layer."""
    masks: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def on(steer: LayerSteering, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (steer.layer, device)
        if key not in masks:
            f = torch.zeros(plan.num_experts, dtype=torch.bool)
            d = torch.zeros(plan.num_experts, dtype=torch.bool)
            f[list(steer.forced)] = True
            d[list(steer.deactivated)] = True
            masks[key] = (f.to(device), d.to(device))
        return masks[key]

    def steer_hook(
        layer: int, module: nn.Module, args: Any, output: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not (isinstance(output, tuple) and len(output) == 3):
            raise SteeringError(
                f"router of layer {layer} returned {type(output).__name__}, not (logits, weights, indices): "
                "steering needs transformers >= 5 MoE routers"
            )
        logits, weights, index = output
        forced, deact = on(plan.layers[layer], logits.device)
        new_w, new_i = rule(module, logits, plan.top_k, forced, deact, plan.margin)
        return logits, new_w.to(weights.dtype), new_i.to(index.dtype)

    return steer_hook


@contextmanager
def steer_experts(
    model: nn.Module,
    deactivate: ExpertSpec = None,
    activate: ExpertSpec = None,
    margin: float = 0.01,
) -> Iterator[SteeringPlan]:
    """Route every forward inside the block with ``deactivate``d experts off and ``activate``d ones on.

    ``deactivate``/``activate``: an ExpertMask [num_layers, num_experts], (layer, expert) pairs or
    ``{layer: [experts]}``, decoder-layer indices. ``margin``: how far past the lowest/highest
    score steered experts are placed (SteerMoE uses 0.01 on log-probabilities). Raises
    SteeringError before touching the model when the request cannot be honoured, or when
    another ``steer_experts`` block is already active on the same model (combine the masks).
    """
    adapter = MoEAdapter.for_model(model)
    plan = plan_steering(adapter, deactivate, activate, margin)
    if model in _ACTIVE:
        raise SteeringError(
            "steering is already active on this model: combine the masks into one steer_experts block"
        )
    rule = ROUTING_RULES[plan.router_kind]
    _ACTIVE.add(model)
    try:
        with adapter.router_hooks(_make_hook(rule, plan), stage="steer", layers=list(plan.layers)):
            log.info("steering %d layer(s): %s", len(plan.layers), plan.describe())
            yield plan
    finally:
        _ACTIVE.discard(model)
