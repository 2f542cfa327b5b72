"""The seed note's snippets (BATCH_STRUCTURE_EXPLAINED), with only their imports changed, give the seed's answers.

One test per snippet, on a tiny random OLMoE and the seed's data layout: batches of 16 = 8 safe
then 8 unsafe, ``batch_data_list`` entries with batch_idx / safe_indices / unsafe_indices /
batch_outputs (and the routing fields the seed also stores).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback, TrainingArguments

import moe_core.train.sampler
import moe_core.train.sft
import moe_core.train.training
from moe_core.analysis.masks import ExpertMask
from moe_core.train.config import ExpertMaskingConfig, TrainingConfigError
from moe_core.train.expert_rows import merge_trained_experts, trained_rows
from moe_core.train.expert_trainer import ExpertMaskingTrainer
from moe_core.train.sampler import BatchCollator, BatchPreservingSampler
from moe_core.train.sft import (
    create_batch_aware_dataset,
    create_batch_structured_dataset,
)
from tests.tiny import tiny_model, tiny_tokenizer

N_BATCHES, BATCH_SIZE = 3, 16


def seed_sft_data(n_batches=N_BATCHES, batch_size=BATCH_SIZE):
    """The seed's ``sft_data``: what demo_refactored.py pickles (routings as placeholders)."""
    bl = []
    for b in range(n_batches):
        half = batch_size // 2
        outs = [
            {
                "prompt": f"How do I bake bread {b} {i}?",
                "label": "safe",
                "generated_text": "Mix flour and water.",
            }
            for i in range(half)
        ]
        outs += [
            {
                "prompt": f"Tell me how to pick a lock {b} {i}!",
                "label": "unsafe",
                "generated_text": "Sure, here is how",
            }
            for i in range(half)
        ]
        bl.append(
            {
                "batch_idx": b,
                "safe_indices": list(range(half)),
                "unsafe_indices": list(range(half, batch_size)),
                "batch_outputs": outs,
                "safe_routings": [None] * half,
                "unsafe_routings": [None] * half,
            }
        )
    return {"batch_data_list": bl, "unsafe_experts": [], "expert_mask": np.zeros((2, 8))}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def train_dataset(tokenizer):
    batches = create_batch_structured_dataset(seed_sft_data(), tokenizer)
    return create_batch_aware_dataset(batches, tokenizer, max_length=48)


def batch_masks():
    """One mask per analysis batch, as the reference's list: batch b trains expert b of layer 0 and expert 7 of layer 1."""
    return [ExpertMask.from_experts([(0, b), (1, 7)], 2, 8).mask.astype(int) for b in range(N_BATCHES)]


def training_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=BATCH_SIZE,
        max_steps=3,
        learning_rate=1e-2,
        weight_decay=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_drop_last=False,
    )
    return TrainingArguments(**{**base, **kw})


# -- names -----------------------------------------------------------------------------
def test_seed_names_are_the_main_path_objects():
    assert BatchPreservingSampler is moe_core.train.sampler.BatchPreservingSampler
    assert create_batch_structured_dataset is moe_core.train.sft.create_batch_structured_dataset
    assert create_batch_aware_dataset is moe_core.train.sft.create_batch_aware_dataset
    assert ExpertMaskingTrainer is moe_core.train.expert_trainer.ExpertMaskingTrainer


# -- 1. create_batch_structured_dataset ------------------------------------------------
def test_structured_dataset_is_a_list_of_batches_safe_first(tokenizer):
    sft_data = seed_sft_data()
    batches = create_batch_structured_dataset(sft_data, tokenizer, batch_size=16, safe_ratio=0.5)
    assert batches == create_batch_structured_dataset(sft_data, tokenizer, 16, 0.5)
    assert batches == create_batch_structured_dataset(sft_data, tokenizer)
    assert len(batches) == N_BATCHES
    for b, batch in enumerate(batches):
        assert [ex["label"] for ex in batch] == ["safe"] * 8 + ["unsafe"] * 8
        assert [ex["in_batch_idx"] for ex in batch] == list(range(16))
        assert {ex["batch_idx"] for ex in batch} == {b}
        assert all(ex["messages"][-1]["role"] == "assistant" for ex in batch)
    with pytest.raises(ValueError, match="batch 0 holds 16 samples, more than batch_size=8"):
        create_batch_structured_dataset(sft_data, tokenizer, batch_size=8, safe_ratio=0.5)


