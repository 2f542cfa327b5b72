"""The trained weights at chosen steps of a run, kept in CPU memory, so that a study tests exactly the model
it validated at a step without training it again from the base weights (the study's largest repeated cost:
every random arm was trained once more for each selector's step).

    keep = StepSnapshots()
    train_model(..., callbacks=[CurveCallback(scorer, every=7, keep=keep)])  # kept at the curve's points
    load_trainable_state(model, keep.states[21])  # the base model + what step 21 had trained

A state holds only what training moves: the spliced expert rows (``expert_rows``) and any other parameter
with ``requires_grad`` (every one for full fine-tuning). Past ``max_bytes`` nothing more is kept and the
caller trains again (a real model's full fine-tuning does not fit in memory 14 times over).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_core.model.adapter import MoEAdapter
from moe_core.train.expert_rows import trained_rows

KEEP_BYTES = 2 << 30  # at most this much CPU memory of kept states per curve (one StepSnapshots)

StateKey = tuple[Any, ...]  # ("row", layer, tensor name, expert) or ("param", parameter name)


def trainable_state(model: nn.Module) -> dict[StateKey, torch.Tensor]:
    """CPU copies of what training moves: each spliced expert row and every other trainable parameter."""
    rows = trained_rows(model)
    state: dict[StateKey, torch.Tensor] = {
        ("row", r.layer, r.name, r.expert): r.param.detach().to("cpu", copy=True) for r in rows
    }
    spliced = {id(r.param) for r in rows}
    state |= {
        ("param", n): p.detach().to("cpu", copy=True)
        for n, p in model.named_parameters()
        if p.requires_grad and id(p) not in spliced
    }
    return state


def load_trainable_state(model: nn.Module, state: dict[StateKey, torch.Tensor]) -> None:
    """Write a kept state into ``model`` (merged, with the base weights): rows into their fused tensors."""
    adapter = MoEAdapter.for_model(model) if any(k[0] == "row" for k in state) else None
    with torch.no_grad():
        for key, value in state.items():
            if key[0] == "row":
                _, layer, name, expert = key
                fused = adapter.expert_parameters(layer)[name]  # type: ignore[union-attr]
                fused[expert].copy_(value.to(fused.device))
            else:
                param = model.get_parameter(key[1])
                param.copy_(value.to(param.device))


def state_bytes(state: dict[StateKey, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class StepSnapshots:
    """``trainable_state`` at each step it is handed (``record``: a curve's points, ``eval.curves.CurveCallback``),
    in ``states[step]``, while they fit in ``max_bytes``; ``complete`` says whether every such step was kept."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = KEEP_BYTES if max_bytes is None else max_bytes
        self.states: dict[int, dict[StateKey, torch.Tensor]] = {}
        self.complete = True

    def record(self, step: int, model: nn.Module) -> None:
        if not self.complete:
            return
        kept = trainable_state(model)
        if sum(map(state_bytes, self.states.values())) + state_bytes(kept) > self.max_bytes:
            self.states.clear()  # a partial set would save little: train again instead
            self.complete = False
        else:
            self.states[step] = kept
