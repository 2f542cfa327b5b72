"""Routing capture on tiny random configs of every supported MoE family (CPU, seconds).

The captured experts are checked against the model's own routing (``output_router_logits`` for
softmax routers, the DeepSeek-V3 gate called by hand), batched against one-by-one capture,
generated-scope capture against a teacher-forced forward, and the file format for a bit-exact
round trip.
"""

from __future__ import annotations

import copy
import functools
import json

import numpy as np
import pytest
import torch

from moe_core.model.adapter import MoEAdapter, NotAnMoEModelError
from moe_core.model.generation import encode_prompts
from moe_core.model.routing import (
    SPAN_GENERATED,
    SPAN_PROMPT,
    SPAN_RESPONSE,
    RoutingCall,
    RoutingError,
    RoutingFileError,
    SampleRouting,
    capture_routing,
    gather_to_cpu,
    load_batch_routing,
    route_batch,
    route_sequences,
    routing_to_seed_arrays,
    save_batch_routing,
)
from tests.tiny import FAMILIES, tiny_model, tiny_tokenizer

MESSAGES = [
    [{"role": "user", "content": "How do I bake bread at home? Mix flour and water."}],
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Write a poem about the sea"},
    ],
]
RESPONSES = ["Sure, here is a step by step guide", "I cannot help", "the waves and the wind"]
TIE_EPS = 1e-4  # router-logit gap below which the k-th and (k+1)-th expert count as tied


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@functools.cache
def model_of(family: str):
    return tiny_model(family)


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _sorted(ids: np.ndarray) -> np.ndarray:
    return np.sort(ids.astype(np.int64), axis=-1)


def _reference_topk(model, input_ids, mask, k):
    """Model's own top-k per MoE layer from output_router_logits: ids [L, B, S, k], tie mask [L, B, S]."""
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=_position_ids(mask),
            output_router_logits=True,
        )
    logits = torch.stack([t.float() for t in out.router_logits])  # [L, B*S, E]
    top = logits.topk(k + 1, dim=-1)
    ties = (top.values[..., k - 1] - top.values[..., k]) < TIE_EPS
    b, s = input_ids.shape
    return top.indices[..., :k].reshape(len(logits), b, s, k).numpy(), ties.reshape(len(logits), b, s).numpy()


def _assert_same_sets(
    got: np.ndarray, want: np.ndarray, ties: np.ndarray | None = None, max_tie_frac: float = 0.05
):
    """Per-token set equality of expert ids [L, T, k], except where the reference is a near-tie."""
    assert got.shape == want.shape
    same = (_sorted(got) == _sorted(want)).all(-1)
    if ties is not None:
        assert ties.mean() <= max_tie_frac, "too many near-ties: this comparison would prove little"
        same |= ties
    assert same.all(), f"{(~same).sum()} of {same.size} (layer, token) routings differ"


# -- agreement with the model's own routing -------------------------------------------------------


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "deepseek_v3"])
def test_prompt_capture_equals_models_own_topk(family, tok):
    model = model_of(family)
    ad = MoEAdapter.for_model(model)
    samples = route_batch(model, tok, MESSAGES, scope="prompt", max_new_tokens=0)
    enc = encode_prompts(tok, MESSAGES)
    want, ties = _reference_topk(model, enc["input_ids"], enc["attention_mask"], ad.top_k)
    width = enc["input_ids"].shape[1]
    for b, s in enumerate(samples):
        n = int(enc["attention_mask"][b].sum())
        assert s.routing.num_tokens == n
        assert s.routing.expert_ids.shape == (len(ad.moe_layers), n, ad.top_k)
        assert s.routing.expert_ids.dtype == np.uint8 and s.routing.weights.dtype == np.float16
        _assert_same_sets(s.routing.expert_ids, want[:, b, width - n :], ties[:, b, width - n :])


