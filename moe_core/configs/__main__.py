"""``python -m moe_core.configs [NAME]``: the path of a shipped accelerate config (all of them without NAME)."""

import sys

from ..errors import MoELabError
from . import accelerate_config, accelerate_configs


def main(argv: list[str]) -> int:
    if not argv:
        for name, path in sorted(accelerate_configs().items()):
            print(f"{name}\t{path}")
        return 0
    try:
        print(accelerate_config(argv[0]))
    except MoELabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
