"""Load a model + tokenizer and look inside its MoE layers through one adapter interface.

Every transformers-5 MoE family stores a layer's experts fused (``mlp.experts.gate_up_proj
[E, ...]``, ``mlp.experts.down_proj [E, ...]``; dim 0 is always the expert) and has a router
module (``mlp.gate``, or ``mlp.router`` for gpt-oss) whose forward returns
``(router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])``. ``MoEAdapter`` is the one
place that knows where those live per family; routing capture, training and steering only talk
to the adapter, never to ``hasattr`` chains.

    model, tok = load_model("/path/to/OLMoE-1B-7B-0125-Instruct")
    ad = MoEAdapter.for_model(model)
    ad.moe_layers, ad.num_experts, ad.top_k, ad.router(3), ad.expert_parameters(3)
    with ad.router_hooks(lambda layer, router, args, out: print(layer, out[2].shape)):
        model(**batch)                           # every router forward calls the function

Router hooks: routing capture (``routing.capture_routing``), steering (``steering.steer_experts``)
and the router-consistency loss (``training``) all go through :meth:`MoEAdapter.router_hooks`.
The order is fixed here, in one place (:data:`ROUTER_HOOK_STAGES`): on every router forward the
``"steer"`` functions run first and may replace the router's output, then the ``"observe"``
functions see the final output (so a capture always records the steered choice, whichever
``with`` block was opened first). Within a stage, functions run in the order they were added.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_core.errors import MoELabError

log = logging.getLogger(__name__)


class NotAnMoEModelError(MoELabError, ValueError):
    """The model has no router/fused-experts layers this tool can read."""


class ModelLoadError(MoELabError, ValueError):
    """A model could not be loaded; the message says what to do."""


# -- router hooks: one dispatcher per router module, stages in a fixed order -----------------------
ROUTER_HOOK_STAGES = ("steer", "observe")  # run in this order on every router forward
RouterHook = Callable[[int, nn.Module, Any, Any], Any]  # fn(layer, router, args, output)


class _RouterDispatch:
    """The single forward hook on one router: runs the registered functions stage by stage.

    Registered with ``prepend=True`` so that it also runs before any foreign hook added later
    (those then see the steered output too).
    """

    def __init__(self, router: nn.Module):
        self.entries: list[tuple[int, int, int, str, RouterHook]] = []  # (stage rank, seq, layer, stage, fn)
        self._seq = 0
        self.handle = router.register_forward_hook(self, prepend=True)

    def add(self, layer: int, stage: str, fn: RouterHook) -> tuple:
        self._seq += 1
        entry = (ROUTER_HOOK_STAGES.index(stage), self._seq, layer, stage, fn)
        self.entries.append(entry)
        self.entries.sort(key=lambda e: e[:2])
        return entry

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        for _, _, layer, stage, fn in list(self.entries):
            result = fn(layer, module, args, output)
            if stage == "steer":
                output = output if result is None else result
            elif result is not None:
                raise RuntimeError(
                    f"an 'observe' router hook returned a value (layer {layer}); only 'steer' hooks may"
                )
        return output


_DISPATCH: weakref.WeakKeyDictionary[nn.Module, _RouterDispatch] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class MoEFamily:
    """Where one architecture keeps its MoE parts (relative to a decoder layer)."""

    block_attr: str = "mlp"  # the sparse MoE block in a decoder layer
    router_attr: str = "gate"  # router module inside the block
    experts_attr: str = "experts"  # fused experts module inside the block
    shared_attr: str | None = None  # always-on shared expert(s), never routed
    router_kind: str = "softmax-topk"  # how the router picks experts (for steering and docs)


FAMILIES: dict[str, MoEFamily] = {
    "olmoe": MoEFamily(),
    "mixtral": MoEFamily(),
    "qwen2_moe": MoEFamily(shared_attr="shared_expert"),
    "qwen3_moe": MoEFamily(),
    "deepseek_v2": MoEFamily(shared_attr="shared_experts", router_kind="softmax-group-topk"),
    "deepseek_v3": MoEFamily(shared_attr="shared_experts", router_kind="sigmoid-bias-group-topk"),
    "gpt_oss": MoEFamily(router_attr="router", router_kind="topk-softmax"),
    "phimoe": MoEFamily(block_attr="block_sparse_moe", router_kind="sparsemixer"),
}


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "model.language_model.layers", "language_model.model.layers", "layers"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise NotAnMoEModelError(f"cannot find the decoder layers of {type(model).__name__}")


class MoEAdapter:
    """A view of one loaded MoE model: its MoE layers, routers, fused expert parameters.

    Layer indices are decoder-layer indices; ``moe_layers`` lists those that route (DeepSeek's
    first layers can be dense and are absent from it).
    """

    def __init__(self, model: nn.Module, family: MoEFamily):
        self.model = model
        self.family = family
        self.layers = _decoder_layers(model)
        self._blocks: dict[int, nn.Module] = {}
        for i, layer in enumerate(self.layers):
            block = getattr(layer, family.block_attr, None)
            if (
                block is not None
                and hasattr(block, family.router_attr)
                and hasattr(block, family.experts_attr)
            ):
                self._blocks[i] = block
        if not self._blocks:
            raise NotAnMoEModelError(
                f"{type(model).__name__} has no MoE layers (no '{family.block_attr}.{family.router_attr}' router "
                f"beside '{family.block_attr}.{family.experts_attr}'): this tool needs a Mixture-of-Experts model"
            )
        first = self.expert_parameters(self.moe_layers[0])
        self.num_experts = int(next(iter(first.values())).shape[0])
        cfg = getattr(model, "config", None)
        cfg = getattr(cfg, "text_config", None) or cfg
        top_k = getattr(cfg, "num_experts_per_tok", None) or getattr(
            self.router(self.moe_layers[0]), "top_k", None
        )
        if not top_k:
            raise NotAnMoEModelError("cannot tell how many experts each token uses (num_experts_per_tok)")
        self.top_k = int(top_k)

    @classmethod
    def for_model(cls, model: nn.Module) -> MoEAdapter:
        cfg = getattr(model, "config", None)
        model_type = getattr(getattr(cfg, "text_config", None), "model_type", None) or getattr(
            cfg, "model_type", ""
        )
        family = FAMILIES.get(model_type)
        if family is None:
            # Unknown family: try the common layout before giving up with a clear error.
            try:
                return cls(model, MoEFamily())
            except NotAnMoEModelError as e:
                raise NotAnMoEModelError(
                    f"model type '{model_type}' is not a supported MoE family "
                    f"(supported: {', '.join(sorted(FAMILIES))}). {e}"
                ) from None
        return cls(model, family)

    # -- structure ----------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return str(getattr(self.model.config, "model_type", "?"))

    @property
    def num_layers(self) -> int:
        """Decoder layers (the row count of an ExpertMask)."""
        return len(self.layers)

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self._blocks)

    def block(self, layer: int) -> nn.Module:
        try:
            return self._blocks[layer]
        except KeyError:
            raise IndexError(f"layer {layer} is not an MoE layer (MoE layers: {self.moe_layers})") from None

    def router(self, layer: int) -> nn.Module:
        return getattr(self.block(layer), self.family.router_attr)

    def experts(self, layer: int) -> nn.Module:
        return getattr(self.block(layer), self.family.experts_attr)

    def router_parameters(self, layer: int) -> dict[str, nn.Parameter]:
        return dict(self.router(layer).named_parameters())

    def expert_parameters(self, layer: int) -> dict[str, nn.Parameter]:
        """Fused expert tensors of a layer (dim 0 = expert), keyed by their name in the experts module.

        gpt-oss adds biases ``gate_up_proj_bias [E, 2I]``/``down_proj_bias [E, H]``; they are
        per-expert too and included.
        """
        params = {n: p for n, p in self.experts(layer).named_parameters(recurse=False)}
        if not params:
            raise NotAnMoEModelError(
                f"layer {layer}: experts are not fused 3-D tensors ({type(self.experts(layer)).__name__}); "
                "this tool needs transformers >= 5 MoE models"
            )
        return params

    def expert_parameter_names(self, layer: int) -> dict[str, str]:
        """Fully-qualified model parameter name for each fused expert tensor of a layer."""
        full = {id(p): n for n, p in self.model.named_parameters()}
        return {n: full[id(p)] for n, p in self.expert_parameters(layer).items()}

    @contextmanager
    def router_hooks(
        self, fn: RouterHook, *, stage: str = "observe", layers: Iterable[int] | None = None
    ) -> Iterator[None]:
        """Call ``fn(layer, router, args, output)`` on every router forward of ``layers`` inside the block.

        ``output`` is the router's ``(router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])``.
        ``stage="steer"``: ``fn`` may return a replacement output (None keeps it); steer functions
        run before every ``"observe"`` function, which must return None. ``layers``: MoE layers
        (default all). The functions are always removed on exit, also when the block raises; the
        router's forward hook itself goes once no function of any adapter is left on it.
        """
        if stage not in ROUTER_HOOK_STAGES:
            raise ValueError(f"stage={stage!r}; choose one of {ROUTER_HOOK_STAGES}")
        chosen = self.moe_layers if layers is None else [int(l) for l in layers]
        added: list[tuple[_RouterDispatch, tuple, nn.Module]] = []
        try:
            for layer in chosen:
                router = self.router(layer)
                dispatch = _DISPATCH.get(router)
                if dispatch is None:
                    dispatch = _DISPATCH[router] = _RouterDispatch(router)
                added.append((dispatch, dispatch.add(layer, stage, fn), router))
            yield
        finally:
            for dispatch, entry, router in added:
                dispatch.entries.remove(entry)
                if not dispatch.entries:
                    dispatch.handle.remove()
                    _DISPATCH.pop(router, None)

    def describe(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "moe_layers": self.moe_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "router_kind": self.family.router_kind,
            "shared_experts": self.family.shared_attr is not None,
        }


def is_local_model_dir(name_or_path: str | Path) -> bool:
    p = Path(name_or_path).expanduser()
    return p.is_dir() and (p / "config.json").exists()


def load_model(
    name_or_path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """Load a causal LM + tokenizer (a local directory or a HF hub id) and check it is MoE.

    Raises ModelLoadError with an actionable message when the directory is missing, the hub is
    unreachable (offline), or files are broken; NotAnMoEModelError for a dense model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(Path(name_or_path).expanduser()) if is_local_model_dir(name_or_path) else str(name_or_path)
    p = Path(src).expanduser()
    if (p.is_absolute() or src.startswith(".")) and not is_local_model_dir(p):
        raise ModelLoadError(f"no model directory at {p} (expected a folder with config.json)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelLoadError(
            f"could not load '{src}': {e}. If this is a Hugging Face id, this machine may be offline: "
            "download the model elsewhere and point to its local directory."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    MoEAdapter.for_model(model)  # fail early, with a clear message, on a dense model
    return model, tokenizer


def default_cpu_threads() -> int:
    """Intra-op CPU threads for our work: one per four cores, 1 to 4.

    Small MoE models gain little from a second thread, while on a shared 2-core machine two
    spinning threads per process made a training step 8x slower (1.6 s vs 0.2 s measured).
    ``MOE_LAB_THREADS`` overrides it.
    """
    env = os.environ.get("MOE_LAB_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return min(4, max(1, (os.cpu_count() or 1) // 4))


def apply_cpu_thread_policy() -> None:
    """Without a GPU, cap torch's intra-op threads at ``default_cpu_threads()`` for this process."""
    if not torch.cuda.is_available():
        torch.set_num_threads(default_cpu_threads())


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