def test_deepseek_capture_equals_its_biased_group_router(tok):
    """DeepSeek-V3 picks by sigmoid + correction bias within the best groups: compare with its gate."""
    model = model_of("deepseek_v3")
    ad = MoEAdapter.for_model(model)
    assert ad.moe_layers == [1, 2]  # layer 0 is dense (first_k_dense_replace=1)
    samples = route_batch(model, tok, MESSAGES, scope="prompt", max_new_tokens=0)
    enc = encode_prompts(tok, MESSAGES)
    hidden: dict[int, torch.Tensor] = {}
    handles = [
        ad.block(layer).register_forward_pre_hook(
            lambda m, args, layer=layer: hidden.__setitem__(layer, args[0].detach())
        )
        for layer in ad.moe_layers
    ]
    try:
        with torch.no_grad():
            model(**enc, position_ids=_position_ids(enc["attention_mask"]))
    finally:
        for h in handles:
            h.remove()
    b_, width = enc["input_ids"].shape
    with torch.no_grad():
        gate_out = [ad.router(layer)(hidden[layer]) for layer in ad.moe_layers]
    want = torch.stack([g[2] for g in gate_out]).reshape(len(ad.moe_layers), b_, width, ad.top_k).numpy()
    want_w = torch.stack([g[1] for g in gate_out]).reshape(len(ad.moe_layers), b_, width, ad.top_k).numpy()
    naive = torch.stack([g[0] for g in gate_out]).topk(ad.top_k, dim=-1).indices
    naive = naive.reshape(len(ad.moe_layers), b_, width, ad.top_k).numpy()
    naive_differs = False
    for b, s in enumerate(samples):
        n = s.routing.num_tokens
        _assert_same_sets(s.routing.expert_ids, want[:, b, width - n :])
        order_got, order_want = np.argsort(s.routing.expert_ids, -1), np.argsort(want[:, b, width - n :], -1)
        np.testing.assert_allclose(
            np.take_along_axis(s.routing.weights.astype(np.float32), order_got, -1),
            np.take_along_axis(want_w[:, b, width - n :], order_want, -1),
            rtol=2e-3,
            atol=1e-3,
        )
        naive_differs |= bool((_sorted(naive[:, b, width - n :]) != _sorted(s.routing.expert_ids)).any())
    assert naive_differs, "plain top-k of the logits should differ from DeepSeek's biased group routing here"


def test_more_than_256_experts_uses_int16(tok):
    model = tiny_model("olmoe", num_experts=260, intermediate_size=8)
    samples = route_batch(model, tok, MESSAGES[:2], scope="prompt", max_new_tokens=0)
    enc = encode_prompts(tok, MESSAGES[:2])
    want, ties = _reference_topk(model, enc["input_ids"], enc["attention_mask"], 2)
    width = enc["input_ids"].shape[1]
    for b, s in enumerate(samples):
        assert s.routing.expert_ids.dtype == np.int16
        n = s.routing.num_tokens
        _assert_same_sets(s.routing.expert_ids, want[:, b, width - n :], ties[:, b, width - n :])
    assert max(int(s.routing.expert_ids.max()) for s in samples) > 255  # ids above uint8 survive


# -- batching, pads, spans ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_capture_equals_one_by_one(family, tok):
    model = model_of(family)
    batched = route_batch(model, tok, MESSAGES, scope="prompt", max_new_tokens=0)
    for msgs, got in zip(MESSAGES, batched):
        (alone,) = route_batch(model, tok, [msgs], scope="prompt", max_new_tokens=0)
        assert got.generation.prompt_ids == alone.generation.prompt_ids
        np.testing.assert_array_equal(got.routing.token_ids, alone.routing.token_ids)
        np.testing.assert_array_equal(_sorted(got.routing.expert_ids), _sorted(alone.routing.expert_ids))
        o1, o2 = np.argsort(got.routing.expert_ids, -1), np.argsort(alone.routing.expert_ids, -1)
        np.testing.assert_allclose(
            np.take_along_axis(got.routing.weights, o1, -1).astype(np.float32),
            np.take_along_axis(alone.routing.weights, o2, -1).astype(np.float32),
            rtol=1e-2,
            atol=1e-3,
        )


