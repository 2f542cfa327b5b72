"""Trainable copies of chosen experts' rows, spliced into frozen fused tensors; merge, delta export/apply.

transformers-5 MoE layers keep all experts of a layer in fused tensors (``gate_up_proj
[E, ...]``, dim 0 = expert), so ``requires_grad`` cannot pick experts and zeroed gradients do
not stop AdamW (weight decay and momentum still move a row). Here every fused tensor of a masked
layer is frozen and each chosen (layer, expert) gets its own small trainable copy of its rows,
spliced into the fused tensor at forward time by a ``torch.nn.utils.parametrize``
parametrization (:class:`ExpertRowSplice`). An optimizer given only those copies leaves every
other expert bit-identical and keeps state the size of the selection.

    rows = install_expert_rows(model, mask)      # [TrainedRow(layer, expert, name, param), ...]
    ...train rows...
    save_expert_delta(model, "expert_delta.safetensors")   # only the trained rows (+ JSON beside it)
    merge_trained_experts(model)                 # write them into the fused tensors, drop the splice
    apply_expert_delta(base_model, "expert_delta.safetensors")  # the same rows into another copy
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from moe_core.analysis.masks import ExpertMask
from moe_core.model.adapter import MoEAdapter
from moe_core.store.atomic import atomic_dir, atomic_write, atomic_write_json
from moe_core.train.config import TrainingConfigError

DELTA_FORMAT = "moe-safety-lab/expert-delta@1"
DELTA_NAME = "expert_delta.safetensors"


class ExpertRowSplice(nn.Module):
    """Parametrization: the frozen fused tensor with the chosen experts' rows taken from small Parameters."""

    def __init__(self, original: torch.Tensor, experts: Sequence[int], layer: int):
        super().__init__()
        self.layer = int(layer)
        self.experts = [int(e) for e in experts]
        index = torch.tensor(self.experts, dtype=torch.long, device=original.device)
        self.register_buffer("index", index, persistent=False)
        self.rows = nn.ParameterList(nn.Parameter(original[e].detach().clone()) for e in self.experts)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original.index_copy(0, self.index, torch.stack(tuple(self.rows)))


@dataclass(frozen=True)
class TrainedRow:
    """One trainable copy: expert ``expert`` of fused tensor ``name`` in decoder layer ``layer``."""

    layer: int
    expert: int
    name: str
    param: nn.Parameter

    @property
    def key(self) -> str:
        return f"layers.{self.layer}.experts.{self.expert}.{self.name}"


def install_expert_rows(
    model: nn.Module, mask: ExpertMask, adapter: MoEAdapter | None = None
) -> list[TrainedRow]:
    """Freeze the fused expert tensors of the masked layers and splice in one trainable copy per chosen expert.

    Every fused tensor of the layer (gpt-oss biases included) gets a row copy per chosen expert.
    Other parameters are left as they are (the trainer freezes them). On an error nothing stays
    spliced in.
    """
    require_merged(model)
    adapter = adapter or MoEAdapter.for_model(model)
    check_mask(mask, adapter)
    rows: list[TrainedRow] = []
    try:
        for layer, experts in sorted(mask.by_layer().items()):
            module = adapter.experts(layer)
            for name, fused in sorted(adapter.expert_parameters(layer).items()):
                fused.requires_grad_(False)
                splice = ExpertRowSplice(fused, experts, layer)
                parametrize.register_parametrization(module, name, splice)
                rows += [TrainedRow(layer, e, name, p) for e, p in zip(splice.experts, splice.rows)]
    except BaseException:
        unsplice_expert_rows(model)
        raise
    return rows