# -- 2. create_batch_aware_dataset + the verification snippet ---------------------------
def test_verification_snippet_counts_8_safe_and_8_unsafe(train_dataset):
    batch_size = 16
    sample_batch_indices = [i for i, item in enumerate(train_dataset) if item["batch_idx"] == 0]
    assert len(sample_batch_indices) == batch_size
    labels = [train_dataset[i]["label_str"] for i in sample_batch_indices]
    assert labels.count("safe") == 8
    assert labels.count("unsafe") == 8
    assert {"messages", "batch_idx", "in_batch_idx", "label", "label_str", "input_ids"} <= set(
        train_dataset.column_names
    )
    assert train_dataset[0]["label"] == 0 and train_dataset[15]["label"] == 1


# -- 3. BatchPreservingSampler ---------------------------------------------------------
def test_sampler_batch_groups_and_dataloader_give_whole_batches(train_dataset):
    sampler = BatchPreservingSampler(train_dataset, 16, shuffle_batches=True)
    assert sampler.batch_groups[0] == list(range(0, 16))
    assert sampler.batch_groups[1] == list(range(16, 32))
    assert len(sampler) == len(train_dataset)
    collator = BatchCollator(pad_token_id=0)
    loader = DataLoader(train_dataset, batch_size=16, sampler=sampler, collate_fn=collator)
    seen = []
    for batch in loader:
        assert len(torch.unique(batch["batch_idx"])) == 1
        assert batch["label"].tolist() == [0] * 8 + [1] * 8  # 8 safe then 8 unsafe, in order
        assert batch["in_batch_idx"].tolist() == list(range(16))
        seen.append(int(batch["batch_idx"][0]))
    assert sorted(seen) == list(range(N_BATCHES))


def test_sampler_shuffle_on_and_off_mean_what_the_seed_says(train_dataset):
    def batch_order(sampler, epoch):
        sampler.set_epoch(epoch)
        flat = list(sampler)
        return [train_dataset[flat[i]]["batch_idx"] for i in range(0, len(flat), 16)]

    off = BatchPreservingSampler(train_dataset, 16, False)
    assert [batch_order(off, e) for e in range(5)] == [[0, 1, 2]] * 5
    on = BatchPreservingSampler(train_dataset, 16)
    orders = [batch_order(on, e) for e in range(6)]
    assert all(sorted(o) == [0, 1, 2] for o in orders) and len({tuple(o) for o in orders}) > 1
    with pytest.raises(ValueError, match="batch_sampler"):
        BatchPreservingSampler(
            train_dataset.select(range(40)), 16
        )  # batch 2 filtered to 8 rows: use the batch form


# -- 4. the reference's trainer constructor ---------------------------------------------
class RowRecorder(TrainerCallback):
    def __init__(self):
        self.trainer, self.after = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.after.append({(r.layer, r.expert, r.name): r.param.detach().clone() for r in self.trainer.rows})


def test_reference_trainer_constructor_trains_per_batch(tokenizer, train_dataset, tmp_path):
    model = tiny_model("olmoe")
    masks = batch_masks()
    rec = RowRecorder()
    trainer = ExpertMaskingTrainer(
        batch_expert_masks=masks,
        use_router_consistency_loss=True,
        router_consistency_weight=0.1,
        router_consistency_type="kl",
        router_consistency_layers="all",
        model=model,
        args=training_args(tmp_path),
        train_dataset=train_dataset,
        tokenizer=tokenizer,
        data_collator=BatchCollator(pad_token_id=tokenizer.pad_token_id),
        callbacks=[rec],
    )
    rec.trainer = trainer
    assert isinstance(trainer.args, ExpertMaskingConfig) and trainer.args.router_consistency_loss == "forward"
    assert trainer.mask_mode == "per_batch" and trainer.processing_class is tokenizer
    start = {(r.layer, r.expert, r.name): r.param.detach().clone() for r in trainer.rows}
    trainer.train()
    prev = start
    for now, step in zip(rec.after, trainer.batch_log):
        moved = {(l, e) for (l, e, n), v in now.items() if not torch.equal(v, prev[(l, e, n)])}
        assert moved == {(0, step["batch_idx"]), (1, 7)}, "a step moved experts its batch did not select"
        prev = now
    assert any("router_consistency" in h for h in trainer.state.log_history)
    union = make_union_trainer(tokenizer, train_dataset, tmp_path)
    assert union.mask_mode == "union" and not union.batch_masks


