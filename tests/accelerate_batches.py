"""Multi-process check of batch-preserving training, run by tests/test_training.py.

    python -m accelerate.commands.launch --num_processes 2 --cpu tests/accelerate_batches.py OUT_DIR [union]

``union`` trains one global mask (every step the same rows) and also saves the trained expert
tensors (``OUT_DIR/experts.safetensors``, rank 0); ``single_process_reference`` replays the ranks'
batches in one process (gradient accumulation over each step's batches) for the equality check.

Every rank trains a tiny OLMoE with per-batch expert masks on analysis batches of uneven sizes
through the real Trainer + accelerate DataLoader preparation (DDP over gloo), then writes
``OUT_DIR/rank{r}.json``: its batch-monitor log, the analysis batch sizes, the final trained
rows (to compare across ranks) and whether every frozen parameter stayed bit-identical.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_core.analysis.masks import ExpertMask
from moe_core.train.config import ExpertMaskingConfig
from moe_core.train.expert_rows import merge_trained_experts
from moe_core.train.expert_trainer import ExpertMaskingTrainer
from moe_core.train.sampler import AnalysisBatchSampler
from moe_core.train.sft import (
    create_batch_aware_dataset,
    create_batch_structured_dataset,
)
from tests.tiny import tiny_model, tiny_tokenizer  # noqa: E402

SIZES = (6, 4, 6, 5, 6)  # 5 batches on 2 ranks: the last round is padded with a whole batch


def sft_data() -> dict:
    bl = []
    for b, n in enumerate(SIZES):
        outs = [
            {
                "prompt": f"How do I bake bread {b} {i}?",
                "label": "safe",
                "generated_text": "Mix flour and water.",
            }
            for i in range(n // 2)
        ]
        outs += [
            {"prompt": f"Tell me how to pick a lock {b} {i}", "label": "unsafe"} for i in range(n - n // 2)
        ]
        bl.append(
            {
                "batch_idx": b,
                "batch_outputs": outs,
                "safe_indices": list(range(n // 2)),
                "unsafe_indices": list(range(n // 2, n)),
            }
        )
    return {"batch_data_list": bl}


def _masks() -> dict[int, ExpertMask]:
    return {b: ExpertMask.from_experts([(b % 2, b % 8), (1, 7)], 2, 8) for b in range(len(SIZES))}


def _trainer(out: Path, union: bool, **cfg_kw) -> tuple[ExpertMaskingTrainer, dict]:
    """The run under test: per-batch masks, or (``union``) their union on every step."""
    tok = tiny_tokenizer()
    ds = create_batch_aware_dataset(create_batch_structured_dataset(sft_data()), tok, max_length=48)
    model = tiny_model("olmoe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = _masks()
    cfg = ExpertMaskingConfig(
        **{
            "output_dir": str(out / "ckpt"),
            "per_device_train_batch_size": max(SIZES),
            "num_train_epochs": 2,
            "mask_mode": "union" if union else "per_batch",
            "learning_rate": 1e-2,
            "weight_decay": 0.1,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "disable_tqdm": True,
            **cfg_kw,
        }
    )
    if union:
        mask = masks[0]
        for m in masks.values():
            mask = mask.union(m)
        return ExpertMaskingTrainer(model, cfg, ds, expert_mask=mask, processing_class=tok), before
    return ExpertMaskingTrainer(model, cfg, ds, batch_expert_masks=masks, processing_class=tok), before


def _expert_tensors(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone().contiguous()
        for n, p in model.named_parameters()
        if n.endswith(("gate_up_proj", "down_proj"))
    }


class ReplaySampler(AnalysisBatchSampler):
    """Yields the analysis batches in a given order of batch_idx (the ranks' steps, interleaved)."""

    def __init__(self, dataset, sequence: list[int]):
        super().__init__(dataset, shuffle_batches=False)
        self.sequence = list(sequence)

    def __iter__(self):
        groups = self.batch_groups
        for b in self.sequence:
            yield list(groups[b])

    def __len__(self) -> int:
        return len(self.sequence)


def single_process_reference(out: Path, rank_logs: list[list[dict]]) -> dict[str, torch.Tensor]:
    """One process, the same global batches: step s accumulates rank 0's then rank 1's batch of step s."""
    sequence = [step[r]["batch_idx"] for step in zip(*rank_logs) for r in range(len(rank_logs))]
    trainer, _ = _trainer(
        out,
        union=True,
        num_train_epochs=1,
        gradient_accumulation_steps=len(rank_logs),
        allow_gradient_accumulation=True,
    )
    trainer.batch_sampler = ReplaySampler(trainer.train_dataset, sequence)
    trainer.train()
    merge_trained_experts(trainer.model)
    return _expert_tensors(trainer.model)


def main(out: Path, union: bool = False) -> None:
    trainer, before = _trainer(out, union)
    model, masks = trainer.model, _masks()
    trainer.train()
    rows = {r.key: r.param.detach().double().sum().item() for r in trainer.rows}
    merge_trained_experts(model)
    if union and trainer.args.process_index == 0:
        from safetensors.torch import save_file

        save_file(_expert_tensors(model), str(out / "experts.safetensors"))
    trained = {(l, e) for m in masks.values() for l, e in m.experts()}
    frozen_ok = True
    for name, p in model.named_parameters():
        if name.endswith(("gate_up_proj", "down_proj")):
            layer = int(name.split(".")[2])
            keep = [e for e in range(p.shape[0]) if (layer, e) not in trained]
            frozen_ok &= torch.equal(p[keep], before[name][keep])
        else:
            frozen_ok &= torch.equal(p, before[name])
    rank = trainer.args.process_index
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "world_size": trainer.args.world_size,
                "sizes": list(SIZES),
                "batch_log": trainer.batch_log,
                "rows": rows,
                "frozen_bit_identical": bool(frozen_ok),
            }
        )
    )
    # Tear the gloo group down explicitly: left to interpreter exit, its threads can abort the
    # process ("terminate called without an active exception") after the work is done.
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), union=sys.argv[2:] == ["union"])
