"""What an expert writes: its mean output over the tokens routed to it, read through the final norm and the
unembedding (the tokens it promotes), a logit-lens view of each expert for the atlas card.

Why with the model and not from the routing files: the routing says where tokens went, not what the expert
added to the residual stream. A forward pass over a few analysed batches captures each MoE layer's input
and routing (a pre-hook on its experts module); every expert is then run on exactly its routed tokens
(the experts module called with that expert forced, weight 1) and the outputs are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from moe_core.model.adapter import MoEAdapter
from moe_core.model.routing import load_batch_routing
from moe_core.store.run import Run

WRITES_BATCHES = 4  # analysed batches the mean output is taken over
WRITES_TOP = 10  # promoted tokens kept per expert


@torch.no_grad()
def expert_writes(model: Any, run: Run, batches: Sequence[int], top: int = WRITES_TOP) -> pd.DataFrame:
    """-> (layer, expert, rank, token_id, logit, routed): each expert's ``top`` promoted tokens, over ``batches``."""
    adapter = MoEAdapter.for_model(model)
    layers, E = adapter.moe_layers, adapter.num_experts
    H = model.config.hidden_size
    sums = torch.zeros(len(layers), E, H, dtype=torch.float32)
    counts = torch.zeros(len(layers), E, dtype=torch.long)
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def capture(row: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            h = kwargs.get("hidden_states", args[0] if args else None)
            idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            seen.setdefault(row, []).append(
                (h.detach().reshape(-1, h.shape[-1]), idx.detach().reshape(h.shape[0], -1))
            )

        return hook

    hooks = [
        adapter.experts(layer).register_forward_pre_hook(capture(r), with_kwargs=True)
        for r, layer in enumerate(layers)
    ]
    device = next(model.parameters()).device
    try:
        model.eval()
        for b in batches:
            for sample in load_batch_routing(run.path_for("routing", batch_idx=b)):
                model(torch.as_tensor(sample.token_ids, dtype=torch.long, device=device)[None])
            for row, parts in seen.items():  # this batch's tokens, layer by layer: memory bounded by a batch
                h = torch.cat([p[0] for p in parts])
                idx = torch.cat([p[1] for p in parts])
                experts = adapter.experts(layers[row])
                for e in torch.unique(idx).tolist():
                    routed = (idx == e).any(dim=-1)
                    n = int(routed.sum())
                    forced = torch.full((n, 1), e, dtype=idx.dtype, device=h.device)
                    out = experts(h[routed], forced, torch.ones(n, 1, dtype=h.dtype, device=h.device))
                    sums[row, e] += out.float().sum(dim=0).cpu()
                    counts[row, e] += n
            seen.clear()
    finally:
        for hk in hooks:
            hk.remove()
    mean = (sums / counts.clamp(min=1)[..., None]).to(device=device, dtype=next(model.parameters()).dtype)
    norm = getattr(model.get_decoder(), "norm", None)
    logits = model.get_output_embeddings()(norm(mean) if norm is not None else mean).float().cpu()
    values, ids = logits.topk(min(top, logits.shape[-1]), dim=-1)
    rows = [
        {
            "layer": layer,
            "expert": e,
            "rank": j,
            "token_id": int(ids[r, e, j]),
            "logit": float(values[r, e, j]),
            "routed": int(counts[r, e]),
        }
        for r, layer in enumerate(layers)
        for e in range(E)
        if counts[r, e] > 0
        for j in range(ids.shape[-1])
    ]
    return pd.DataFrame(rows, columns=["layer", "expert", "rank", "token_id", "logit", "routed"])
