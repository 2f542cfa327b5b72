"""Test-session set-up: the same CPU thread policy as the CLI (see models.default_cpu_threads).

App and browser tests start the app and CLI jobs as separate processes beside pytest; capping
threads keeps them from oversubscribing a small CI machine.
"""

import torch

from moe_core.models import default_cpu_threads

if not torch.cuda.is_available():
    torch.set_num_threads(default_cpu_threads())
