"""Build small, real, finished runs on disk for the app tests (AppTest and the headless browser).

Everything is produced by the real pipeline on a tiny random OLMoE saved to a folder (so the
app and CLI jobs can load it by path): a composed BatchPlan, ``run_analysis`` (routing, judged
answers, risk tables), an expert mask from ``select_experts`` and a short expert-only training
run (``train_experts``). Seconds on a CPU.

    model_dir = save_tiny_model(tmp / "tiny-olmoe")
    run = build_finished_run(tmp / "runs", model_dir, n_batches=3, train=True)
"""

from __future__ import annotations

from pathlib import Path

from moe_core.analysis.analyse import AnalysisConfig, load_batch_data_list, run_analysis
from moe_core.analysis.selection import SelectionConfig, select_experts
from moe_core.batching.batches import compose_batches
from moe_core.batching.demo_prompts import demo_sets
from moe_core.store.files import read_parquet
from moe_core.store.run import Run
from tests.tiny import tiny_model, tiny_tokenizer

BATCH_SIZE = 8
MASK_NAME = "unsafe_experts"


def save_tiny_model(path: Path, family: str = "olmoe", seed: int = 1) -> Path:
    """A tiny random MoE model + tokenizer as a loadable model folder (config.json, weights, tokenizer)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    model, tok = tiny_model(family, seed=seed), tiny_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_dense_model(path: Path) -> Path:
    """A tiny *dense* (non-MoE) Llama folder: the app must refuse it with a clear message."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def compose_plan(n_batches: int, seed: int = 0):
    """A paired demo plan (plain goal vs jailbroken goal) cut to ``n_batches`` batches of 8."""
    from dataclasses import replace

    safe, unsafe = demo_sets("train", mode="paired", seed=seed)
    plan = compose_batches(safe, unsafe, batch_size=BATCH_SIZE, safe_ratio=0.5, seed=seed)
    return replace(plan, batches=plan.batches[:n_batches])


def build_finished_run(
    root: Path,
    model_dir: Path,
    n_batches: int = 3,
    train: bool = True,
    name: str = "fixture",
    max_new_tokens: int = 6,
    evaluate: bool = False,
    seed: int = 0,
) -> Run:
    """A run with plan, analysis (every batch), a saved mask; with ``train`` one expert-only training
    (merged model kept), with ``evaluate`` also a small base-vs-trained evaluation in eval/."""
    from moe_core.model.adapter import load_model

    model, tok = load_model(model_dir, device="cpu")
    run = Run.create(root, name=name, config={"created_by": "tests"}, model=str(model_dir))
    plan = compose_plan(n_batches, seed=seed)
    run_analysis(run, model, tok, plan, AnalysisConfig(scope="generated", max_new_tokens=max_new_tokens))
    agg = read_parquet(run.path_for("risk_aggregated"))
    n_layers = model.config.num_hidden_layers
    mask = select_experts(agg, SelectionConfig(method="top_n", n=4), n_layers, int(agg["expert"].max()) + 1)
    mask.save(run.path_for("mask", name=MASK_NAME))
    if train:
        out = train_fixture(run, model, tok)
        if evaluate:
            evaluate_fixture(run, model_dir, out / "merged_model")
    return Run.open(run.path)


def train_fixture(run: Run, model, tok, epochs: int = 1) -> Path:
    """A real expert-only training of the saved mask (one epoch) into ``train/experts-<mask>``, recorded
    in the manifest as the CLI does (step ``train:<name>`` with the merged model's path)."""
    from moe_core.analysis.masks import ExpertMask
    from moe_core.train.config import ExpertMaskingConfig
    from moe_core.train.sampler import BatchPreservingSampler
    from moe_core.train.sft import (
        create_batch_aware_dataset,
        create_batch_structured_dataset,
    )
    from moe_core.train.training import train_experts

    name = f"experts-{MASK_NAME}"
    out = run.path_for("train", name=name)
    batches = create_batch_structured_dataset(
        load_batch_data_list(run), refusal_target="I cannot help with that."
    )
    ds = create_batch_aware_dataset(batches, tok, max_length=512)
    cfg = ExpertMaskingConfig(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=BatchPreservingSampler(ds).max_batch_size,
        num_train_epochs=epochs,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    result = train_experts(
        model,
        tok,
        ds,
        ExpertMask.load(run.path_for("mask", name=MASK_NAME)),
        cfg,
        out,
        save_merged_model=True,
    )
    run.set_step(f"train:{name}", "done", merged=str(result.merged_path), mask=MASK_NAME, baseline="experts")
    return out


def evaluate_fixture(run: Run, base_dir: Path, trained_dir: Path, limit: int = 3) -> None:
    """A small real comparison (base vs trained) on the held-out demo sets, saved in eval/."""
    from moe_core.eval.evaluation import (
        EvalEntry,
        compare_models,
        default_eval_sets,
        save_evaluation,
    )

    sets = default_eval_sets("heldout", limit=limit)
    responses, summary = compare_models(
        [EvalEntry("base", str(base_dir)), EvalEntry("experts", str(trained_dir))],
        sets,
        max_new_tokens=4,
        device="cpu",
    )
    save_evaluation(run, responses, summary, name="comparison")


def build_risk_only_run(
    root: Path,
    n_batches: int = 100,
    num_layers: int = 16,
    num_experts: int = 64,
    top_k: int = 8,
    tokens: int = 400,
    seed: int = 0,
) -> Run:
    """A run with only risk tables, OLMoE-sized by default (100 batches x 16 layers x 64 experts).

    The tables come from the real ``risk.risk_table`` on random distinct top-k ids (unsafe tokens
    biased towards a few experts), so the heatmap pages can be exercised at full size in seconds.
    """
    import numpy as np
    import pandas as pd

    from moe_core.analysis.risk import aggregate_batch_risk_diffs, risk_table
    from moe_core.store.files import write_parquet

    rng = np.random.default_rng(seed)
    run = Run.create(root, name=f"risk only {n_batches}")

    def ids(bias: bool) -> np.ndarray:
        logits = rng.random((num_layers, tokens, num_experts))
        if bias:
            logits[:, :, :3] += 0.3  # experts 0-2 of every layer fire more on unsafe tokens
        return np.argsort(-logits, axis=-1)[..., :top_k].astype(np.uint8)

    tables = [risk_table(b, ids(False), ids(True), num_experts) for b in range(n_batches)]
    write_parquet(run.path_for("risk_per_batch"), pd.concat(tables, ignore_index=True))
    write_parquet(run.path_for("risk_aggregated"), aggregate_batch_risk_diffs(tables))
    run.set_step(
        "analysis",
        "done",
        model_info={
            "num_layers": num_layers,
            "num_experts": num_experts,
            "top_k": top_k,
            "moe_layers": list(range(num_layers)),
        },
        batches=n_batches,
    )
    return Run.open(run.path)