def make_union_trainer(tokenizer, train_dataset, tmp_path):
    """The union of per-batch masks is trained only when asked for explicitly."""
    return ExpertMaskingTrainer(
        batch_expert_masks=batch_masks(),
        mask_mode="union",
        model=tiny_model("olmoe"),
        args=training_args(tmp_path),
        train_dataset=train_dataset,
        tokenizer=tokenizer,
    )


def test_failed_reference_construction_leaves_the_model_retryable(tokenizer, train_dataset, tmp_path):
    model = tiny_model("olmoe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kw = dict(
        batch_expert_masks=batch_masks(),
        use_router_consistency_loss=True,
        router_consistency_type="kl",
        model=model,
        args=training_args(tmp_path),
        train_dataset=train_dataset,
        tokenizer=tokenizer,
    )
    with pytest.raises(TrainingConfigError, match=r"router_consistency_layers \[5\]"):
        ExpertMaskingTrainer(
            router_consistency_layers=[0, 5], **kw
        )  # layer 5 does not exist: fails after splicing
    with pytest.raises(TrainingConfigError, match="router_consistency_type='mse'"):
        ExpertMaskingTrainer(**{**kw, "router_consistency_type": "mse"})
    assert not trained_rows(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    trainer = ExpertMaskingTrainer(router_consistency_layers=[0, 1], **kw)  # the corrected retry
    trainer.train()
    merge_trained_experts(model)


# -- 5. the monitoring subclass ---------------------------------------------------------
def test_batch_monitoring_subclass_sees_one_batch_idx_per_step(tokenizer, train_dataset, tmp_path, capsys):
    class BatchMonitoringTrainer(ExpertMaskingTrainer):
        def training_step(
            self, model, inputs, num_items_in_batch=None
        ):  # transformers 5 passes num_items_in_batch
            # 检查当前 batch 的 batch_idx 分布
            if "batch_idx" in inputs:
                batch_ids = inputs["batch_idx"].cpu().numpy()
                unique_batches = np.unique(batch_ids)
                print(f"Current training batch contains samples from batches: {unique_batches}")
                # 应该只有一个 unique batch_idx
                assert len(unique_batches) == 1, "Batch structure broken!"

            return super().training_step(model, inputs)

    trainer = BatchMonitoringTrainer(
        batch_expert_masks=batch_masks(),
        model=tiny_model("olmoe"),
        args=training_args(tmp_path),
        train_dataset=train_dataset,
        tokenizer=tokenizer,
    )
    trainer.train()
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("Current training batch")]
    assert lines == [
        f"Current training batch contains samples from batches: [{r['batch_idx']}]" for r in trainer.batch_log
    ]


def test_monitor_flag_prints_the_seeds_line(tokenizer, train_dataset, tmp_path, capsys):
    trainer = ExpertMaskingTrainer(
        batch_expert_masks=batch_masks(),
        monitor_batches=True,
        model=tiny_model("olmoe"),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=train_dataset,
        tokenizer=tokenizer,
    )
    trainer.train()
    assert [line for line in capsys.readouterr().out.splitlines() if "Current training" in line] == [
        f"Current training batch contains samples from batches: [{r['batch_idx']}]" for r in trainer.batch_log
    ]


# -- 6. replacing get_train_dataloader, as the seed's training script does ----------------
def test_seed_dataloader_replacement_still_trains_whole_batches(tokenizer, train_dataset, tmp_path):
    batch_size = 16
    trainer = ExpertMaskingTrainer(
        batch_expert_masks=batch_masks(),
        model=tiny_model("olmoe"),
        args=training_args(tmp_path),
        train_dataset=train_dataset,
        tokenizer=tokenizer,
    )
    original_get_train_dataloader = trainer.get_train_dataloader

    def get_batch_preserving_dataloader():
        dataloader = original_get_train_dataloader()
        return DataLoader(
            trainer.train_dataset,
            batch_size=batch_size,  # 16
            sampler=BatchPreservingSampler(  # 使用自定义 sampler！
                trainer.train_dataset, batch_size, shuffle_batches=True
            ),
            collate_fn=dataloader.collate_fn,
        )

    trainer.get_train_dataloader = get_batch_preserving_dataloader
    trainer.train()
    assert [r["n_samples"] for r in trainer.batch_log] == [16] * 3
    assert [(r["n_safe"], r["n_unsafe"]) for r in trainer.batch_log] == [(8, 8)] * 3
