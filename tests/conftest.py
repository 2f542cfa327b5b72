"""Test-session set-up: the same CPU thread policy as the CLI (see models.default_cpu_threads).

App and browser tests start the app and CLI jobs as separate processes beside pytest; capping
threads keeps them from oversubscribing a small CI machine.
"""

from moe_core.model.adapter import apply_cpu_thread_policy

apply_cpu_thread_policy()
