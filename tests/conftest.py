"""Test-session set-up: the same CPU thread policy as the CLI (see models.default_cpu_threads).

App and browser tests start the app and CLI jobs as separate processes beside pytest; capping
threads keeps them from oversubscribing a small CI machine.
"""

import pytest

from moe_core.model.adapter import apply_cpu_thread_policy

apply_cpu_thread_policy()


@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    """An empty runs root the app uses (MOE_LAB_RUNS)."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    return root
