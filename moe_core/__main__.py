"""``python -m moe_core``: see moe_core/cli.py."""

import sys

from moe_core.cli import main

sys.exit(main())
