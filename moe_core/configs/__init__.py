"""Shipped configuration files: accelerate launch configs for 1, 2 and 8 GPUs and FSDP.

python -m moe_core.configs                  # list them with their paths
accelerate launch --config_file "$(python -m moe_core.configs 8gpu)" -m moe_core train --run RUN
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import MoELabError


def accelerate_configs() -> dict[str, Path]:
    """Name (``1gpu``, ``2gpu``, ``8gpu``, ``fsdp_8gpu``) -> path of the shipped accelerate config."""
    folder = resources.files(__name__) / "accelerate"
    return {p.name[: -len(".yaml")]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def accelerate_config(name: str) -> Path:
    """The path of one shipped accelerate config, or a clear error naming the ones there are."""
    configs = accelerate_configs()
    if name not in configs:
        raise MoELabError(f"no accelerate config {name!r}; shipped: {', '.join(sorted(configs))}")
    return configs[name]
