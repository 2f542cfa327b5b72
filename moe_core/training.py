"""Fine-tune only the chosen experts of an MoE model, one whole analysis batch per step.

transformers-5 MoE layers keep all experts of a layer in fused tensors (``gate_up_proj
[E, ...]``, dim 0 = expert), so ``requires_grad`` cannot pick experts and zeroed gradients do
not stop AdamW (weight decay and momentum still move a row). Here every fused tensor is frozen
and each chosen (layer, expert) gets its own small trainable copy of its rows, spliced into the
fused tensor at forward time by a ``torch.nn.utils.parametrize`` parametrization
(:class:`ExpertRowSplice`). The optimizer only ever sees those row copies (plus the routers if
``train_router``), so:

* frozen experts are bit-identical after training, whatever the weight decay;
* optimizer state is the size of the selection, not of the fused tensors;
* per-batch masks are exact: on a step whose analysis batch did not select (l, e), that row's
  ``.grad`` is set to ``None`` before ``optimizer.step`` and AdamW skips it entirely.

Each training step holds exactly one analysis batch (``moe_core.sampler``), checked at every
step by a batch monitor. Usage::

    cfg = ExpertMaskingConfig(output_dir="ckpt", per_device_train_batch_size=16, weight_decay=0.1)
    result = train_experts(model, tok, sft_dataset, expert_mask, cfg, run_dir / "training")
    # run_dir/training: expert_delta.safetensors (+ .json), training_metadata.json, batch_monitor.jsonl

or, for full control, ``ExpertMaskingTrainer(model, cfg, train_dataset, expert_mask=...)``,
then :func:`merge_trained_experts`, :func:`save_merged`, :func:`save_expert_delta`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import Trainer, TrainerCallback, TrainingArguments

from .masks import ExpertMask
from .models import MoEAdapter
from .runs import atomic_write, atomic_write_json, atomic_write_text
from .sampler import BatchCollator, BatchPreservingSampler
from .runs import atomic_dir
from .sft import META_COLUMNS, create_batch_aware_dataset

log = logging.getLogger(__name__)

MASK_MODES = ("union", "per_batch")
CONSISTENCY_LOSSES = ("none", "forward", "reverse", "symmetric")
CONSISTENCY_LAYERS = ("all", "masked")
BASELINES = ("experts", "full", "random_experts")
DELTA_FORMAT = "moe-safety-lab/expert-delta@1"
METADATA_FORMAT = "moe-safety-lab/expert-training@1"
DELTA_NAME = "expert_delta.safetensors"

ProgressFn = Callable[..., None]


class TrainingConfigError(ValueError):
    """Training arguments or inputs that would break the batch structure or the expert masking."""


class BatchStructureError(ValueError):
    """A training step did not hold exactly one analysis batch in its original order."""


# -- configuration ---------------------------------------------------------------------
@dataclass
class ExpertMaskingConfig(TrainingArguments):
    """TrainingArguments plus what expert-masked, batch-preserving training needs (trl style)."""

    # which experts a step may update: "union" = every chosen expert on every step;
    # "per_batch" = only the experts chosen for that step's analysis batch
    mask_mode: str = field(default="union", metadata={"help": "union | per_batch"})
    # also train the routers of all MoE layers (their own learning rate below)
    train_router: bool = field(default=False, metadata={"help": "train router weights too"})
    # router learning rate; None = learning_rate
    router_learning_rate: float | None = field(default=None, metadata={"help": "router lr (default: learning_rate)"})
    # KL between the batch's mean safe and mean unsafe routing distributions (safe side is the
    # target): forward = KL(safe || unsafe), reverse = KL(unsafe || safe), symmetric = mean of both
    router_consistency_loss: str = field(default="none", metadata={"help": "none | forward | reverse | symmetric"})
    # weight of that term added to the LM loss
    router_consistency_weight: float = field(default=0.1, metadata={"help": "weight of the consistency loss"})
    # routers it is computed on: every MoE layer, or only layers with chosen experts
    router_consistency_layers: str = field(default="all", metadata={"help": "all | masked"})
    # "experts" = the chosen experts; "full" = every parameter; "random_experts" = as many random experts
    baseline: str = field(default="experts", metadata={"help": "experts | full | random_experts"})
    # seed of the random_experts baseline draw
    random_seed: int = field(default=0, metadata={"help": "seed for random_experts"})
    # reshuffle the order of analysis batches every epoch (in-batch order never changes)
    shuffle_batches: bool = field(default=True, metadata={"help": "shuffle batch order per epoch"})
    # the analysis batch size; must equal per_device_train_batch_size when given
    analysis_batch_size: int | None = field(default=None, metadata={"help": "analysis batch size (checked)"})
    # gradient accumulation merges several analysis batches into one update: off unless allowed
    allow_gradient_accumulation: bool = field(default=False, metadata={"help": "permit grad accumulation > 1"})
    # legacy TrainingArguments flag, accepted only to reject True with a clear message
    group_by_length: bool = field(default=False, metadata={"help": "must stay False"})
    # keep batch_idx/in_batch_idx/label in the batches (the trainer strips them before forward)
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep structure columns"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate()

    def validate(self) -> None:
        """Raise TrainingConfigError for choices that are unknown or would break batch structure."""
        for name, allowed in (
            ("mask_mode", MASK_MODES), ("router_consistency_loss", CONSISTENCY_LOSSES),
            ("router_consistency_layers", CONSISTENCY_LAYERS), ("baseline", BASELINES),
        ):
            if getattr(self, name) not in allowed:
                raise TrainingConfigError(f"{name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        problems = []
        if self.group_by_length or self.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
            problems.append("grouping by length regroups samples across analysis batches; leave group_by_length False "
                            "and train_sampling_strategy at its default (the batch sampler decides)")
        if self.dataloader_drop_last:
            problems.append("dataloader_drop_last=True would drop a short analysis batch; set it False")
        if self.gradient_accumulation_steps > 1 and not self.allow_gradient_accumulation:
            problems.append(f"gradient_accumulation_steps={self.gradient_accumulation_steps} merges analysis batches "
                            "into one update; set it to 1 or allow_gradient_accumulation=True")
        if self.analysis_batch_size is not None and self.analysis_batch_size != self.per_device_train_batch_size:
            problems.append(f"per_device_train_batch_size={self.per_device_train_batch_size} differs from "
                            f"analysis_batch_size={self.analysis_batch_size}; set them equal")
        if self.auto_find_batch_size:
            problems.append("auto_find_batch_size would change the batch size; the analysis batches fix it")
        if self.baseline == "full" and self.mask_mode == "per_batch":
            problems.append("baseline='full' trains every parameter; per-batch masks do not apply "
                            "(use mask_mode='union')")
        if self.router_consistency_weight < 0 or (self.router_learning_rate or 0) < 0:
            problems.append("router_consistency_weight and router_learning_rate must be >= 0")
        if problems:
            raise TrainingConfigError("; ".join(problems))


# -- trainable expert rows -------------------------------------------------------------
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


def install_expert_rows(model: nn.Module, mask: ExpertMask, adapter: MoEAdapter | None = None) -> list[TrainedRow]:
    """Freeze the fused expert tensors of the masked layers and splice in one trainable copy per chosen expert.

    Every fused tensor of the layer (gpt-oss biases included) gets a row copy per chosen expert.
    Other parameters are left as they are (the trainer freezes them).
    """
    _require_merged(model)
    adapter = adapter or MoEAdapter.for_model(model)
    _check_mask(mask, adapter)
    rows: list[TrainedRow] = []
    for layer, experts in sorted(mask.by_layer().items()):
        module = adapter.experts(layer)
        for name, fused in sorted(adapter.expert_parameters(layer).items()):
            fused.requires_grad_(False)
            splice = ExpertRowSplice(fused, experts, layer)
            parametrize.register_parametrization(module, name, splice)
            rows += [TrainedRow(layer, e, name, p) for e, p in zip(splice.experts, splice.rows)]
    return rows


def trained_rows(model: nn.Module) -> list[TrainedRow]:
    """The row copies currently spliced into ``model`` (empty once merged)."""
    rows = []
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                for pz in plist:
                    if isinstance(pz, ExpertRowSplice):
                        rows += [TrainedRow(pz.layer, e, name, p) for e, p in zip(pz.experts, pz.rows)]
    return sorted(rows, key=lambda r: (r.layer, r.name, r.expert))


def merge_trained_experts(model: nn.Module) -> int:
    """Write the trained rows into the fused tensors and remove the parametrizations; returns rows merged.

    The fused Parameters keep their identity and names, so the model saves and loads as usual.
    """
    merged = 0
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            plist = module.parametrizations[name]
            if all(isinstance(pz, ExpertRowSplice) for pz in plist):
                merged += sum(len(pz.experts) for pz in plist)
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return merged


def _require_merged(model: nn.Module) -> None:
    if trained_rows(model):
        raise TrainingConfigError(
            "the model still has trainable expert rows spliced in from an earlier training; "
            "call merge_trained_experts(model) first"
        )


def _check_mask(mask: ExpertMask, adapter: MoEAdapter) -> None:
    if mask.shape != (adapter.num_layers, adapter.num_experts):
        raise TrainingConfigError(
            f"expert mask is {mask.shape} but the model has {adapter.num_layers} layers x {adapter.num_experts} experts"
        )
    if mask.count() == 0:
        raise TrainingConfigError("the expert mask selects no experts; pick some experts first")
    dense = sorted(set(mask.by_layer()) - set(adapter.moe_layers))
    if dense:
        raise TrainingConfigError(f"layers {dense} have no experts (MoE layers: {adapter.moe_layers}); unselect them")


def _as_mask(m: Any) -> ExpertMask:
    return m if isinstance(m, ExpertMask) else ExpertMask.from_array(np.asarray(m))


def normalize_batch_masks(batch_expert_masks: Any) -> dict[int, ExpertMask]:
    """Per-batch masks as ``{batch_idx: ExpertMask}`` from a dict, a list (position = batch_idx) or a 3-D array."""
    if isinstance(batch_expert_masks, Mapping):
        items = [(int(k), v) for k, v in batch_expert_masks.items()]
    elif isinstance(batch_expert_masks, (list, tuple)) or np.ndim(batch_expert_masks) == 3:
        items = list(enumerate(batch_expert_masks))
    else:
        raise TrainingConfigError(
            "batch_expert_masks must be a dict {batch_idx: mask}, a list of masks or a [B, L, E] array"
        )
    if not items:
        raise TrainingConfigError("batch_expert_masks is empty")
    return {b: _as_mask(m) for b, m in items}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes held by the optimizer's per-parameter state tensors (e.g. AdamW's two moments)."""
    if optimizer is None:
        return 0
    tensors = (v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return int(sum(v.numel() * v.element_size() for v in tensors))


# -- router consistency ----------------------------------------------------------------
def router_consistency_loss(
    router_logits: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    is_unsafe: torch.Tensor,
    direction: str = "symmetric",
) -> torch.Tensor:
    """KL between the mean routing distribution of a batch's safe and unsafe samples, averaged over layers.

    ``router_logits``: one ``[T, E]`` tensor per layer, T = batch*seq flattened (pads included);
    ``attention_mask [B, S]`` drops pads; ``is_unsafe [B]``. Distributions are softmaxes of the
    logits averaged over a label's real tokens. The safe mean is the (detached) target. Returns
    0 (still attached to the graph) when the batch lacks safe or unsafe tokens.
    """
    if direction not in CONSISTENCY_LOSSES[1:]:
        raise TrainingConfigError(f"direction={direction!r}; choose forward, reverse or symmetric")
    if not router_logits:
        raise TrainingConfigError("no router logits were captured; is this an MoE model?")
    B, S = attention_mask.shape
    real = attention_mask.reshape(-1).bool()
    unsafe = is_unsafe.bool().to(real.device)[:, None].expand(B, S).reshape(-1)
    w_s, w_u = (real & ~unsafe).float(), (real & unsafe).float()
    if w_s.sum() == 0 or w_u.sum() == 0:
        return sum(l.sum() for l in router_logits) * 0.0
    terms = []
    for logits in router_logits:
        if logits.shape[0] != B * S:
            raise BatchStructureError(f"router logits have {logits.shape[0]} rows, expected batch*seq = {B * S}")
        p = torch.softmax(logits.float(), dim=-1)
        p_s = ((w_s.to(p.device) @ p) / w_s.sum()).clamp_min(1e-9).detach()
        p_u = ((w_u.to(p.device) @ p) / w_u.sum()).clamp_min(1e-9)
        fwd = (p_s * (p_s.log() - p_u.log())).sum()
        rev = (p_u * (p_u.log() - p_s.log())).sum()
        terms.append({"forward": fwd, "reverse": rev, "symmetric": 0.5 * (fwd + rev)}[direction])
    return torch.stack(terms).mean()


@contextlib.contextmanager
def capture_router_logits(routers: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collect each router's logits (its forward's first output) during the block; hooks always removed."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    handles = [r.register_forward_hook(hook) for r in routers]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


# -- the trainer -----------------------------------------------------------------------
class ExpertMaskingTrainer(Trainer):
    """A Trainer that updates only chosen experts (exactly), one analysis batch per step.

    ``expert_mask`` (ExpertMask or [layers, experts] array) is the union of experts to train;
    ``batch_expert_masks`` (dict ``{batch_idx: mask}`` or a list indexed by batch_idx, as in the
    reference) adds per-batch masks: with ``args.mask_mode="per_batch"`` each step updates only
    its batch's experts. The model is modified in place (rows spliced in); call
    :func:`merge_trained_experts` when done.
    """

    def __init__(
        self,
        model: nn.Module,
        args: ExpertMaskingConfig,
        train_dataset: Any,
        expert_mask: ExpertMask | np.ndarray | None = None,
        batch_expert_masks: Any = None,
        data_collator: Callable | None = None,
        processing_class: Any = None,
        **kwargs: Any,
    ):
        if not isinstance(args, ExpertMaskingConfig):
            raise TrainingConfigError("args must be an ExpertMaskingConfig (it validates the batch-structure settings)")
        if train_dataset is None:
            raise TrainingConfigError(
                "train_dataset is required: build it with moe_core.sft.create_batch_aware_dataset"
            )
        _require_merged(model)
        seed = args.data_seed if args.data_seed is not None else args.seed
        self.batch_sampler = BatchPreservingSampler(train_dataset, shuffle_batches=args.shuffle_batches, seed=seed)
        expected = args.analysis_batch_size or self.batch_sampler.max_batch_size
        if args.per_device_train_batch_size != expected or self.batch_sampler.max_batch_size > expected:
            raise TrainingConfigError(
                f"per_device_train_batch_size={args.per_device_train_batch_size} but the analysis batches hold up to "
                f"{self.batch_sampler.max_batch_size} samples (analysis_batch_size={args.analysis_batch_size}); "
                f"set per_device_train_batch_size={self.batch_sampler.max_batch_size}"
            )
        self.adapter = MoEAdapter.for_model(model)
        self.union_mask, self.batch_masks = self._resolve_masks(args, expert_mask, batch_expert_masks)
        self.rows: list[TrainedRow] = []
        self.router_params: dict[str, nn.Parameter] = {}
        self._setup_parameters(model, args)
        self.batch_log: list[dict[str, Any]] = []
        self._local_active: list[bool] | None = None
        self._window_active = torch.zeros(len(self.rows), dtype=torch.bool)
        self._consistency = [0.0, 0]  # running sum and count since the last log
        if data_collator is None:
            pad = getattr(processing_class, "pad_token_id", None)
            pad = pad if pad is not None else getattr(model.config, "pad_token_id", None)
            data_collator = BatchCollator(pad_token_id=int(pad or 0))
        super().__init__(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator,
                         processing_class=processing_class, **kwargs)
        acc = self.accelerator
        if acc.num_processes > 1 and (acc.split_batches or not acc.even_batches):
            raise TrainingConfigError("with several processes, use split_batches=False and even_batches=True so each "
                                      "rank receives whole analysis batches in equal numbers")
        log.info("expert-masked training: %s", self.trainable_report())

    # -- setup ---------------------------------------------------------------------
    def _resolve_masks(self, args, expert_mask, batch_expert_masks) -> tuple[ExpertMask | None, dict[int, ExpertMask]]:
        ad = self.adapter
        batch_masks = normalize_batch_masks(batch_expert_masks) if batch_expert_masks is not None else {}
        union = _as_mask(expert_mask) if expert_mask is not None else None
        if union is None and batch_masks:
            union = ExpertMask(np.logical_or.reduce([m.mask for m in batch_masks.values()]))
        if args.mask_mode == "per_batch":
            if not batch_masks:
                raise TrainingConfigError(
                    "mask_mode='per_batch' needs batch_expert_masks (one mask per analysis batch)"
                )
            missing = sorted(set(self.batch_sampler.batch_ids) - set(batch_masks))
            if missing:
                raise TrainingConfigError(
                    f"no per-batch mask for analysis batches {missing[:10]}; give one for each batch"
                )
            for b, m in batch_masks.items():
                if m.shape != union.shape:
                    raise TrainingConfigError(f"the mask of batch {b} is {m.shape}, expert_mask is {union.shape}")
                if (m.mask & ~union.mask).any():
                    raise TrainingConfigError(f"the mask of batch {b} selects experts outside expert_mask")
        else:
            batch_masks = {}
        if args.baseline == "full":
            return union, {}
        if union is None:
            raise TrainingConfigError("give expert_mask or batch_expert_masks (or use baseline='full')")
        _check_mask(union, ad)
        if args.baseline == "random_experts":
            from .selection import random_like

            if batch_masks:
                batch_masks = {b: random_like(m, [args.random_seed, b], layers=ad.moe_layers) if m.count() else m
                               for b, m in batch_masks.items()}
                union = ExpertMask(np.logical_or.reduce([m.mask for m in batch_masks.values()]))
            else:
                union = random_like(union, args.random_seed, layers=ad.moe_layers)
        return union, batch_masks

    def _setup_parameters(self, model: nn.Module, args: ExpertMaskingConfig) -> None:
        """Freeze everything, then open exactly what this baseline trains."""
        full = args.baseline == "full"
        for p in model.parameters():
            p.requires_grad_(full)
        if full:
            return
        self.rows = install_expert_rows(model, self.union_mask, self.adapter)
        if args.train_router:
            for layer in self.adapter.moe_layers:
                for n, p in self.adapter.router_parameters(layer).items():
                    p.requires_grad_(True)
                    self.router_params[f"layers.{layer}.router.{n}"] = p
        if self.batch_masks:
            layer_ix = np.array([r.layer for r in self.rows])
            expert_ix = np.array([r.expert for r in self.rows])
            self._row_active = {
                b: torch.from_numpy(m.mask[layer_ix, expert_ix].copy()) for b, m in self.batch_masks.items()
            }
            for i, r in enumerate(self.rows):
                r.param.register_hook(functools.partial(self._gate_row_grad, i))

    def _gate_row_grad(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        """Zero this batch's contribution to a row its batch did not select (before DDP averages it)."""
        return grad if self._local_active is None or self._local_active[i] else torch.zeros_like(grad)

    # -- optimizer -----------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Optimizer over the row copies (+ routers) only; the fused tensors never enter it."""
        if self.args.baseline == "full":
            return super().create_optimizer(model)
        if self.optimizer is None:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            wd, lr = self.args.weight_decay, self.args.learning_rate
            rlr = self.args.router_learning_rate if self.args.router_learning_rate is not None else lr
            router = list(self.router_params.items())
            groups = [
                {"params": [r.param for r in self.rows if "bias" not in r.name], "weight_decay": wd, "lr": lr},
                {"params": [r.param for r in self.rows if "bias" in r.name], "weight_decay": 0.0, "lr": lr},
                {"params": [p for k, p in router if not k.endswith("bias")], "weight_decay": wd, "lr": rlr},
                {"params": [p for k, p in router if k.endswith("bias")], "weight_decay": 0.0, "lr": rlr},
            ]
            self.optimizer = cls([g for g in groups if g["params"]], **kwargs)
        return self.optimizer

    def trainable_report(self) -> dict[str, Any]:
        """What is trained, counted honestly: rows actually trained, not whole fused tensors."""
        row_ids = {id(r.param) for r in self.rows}
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return {
            "baseline": self.args.baseline,
            "mask_mode": self.args.mask_mode,
            "trained_experts": None if self.args.baseline == "full" else self.union_mask.count(),
            "trainable_parameters": int(sum(p.numel() for p in trainable)),
            "expert_row_parameters": int(sum(r.param.numel() for r in self.rows)),
            "router_parameters": int(sum(p.numel() for p in self.router_params.values())),
            "model_parameters": int(sum(p.numel() for p in self.model.parameters() if id(p) not in row_ids)),
            "optimizer_state_bytes": optimizer_state_bytes(self.optimizer),
        }

    # -- data ----------------------------------------------------------------------
    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """DataLoader with the batch-preserving batch sampler, still prepared by accelerate (sharding, devices)."""
        dataset = self.train_dataset
        if hasattr(dataset, "column_names"):
            dataset = self._remove_unused_columns(dataset, description="Training")  # keeps META_COLUMNS
        a = self.args
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.batch_sampler, collate_fn=self.data_collator,
            num_workers=a.dataloader_num_workers, pin_memory=a.dataloader_pin_memory and a.device.type != "cpu",
            persistent_workers=a.dataloader_persistent_workers and a.dataloader_num_workers > 0,
            prefetch_factor=a.dataloader_prefetch_factor if a.dataloader_num_workers > 0 else None,
        )
        return self.accelerator.prepare(loader)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in META_COLUMNS if c not in self._signature_columns]

    # -- step ----------------------------------------------------------------------
    def _check_batch(self, inputs: Mapping[str, Any]) -> int:
        """Batch monitor: one analysis batch per step, in its original order; log it."""
        if "batch_idx" not in inputs:
            raise BatchStructureError("the batch has no batch_idx; build the dataset with moe_core.sft and keep "
                                      "remove_unused_columns=False")
        ids = torch.unique(inputs["batch_idx"]).tolist()
        if len(ids) != 1:
            raise BatchStructureError(f"training step {self.state.global_step} mixes analysis batches {ids}; each step "
                                      "must hold exactly one (use BatchPreservingSampler, no drop_last/grouping)")
        if "in_batch_idx" in inputs and (inputs["in_batch_idx"].diff() <= 0).any():
            raise BatchStructureError(
                f"batch {ids[0]} arrived out of its in-batch order: {inputs['in_batch_idx'].tolist()}"
            )
        label = inputs.get("label")
        n_unsafe = int(label.sum()) if label is not None else None
        self.batch_log.append({
            "step": int(self.state.global_step), "epoch": float(self.state.epoch or 0.0),
            "rank": int(self.args.process_index),
            "batch_idx": int(ids[0]), "n_samples": int(inputs["batch_idx"].numel()),
            "n_safe": None if label is None else int(label.numel()) - n_unsafe, "n_unsafe": n_unsafe,
            "n_tokens": int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else None,
        })
        return int(ids[0])

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        batch_idx = self._check_batch(inputs)
        gated = bool(self.batch_masks) and bool(self.rows)
        if gated:
            active = self._row_active[batch_idx]
            self._local_active = active.tolist()
            self._window_active |= active
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._local_active = None  # the gradient hooks act only inside a training step
        if gated and self.accelerator.sync_gradients:
            window = self._window_active
            if self.accelerator.num_processes > 1:  # a row moves if any rank's batch selected it
                gathered = self.accelerator.gather(window.to(self.args.device, torch.int32)[None])
                window = gathered.sum(0).cpu() > 0
            for r, keep in zip(self.rows, window.tolist()):
                if not keep:
                    r.param.grad = None  # AdamW skips it: no weight decay, no momentum
            self._window_active = torch.zeros_like(self._window_active)
        return loss

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ):
        """LM loss on the batch without its structure columns, plus the weighted router-consistency term."""
        meta = {k: inputs[k] for k in META_COLUMNS if k in inputs}
        inputs = {k: v for k, v in inputs.items() if k not in META_COLUMNS}
        direction = self.args.router_consistency_loss
        use_consistency = direction != "none" and self.args.router_consistency_weight > 0 and model.training
        routers = self._consistency_routers() if use_consistency else []
        with parametrize.cached(), capture_router_logits(routers) as logits:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if use_consistency:
            if "label" not in meta:
                raise BatchStructureError(
                    "router consistency needs the 'label' column (0 safe, 1 unsafe) in each batch"
                )
            c = router_consistency_loss(logits, inputs["attention_mask"], meta["label"], direction)
            self._consistency[0] += float(c.detach())
            self._consistency[1] += 1
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                c = c / max(1, getattr(self, "current_gradient_accumulation_steps", 1))  # LM loss is already GA-scaled
            loss = loss + self.args.router_consistency_weight * c
        return (loss, outputs) if return_outputs else loss

    def _consistency_routers(self) -> list[nn.Module]:
        layers = self.adapter.moe_layers
        if self.args.router_consistency_layers == "masked":
            if self.union_mask is None:
                raise TrainingConfigError("router_consistency_layers='masked' needs an expert mask")
            layers = sorted(self.union_mask.by_layer())
        return [self.adapter.router(l) for l in layers]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._consistency[1] and "loss" in logs:
            logs["router_consistency"] = self._consistency[0] / self._consistency[1]
            self._consistency = [0.0, 0]
        super().log(logs, start_time)

    # -- checkpoints ---------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoint = the trained rows (+ routers) as safetensors and the args as JSON; no pickle."""
        out = Path(output_dir or self.args.output_dir)
        if not self.args.should_save:
            return
        out.mkdir(parents=True, exist_ok=True)
        if self.args.baseline == "full":
            self.accelerator.unwrap_model(self.model).save_pretrained(out, state_dict=state_dict)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(out)
        else:
            save_expert_delta(self, out / DELTA_NAME)
        atomic_write_text(out / "training_args.json", self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.args.baseline == "full":
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / DELTA_NAME
        if not path.exists():
            raise TrainingConfigError(
                f"{resume_from_checkpoint} has no {DELTA_NAME}; it is not a checkpoint of this trainer"
            )
        tensors, _ = _read_delta(path)
        wanted = {r.key: r.param for r in self.rows} | dict(self.router_params)
        missing = sorted(set(wanted) - set(tensors))
        if missing:
            raise TrainingConfigError(
                f"checkpoint {resume_from_checkpoint} lacks {missing[:5]}: it was trained on other experts"
            )
        with torch.no_grad():
            for k, p in wanted.items():
                p.copy_(tensors[k].to(p.dtype))


# -- outputs ---------------------------------------------------------------------------
def save_expert_delta(model_or_trainer: Any, path: str | Path) -> Path:
    """A small safetensors file with only the trained experts' rows (+ trained routers), and a JSON beside it.

    Keys: ``layers.{l}.experts.{e}.{param}`` and ``layers.{l}.router.{param}``; the metadata
    (format, model type, shapes, which layer/expert/param) is in the file header and in
    ``<path>.json``. Works on a trainer (also after merging) or a model with rows installed.
    """
    from safetensors.torch import save_file

    if isinstance(model_or_trainer, ExpertMaskingTrainer):
        tr = model_or_trainer
        if tr.args.baseline == "full":
            raise TrainingConfigError("full fine-tuning has no expert delta; use save_merged(model, tokenizer, dir)")
        model, rows, routers, n_experts = tr.model, tr.rows, tr.router_params, tr.adapter.num_experts
    else:
        model, rows, routers = model_or_trainer, trained_rows(model_or_trainer), {}
        n_experts = _num_experts(model)
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
        "experts": [{"key": r.key, "layer": r.layer, "expert": r.expert, "param": r.name,
                     "shape": list(r.param.shape), "dtype": str(r.param.dtype)} for r in rows],
        "routers": [{"key": k, "shape": list(p.shape)} for k, p in routers.items()],
    }
    path = Path(path)
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"moe_lab": json.dumps(meta)}))
    atomic_write_json(path.with_suffix(".json"), meta)
    return path