def _splices(model: nn.Module):
    """(module, tensor name, parametrization list) of every tensor with only ExpertRowSplice parametrizations."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                plist = module.parametrizations[name]
                if all(isinstance(pz, ExpertRowSplice) for pz in plist):
                    yield module, name, plist


def trained_rows(model: nn.Module) -> list[TrainedRow]:
    """The row copies currently spliced into ``model`` (empty once merged)."""
    rows = [
        TrainedRow(pz.layer, e, name, p)
        for _, name, plist in _splices(model)
        for pz in plist
        for e, p in zip(pz.experts, pz.rows)
    ]
    return sorted(rows, key=lambda r: (r.layer, r.name, r.expert))


def merge_trained_experts(model: nn.Module) -> int:
    """Write the trained rows into the fused tensors and remove the parametrizations; returns rows merged.

    The fused Parameters keep their identity and names, so the model saves and loads as usual.
    """
    merged = 0
    for module, name, plist in _splices(model):
        merged += sum(len(pz.experts) for pz in plist)
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return merged


def unsplice_expert_rows(model: nn.Module) -> int:
    """Remove the row copies *without* merging: the fused tensors are exactly as before; returns tensors restored."""
    n = 0
    for module, name, _ in _splices(model):
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        n += 1
    return n


def require_merged(model: nn.Module) -> None:
    if trained_rows(model):
        raise TrainingConfigError(
            "the model still has trainable expert rows spliced in from an earlier training; "
            "call merge_trained_experts(model) first"
        )


def check_mask(mask: ExpertMask, adapter: MoEAdapter) -> None:
    """The mask fits the model, selects something, and only MoE layers."""
    if mask.shape != (adapter.num_layers, adapter.num_experts):
        raise TrainingConfigError(
            f"expert mask is {mask.shape} but the model has {adapter.num_layers} layers x {adapter.num_experts} experts"
        )
    if mask.count() == 0:
        raise TrainingConfigError("the expert mask selects no experts; pick some experts first")
    dense = sorted(set(mask.by_layer()) - set(adapter.moe_layers))
    if dense:
        raise TrainingConfigError(
            f"layers {dense} have no experts (MoE layers: {adapter.moe_layers}); unselect them"
        )


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes held by the optimizer's per-parameter state tensors (e.g. AdamW's two moments)."""
    if optimizer is None:
        return 0
    tensors = (v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return int(sum(v.numel() * v.element_size() for v in tensors))


# -- expert delta: a small safetensors file with only the trained rows ---------------------------
def save_expert_delta(model_or_trainer: Any, path: str | Path) -> Path:
    """A small safetensors file with only the trained experts' rows (+ trained routers), and a JSON beside it.

    Keys: ``layers.{l}.experts.{e}.{param}`` and ``layers.{l}.router.{param}``; the metadata
    (format, model type, shapes, which layer/expert/param) is in the file header and in
    ``<path>.json``. Works on an expert-masking trainer (also after merging) or a model with
    rows installed.
    """
    from safetensors.torch import save_file

    if isinstance(model_or_trainer, nn.Module):
        model, rows, routers = model_or_trainer, trained_rows(model_or_trainer), {}
        n_experts = _num_experts(model)
    else:
        tr = model_or_trainer
        if getattr(tr, "trains", None) == "full":
            raise TrainingConfigError(
                "full fine-tuning has no expert delta; use save_merged(model, tokenizer, dir)"
            )
        model, rows, routers, n_experts = tr.model, tr.rows, tr.router_params, tr.adapter.num_experts
    if not rows:
        raise TrainingConfigError("no trained expert rows found (already merged?); pass the trainer instead")
    tensors = {r.key: r.param.detach().cpu().contiguous() for r in rows}
    tensors.update({k: p.detach().cpu().contiguous() for k, p in routers.items()})
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    meta = {
        "format": DELTA_FORMAT,
        "model_type": getattr(cfg, "model_type", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "num_experts": n_experts,
        "experts": [
            {
                "key": r.key,
                "layer": r.layer,
                "expert": r.expert,
                "param": r.name,
                "shape": list(r.param.shape),
                "dtype": str(r.param.dtype),
            }
            for r in rows
        ],
        "routers": [{"key": k, "shape": list(p.shape)} for k, p in routers.items()],
    }
    path = Path(path)
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"moe_lab": json.dumps(meta)}))
    atomic_write_json(path.with_suffix(".json"), meta)
    return path


def _num_experts(model: nn.Module) -> int | None:
    for _, _, plist in _splices(model):
        return int(plist.original.shape[0])
    return None


def read_expert_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of an expert-delta file; TrainingConfigError if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("moe_lab", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for broken files
        raise TrainingConfigError(f"cannot read expert delta {path}: {e}") from None
    if meta.get("format") != DELTA_FORMAT:
        raise TrainingConfigError(f"{path} is not an expert-delta file (format {meta.get('format')!r})")
    return tensors, meta


def apply_expert_delta(base_model: nn.Module, path: str | Path) -> int:
    """Write a delta's expert rows (and routers) into ``base_model``'s fused tensors; returns tensors written."""
    tensors, meta = read_expert_delta(Path(path))
    require_merged(base_model)
    adapter = MoEAdapter.for_model(base_model)
    mt = getattr(getattr(base_model.config, "text_config", None) or base_model.config, "model_type", None)
    if meta.get("model_type") not in (None, mt) or meta.get("num_experts") not in (None, adapter.num_experts):
        raise TrainingConfigError(
            f"delta is for {meta.get('model_type')} with {meta.get('num_experts')} experts; "
            f"this model is {mt} with {adapter.num_experts}"
        )
    writes: list[tuple[torch.Tensor, torch.Tensor]] = []  # validate everything before touching the model
    for e in meta["experts"]:
        fused = (
            adapter.expert_parameters(e["layer"]).get(e["param"])
            if e["layer"] in adapter.moe_layers
            else None
        )
        t = tensors[e["key"]]
        if fused is None or tuple(fused.shape[1:]) != tuple(t.shape):
            raise TrainingConfigError(
                f"{e['key']}: the model has no matching tensor (shape {tuple(t.shape)})"
            )
        writes.append((fused[e["expert"]], t))
    for r in meta.get("routers", []):
        _, layer, _, name = r["key"].split(".", 3)
        p = adapter.router_parameters(int(layer)).get(name) if int(layer) in adapter.moe_layers else None
        if p is None or p.shape != tensors[r["key"]].shape:
            raise TrainingConfigError(f"{r['key']}: the model has no matching router parameter")
        writes.append((p, tensors[r["key"]]))
    with torch.no_grad():
        for dst, src in writes:
            dst.copy_(src.to(dst.dtype))
    return len(writes)


def save_merged(model: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """Merge the trained rows and save a normal model directory (``from_pretrained``-loadable), atomically."""
    merge_trained_experts(model)

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_dir(Path(out_dir), build)


def as_mask(m: Any) -> ExpertMask:
    """An ExpertMask from an ExpertMask or a [layers, experts] 0/1 array (numpy or torch)."""
    if isinstance(m, ExpertMask):
        return m
    if torch.is_tensor(m):
        m = m.detach().cpu().numpy()
    return ExpertMask.from_array(np.asarray(m))
