"""Selector scores besides the risk difference (issue 17, item 2): gate_diff from the routing files, grad_attr
and ablation from the model; each ranks experts through ``select --score`` and leaves the model as it was."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from moe_core.analysis.masks import ExpertMask
from moe_core.analysis.scores import (
    ablation_effect,
    batch_samples,
    gate_diff_table,
    gradient_attribution,
    gradient_contrast,
)
from moe_core.cli import main
from moe_core.pipeline import _sft_model_inputs, open_run
from tests.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A tiny OLMoE saved as a local model and analysed on 2 demo batches (generated scope)."""
    tmp = tmp_path_factory.mktemp("scores")
    model, tok = tiny_model("olmoe", seed=3), tiny_tokenizer()
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    root = tmp / "runs"
    argv = ["--runs-root", str(root), "analyze", "--model", str(tmp / "model"), "--demo-sets"]
    argv += ["--batch-size", "8", "--max-batches", "2", "--max-new-tokens", "3", "--name", "s"]
    assert main(argv) == 0
    (run_dir,) = list(root.iterdir())
    return root, run_dir, model, tok


def _gate_diff_by_hand(run, b: int, layer_row: int, expert: int) -> float:
    """The same quantity as gate_diff for one batch and expert, token by token (an independent loop)."""
    by_label, _ = batch_samples(run, b)
    means = {}
    for label, samples in by_label.items():
        total, n = 0.0, 0
        for ids, weights, _ in samples:
            for t in range(ids.shape[1]):
                n += 1
                for slot in range(ids.shape[2]):
                    if int(ids[layer_row, t, slot]) == expert:
                        total += float(weights[layer_row, t, slot])
        means[label] = total / n
    return means["unsafe"] - means["safe"]


def test_gate_diff_is_the_mean_router_weight_difference(analysed) -> None:
    _, run_dir, _, _ = analysed
    run = open_run(run_dir)
    table = gate_diff_table(run)
    assert len(table) == 2 * 8 and set(table.columns) >= {"layer", "expert", "gate_diff", "gate_diff_std"}
    assert table["gate_diff"].abs().max() <= 1.0 and table["gate_diff"].abs().max() > 0
    for layer_row, expert in ((0, 0), (1, 5)):
        layer = run.manifest["provenance"]["model_info"]["moe_layers"][layer_row]
        row = table[(table["layer"] == layer) & (table["expert"] == expert)].iloc[0]
        by_hand = np.mean(
            [_gate_diff_by_hand(run, b, layer_row, expert) for b in sorted(run.completed_batches())]
        )
        assert row["gate_diff"] == pytest.approx(by_hand, abs=1e-6)


def test_select_ranks_by_a_score_and_keeps_it_in_the_run(analysed, capsys) -> None:
    root, run_dir, _, _ = analysed
    common = ["--runs-root", str(root)]
    assert (
        main(common + ["select", "--run", run_dir.name, "--n", "3", "--score", "gate_diff", "--name", "g"])
        == 0
    )
    scores = pd.read_parquet(run_dir / "risk" / "score_gate_diff.parquet")
    top3 = scores.sort_values("gate_diff", ascending=False).head(3)
    mask = ExpertMask.load(run_dir / "masks" / "g.json")
    assert sorted(mask.experts()) == sorted(zip(top3["layer"], top3["expert"]))
    argv = ["select", "--run", run_dir.name, "--per-batch", "--score", "gate_diff", "--name", "pb"]
    assert main(common + argv) == 2
    assert "without --per-batch" in capsys.readouterr().err


def test_model_scores_leave_the_model_as_it_was(analysed) -> None:
    _, run_dir, model, tok = analysed
    run = open_run(run_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    inputs = _sft_model_inputs(run, tok)
    assert len(inputs) == 2 and all("labels" in b for b in inputs)
    with torch.no_grad():
        logits = model(input_ids=inputs[0]["input_ids"]).logits
    grads = gradient_attribution(model, inputs)
    drops = ablation_effect(model, inputs[:1])
    assert len(grads) == len(drops) == 2 * 8
    assert (grads["grad_attr"] >= 0).all() and grads["grad_attr"].max() > 0
    assert drops["ablation"].abs().max() > 0  # switching an expert off moves the refusal log-probability
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():  # no steering hook is left behind
        assert torch.equal(model(input_ids=inputs[0]["input_ids"]).logits, logits)


def test_grad_contrast_is_the_refusal_gradient_share_minus_the_retain_gradient_share(analysed) -> None:
    """The retain side holds only retain examples, one per analysis example of each batch, and the score is
    the difference of the two gradient-norm shares: it ranks experts the refusal loss needs and benign
    answering does not, and ``select --score grad_contrast`` ranks by it."""
    root, run_dir, model, tok = analysed
    run = open_run(run_dir)
    pairs = [(f"benign request {i}", f"a helpful answer number {i}") for i in range(40)]
    refusal, retain = _sft_model_inputs(run, tok), _sft_model_inputs(run, tok, pairs)
    assert [b["input_ids"].shape[0] for b in retain] == [b["input_ids"].shape[0] for b in refusal]
    assert all(
        t in tok.decode(b["input_ids"][0]) for b in retain for t in ("benign request", "helpful answer")
    )
    table = gradient_contrast(model, refusal, retain).set_index(["layer", "expert"])["grad_contrast"]
    r = gradient_attribution(model, refusal).set_index(["layer", "expert"])["grad_attr"]
    k = gradient_attribution(model, retain).set_index(["layer", "expert"])["grad_attr"]
    assert table.to_numpy() == pytest.approx((r / r.sum() - k / k.sum()).to_numpy(), abs=1e-12)
    assert table.sum() == pytest.approx(0.0, abs=1e-9) and table.abs().max() > 0
    argv = ["--runs-root", str(root), "select", "--run", run_dir.name, "--n", "3", "--score", "grad_contrast"]
    assert main([*argv, "--name", "gc"]) == 0
    stored = pd.read_parquet(run_dir / "risk" / "score_grad_contrast.parquet")
    top3 = stored.sort_values("grad_contrast", ascending=False).head(3)
    mask = ExpertMask.load(run_dir / "masks" / "gc.json")
    assert sorted(mask.experts()) == sorted(zip(top3["layer"], top3["expert"]))