def _num_experts(model: nn.Module) -> int | None:
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for plist in module.parametrizations.values():
                return int(plist.original.shape[0])
    return None


def _read_delta(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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
    tensors, meta = _read_delta(Path(path))
    _require_merged(base_model)
    adapter = MoEAdapter.for_model(base_model)
    mt = getattr(getattr(base_model.config, "text_config", None) or base_model.config, "model_type", None)
    if meta.get("model_type") not in (None, mt) or meta.get("num_experts") not in (None, adapter.num_experts):
        raise TrainingConfigError(
            f"delta is for {meta.get('model_type')} with {meta.get('num_experts')} experts; "
            f"this model is {mt} with {adapter.num_experts}"
        )
    writes: list[tuple[torch.Tensor, torch.Tensor]] = []  # validate everything before touching the model
    for e in meta["experts"]:
        fused = adapter.expert_parameters(e["layer"]).get(e["param"]) if e["layer"] in adapter.moe_layers else None
        t = tensors[e["key"]]
        if fused is None or tuple(fused.shape[1:]) != tuple(t.shape):
            raise TrainingConfigError(f"{e['key']}: the model has no matching tensor (shape {tuple(t.shape)})")
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


def training_metadata(trainer: ExpertMaskingTrainer, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to understand a run: masks, args, counts, loss history, batch monitor log.

    ``report``: the trainable report taken before merging (afterwards the rows are gone).
    """
    return {
        "format": METADATA_FORMAT,
        "baseline": trainer.args.baseline,
        "mask_mode": trainer.args.mask_mode,
        "expert_mask": trainer.union_mask.to_json_dict() if trainer.union_mask is not None else None,
        "batch_masks": {
            str(b): {str(l): es for l, es in m.by_layer().items()} for b, m in sorted(trainer.batch_masks.items())
        },
        "report": report or trainer.trainable_report(),
        "args": json.loads(trainer.args.to_json_string()),
        "loss_history": trainer.state.log_history,
        "batch_monitor": trainer.batch_log,
    }


@dataclass
class TrainingResult:
    """Paths and numbers of one finished training run."""

    output_dir: Path  # where everything below lives
    metadata_path: Path  # training_metadata.json
    delta_path: Path | None  # expert_delta.safetensors (None for the full baseline)
    merged_path: Path | None  # saved merged model directory, if requested (always for "full")
    metrics: dict[str, Any]  # the Trainer's train metrics (loss, runtime, ...)
    report: dict[str, Any]  # trainable_report(): parameters and optimizer-state bytes


class _ProgressCallback(TrainerCallback):
    def __init__(self, progress: ProgressFn):
        self.progress = progress

    def on_step_end(self, args, state, control, **kwargs):
        loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
        self.progress(state.global_step, state.max_steps, "" if loss is None else f"loss {loss:.4f}")


def _is_per_batch(masks: Any) -> bool:
    """Per-batch masks (dict, list of masks, [B, L, E] array) versus one union mask ([L, E])."""
    if isinstance(masks, Mapping):
        return True
    if isinstance(masks, ExpertMask):
        return False
    if isinstance(masks, (list, tuple)) and masks and isinstance(masks[0], ExpertMask):
        return True
    ndim = np.asarray(masks).ndim
    if ndim not in (2, 3):
        raise TrainingConfigError(
            f"a mask is [layers, experts] and per-batch masks are [batches, layers, experts]; got {ndim}-D"
        )
    return ndim == 3


def train_experts(
    model: nn.Module,
    tokenizer: Any,
    dataset: Any,
    mask_or_batch_masks: Any,
    config: ExpertMaskingConfig | None = None,
    output_dir: str | Path = "training",
    progress: ProgressFn | None = None,
    save_merged_model: bool = False,
    resume_from_checkpoint: str | bool | None = None,
    max_length: int = 512,
) -> TrainingResult:
    """Train, then write the delta, metadata and batch log into ``output_dir``; the model ends merged.

    ``dataset``: a tokenised batch-aware ``datasets.Dataset`` or structured batches
    (``list[list[dict]]``, tokenised here). ``mask_or_batch_masks``: an ExpertMask / 2-D array
    (union) or per-batch masks (dict / list / 3-D array; with ``config.mask_mode="per_batch"``
    they are applied per step, else their union is trained). Without ``config``, defaults are
    used with ``per_device_train_batch_size`` set to the largest analysis batch.
    """
    out = Path(output_dir)
    if isinstance(dataset, (list, tuple)):
        dataset = create_batch_aware_dataset(dataset, tokenizer, max_length)
    per_batch = _is_per_batch(mask_or_batch_masks)
    if config is None:
        size = BatchPreservingSampler(dataset, shuffle_batches=False).max_batch_size
        config = ExpertMaskingConfig(output_dir=str(out / "checkpoints"), per_device_train_batch_size=size,
                                     mask_mode="per_batch" if per_batch else "union", save_strategy="no",
                                     logging_steps=1, report_to="none")
    elif config.output_dir in (None, "trainer_output"):  # TrainingArguments' default: keep checkpoints in the run
        config.output_dir = str(out / "checkpoints")
    trainer = ExpertMaskingTrainer(
        model, config, dataset,
        expert_mask=None if per_batch else mask_or_batch_masks,
        batch_expert_masks=mask_or_batch_masks if per_batch else None,
        processing_class=tokenizer,
        callbacks=[_ProgressCallback(progress)] if progress else None,
    )
    if progress:  # the caller draws progress; the Trainer's own bar and printed log dicts would repeat it
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        report = trainer.trainable_report()  # before merging: afterwards the trained rows are gone
    finally:
        merge_trained_experts(model)  # also after an error: never leave rows spliced into the caller's model
    delta = merged = meta_path = None
    if trainer.args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        if config.baseline != "full":
            delta = save_expert_delta(trainer, out / DELTA_NAME)
        if save_merged_model or config.baseline == "full":
            merged = save_merged(model, tokenizer, out / "merged_model")
        meta_path = atomic_write_json(out / "training_metadata.json", training_metadata(trainer, report))
        atomic_write_text(out / "batch_monitor.jsonl", "".join(json.dumps(r) + "\n" for r in trainer.batch_log))
    if progress:
        progress(trainer.state.global_step, trainer.state.global_step, "done")
    return TrainingResult(out, meta_path or out / "training_metadata.json", delta, merged,
                          dict(result.metrics), report)