def test_pads_never_counted_and_spans_for_every_scope(tok):
    model = model_of("olmoe")
    enc = encode_prompts(tok, MESSAGES)
    real = enc["attention_mask"].sum(1).tolist()
    assert len(set(real)) == len(real), "prompts must differ in length so that the batch is padded"
    assert min(real) < enc["input_ids"].shape[1]

    prompt_only = route_batch(model, tok, MESSAGES, scope="prompt", max_new_tokens=0)
    for s, n, row, m in zip(prompt_only, real, enc["input_ids"], enc["attention_mask"].bool()):
        assert s.routing.num_tokens == n and s.routing.count(SPAN_PROMPT) == n
        np.testing.assert_array_equal(s.routing.token_ids, row[m].numpy())
        assert s.generation.new_ids == [] and s.generation.text == ""

    max_new = 5
    for scope in ("prompt", "generated"):
        for s, n, alone in zip(
            route_batch(model, tok, MESSAGES, scope=scope, max_new_tokens=max_new), real, prompt_only
        ):
            g, r = s.generation, s.routing
            assert len(g.prompt_ids) == n and r.count(SPAN_PROMPT) == n
            routed = min(len(g.new_ids), max_new - 1)  # the last token of a cut answer is never fed back
            assert r.count(SPAN_GENERATED) == routed and r.num_tokens == n + routed
            np.testing.assert_array_equal(r.token_ids, g.prompt_ids + g.new_ids[:routed])
            np.testing.assert_array_equal(r.spans, [SPAN_PROMPT] * n + [SPAN_GENERATED] * routed)
            assert r.select(scope).expert_ids.shape[1] == (n if scope == "prompt" else routed)
            # generate()'s prefill routes the prompt exactly like the plain prompt forward
            _assert_same_sets(r.select("prompt").expert_ids, alone.routing.expert_ids)

    teacher = route_batch(model, tok, MESSAGES, scope="response", responses=RESPONSES)
    for s, n, text in zip(teacher, real, RESPONSES):
        resp = tok(text, add_special_tokens=False)["input_ids"]
        assert s.generation.new_ids == resp and s.generation.text == text
        np.testing.assert_array_equal(s.routing.spans, [SPAN_PROMPT] * n + [SPAN_RESPONSE] * len(resp))
        np.testing.assert_array_equal(s.routing.select("response").token_ids, resp)
        assert s.routing.count(SPAN_GENERATED) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_generated_scope_equals_teacher_forced_forward(family, tok):
    """Decode-step routing (KV cache) == one forward over prompt + generated ids; EOS stops a sample."""
    model = copy.deepcopy(model_of(family))
    ad = MoEAdapter.for_model(model)
    max_new = 8
    first = route_batch(model, tok, MESSAGES, scope="generated", max_new_tokens=max_new)
    # Make sample 0 stop early: declare its 3rd answer token an EOS token (others go on).
    new0 = first[0].generation.new_ids
    stop = next(t for j, t in enumerate(new0) if j >= 2 and t not in new0[:j])
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    samples = route_batch(model, tok, MESSAGES, scope="generated", max_new_tokens=max_new)
    lens = [len(s.generation.new_ids) for s in samples]
    assert lens[0] == new0.index(stop) < max_new and max(lens) > lens[0], lens
    assert samples[0].routing.count(SPAN_GENERATED) == lens[0]  # stopped at EOS: every answer token routed

    gen_ids = [s.routing.select("generated").token_ids.tolist() for s in samples]
    forced = route_sequences(model, [s.generation.prompt_ids for s in samples], gen_ids, tok.pad_token_id, ad)
    seqs = [s.generation.prompt_ids + g for s, g in zip(samples, gen_ids)]
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(x)) + x for x in seqs])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs])
    want, ties = _reference_topk(model, ids, mask, ad.top_k) if family != "deepseek_v3" else (None, None)
    for b, (s, f) in enumerate(zip(samples, forced)):
        np.testing.assert_array_equal(f.token_ids, s.routing.token_ids)
        np.testing.assert_array_equal(f.spans == SPAN_RESPONSE, s.routing.spans == SPAN_GENERATED)
        n = len(seqs[b])
        tie = None if ties is None else ties[:, b, width - n :]
        _assert_same_sets(s.routing.expert_ids, f.expert_ids, tie, max_tie_frac=0.1)
        if want is not None:
            _assert_same_sets(f.expert_ids, want[:, b, width - n :], tie, max_tie_frac=0.1)


