"""Benchmark: generated tokens per second, vLLM (a `vllm serve` process) vs HF ``generate``, same prompts.

Measured in one run on the organism with the demo batch plan's prompts (chat-templated, greedy,
cut at EOS): HF generates analysis batch by batch (left-padded, as the analysis does); vLLM gets
the same batches as one request each, and then all prompts in one request (its continuous
batching at work). Rounds alternate (HF, vLLM, HF, ...) so machine load hits both alike; the
figure is the median round. Also checks that both produced the same token ids.

The server is started (or reused) from ./.venv-vllm; its start-up time is reported, not counted.

    .venv/bin/python bench/bench_generation.py                    # ~3 minutes on 2 shared cores
    .venv/bin/python bench/bench_generation.py --batches 2 --repeats 1 --json /tmp/bench_generation.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_core import pipeline as P
from moe_core.errors import MoELabError
from moe_core.model.backends import VLLMGenerator
from moe_core.model.generation import generate_batch
from moe_core.model.loading import ORGANISM, load_any_model, model_dir
from moe_core.model.vllm_server import ServerSettings, VLLMEnvMissing, acquire, release


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--batches", type=int, default=4, help="analysis batches of the demo plan (16 prompts each)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for HF generate (vLLM's CPU server runs its model on 1 by default)",
    )
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    model, tok = load_any_model(ORGANISM)
    plan = P.compose(P.AnalyseSpec(demo_sets=True, max_batches=args.batches))
    batches = [[it.messages(None) for it in b.items] for b in plan.batches]
    every = [m for b in batches for m in b]
    t0 = time.perf_counter()
    try:
        server = acquire(ServerSettings(model_dir(ORGANISM)))
    except VLLMEnvMissing as e:  # `make bench` runs every benchmark; this one needs `make vllm` first
        print(f"skipped: {e}")
        return 0
    except MoELabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start_s = time.perf_counter() - t0
    gen = VLLMGenerator(server)
    try:
        hf_gen = lambda: [g for b in batches for g in generate_batch(model, tok, b, args.max_new_tokens)]  # noqa: E731
        vl_batches = lambda: [
            g for b in batches for g in generate_batch(model, tok, b, args.max_new_tokens, gen)
        ]  # noqa: E731
        vl_all = lambda: generate_batch(model, tok, every, args.max_new_tokens, gen)  # noqa: E731
        (
            generate_batch(model, tok, batches[0][:2], 4),
            generate_batch(model, tok, batches[0][:2], 4, gen),
        )  # warm-up
        times: dict[str, list[float]] = {"hf": [], "vllm_per_batch": [], "vllm_all": []}
        outs = {}
        for _ in range(args.repeats):
            for name, fn in (("hf", hf_gen), ("vllm_per_batch", vl_batches), ("vllm_all", vl_all)):
                dt, outs[name] = timed(fn)
                times[name].append(dt)
    finally:
        release(server)
    tokens = {k: sum(len(g.new_ids) for g in v) for k, v in outs.items()}
    same = sum(a.new_ids == b.new_ids for a, b in zip(outs["hf"], outs["vllm_all"]))
    tps = {k: tokens[k] / statistics.median(v) for k, v in times.items()}
    res = {
        "prompts": len(every),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "generated_tokens": tokens["hf"],
        "identical_answers": f"{same}/{len(every)}",
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "seconds_per_round": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "ratio_vllm_per_batch_over_hf": round(tps["vllm_per_batch"] / tps["hf"], 2),
        "ratio_vllm_all_over_hf": round(tps["vllm_all"] / tps["hf"], 2),
        "vllm_server_start_s": round(start_s, 1),
        "hf_torch_threads": torch.get_num_threads(),
        "machine": f"{torch.get_num_threads()} torch threads, cuda={torch.cuda.is_available()}",
    }
    print(json.dumps(res, indent=2))
    print(
        f"vLLM / HF generate: {res['ratio_vllm_per_batch_over_hf']}x per analysis batch, "
        f"{res['ratio_vllm_all_over_hf']}x with all {len(every)} prompts in one request "
        f"({same}/{len(every)} answers identical)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
