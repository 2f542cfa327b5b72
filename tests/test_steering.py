"""Inference-time expert steering on tiny random models of every family.

What must hold: with nothing steered each family's routing rule reproduces its router exactly; a
deactivated expert is never chosen and a forced one always is (seen through capture_routing, in
either nesting order); logits and greedy generation change; after the block everything is
bit-identical to before, also when the block raised; impossible requests fail before any hook.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_core.analysis.masks import ExpertMask
from moe_core.analysis.steering import (
    ROUTING_RULES,
    SteeringError,
    plan_steering,
    steer_experts,
)
from moe_core.model.adapter import MoEAdapter, MoEFamily
from moe_core.model.routing import capture_routing
from tests.tiny import COMMON, FAMILIES, tiny_model


def tiny_deepseek_v2():
    """DeepSeek-V2 with group-limited greedy routing (not in tests/tiny.py; its attention needs kv heads = heads)."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "deepseek_v2",
        **{
            **COMMON,
            "num_key_value_heads": 4,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "n_group": 4,
            "topk_group": 2,
            "topk_method": "group_limited_greedy",
            "kv_lora_rank": 16,
            "q_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "n_shared_experts": 1,
            "num_hidden_layers": 3,
            "initializer_range": 0.1,
        },
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


ALL = FAMILIES + ["deepseek_v2"]


def _model(family: str):
    # initializer_range 0.1 (instead of 0.02) makes the experts' contribution large enough that a
    # routing change shows in the greedy tokens of a random model.
    return tiny_deepseek_v2() if family == "deepseek_v2" else tiny_model(family, initializer_range=0.1)


@pytest.fixture(scope="module", params=ALL)
def fam(request):
    model = _model(request.param)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (3, 12), generator=g)
    return request.param, model, MoEAdapter.for_model(model), ids


def _route(model, ids):
    """(logits, expert_ids [n_moe_layers, T, k]) of one forward."""
    with torch.no_grad(), capture_routing(model) as rec:
        logits = model(ids).logits
    assert len(rec.calls) == 1
    return logits, rec.calls[0].expert_ids.long()