# -- storage --------------------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_exact(tmp_path, tok):
    model = model_of("olmoe")
    ad = MoEAdapter.for_model(model)
    samples = route_batch(model, tok, MESSAGES, scope="generated", max_new_tokens=4)
    meta = {"batch_idx": 3, "scope": "generated", "labels": ["safe", "safe", "unsafe"]}
    path = save_batch_routing(tmp_path / "routing" / "batch_0003.safetensors", samples, ad.moe_layers, meta)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # nothing half-written left behind
    loaded = load_batch_routing(path)
    assert loaded.moe_layers == ad.moe_layers and loaded.meta == meta and len(loaded) == len(samples)
    for s, r in zip(samples, loaded):
        for name in ("expert_ids", "weights", "token_ids", "spans"):
            a, b = getattr(s.routing, name), getattr(r, name)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name

    slim = save_batch_routing(
        tmp_path / "slim.safetensors", [s.routing for s in samples], ad.moe_layers, keep_weights=False
    )
    assert slim.stat().st_size < path.stat().st_size
    back = load_batch_routing(slim)
    assert back[1].weights is None and back[1].select("prompt").weights is None
    np.testing.assert_array_equal(back[1].expert_ids, samples[1].routing.expert_ids)


def test_storage_rejects_bad_input_without_writing(tmp_path, tok):
    model = model_of("olmoe")
    ad = MoEAdapter.for_model(model)
    samples = route_batch(model, tok, MESSAGES[:1], scope="prompt", max_new_tokens=0)
    target = tmp_path / "r.safetensors"
    with pytest.raises(RoutingError, match="JSON"):
        save_batch_routing(target, samples, ad.moe_layers, {"bad": object()})
    with pytest.raises(RoutingError, match="moe_layers"):
        save_batch_routing(target, samples, ad.moe_layers[:1])
    with pytest.raises(RoutingError, match="no samples"):
        save_batch_routing(target, [], ad.moe_layers)
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(RoutingFileError, match="no routing file"):
        load_batch_routing(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(RoutingFileError, match="not a readable"):
        load_batch_routing(tmp_path / "junk.safetensors")
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(RoutingFileError, match="not a routing file"):
        load_batch_routing(tmp_path / "other.safetensors")


def test_header_is_plain_json(tmp_path, tok):
    """The metadata is readable without this code (safetensors header = 8-byte length + JSON)."""
    model = model_of("olmoe")
    samples = route_batch(model, tok, MESSAGES[:2], scope="prompt", max_new_tokens=0)
    path = save_batch_routing(tmp_path / "r.safetensors", samples, [0, 1], {"batch_idx": 0})
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert json.loads(header["__metadata__"]["meta"]) == {"batch_idx": 0}
    assert header["expert_ids"]["dtype"] == "U8" and header["weights"]["dtype"] == "F16"
    assert header["offsets"]["shape"] == [3]


def test_seed_arrays_are_int64_topk_ids_of_the_scope(tok):
    model = model_of("olmoe")
    samples = route_batch(model, tok, MESSAGES, scope="generated", max_new_tokens=4)
    arrays = routing_to_seed_arrays(samples, "generated")
    for a, s in zip(arrays, samples):
        assert a.dtype == np.int64 and a.shape == (2, s.routing.count("generated"), 2)
        np.testing.assert_array_equal(a, s.routing.expert_ids[:, s.routing.spans == SPAN_GENERATED])
        sub = s.routing.subset("generated")
        assert sub.num_tokens == a.shape[1] and (sub.spans == SPAN_GENERATED).all()
    assert routing_to_seed_arrays([s.routing for s in samples], SPAN_PROMPT)[0].shape[1] == len(
        samples[0].generation.prompt_ids
    )


# -- the context manager and bad input -------------------------------------------------------------


def _hook_count(model) -> int:
    ad = MoEAdapter.for_model(model)
    return sum(len(ad.router(layer)._forward_hooks) for layer in ad.moe_layers)


def test_capture_records_each_forward_and_removes_hooks_even_on_error():
    model = model_of("qwen3_moe")
    before = _hook_count(model)
    x = torch.randint(3, 200, (2, 5))
    with capture_routing(model) as rec:
        assert _hook_count(model) == before + 2
        with torch.no_grad():
            model(input_ids=x)
            model(input_ids=x[:, :3])
    assert _hook_count(model) == before
    assert [tuple(c.expert_ids.shape) for c in rec.calls] == [(2, 10, 2), (2, 6, 2)]
    with torch.no_grad():
        model(input_ids=x)
    assert len(rec.calls) == 2  # nothing recorded once the block is left

    with pytest.raises(KeyError):
        with capture_routing(model):
            with torch.no_grad():
                model(input_ids=x)
            raise KeyError("boom")
    assert _hook_count(model) == before


def test_gather_to_cpu_keeps_every_call_intact():
    """The one-transfer move used after GPU capture splits calls back exactly (checked here on CPU)."""
    calls = [
        RoutingCall(torch.randint(0, 8, (3, t, 2), dtype=torch.uint8), torch.rand(3, t, 2).half())
        for t in (12, 4, 4, 4)
    ]
    moved = gather_to_cpu(calls)
    for a, b in zip(calls, moved):
        assert b.expert_ids.is_contiguous() and b.weights.is_contiguous()
        assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.weights, b.weights)


