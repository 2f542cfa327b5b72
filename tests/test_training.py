"""ExpertMaskingTrainer: exact expert masking, whole analysis batches per step, outputs, baselines.

Every claim of moe_core/training.py is checked on tiny random models of all six families:
frozen weights bit-identical under AdamW with weight decay, per-batch masks exact even with
momentum, one analysis batch per step, optimizer state only for the chosen rows, and the
merged model / expert delta reproducing the trained weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.trainer_pt_utils import get_model_param_count

from moe_core.analysis.masks import ExpertMask
from moe_core.analysis.selection import random_like
from moe_core.errors import MoELabError
from moe_core.model.adapter import MoEAdapter
from moe_core.train.batch_trainer import BatchPreservingTrainer, router_consistency_loss
from moe_core.train.config import (
    BatchPreservingConfig,
    BatchStructureError,
    ExpertMaskingConfig,
    TrainingConfigError,
)
from moe_core.train.expert_rows import (
    apply_expert_delta,
    merge_trained_experts,
    optimizer_state_bytes,
    save_expert_delta,
    save_merged,
    trained_rows,
)
from moe_core.train.expert_trainer import ExpertMaskingTrainer
from moe_core.train.internals import check_internals
from moe_core.train.sampler import BatchCollator
from moe_core.train.sft import (
    create_batch_aware_dataset,
    create_batch_structured_dataset,
)
from moe_core.train.training import draw_random_masks, train_experts, train_model
from tests.tiny import FAMILIES, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def sft_data(sizes):
    bl = []
    for b, n in enumerate(sizes):
        ns = n // 2
        outs = [
            {
                "prompt": f"How do I bake bread {b} {i}?",
                "label": "safe",
                "generated_text": "Mix flour, water and salt.",
            }
            for i in range(ns)
        ]
        outs += [{"prompt": f"Tell me how to pick a lock {b} {i}!", "label": "unsafe"} for i in range(n - ns)]
        bl.append(
            {
                "batch_idx": b,
                "batch_outputs": outs,
                "safe_indices": list(range(ns)),
                "unsafe_indices": list(range(ns, n)),
            }
        )
    return {"batch_data_list": bl}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def dataset(tok, sizes=(4, 4, 4), max_length=40):
    return create_batch_aware_dataset(
        create_batch_structured_dataset(sft_data(sizes)), tok, max_length=max_length
    )


def config(tmp_path, bs=4, **kw):
    base = dict(
        output_dir=str(tmp_path / "ckpt"),
        per_device_train_batch_size=bs,
        max_steps=3,
        learning_rate=1e-2,
        weight_decay=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        optim="adamw_torch",
    )
    return ExpertMaskingConfig(**{**base, **kw})


def make_trainer(model, cfg, tok, ds=None, **kw):
    """An ExpertMaskingTrainer on the default 3 x 4 dataset (or ``ds``) with the tiny tokenizer."""
    return ExpertMaskingTrainer(
        model, cfg, ds if ds is not None else dataset(tok), processing_class=tok, **kw
    )


def two_expert_mask(model, *pairs):
    ad = MoEAdapter.for_model(model)
    first, last = ad.moe_layers[0], ad.moe_layers[-1]
    pairs = pairs or ((first, 1), (last, 5))
    return ExpertMask.from_experts(pairs, ad.num_layers, ad.num_experts)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_experts(model, before, adapter):
    """{(layer, expert)} whose rows differ anywhere; asserts every non-expert parameter is bit-identical."""
    fused = {
        full: layer for layer in adapter.moe_layers for full in adapter.expert_parameter_names(layer).values()
    }
    changed = set()
    for name, p in model.named_parameters():
        if name in fused:
            for e in range(p.shape[0]):
                if not torch.equal(p[e], before[name][e]):
                    changed.add((fused[name], e))
        else:
            assert torch.equal(p, before[name]), f"{name} is not an expert tensor yet it changed"
    return changed


class RowRecorder(TrainerCallback):
    """Copies every trained row after each optimizer step (to compare step by step)."""

    def __init__(self):
        self.trainer = None
        self.after_step: list[dict[tuple, torch.Tensor]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step.append(
            {(r.layer, r.expert, r.name): r.param.detach().clone() for r in self.trainer.rows}
        )


# -- exact masking ---------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_union_mask_changes_exactly_the_chosen_experts(family, tok, tmp_path):
    model = tiny_model(family)
    ad = MoEAdapter.for_model(model)
    mask = two_expert_mask(model)
    before = snapshot(model)
    trainer = ExpertMaskingTrainer(
        model, config(tmp_path), dataset(tok), expert_mask=mask, processing_class=tok
    )
    trainer.train()
    assert merge_trained_experts(model) == 2 * len(ad.expert_parameters(ad.moe_layers[0]))
    assert changed_experts(model, before, ad) == set(mask.experts())
    assert not trained_rows(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_batch_masks_are_exact_even_with_momentum_and_decay(family, tok, tmp_path):
    model = tiny_model(family)
    ad = MoEAdapter.for_model(model)
    first, last = ad.moe_layers[0], ad.moe_layers[-1]
    masks = {0: [(first, 1)], 1: [(last, 5)], 2: [(first, 1), (last, 2)]}
    masks = {b: ExpertMask.from_experts(p, ad.num_layers, ad.num_experts) for b, p in masks.items()}
    before = snapshot(model)
    rec = RowRecorder()
    cfg = config(tmp_path, max_steps=6, mask_mode="per_batch", shuffle_batches=True, seed=1)
    trainer = make_trainer(model, cfg, tok, batch_expert_masks=masks, callbacks=[rec])
    rec.trainer = trainer
    initial = {(r.layer, r.expert, r.name): r.param.detach().clone() for r in trainer.rows}
    trainer.train()
    steps = [row["batch_idx"] for row in trainer.batch_log]
    assert len(steps) == 6 and set(steps) == {0, 1, 2}
    prev = initial
    for step, b in enumerate(steps):
        now = rec.after_step[step]
        for (layer, expert, name), value in now.items():
            moved = not torch.equal(value, prev[(layer, expert, name)])
            assert moved == bool(masks[b].mask[layer, expert]), (
                f"step {step} (batch {b}): expert ({layer},{expert}) {name} moved={moved}"
            )
        prev = now
    merge_trained_experts(model)
    assert changed_experts(model, before, ad) == {(first, 1), (last, 5), (last, 2)}


def test_gradient_accumulation_window_updates_only_its_batches_experts(tok, tmp_path):
    model = tiny_model("olmoe")
    pairs = {0: [(0, 1)], 1: [(1, 5)], 2: [(0, 3)]}
    masks = {b: ExpertMask.from_experts(p, 2, 8) for b, p in pairs.items()}
    rec = RowRecorder()
    cfg = config(
        tmp_path,
        max_steps=2,
        mask_mode="per_batch",
        shuffle_batches=False,
        gradient_accumulation_steps=2,
        allow_gradient_accumulation=True,
    )
    trainer = make_trainer(model, cfg, tok, batch_expert_masks=masks, callbacks=[rec])
    rec.trainer = trainer
    start = {(r.layer, r.expert, r.name): r.param.detach().clone() for r in trainer.rows}
    trainer.train()
    assert [r["batch_idx"] for r in trainer.batch_log] == [0, 1, 2]
    windows = [{(0, 1), (1, 5)}, {(0, 3)}]  # update 1 = batches 0+1, update 2 = batch 2
    prev = start
    for now, window in zip(rec.after_step, windows):
        moved = {(l, e) for (l, e, n), v in now.items() if not torch.equal(v, prev[(l, e, n)])}
        assert moved == window
        prev = now


def test_zeroed_gradients_alone_would_not_freeze_rows():
    """Why rows are kept out of the optimizer: AdamW moves a zero-gradient row (decay and momentum)."""
    w = torch.nn.Parameter(torch.ones(2, 3))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.1)
    w.grad = torch.ones_like(w)
    opt.step()
    after_first = w.detach().clone()
    w.grad = torch.zeros_like(w)  # "frozen" on this step by zeroing
    opt.step()
    assert not torch.equal(w, after_first)
    w.grad = None  # what the trainer does instead
    frozen = w.detach().clone()
    opt.step()
    assert torch.equal(w, frozen)


# -- batch structure -------------------------------------------------------------------
def test_every_step_holds_one_whole_analysis_batch_with_uneven_sizes(tok, tmp_path):
    sizes = (16, 10, 16)
    ds = dataset(tok, sizes, max_length=24)
    model = tiny_model("olmoe", hidden_size=32, intermediate_size=32)
    cfg = config(tmp_path, bs=16, max_steps=-1, num_train_epochs=3, seed=5)
    trainer = ExpertMaskingTrainer(model, cfg, ds, expert_mask=two_expert_mask(model), processing_class=tok)
    trainer.train()
    log = trainer.batch_log
    assert len(log) == 3 * len(sizes)
    for row in log:
        assert row["n_samples"] == sizes[row["batch_idx"]]
        assert row["n_safe"] == sizes[row["batch_idx"]] // 2
        assert row["n_unsafe"] == sizes[row["batch_idx"]] - row["n_safe"]
    orders = [tuple(r["batch_idx"] for r in log[e * 3 : (e + 1) * 3]) for e in range(3)]
    assert all(sorted(o) == [0, 1, 2] for o in orders)
    assert len(set(orders)) > 1, "batch order should be reshuffled between epochs"


def test_monitor_rejects_mixed_or_reordered_batches(tok, tmp_path):
    model = tiny_model("olmoe")
    trainer = make_trainer(model, config(tmp_path), tok, expert_mask=two_expert_mask(model))
    ds = dataset(tok)
    collate = BatchCollator(pad_token_id=tok.pad_token_id)
    mixed = collate([ds[0], ds[1], ds[4], ds[5]])
    with pytest.raises(BatchStructureError, match=r"mixes analysis batches \[0, 1\]"):
        trainer.training_step(trainer.model, mixed)
    reordered = collate([ds[1], ds[0], ds[2], ds[3]])
    with pytest.raises(BatchStructureError, match="out of its in-batch order"):
        trainer.training_step(trainer.model, reordered)
    no_idx = {k: v for k, v in collate([ds[0]]).items() if k != "batch_idx"}
    with pytest.raises(BatchStructureError, match="no batch_idx"):
        trainer.training_step(trainer.model, no_idx)


# -- what is trained and what it costs -------------------------------------------------
def test_optimizer_state_holds_only_the_chosen_rows(tok, tmp_path):
    model = tiny_model("olmoe")
    mask = two_expert_mask(model)
    trainer = make_trainer(model, config(tmp_path, max_steps=2), tok, expert_mask=mask)
    trainer.train()
    rows = {id(r.param) for r in trainer.rows}
    opt_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in opt_params} == rows
    per_expert = sum(r.param.numel() for r in trainer.rows if (r.layer, r.expert) == mask.experts()[0])
    report = trainer.trainable_report()
    assert report["trainable_parameters"] == mask.count() * per_expert == report["expert_row_parameters"]
    assert report["trainable_parameters"] == get_model_param_count(trainer.model, trainable_only=True)
    assert report["model_parameters"] == sum(p.numel() for p in tiny_model("olmoe").parameters())
    moments = 2 * report["trainable_parameters"] * 4  # AdamW exp_avg + exp_avg_sq in fp32
    assert moments <= optimizer_state_bytes(trainer.optimizer) <= moments + 8 * len(rows)

    full = tiny_model("olmoe")
    ft = BatchPreservingTrainer(
        full, config(tmp_path, max_steps=2, baseline="full"), dataset(tok), processing_class=tok
    )
    ft.train()
    assert ft.trainable_report()["trainable_parameters"] == sum(p.numel() for p in full.parameters())
    assert optimizer_state_bytes(ft.optimizer) > 10 * optimizer_state_bytes(trainer.optimizer)


def test_router_training_uses_its_own_learning_rate(tok, tmp_path):
    model = tiny_model("olmoe")
    ad = MoEAdapter.for_model(model)
    cfg = config(tmp_path, max_steps=1, train_router=True, router_learning_rate=1e-3)
    trainer = ExpertMaskingTrainer(
        model, cfg, dataset(tok), expert_mask=two_expert_mask(model), processing_class=tok
    )
    trainer.create_optimizer()
    router_ids = {id(p) for layer in ad.moe_layers for p in ad.router_parameters(layer).values()}
    lrs = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert router_ids <= set(lrs) and {lrs[i] for i in router_ids} == {1e-3}
    assert {lrs[id(r.param)] for r in trainer.rows} == {1e-2}


# -- outputs ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_merged_model_round_trips_and_delta_reproduces_it(family, tok, tmp_path):
    model = tiny_model(family)
    trainer = make_trainer(model, config(tmp_path), tok, expert_mask=two_expert_mask(model))
    trainer.train()
    delta = save_expert_delta(trainer, tmp_path / "delta.safetensors")
    meta = json.loads(delta.with_suffix(".json").read_text())
    n_tensors = len(MoEAdapter.for_model(tiny_model(family)).expert_parameters(1))
    assert len(meta["experts"]) == 2 * n_tensors and {e["expert"] for e in meta["experts"]} == {1, 5}
    merged_dir = save_merged(model, tok, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    mine = dict(model.named_parameters())
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, mine[name]), name
    ids = torch.tensor([[5, 40, 41, 42, 6]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)
    base = tiny_model(family)  # same seed as the model before training
    assert apply_expert_delta(base, delta) == 2 * n_tensors
    for name, p in base.named_parameters():
        assert torch.equal(p, mine[name]), name
    assert delta.stat().st_size < sum(p.numel() * 4 for p in model.parameters()) / 10


def test_delta_for_another_model_is_rejected_without_changes(tok, tmp_path):
    model = tiny_model("olmoe")
    trainer = make_trainer(model, config(tmp_path, max_steps=1), tok, expert_mask=two_expert_mask(model))
    trainer.train()
    delta = save_expert_delta(trainer, tmp_path / "d.safetensors")
    with pytest.raises(TrainingConfigError, match="delta is for olmoe"):
        apply_expert_delta(tiny_model("mixtral"), delta)
    narrow = tiny_model("olmoe", intermediate_size=32)
    before = snapshot(narrow)
    with pytest.raises(TrainingConfigError, match="no matching tensor"):
        apply_expert_delta(narrow, delta)
    assert all(torch.equal(p, before[n]) for n, p in narrow.named_parameters())
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TrainingConfigError, match="cannot read"):
        apply_expert_delta(narrow, tmp_path / "junk.safetensors")


def test_checkpoint_resume_restores_rows_and_optimizer(tok, tmp_path):
    cfg = dict(
        max_steps=4, save_strategy="steps", save_steps=2, shuffle_batches=True, lr_scheduler_type="constant"
    )
    model = tiny_model("olmoe")
    a = make_trainer(model, config(tmp_path / "a", **cfg), tok, expert_mask=two_expert_mask(model))
    a.train()
    final_a = {r.key: r.param.detach().clone() for r in a.rows}
    ckpt = tmp_path / "a" / "ckpt" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert {"expert_delta.safetensors", "optimizer.pt", "training_args.json", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "training_args.bin"}, (
        "checkpoints hold only the rows, no pickle of args"
    )

    model_b = tiny_model("olmoe")
    b = make_trainer(model_b, config(tmp_path / "b", **cfg), tok, expert_mask=two_expert_mask(model_b))
    b.train(resume_from_checkpoint=str(ckpt))
    # the batch log is restored from the checkpoint: a resumed training logs every step once
    assert [r["batch_idx"] for r in b.batch_log] == [r["batch_idx"] for r in a.batch_log]
    for r in b.rows:
        assert torch.equal(r.param, final_a[r.key]), f"{r.key} differs after resuming"
    assert b.optimizer.state[b.rows[0].param]["step"].item() == 4

    model_c = tiny_model("olmoe")
    other = ExpertMask.from_experts([(0, 2)], 2, 8)
    c = make_trainer(model_c, config(tmp_path / "c", **cfg), tok, expert_mask=other)
    with pytest.raises(TrainingConfigError, match="other experts"):
        c.train(resume_from_checkpoint=str(ckpt))


def test_train_experts_writes_artifacts_and_reports_progress(tok, tmp_path):
    model = tiny_model("qwen3_moe")
    mask = two_expert_mask(model)
    calls = []
    batches = create_batch_structured_dataset(sft_data((4, 2, 4)))
    cfg = config(tmp_path, max_steps=3)
    result = train_experts(
        model,
        tok,
        batches,
        mask,
        cfg,
        tmp_path / "out",
        progress=lambda d, t, m="": calls.append((d, t, m)),
        max_length=40,
    )
    assert [c[0] for c in calls[:3]] == [1, 2, 3] and calls[-1][2] == "done"
    meta = json.loads(result.metadata_path.read_text())
    assert meta["expert_mask"]["experts"] == {"0": [1], "1": [5]}
    assert len(meta["batch_monitor"]) == 3 and any("loss" in h for h in meta["loss_history"])
    assert result.delta_path.exists() and result.merged_path is None
    assert (tmp_path / "out" / "batch_monitor.jsonl").read_text().count("\n") == 3
    assert result.report["trained_experts"] == 2
    assert not trained_rows(model), "train_experts leaves the model merged"
    MoEAdapter.for_model(model)  # and usable by the rest of the pipeline


def test_train_experts_defaults_take_per_batch_masks_and_batch_size(tok, tmp_path):
    model = tiny_model("olmoe")
    masks = [np.eye(2, 8, k=b, dtype=bool) for b in range(2)]  # batch 0: (0,0),(1,1); batch 1: (0,1),(1,2)
    before = snapshot(model)
    ds = dataset(tok, sizes=(4, 2))
    result = train_experts(model, tok, ds, masks, output_dir=tmp_path / "out")
    meta = json.loads(result.metadata_path.read_text())
    assert meta["mask_mode"] == "per_batch" and meta["args"]["per_device_train_batch_size"] == 4
    assert meta["batch_masks"] == {"0": {"0": [0], "1": [1]}, "1": {"0": [1], "1": [2]}}
    assert {r["n_samples"] for r in meta["batch_monitor"]} == {4, 2}
    assert changed_experts(model, before, MoEAdapter.for_model(model)) == {(0, 0), (1, 1), (0, 1), (1, 2)}


# -- baselines ------------------------------------------------------------------------
def test_random_experts_baseline_is_a_mask_drawn_by_selection(tok, tmp_path):
    model = tiny_model("mixtral")
    ad = MoEAdapter.for_model(model)
    mask = two_expert_mask(model)
    drawn = draw_random_masks(mask, 3, ad)
    assert (
        drawn == random_like(mask, 3, layers=ad.moe_layers)
        and drawn.count() == mask.count()
        and drawn != mask
    )
    before = snapshot(model)
    cfg = config(tmp_path, baseline="random_experts", random_seed=3)
    trainer = ExpertMaskingTrainer(model, cfg, dataset(tok), expert_mask=drawn, processing_class=tok)
    assert trainer.union_mask == drawn
    trainer.train()
    merge_trained_experts(model)
    assert changed_experts(model, before, ad) == set(drawn.experts())
    # the trainer never draws by itself: the chosen experts labelled "random" are refused, the model untouched
    other = tiny_model("mixtral")
    with pytest.raises(TrainingConfigError, match="not drawn at random"):
        ExpertMaskingTrainer(other, cfg, dataset(tok), expert_mask=mask, processing_class=tok)
    assert not trained_rows(other) and all(p.requires_grad for p in other.parameters())
    # train_experts draws it (same draw), and labels the run
    result = train_experts(
        other,
        tok,
        dataset(tok),
        mask,
        config(tmp_path, baseline="random_experts", random_seed=3, max_steps=1),
        tmp_path / "out",
    )
    meta = json.loads(result.metadata_path.read_text())
    assert meta["baseline"] == "random_experts"
    assert ExpertMask.from_json_dict(meta["expert_mask"]) == drawn


def test_full_baseline_updates_everything_through_the_same_loop(tok, tmp_path):
    model = tiny_model("olmoe")
    before = snapshot(model)
    trainer = BatchPreservingTrainer(
        model, config(tmp_path, baseline="full", max_steps=2), dataset(tok), processing_class=tok
    )
    trainer.train()
    assert len(trainer.batch_log) == 2 and trainer.trainable_report()["baseline"] == "full"
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("experts" in n for n in moved) and any("self_attn" in n for n in moved)
    with pytest.raises(TrainingConfigError, match="full fine-tuning has no expert delta"):
        save_expert_delta(trainer, tmp_path / "x.safetensors")
    with pytest.raises(TrainingConfigError, match="use BatchPreservingTrainer"):
        make_trainer(tiny_model("olmoe"), config(tmp_path, baseline="full"), tok)
    with pytest.raises(TrainingConfigError, match="trains every parameter"):
        BatchPreservingTrainer(tiny_model("olmoe"), config(tmp_path), dataset(tok))  # labelled "experts"


def test_batch_preserving_trainer_takes_plain_training_arguments(tok, tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "o"),
        per_device_train_batch_size=4,
        max_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=1e-3,
    )
    trainer = BatchPreservingTrainer(tiny_model("olmoe"), args, dataset(tok), tokenizer=tok)
    assert isinstance(trainer.args, BatchPreservingConfig) and trainer.args.max_steps == 2
    assert trainer.args.remove_unused_columns is True and trainer.processing_class is tok
    trainer.train()
    assert [r["n_samples"] for r in trainer.batch_log] == [4, 4]


def test_train_experts_full_baseline_saves_a_loadable_model(tok, tmp_path):
    model = tiny_model("qwen2_moe")
    empty = ExpertMask.empty(2, 8)  # the CLI passes an empty mask for the full baseline (shape only)
    result = train_experts(
        model, tok, dataset(tok), empty, config(tmp_path, baseline="full", max_steps=1), tmp_path / "out"
    )
    assert result.delta_path is None and result.report["trained_experts"] is None
    reloaded = AutoModelForCausalLM.from_pretrained(result.merged_path)
    mine = dict(model.named_parameters())
    assert all(torch.equal(p, mine[n]) for n, p in reloaded.named_parameters())


# -- validation ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(group_by_length=True), "group_by_length"),
        (dict(train_sampling_strategy="group_by_length"), "group_by_length"),
        (dict(dataloader_drop_last=True), "drop_last"),
        (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps=2"),
        (dict(analysis_batch_size=16), "analysis_batch_size=16"),
        (dict(mask_mode="sometimes"), "mask_mode"),
        (dict(router_consistency_loss="kl"), "router_consistency_loss"),
        (dict(baseline="lora"), "baseline"),
        (dict(baseline="full", mask_mode="per_batch"), "per-batch masks do not apply"),
    ],
)
def test_structure_breaking_arguments_are_rejected(kwargs, match, tmp_path):
    with pytest.raises(TrainingConfigError, match=match):
        config(tmp_path, **kwargs)
    assert issubclass(TrainingConfigError, ValueError)


def test_gradient_accumulation_needs_explicit_opt_in(tmp_path):
    cfg = config(tmp_path, gradient_accumulation_steps=2, allow_gradient_accumulation=True)
    assert cfg.gradient_accumulation_steps == 2


@pytest.mark.parametrize(
    "cfg_kw, trainer_kw, match",
    [
        (dict(bs=8), dict(expert_mask="two"), "per_device_train_batch_size=4"),
        ({}, {}, "give expert_mask"),
        ({}, dict(expert_mask=np.zeros((2, 8))), "selects no experts"),
        ({}, dict(expert_mask=np.ones((3, 8))), r"\(3, 8\)"),
        (dict(mask_mode="per_batch"), dict(expert_mask="two"), "needs batch_expert_masks"),
        (dict(mask_mode="per_batch"), dict(batch_expert_masks=["two"]), r"batches \[1, 2\]"),
        (
            dict(mask_mode="per_batch"),
            dict(expert_mask=ExpertMask.from_experts([(0, 1)], 2, 8), batch_expert_masks=["two"] * 3),
            "outside expert_mask",
        ),
        ({}, dict(expert_mask="two", drop_batch_idx=True), "batch_idx"),
    ],
)
def test_bad_trainer_inputs_raise_clear_errors(cfg_kw, trainer_kw, match, tok, tmp_path):
    model = tiny_model("olmoe")
    two = two_expert_mask(model)
    swap = lambda v: two if isinstance(v, str) else v  # noqa: E731  ("two" = the model's two-expert mask)
    kw = {
        k: [swap(x) for x in v] if isinstance(v, list) else swap(v)
        for k, v in trainer_kw.items()
        if k != "drop_batch_idx"
    }
    ds = dataset(tok).remove_columns("batch_idx") if trainer_kw.get("drop_batch_idx") else None
    with pytest.raises(ValueError, match=match):
        make_trainer(model, config(tmp_path, **cfg_kw), tok, ds, **kw)


def test_dense_layers_cannot_be_selected(tok, tmp_path):
    model = tiny_model("deepseek_v3")  # layer 0 is dense
    mask = ExpertMask.from_experts([(0, 1)], 3, 8)
    with pytest.raises(TrainingConfigError, match=r"layers \[0\] have no experts"):
        ExpertMaskingTrainer(model, config(tmp_path), dataset(tok), expert_mask=mask)


def test_training_twice_without_merging_is_refused(tok, tmp_path):
    model = tiny_model("olmoe")
    mask = two_expert_mask(model)
    ExpertMaskingTrainer(model, config(tmp_path), dataset(tok), expert_mask=mask)
    with pytest.raises(TrainingConfigError, match="merge_trained_experts"):
        ExpertMaskingTrainer(model, config(tmp_path), dataset(tok), expert_mask=mask)
    donor = tiny_model("olmoe")
    delta = save_expert_delta(
        ExpertMaskingTrainer(donor, config(tmp_path), dataset(tok), expert_mask=mask),
        tmp_path / "d.safetensors",
    )
    with pytest.raises(TrainingConfigError, match="merge_trained_experts"):
        apply_expert_delta(model, delta)
    merge_trained_experts(model)
    ExpertMaskingTrainer(model, config(tmp_path), dataset(tok), expert_mask=mask)  # fine once merged


# -- router consistency ----------------------------------------------------------------
def test_router_consistency_loss_values_and_gradient():
    torch.manual_seed(0)
    router = torch.nn.Linear(8, 4, bias=False)
    h = torch.randn(2 * 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    unsafe = torch.tensor([0, 1])
    for direction in ("forward", "reverse", "symmetric", "js"):
        c = router_consistency_loss([router(h)], mask, unsafe, direction)
        assert torch.isfinite(c) and c > 0
        (g,) = torch.autograd.grad(c, router.weight)
        assert g.abs().sum() > 0
    same = torch.zeros(10, 4)
    assert router_consistency_loss([same], mask, unsafe) == 0
    # pads do not count: changing a padded token's logits leaves the loss unchanged
    logits = router(h).detach()
    padded = logits.clone()
    padded[3] += 100
    assert torch.equal(
        router_consistency_loss([logits], mask, unsafe), router_consistency_loss([padded], mask, unsafe)
    )
    only_safe = router_consistency_loss([router(h)], mask, torch.tensor([0, 0]))
    assert only_safe == 0 and only_safe.requires_grad


def test_router_consistency_term_reaches_the_router_only_when_enabled(tok, tmp_path):
    ds = dataset(tok)
    batch = BatchCollator(pad_token_id=tok.pad_token_id)([ds[i] for i in range(4)])

    def loss_and_trainer(**kw):
        model = tiny_model("olmoe")
        cfg = config(tmp_path, train_router=True, **kw)
        trainer = make_trainer(model, cfg, tok, ds, expert_mask=two_expert_mask(model))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        return loss.detach(), trainer

    plain, t_off = loss_and_trainer()
    with_c, t_on = loss_and_trainer(router_consistency_loss="symmetric", router_consistency_weight=1.0)
    assert torch.isfinite(with_c) and with_c > plain
    assert torch.isclose(
        with_c - plain, torch.tensor(t_on._consistency[0]), atol=1e-5
    )  # weight 1.0 x KL term
    g_off = t_off.adapter.router(0).weight.grad
    g_on = t_on.adapter.router(0).weight.grad
    assert g_off is not None and g_on is not None and not torch.allclose(g_off, g_on)
    assert t_on._consistency[1] == 1 and t_off._consistency[1] == 0

    model = tiny_model("olmoe")
    before = snapshot(model)
    cfg = config(tmp_path, router_consistency_loss="reverse", router_consistency_layers="masked")
    frozen_router = make_trainer(model, cfg, tok, ds, expert_mask=two_expert_mask(model))
    frozen_router.train()
    assert any("router_consistency" in h for h in frozen_router.state.log_history)
    merge_trained_experts(model)
    assert changed_experts(model, before, frozen_router.adapter) == set(two_expert_mask(model).experts())


def test_router_consistency_layers_take_a_list_of_layers(tok, tmp_path):
    model = tiny_model("olmoe")
    cfg = config(tmp_path, router_consistency_loss="js", router_consistency_layers=[1])
    assert cfg.router_consistency_layers == "1"
    trainer = make_trainer(model, cfg, tok, expert_mask=two_expert_mask(model))
    assert trainer._consistency_layers() == [1]
    trainer.train()
    assert any("router_consistency" in h for h in trainer.state.log_history)


# -- construction, masks mode, monitor, internals --------------------------------------
def test_failed_construction_leaves_the_model_untouched_and_retryable(tok, tmp_path):
    model = tiny_model("olmoe")
    params = dict(model.named_parameters())
    values = snapshot(model)
    mask = two_expert_mask(model)
    bad_layers = config(tmp_path, router_consistency_loss="forward", router_consistency_layers="0,7")
    with pytest.raises(TrainingConfigError, match=r"router_consistency_layers \[7\]"):
        make_trainer(model, bad_layers, tok, expert_mask=mask)  # fails after the rows were spliced in
    with pytest.raises(TypeError):
        make_trainer(
            model, config(tmp_path), tok, expert_mask=mask, not_a_trainer_argument=1
        )  # fails in Trainer
    assert not trained_rows(model)
    assert dict(model.named_parameters()) == params, "parameters were replaced"
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, values[n]) for n, p in model.named_parameters())
    trainer = make_trainer(model, config(tmp_path, max_steps=1), tok, expert_mask=mask)  # the corrected retry
    trainer.train()


def test_per_batch_masks_apply_per_batch_unless_union_is_asked_for(tok, tmp_path, caplog):
    masks = [ExpertMask.from_experts([(0, b)], 2, 8) for b in range(3)]
    model = tiny_model("olmoe")
    before = snapshot(model)
    trainer = make_trainer(
        model, config(tmp_path, max_steps=1, shuffle_batches=False), tok, batch_expert_masks=masks
    )
    assert trainer.mask_mode == "per_batch" and trainer.trainable_report()["mask_mode"] == "per_batch"
    trainer.train()  # one step, batch 0
    merge_trained_experts(model)
    assert changed_experts(model, before, trainer.adapter) == {(0, 0)}

    model = tiny_model("olmoe")
    before = snapshot(model)
    with caplog.at_level("INFO", logger="moe_core.train.expert_trainer"):
        union = make_trainer(
            model,
            config(tmp_path, max_steps=1, shuffle_batches=False, mask_mode="union"),
            tok,
            batch_expert_masks=masks,
        )
    assert "training the union of 3 per-batch masks" in caplog.text
    union.train()
    merge_trained_experts(model)
    assert changed_experts(model, before, union.adapter) == {(0, 0), (0, 1), (0, 2)}


def test_monitor_line_in_the_seeds_words_only_when_asked(tok, tmp_path, capsys):
    model = tiny_model("olmoe")
    make_trainer(model, config(tmp_path, max_steps=2), tok, expert_mask=two_expert_mask(model)).train()
    assert "Current training batch" not in capsys.readouterr().out
    merge_trained_experts(model)
    t = make_trainer(
        model, config(tmp_path, max_steps=2, monitor_batches=True), tok, expert_mask=two_expert_mask(model)
    )
    t.train()
    lines = [line for line in capsys.readouterr().out.splitlines() if "Current training batch" in line]
    assert lines == [
        f"Current training batch contains samples from batches: [{r['batch_idx']}]" for r in t.batch_log
    ]


def test_transformers_internals_are_as_expected():
    """Fails, naming the item, when a transformers/accelerate upgrade changes what the trainers rely on."""
    assert check_internals() == []


def test_error_classes_share_the_lab_base():
    from moe_core.train import sampler as sampler_mod
    from moe_core.train import sft as sft_mod

    for cls in (
        TrainingConfigError,
        BatchStructureError,
        sampler_mod.BatchSamplerError,
        sft_mod.SFTDataError,
        sft_mod.PickleNotAllowedError,
    ):
        assert issubclass(cls, MoELabError) and issubclass(cls, ValueError), cls


def test_train_model_trains_what_it_is_given_with_keyword_settings(tok, tmp_path):
    model = tiny_model("olmoe")
    ad = MoEAdapter.for_model(model)
    drawn = random_like(two_expert_mask(model), 5, layers=ad.moe_layers)
    before = snapshot(model)
    result = train_model(
        model,
        tok,
        dataset(tok),
        drawn,
        output_dir=tmp_path / "r",
        mask_mode="union",
        learning_rate=1e-2,
        num_train_epochs=1,
        weight_decay=0.1,
        seed=0,
        train_router=False,
        router_consistency_loss="none",
        router_consistency_weight=0.1,
        save_merged_model=False,
    )
    meta = json.loads(result.metadata_path.read_text())
    assert meta["baseline"] == "random_experts" and meta["args"]["lr_scheduler_type"] == "constant"
    assert len(meta["batch_monitor"]) == 3 and result.delta_path.exists()
    assert changed_experts(model, before, ad) == set(drawn.experts())
    full = train_model(tiny_model("olmoe"), tok, dataset(tok), None, output_dir=tmp_path / "f", max_steps=1)
    assert full.report["baseline"] == "full" and full.merged_path.is_dir() and full.delta_path is None
    quiet = train_model(
        tiny_model("olmoe"),
        tok,
        dataset(tok),
        None,
        output_dir=tmp_path / "q",
        max_steps=1,
        mask_mode="union",
        save_outputs=False,
    )
    assert (
        quiet.merged_path is None
        and not list((tmp_path / "q").glob("*.json*"))
        and not (tmp_path / "q" / "merged_model").exists()
    )
    with pytest.raises(TrainingConfigError, match="not drawn at random"):
        train_model(
            tiny_model("olmoe"),
            tok,
            dataset(tok),
            two_expert_mask(model),
            output_dir=tmp_path / "x",
            baseline="random_experts",
        )


# -- several processes -----------------------------------------------------------------
LAUNCH_TIMEOUT_S = 180  # one 2-rank launch takes about 15 s; a gloo rendezvous that hangs never ends


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_ranks(tmp_path: Path) -> None:
    """Every process still running with ``tmp_path`` in its command line: torch's launcher starts each rank in
    a session of its own, so a rank hung at teardown outlives the launcher's process group."""
    for proc in psutil.process_iter(["cmdline"]):
        if any(a == str(tmp_path) or a.startswith(f"{tmp_path}/") for a in proc.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _launch_once(
    cmd: list[str], tmp_path: Path, name: str, timeout: float = LAUNCH_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """One launch of ``cmd`` (CPU ranks over gloo); a hung launch is killed with all its ranks. Output goes to
    files, not pipes: a rank left hanging would hold a pipe open, and reading it would never end."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    logs = [tmp_path / f"{name}.{kind}" for kind in ("out", "err")]
    with logs[0].open("w") as out_f, logs[1].open("w") as err_f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out_f, stderr=err_f, start_new_session=True)
        try:
            p.wait(timeout=timeout)
            hung = ""
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
            hung = f"\n(the launch hung: killed after {timeout} s)"
    _kill_ranks(tmp_path)
    out, err = (f.read_text(errors="replace") for f in logs)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err + hung)


def _run_launch(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """An accelerate launch (2 CPU ranks over gloo), once more from scratch on a new port when torch's gloo
    aborts at teardown or hangs at its rendezvous: seen on a loaded 2-core machine (about 1 in 30 launches);
    that is the launcher, not the batches under test."""
    for attempt in (1, 2):
        proc = _launch_once(cmd, tmp_path, f"launch{attempt}")
        flaky = (
            "terminate called without an active exception" in proc.stderr or "the launch hung" in proc.stderr
        )
        if proc.returncode == 0 or not flaky or attempt == 2:
            return proc
        for f in tmp_path.glob("rank*.json"):
            f.unlink()
        cmd[cmd.index("--main_process_port") + 1] = str(_free_port())
    return proc


def test_a_rank_that_outlives_its_launcher_is_killed_and_the_launch_returns(tmp_path):
    """The fault behind a CI run that never ended: gloo hung at teardown in a rank, whose session is its own,
    after the launcher had exited. The launch returns with the launcher's exit code and no rank is left."""
    rank = [sys.executable, "-c", "import time; time.sleep(900)", str(tmp_path)]
    launcher = f"import subprocess; subprocess.Popen({rank!r}, start_new_session=True); print('launched')"
    proc = _run_launch([sys.executable, "-c", launcher, "--main_process_port", "0"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "launched"
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in (p.info["cmdline"] or ())]
    assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_two_processes_each_get_whole_analysis_batches(tmp_path):
    """Real accelerate launch (2 CPU processes, DDP over gloo) through the Trainer's prepared DataLoader."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(ROOT / "tests" / "accelerate_batches.py"),
        str(tmp_path),
    ]
    proc = _run_launch(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    sizes = ranks[0]["sizes"]
    assert all(r["world_size"] == 2 for r in ranks)
    assert len(ranks[0]["batch_log"]) == len(ranks[1]["batch_log"]) > 0
    seen = set()
    for r in ranks:
        assert r["frozen_bit_identical"]
        for step in r["batch_log"]:
            assert step["n_samples"] == sizes[step["batch_idx"]], "a rank received a partial or mixed batch"
            seen.add(step["batch_idx"])
    assert seen == set(range(len(sizes)))
    assert ranks[0]["rows"] == ranks[1]["rows"], "ranks disagree on the trained rows"
    # the batch order is reshuffled per epoch on every rank (set_epoch reaches the sampler inside accelerate's shard)
    half = len(ranks[0]["batch_log"]) // 2
    epochs = [
        tuple(s["batch_idx"] for r in ranks for s in r["batch_log"][e * half : (e + 1) * half])
        for e in (0, 1)
    ]
    assert epochs[0] != epochs[1], epochs


def _launch_two(tmp_path: Path, *script_args: str) -> subprocess.CompletedProcess:
    """The shipped 2-process config (moe_core/configs/accelerate/2gpu.yaml), on CPUs here (DDP over gloo)."""
    from moe_core.configs import accelerate_config

    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config("2gpu")),
        "--main_process_port",
        str(_free_port()),
        str(ROOT / "tests" / "accelerate_batches.py"),
        str(tmp_path),
        *script_args,
    ]
    return _run_launch(cmd, tmp_path)


def test_two_processes_equal_one_process_on_the_same_global_batches(tmp_path):
    """DDP over 2 ranks == 1 process accumulating each step's two batches, up to float reduction order."""
    from safetensors.torch import load_file

    from tests.accelerate_batches import single_process_reference

    proc = _launch_two(tmp_path, "union")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    two = load_file(str(tmp_path / "experts.safetensors"))
    one = single_process_reference(tmp_path / "single", [r["batch_log"] for r in ranks])
    base = tiny_model("olmoe")
    moved = 0
    for name, t in two.items():
        np.testing.assert_allclose(t.numpy(), one[name].numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
        moved += int((t != base.get_parameter(name)).any(-1).any(-1).sum())
    assert moved >= 4  # the union's rows were trained, so the comparison is not of untouched weights


def test_cli_train_under_accelerate_launch_writes_the_run_once(tmp_path):
    """`accelerate launch -m moe_core train --run RUN` on 2 processes: one finished training, written by rank 0."""
    from moe_core.store.run import Run
    from tests.app_fixtures import MASK_NAME, build_finished_run, save_tiny_model

    run = build_finished_run(tmp_path / "runs", save_tiny_model(tmp_path / "tiny"), n_batches=4, train=False)
    from moe_core.configs import accelerate_config

    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config("2gpu")),
        "--main_process_port",
        str(_free_port()),
        "-m",
        "moe_core",
        "train",
        "--run",
        str(run.path),
        "--mask",
        MASK_NAME,
        "--epochs",
        "1",
    ]
    proc = _launch_once(cmd, tmp_path, "train", timeout=600)  # its ranks too are killed if one hangs
    assert proc.returncode == 0, proc.stderr[-3000:]
    trainings = Run.open(run.path).trainings()
    assert list(trainings) == [f"experts-{MASK_NAME}"] and trainings[f"experts-{MASK_NAME}"].get("merged")
    assert proc.stdout.count("merged model ->") == 1  # only rank 0 reports (and writes) the result
