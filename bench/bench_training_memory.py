"""Memory and speed of expert-masked training versus the naive union freeze and full fine-tuning.

    .venv/bin/python bench/bench_training_memory.py            # ~1-2 min on 2 CPU cores
    .venv/bin/python bench/bench_training_memory.py --layers 4 --steps 3   # quicker

One random OLMoE config (default 8 layers x 32 experts, hidden 256, expert width 256, fp32),
the same 8 chosen experts, the same token batches, AdamW (weight decay 0.1), three ways:

* ``expert_masked``: moe_core.train.training (frozen fused tensors, one trainable row copy per chosen
  expert, only those in the optimizer);
* ``union_freeze``: the naive way: the fused expert tensors of the chosen layers trainable,
  gradients of unselected rows zeroed before each step (AdamW state for whole tensors, and
  weight decay still moves the "frozen" rows, which the bench counts);
* ``full``: every parameter trainable.

Each method runs in a fresh subprocess. Reported per method: trainable parameters, optimizer
state bytes (exact: the tensors in ``optimizer.state``), gradient bytes after backward, peak
RSS growth over the loaded model (``ru_maxrss`` high-water mark minus the RSS before the first
step: it includes activations, gradients, optimizer state and the spliced copy of the fused
tensors the parametrization builds in each forward), median step time after one warm-up step,
and how many unselected expert rows moved. Ratios are relative to ``expert_masked``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_training_memory")
METHODS = ("expert_masked", "union_freeze", "full")


def rss_bytes() -> int:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def build(args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "olmoe",
        hidden_size=args.hidden,
        intermediate_size=args.expert_width,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        vocab_size=1024,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, 1024, (args.batch, args.seq), generator=g) for _ in range(args.steps + 1)]
    return model, batches


def chosen_experts(args) -> list[tuple[int, int]]:
    """The same selection for every method: ``args.n_experts`` experts spread over the layers."""
    return [(i % args.layers, (7 * i + 3) % args.experts) for i in range(args.n_experts)]


def run_method(method: str, args) -> dict:
    import torch

    from moe_core.analysis.masks import ExpertMask
    from moe_core.model.adapter import MoEAdapter
    from moe_core.train.expert_rows import (
        install_expert_rows,
        merge_trained_experts,
        optimizer_state_bytes,
    )

    torch.set_num_threads(args.threads)
    model, batches = build(args)
    model.train()
    ad = MoEAdapter.for_model(model)
    pairs = chosen_experts(args)
    mask = ExpertMask.from_experts(pairs, ad.num_layers, ad.num_experts)
    fused = {(l, n): p for l in ad.moe_layers for n, p in ad.expert_parameters(l).items()}
    before = {k: p.detach().clone() for k, p in fused.items()}
    for p in model.parameters():
        p.requires_grad_(method == "full")
    zero_rows = {}
    if method == "expert_masked":
        params = [r.param for r in install_expert_rows(model, mask, ad)]
    elif method == "union_freeze":
        params = []
        for layer, experts in mask.by_layer().items():
            keep = torch.zeros(ad.num_experts, dtype=torch.bool)
            keep[experts] = True
            for p in ad.expert_parameters(layer).values():
                p.requires_grad_(True)
                params.append(p)
                zero_rows[p] = ~keep
    else:
        params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    base_rss = rss_bytes()
    times, grad_bytes = [], 0
    from torch.nn.utils import parametrize

    for i, ids in enumerate(batches):
        t0 = time.perf_counter()
        with parametrize.cached():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p, rows in zero_rows.items():
            p.grad[rows] = 0  # the naive "freeze"
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # first step is warm-up
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if method == "expert_masked":
        merge_trained_experts(model)
    chosen = set(pairs)
    moved_frozen = sum(
        1
        for (l, n), p in fused.items()
        for e in range(p.shape[0])
        if (l, e) not in chosen and not torch.equal(p[e], before[(l, n)][e])
    )
    return {
        "method": method,
        "trainable_params": int(sum(p.numel() for p in params)),
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "grad_bytes": int(grad_bytes),
        "peak_rss_growth_bytes": int(max(0, peak - base_rss)),
        "step_s_median": statistics.median(times) if times else float("nan"),
        "unselected_rows_moved": moved_frozen,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (all MoE)")
    ap.add_argument("--experts", type=int, default=32, help="experts per layer")
    ap.add_argument("--top-k", type=int, default=4, help="experts per token")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size")
    ap.add_argument("--expert-width", type=int, default=256, help="intermediate size of one expert")
    ap.add_argument("--n-experts", type=int, default=8, help="experts to train (spread over layers)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (shared machine)")
    ap.add_argument(
        "--method", choices=METHODS, help=argparse.SUPPRESS
    )  # internal: one subprocess per method
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.method:
        print(json.dumps(run_method(args.method, args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--json")]
    if "--json" in sys.argv:
        i = sys.argv.index("--json")
        passthrough = sys.argv[1:i] + sys.argv[i + 2 :]
    results = []
    for m in METHODS:
        cmd = [sys.executable, __file__, *passthrough, "--method", m]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        log.info("%s done", m)
    ref = results[0]
    mb = 1 / 2**20
    log.info(
        "OLMoE %d layers x %d experts (top-%d), hidden %d, expert width %d; %d experts trained; "
        "batch %dx%d; %d steps",
        args.layers,
        args.experts,
        args.top_k,
        args.hidden,
        args.expert_width,
        args.n_experts,
        args.batch,
        args.seq,
        args.steps,
    )
    log.info(
        "%-14s %12s %10s %9s %11s %9s %9s %8s %7s",
        "method",
        "trainable",
        "optim MB",
        "x optim",
        "peakRSS+MB",
        "x peak",
        "step ms",
        "x step",
        "moved*",
    )
    for r in results:
        log.info(
            "%-14s %12d %10.1f %9.1f %11.1f %9.2f %9.1f %8.2f %7d",
            r["method"],
            r["trainable_params"],
            r["optimizer_state_bytes"] * mb,
            r["optimizer_state_bytes"] / max(ref["optimizer_state_bytes"], 1),
            r["peak_rss_growth_bytes"] * mb,
            r["peak_rss_growth_bytes"] / max(ref["peak_rss_growth_bytes"], 1),
            r["step_s_median"] * 1e3,
            r["step_s_median"] / ref["step_s_median"],
            r["unselected_rows_moved"],
        )
    log.info(
        "* unselected expert rows (of all fused tensors) that changed: must be 0 for expert_masked; "
        "union_freeze moves them through AdamW weight decay; full trains them on purpose"
    )
    if args.json:
        from moe_core.store.atomic import atomic_write_json

        atomic_write_json(args.json, {"args": vars(args) | {"json": str(args.json)}, "results": results})


if __name__ == "__main__":
    main()