def test_dense_model_is_refused_with_a_clear_error(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=256,
        )
    )
    with pytest.raises(NotAnMoEModelError, match="Mixture-of-Experts"):
        with capture_routing(dense):
            pass
    with pytest.raises(NotAnMoEModelError):
        route_batch(dense, tok, MESSAGES, scope="prompt", max_new_tokens=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scope="tokens"), "unknown routing scope"),
        (dict(scope="response"), "one response text per conversation"),
        (dict(scope="response", responses=["only one"]), "one response text per conversation"),
        (dict(scope="prompt", responses=RESPONSES), "only used with scope='response'"),
        (dict(scope="generated", max_new_tokens=0), "max_new_tokens"),
        (dict(scope="prompt", max_new_tokens=-1), "max_new_tokens"),
    ],
)
def test_bad_arguments_raise_actionable_errors(kwargs, match, tok):
    with pytest.raises(RoutingError, match=match):
        route_batch(model_of("olmoe"), tok, MESSAGES, **kwargs)


def test_sample_routing_validates_shapes():
    ids = np.zeros((2, 3, 2), np.uint8)
    with pytest.raises(RoutingError, match="token_ids"):
        SampleRouting(ids, None, np.zeros(4, np.int32), np.zeros(3, np.uint8))
    with pytest.raises(RoutingError, match="weights"):
        SampleRouting(ids, np.zeros((2, 3, 1), np.float16), np.zeros(3, np.int32), np.zeros(3, np.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capture_on_gpu_returns_cpu_arrays(tok):
    model = copy.deepcopy(model_of("olmoe")).cuda()
    with capture_routing(model) as rec:
        with torch.no_grad():
            model(input_ids=torch.randint(3, 200, (2, 5), device="cuda"))
    assert rec.calls[0].expert_ids.device.type == "cpu"
    gpu = route_batch(model, tok, MESSAGES, scope="generated", max_new_tokens=4)
    cpu = route_batch(model_of("olmoe"), tok, MESSAGES, scope="generated", max_new_tokens=4)
    for a, b in zip(gpu, cpu):
        assert a.routing.num_tokens == b.routing.num_tokens
