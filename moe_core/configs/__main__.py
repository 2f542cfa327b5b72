"""``python -m moe_core.configs [NAME]``: the path of a shipped accelerate config (all of them without NAME)."""

import sys

from moe_core import accelerate_config, accelerate_configs

from ..errors import MoELabError


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
