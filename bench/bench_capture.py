"""Benchmark: what routing capture costs in time, and what its files cost on disk.

Measured in one run:

1. Capture overhead = forward time inside ``capture_routing`` / forward time without it, on
   random OLMoE configs (hooks, per-forward stacking and the move to CPU all included). Runs
   alternate (with, without, with, ...) so machine load hits both sides alike; the ratio is
   median(with) / median(without). Configs: the organism (4 layers, 8 experts, top-2, hidden 128)
   and a larger one (8 layers, 64 experts, top-8, hidden 256), each on a batch of 16 x 64 tokens;
   plus greedy generation (prefill + decode steps, where hooks weigh most) on the organism.
2. Bytes per token of a routing file (``save_batch_routing``: uint8 ids + float16 weights +
   int32 token id + uint8 span) and of its ids-only form, against the reference's float16 full
   router logits ``[layers, tokens, experts]`` (``np.save``), for real model dims.

Run::

    .venv/bin/python bench/bench_capture.py              # ~1 minute on 2 shared cores
    .venv/bin/python bench/bench_capture.py --repeats 5 --json /tmp/bench_capture.json   # quicker
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_core.model.adapter import MoEAdapter
from moe_core.model.routing import (
    SampleRouting,
    capture_routing,
    expert_id_dtype,
    save_batch_routing,
)
from moe_core.store.atomic import atomic_write_json

logger = logging.getLogger("bench_capture")


@dataclass(frozen=True)
class ModelDims:
    """Routing dims of one model (for the storage comparison)."""

    name: str  # display name
    layers: int  # MoE layers recorded
    experts: int  # routed experts per layer
    top_k: int  # experts per token


STORAGE_DIMS = [
    ModelDims("OLMoE-1B-7B", 16, 64, 8),
    ModelDims("Mixtral-8x7B", 32, 8, 2),
    ModelDims("Qwen3-30B-A3B", 48, 128, 8),
    ModelDims("organism", 4, 8, 2),
]


@dataclass(frozen=True)
class TimingConfig:
    """A random OLMoE model and the batch it is timed on."""

    name: str  # display name
    layers: int  # decoder layers (all MoE)
    experts: int  # routed experts per layer
    top_k: int  # experts per token
    hidden: int  # hidden size
    intermediate: int  # per-expert intermediate size
    vocab: int = 1024  # vocabulary (only the last position's logits are computed)
    batch: int = 16  # sequences per batch
    seq: int = 64  # tokens per sequence
    repeats: int = 15  # timed runs per side (the median is taken)


TIMING_CONFIGS = [
    TimingConfig("organism", 4, 8, 2, 128, 256, repeats=41),
    TimingConfig("larger", 8, 64, 8, 256, 512, repeats=11),
]


def build_model(c: TimingConfig) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "olmoe",
        hidden_size=c.hidden,
        intermediate_size=c.intermediate,
        num_hidden_layers=c.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=c.experts,
        num_experts_per_tok=c.top_k,
        vocab_size=c.vocab,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def interleaved(
    with_capture: Callable[[], None], without: Callable[[], None], repeats: int
) -> dict[str, float]:
    """Median seconds of each side, timed in ABBA order after one warm-up of each.

    ``ratio`` = median(with) / median(without); ``paired_ratio`` = median of the per-pair ratios
    (each pair ran back to back, so it is the steadier one under a drifting machine load);
    ``min_ratio`` = fastest with / fastest without (the least disturbed run of each side).
    """
    with_capture(), without()
    a: list[float] = []
    b: list[float] = []
    for i in range(repeats):
        order = ((with_capture, a), (without, b)) if i % 2 == 0 else ((without, b), (with_capture, a))
        for fn, out in order:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    ma, mb = statistics.median(a), statistics.median(b)
    return {
        "with_ms": 1e3 * ma,
        "without_ms": 1e3 * mb,
        "ratio": ma / mb,
        "paired_ratio": statistics.median(x / y for x, y in zip(a, b)),
        "min_ratio": min(a) / min(b),
    }


def machinery_us(c: TimingConfig, adapter: MoEAdapter, tokens: int | None = None, reps: int = 200) -> float:
    """Microseconds the capture itself adds to one forward, without the model's noise.

    Enters/leaves ``capture_routing`` and fires every layer's hook on router outputs of the
    forward's real shapes: what a captured forward does beyond the plain one.
    """
    t = tokens or c.batch * c.seq
    out = (torch.randn(t, c.experts), torch.rand(t, c.top_k), torch.randint(0, c.experts, (t, c.top_k)))
    routers = [adapter.router(layer) for layer in adapter.moe_layers]
    t0 = time.perf_counter()
    for _ in range(reps):
        with capture_routing(adapter.model, adapter) as rec:
            for r in routers:
                for hook in r._forward_hooks.values():
                    hook(r, (), out)
    assert len(rec.calls) == 1
    return 1e6 * (time.perf_counter() - t0) / reps


@torch.no_grad()
def time_forward(c: TimingConfig, repeats: int) -> dict[str, float]:
    model = build_model(c)
    adapter = MoEAdapter.for_model(model)
    ids = torch.randint(3, c.vocab, (c.batch, c.seq))
    mask = torch.ones_like(ids)
    mask[: c.batch // 2, : c.seq // 4] = 0  # half the batch left-padded, as in a real analysis batch

    def plain() -> None:
        model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

    def captured() -> None:
        with capture_routing(model, adapter) as rec:
            plain()
        assert rec.calls[0].expert_ids.shape == (c.layers, c.batch * c.seq, c.top_k)

    r = interleaved(captured, plain, repeats)
    r["machinery_us"] = machinery_us(c, adapter)
    r["machinery_fraction"] = r["machinery_us"] / (1e3 * r["without_ms"])
    return r


@torch.no_grad()
def time_generate(c: TimingConfig, new_tokens: int, repeats: int) -> dict[str, float]:
    model = build_model(c)
    adapter = MoEAdapter.for_model(model)
    ids = torch.randint(3, c.vocab, (c.batch, c.seq))
    kw = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )

    def plain() -> None:
        model.generate(**kw)

    def captured() -> None:
        with capture_routing(model, adapter) as rec:
            plain()
        assert len(rec.calls) == new_tokens  # prefill + (new_tokens - 1) decode steps

    r = interleaved(captured, plain, repeats)
    # prefill + one B-token decode step per further new token (each step counted with a context entry: an upper bound)
    r["machinery_us"] = machinery_us(c, adapter) + (new_tokens - 1) * machinery_us(c, adapter, tokens=c.batch)
    r["machinery_fraction"] = r["machinery_us"] / (1e3 * r["without_ms"])
    return r


def storage(d: ModelDims, samples: int, tokens: int, folder: Path) -> dict[str, float]:
    """File bytes per token: our format (with / without weights) vs float16 full logits."""
    rng = np.random.default_rng(0)
    recs = []
    for _ in range(samples):
        ids = np.argsort(rng.random((d.layers, tokens, d.experts)), axis=-1)[..., : d.top_k]
        recs.append(
            SampleRouting(
                ids.astype(expert_id_dtype(d.experts)),
                rng.random((d.layers, tokens, d.top_k)).astype(np.float16),
                rng.integers(0, 50000, tokens).astype(np.int32),
                (np.arange(tokens) >= tokens // 2).astype(np.uint8),
            )
        )
    n = samples * tokens
    ours = (
        save_batch_routing(folder / f"{d.name}.safetensors", recs, list(range(d.layers)), {"batch_idx": 0})
        .stat()
        .st_size
    )
    ids_only = (
        save_batch_routing(
            folder / f"{d.name}.ids.safetensors", recs, list(range(d.layers)), keep_weights=False
        )
        .stat()
        .st_size
    )
    ref_path = folder / f"{d.name}.logits.npy"
    np.save(ref_path, np.zeros((d.layers, n, d.experts), np.float16))
    ref = ref_path.stat().st_size
    for p in folder.iterdir():
        p.unlink()
    return {
        "ours_B_per_token": ours / n,
        "ids_only_B_per_token": ids_only / n,
        "reference_B_per_token": ref / n,
        "ratio": ours / ref,
        "ids_only_ratio": ids_only / ref,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--repeats", type=int, help="timed runs per side for every config (default: per config, 41 / 11)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 keeps timings steadier on a shared box)"
    )
    ap.add_argument(
        "--new-tokens", type=int, default=32, help="tokens generated per sample in the generation timing"
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    results: dict = {"torch": torch.__version__, "threads": args.threads, "timing": {}, "storage": {}}

    logger.info("1) capture overhead (medians of interleaved runs, %d thread(s))", args.threads)
    for c in TIMING_CONFIGS:
        n = args.repeats or c.repeats
        r = time_forward(c, n)
        results["timing"][f"forward/{c.name}"] = {**asdict(c), "repeats": n, **r}
        logger.info(
            "  forward  %-9s L=%d E=%-3d k=%d H=%d %dx%d tokens, %d runs/side: %8.2f ms with, %8.2f ms without, "
            "ratio %.3f (paired %.3f, min %.3f) %s; capture machinery alone %.0f us = %.2f%% of a forward",
            c.name,
            c.layers,
            c.experts,
            c.top_k,
            c.hidden,
            c.batch,
            c.seq,
            n,
            r["with_ms"],
            r["without_ms"],
            r["ratio"],
            r["paired_ratio"],
            r["min_ratio"],
            "target <= 1.05: ok" if r["ratio"] <= 1.05 else "target <= 1.05: MISSED",
            r["machinery_us"],
            100 * r["machinery_fraction"],
        )
    c = TIMING_CONFIGS[0]
    n = max(3, (args.repeats or c.repeats) // 4)
    r = time_generate(c, args.new_tokens, n)
    results["timing"][f"generate/{c.name}"] = {**asdict(c), "new_tokens": args.new_tokens, **r}
    logger.info(
        "  generate %-9s %dx%d prompt + %d new tokens, %d runs/side: %8.2f ms with, %8.2f ms without, "
        "ratio %.3f (paired %.3f, min %.3f); capture machinery alone %.0f us = %.2f%%",
        c.name,
        c.batch,
        c.seq,
        args.new_tokens,
        n,
        r["with_ms"],
        r["without_ms"],
        r["ratio"],
        r["paired_ratio"],
        r["min_ratio"],
        r["machinery_us"],
        100 * r["machinery_fraction"],
    )

    logger.info(
        "2) bytes per token: routing file vs reference fp16 full router logits [layers, tokens, experts]"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for d in STORAGE_DIMS:
            s = storage(d, samples=16, tokens=128, folder=Path(tmp))
            results["storage"][d.name] = {**asdict(d), **s}
            logger.info(
                "  %-14s L=%-2d E=%-3d k=%d: ours %7.1f B/tok (ids only %6.1f), reference %7.1f B/tok -> "
                "ratio %.3f (ids only %.3f) %s",
                d.name,
                d.layers,
                d.experts,
                d.top_k,
                s["ours_B_per_token"],
                s["ids_only_B_per_token"],
                s["reference_B_per_token"],
                s["ratio"],
                s["ids_only_ratio"],
                "<= 1/5"
                if s["ratio"] <= 0.2
                else ("> 1/5 (ids only <= 1/5)" if s["ids_only_ratio"] <= 0.2 else "> 1/5"),
            )
    if args.json:
        atomic_write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