def _usage(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[n_moe_layers, E] how many tokens chose each expert."""
    return torch.stack([torch.bincount(row.flatten(), minlength=num_experts) for row in expert_ids])


def _gen(model, ids, n: int = 8) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            min_new_tokens=n,
            pad_token_id=0,
        )


def test_rule_reproduces_the_router_exactly(fam) -> None:
    _, model, ad, ids = fam
    rule = ROUTING_RULES[ad.family.router_kind]
    none = torch.zeros(ad.num_experts, dtype=torch.bool)
    checked = []

    def hook(module, args, out):
        w, i = rule(module, out[0], ad.top_k, none, none, 0.01)
        checked.append(torch.equal(w.to(out[1].dtype), out[1]) and torch.equal(i.to(out[2].dtype), out[2]))

    hs = [ad.router(l).register_forward_hook(hook) for l in ad.moe_layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hs:
            h.remove()
    assert checked == [True] * len(ad.moe_layers)


def test_deactivated_never_chosen_and_everything_restored(fam) -> None:
    family, model, ad, ids = fam
    base_logits, base_ids = _route(model, ids)
    base_gen = _gen(model, ids)
    usage = _usage(base_ids, ad.num_experts)
    # deactivate each layer's two busiest experts (they really were used)
    off = [
        (layer, int(e)) for row, layer in zip(usage, ad.moe_layers) for e in row.argsort(descending=True)[:2]
    ]
    assert all(usage[ad.moe_layers.index(l), e] > 0 for l, e in off)
    with steer_experts(model, deactivate=off) as plan:
        assert set(plan.layers) == set(ad.moe_layers)
        logits, steered_ids = _route(model, ids)
        gen = _gen(model, ids)
    for pos, layer in enumerate(ad.moe_layers):
        chosen = set(steered_ids[pos].flatten().tolist())
        assert not chosen & {e for l, e in off if l == layer}, (family, layer, chosen)
    assert (logits - base_logits).abs().max() > 1e-4
    assert not torch.equal(gen, base_gen), family  # greedy continuation changed
    # back to identical after the block
    after_logits, after_ids = _route(model, ids)
    assert torch.equal(after_logits, base_logits) and torch.equal(after_ids, base_ids)
    assert torch.equal(_gen(model, ids), base_gen)
    assert all(not ad.router(l)._forward_hooks for l in ad.moe_layers)


def test_forced_always_chosen_capture_outside_or_inside(fam) -> None:
    family, model, ad, ids = fam
    base_logits, base_ids = _route(model, ids)
    usage = _usage(base_ids, ad.num_experts)
    on = {layer: [int(row.argmin())] for row, layer in zip(usage, ad.moe_layers)}  # least-used expert
    # capture opened outside the steering block: it still sees the steered choice (steer hooks run before observers)
    with torch.no_grad(), capture_routing(model) as rec:
        with steer_experts(model, activate=on):
            logits = model(ids).logits
    # and opened inside it
    with steer_experts(model, activate=on):
        logits2, inner_ids = _route(model, ids)
    outer_ids = rec.calls[0].expert_ids.long()
    assert torch.equal(outer_ids, inner_ids) and torch.equal(logits, logits2)
    for pos, layer in enumerate(ad.moe_layers):
        has = (outer_ids[pos] == on[layer][0]).any(dim=-1)
        assert bool(has.all()), (family, layer)
    assert (logits - base_logits).abs().max() > 1e-4
    assert torch.equal(_route(model, ids)[0], base_logits)


def test_force_top_k_and_deactivate_together(fam) -> None:
    family, model, ad, ids = fam
    layer = ad.moe_layers[-1]
    if ad.family.router_kind in ("sigmoid-bias-group-topk", "softmax-group-topk"):
        size = ad.num_experts // ad.router(layer).num_group
        forced = list(range(ad.top_k)) if ad.top_k <= size else [0]  # inside one group
    else:
        forced = list(range(ad.num_experts - ad.top_k, ad.num_experts))
    off = [e for e in range(ad.num_experts) if e not in forced][:1]
    with steer_experts(model, activate={layer: forced}, deactivate={layer: off}):
        _, steered = _route(model, ids)
    row = steered[ad.moe_layers.index(layer)]
    for e in forced:
        assert bool((row == e).any(dim=-1).all()), family
    assert not bool((row == off[0]).any())
    if len(forced) == ad.top_k:
        assert {tuple(sorted(r.tolist())) for r in row} == {tuple(forced)}


def test_expert_mask_input_and_plan_summary() -> None:
    model = tiny_model("olmoe")
    ad = MoEAdapter.for_model(model)
    mask = ExpertMask.from_experts([(0, 1), (1, 3)], ad.num_layers, ad.num_experts)
    plan = plan_steering(model, deactivate=mask)
    assert plan.describe()["deactivated"] == {"0": [1], "1": [3]} and plan.describe()["forced"] == {}
    ids = torch.randint(3, 256, (2, 9))
    with steer_experts(model, deactivate=mask):
        _, steered = _route(model, ids)
    assert not bool((steered[0] == 1).any()) and not bool((steered[1] == 3).any())


def test_hooks_removed_when_the_block_raises() -> None:
    model = tiny_model("qwen3_moe")
    ad = MoEAdapter.for_model(model)
    with pytest.raises(RuntimeError, match="boom"):
        with steer_experts(model, deactivate=[(0, 0)]):
            assert ad.router(0)._forward_hooks
            raise RuntimeError("boom")
    assert not ad.router(0)._forward_hooks
    with steer_experts(model, deactivate=[(0, 0)]):  # usable again: not left marked as active
        pass


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(activate=[(0, 0), (0, 1), (0, 2)]), "3 experts forced but each token uses only top_k=2"),
        (dict(activate=[(1, 4)], deactivate=[(1, 4)]), r"both forced and deactivated .*\(1, 4\)"),
        (dict(deactivate=[(0, e) for e in range(7)]), "fewer than top_k=2"),
        (dict(deactivate=[(5, 0)]), "layer 5 is not an MoE layer"),
        (dict(deactivate=[(0, 8)]), "expert 8 of layer 0 does not exist"),
        (dict(deactivate=ExpertMask.empty(3, 8)), "made for another model"),
        (dict(deactivate=["nonsense"]), "ExpertMask, \\(layer, expert\\) pairs"),
        (dict(deactivate=[(0, 0)], margin=0.0), "margin must be > 0"),
    ],
)
def test_invalid_requests(kwargs, match) -> None:
    model = tiny_model("mixtral")
    with pytest.raises(SteeringError, match=match):
        with steer_experts(model, **kwargs):
            pass
    assert all(not MoEAdapter.for_model(model).router(l)._forward_hooks for l in (0, 1))


def test_group_limited_constraints_and_dense_layers() -> None:
    model = tiny_model("deepseek_v3")  # 8 experts in 2 groups of 4, topk_group=1, top_k=2, layer 0 dense
    with pytest.raises(SteeringError, match="layer 0 is not an MoE layer"):
        plan_steering(model, deactivate=[(0, 1)])
    with pytest.raises(SteeringError, match=r"lie in groups \[0, 1\].*topk_group=1"):
        plan_steering(model, activate=[(1, 0), (1, 5)])
    with pytest.raises(SteeringError, match="usable per group: \\[1, 4\\]"):
        plan_steering(model, deactivate=[(1, 0), (1, 1), (1, 2)])
    plan_steering(model, activate=[(1, 0), (1, 3)], deactivate=[(1, 4), (1, 5)])  # fits: no error


def test_deepseek_v3_forced_expert_in_a_losing_group_is_still_chosen() -> None:
    """The group pre-selection must admit the forced expert's group even when every token prefers another."""
    model = tiny_model("deepseek_v3")
    ad = MoEAdapter.for_model(model)
    layer = ad.moe_layers[0]
    with torch.no_grad():
        ad.router(layer).e_score_correction_bias[4:] += 5.0  # group 1 (experts 4..7) wins every token
    ids = torch.randint(3, 256, (2, 10))
    _, base = _route(model, ids)
    assert bool((base[0] >= 4).all())
    with steer_experts(model, activate=[(layer, 2)]):
        _, steered = _route(model, ids)
    assert bool((steered[0] == 2).any(dim=-1).all())


def test_nested_steering_is_refused_and_unsupported_router_kind() -> None:
    model = tiny_model("gpt_oss")
    with steer_experts(model, deactivate=[(0, 0)]):
        with pytest.raises(SteeringError, match="already active"):
            with steer_experts(model, deactivate=[(1, 0)]):
                pass
    ad = MoEAdapter(model, MoEFamily(router_attr="router", router_kind="sparsemixer"))
    with pytest.raises(SteeringError, match="'sparsemixer'.*not supported"):
        plan_steering(ad, deactivate=[(0, 0)])


def test_bf16_margin_still_separates() -> None:
    """The push happens in float32, so a small margin is not rounded away in a bf16 model."""
    model = tiny_model("olmoe").to(torch.bfloat16)
    ids = torch.randint(3, 256, (2, 10))
    _, base = _route(model, ids)
    busiest = int(_usage(base, 8)[0].argmax())
    with steer_experts(model, deactivate=[(0, busiest)], activate=[(1, 5)], margin=1e-3):
        _, steered = _route(model, ids)
    assert not bool((steered[0] == busiest).any())
    assert bool((steered[1] == 5).any(dim=-1).all())


# -- the one router-hook API (MoEAdapter.router_hooks) --------------------------------------
def test_router_hook_stages_steer_before_observe_whatever_the_nesting() -> None:
    model = tiny_model("olmoe")
    ad = MoEAdapter.for_model(model)
    ids = torch.randint(3, 200, (1, 5))
    seen = []

    def observe(layer, router, args, out):
        seen.append((layer, out[2].clone()))

    def steer(layer, router, args, out):  # every token of layer 1 to experts 0 and 1
        return out[0], out[1], torch.arange(2, dtype=out[2].dtype).expand_as(out[2])

    with ad.router_hooks(observe):  # the observer is added first ...
        with MoEAdapter.for_model(model).router_hooks(
            steer, stage="steer", layers=[1]
        ):  # ... another adapter steers
            assert all(
                len(ad.router(l)._forward_hooks) == 1 for l in ad.moe_layers
            )  # one dispatcher per router
            with torch.no_grad():
                model(ids)
    assert [l for l, _ in seen] == [0, 1]
    assert not bool((seen[0][1] == torch.arange(2)).all()) and bool((seen[1][1] == torch.arange(2)).all())
    assert all(not ad.router(l)._forward_hooks for l in ad.moe_layers)
    with pytest.raises(RuntimeError, match="observe"):
        with ad.router_hooks(lambda layer, router, args, out: out):  # an observer may not change the output
            with torch.no_grad():
                model(ids)
    assert all(not ad.router(l)._forward_hooks for l in ad.moe_layers)
    with pytest.raises(ValueError, match="stage"):
        with ad.router_hooks(observe, stage="late"):
            pass
