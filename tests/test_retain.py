"""Retain examples (issue 17, item 3): benign requests with the model's own answers join each analysis batch as
a third group, so training also says where to keep answering, without breaking the batch's structure."""

from __future__ import annotations

import json

import pytest
import torch

from moe_core.cli import main
from moe_core.train.batch_trainer import router_consistency_loss
from moe_core.train.sampler import AnalysisBatchSampler, BatchCollator
from moe_core.train.sft import (
    SFTDataError,
    add_retain_examples,
    create_batch_aware_dataset,
    create_batch_structured_dataset,
)
from tests.test_training import sft_data
from tests.tiny import tiny_model, tiny_tokenizer

RETAIN = [
    ("How do I bake a cake?", "Mix flour and eggs, then bake."),
    ("Write a haiku.", "Snow falls on the pond."),
]


def test_retain_rows_follow_each_batch_and_keep_its_structure():
    batches = create_batch_structured_dataset(sft_data((4, 4, 2)))
    mixed = add_retain_examples(batches, RETAIN, share=0.5, seed=1)
    for before, after in zip(batches, mixed):
        assert after[: len(before)] == before  # safe and unsafe rows untouched, in order
        extra = after[len(before) :]
        assert len(extra) == round(0.5 * len(before)) and {ex["label"] for ex in extra} == {"retain"}
        assert [ex["in_batch_idx"] for ex in after] == list(range(len(after)))
        assert {ex["batch_idx"] for ex in after} == {before[0]["batch_idx"]}
    assert add_retain_examples(batches, RETAIN, share=0.5, seed=1) == mixed  # seeded
    with pytest.raises(SFTDataError, match="needs retain examples"):
        add_retain_examples(batches, [], share=0.25)
    tok = tiny_tokenizer()
    ds = create_batch_aware_dataset(mixed, tok, max_length=48)
    sampler = AnalysisBatchSampler(ds, shuffle_batches=False)
    assert [len(b) for b in sampler] == [len(b) for b in mixed]  # still one training batch per analysis batch
    labels = BatchCollator(pad_token_id=tok.pad_token_id)([ds[i] for i in next(iter(sampler))])["label"]
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_retain_rows_stay_out_of_the_router_consistency_loss():
    torch.manual_seed(0)
    logits = [torch.randn(3 * 5, 8)]  # 3 samples x 5 tokens
    mask = torch.ones(3, 5, dtype=torch.long)
    with_retain = router_consistency_loss(logits, mask, torch.tensor([0, 1, 2]), "forward")
    without = router_consistency_loss([logits[0][:10]], mask[:2], torch.tensor([0, 1]), "forward")
    assert torch.allclose(with_retain, without)


def test_train_with_a_retain_share_from_the_command_line(tmp_path):
    model, tok = tiny_model("olmoe", seed=1), tiny_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    common = ["--runs-root", str(tmp_path / "runs")]
    argv = [
        "analyze",
        "--model",
        str(tmp_path / "model"),
        "--demo-sets",
        "--batch-size",
        "8",
        "--max-batches",
        "2",
    ]
    assert main(common + argv + ["--max-new-tokens", "2", "--name", "r"]) == 0
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert main(common + ["select", "--run", run_dir.name, "--n", "2"]) == 0
    argv = ["train", "--run", run_dir.name, "--epochs", "1", "--retain-share", "0.5", "--name", "retained"]
    assert main(common + argv) == 0
    log = json.loads((run_dir / "train" / "retained" / "training_metadata.json").read_text())["batch_monitor"]
    assert [row["n_retain"] for row in log] == [4, 4] and all(
        row["n_safe"] + row["n_unsafe"] == 8 for row in log
    )
    assert (
        main(common + ["train", "--run", run_dir.name, "--retain-share", "9"]) == 2
    )  # refused at parse time
