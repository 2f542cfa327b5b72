"""Test-session set-up: the same CPU thread policy as the CLI (see models.default_cpu_threads).

App and browser tests start the app and CLI jobs as separate processes beside pytest; capping
threads keeps them from oversubscribing a small CI machine.
"""

import pytest

from moe_core.model.adapter import apply_cpu_thread_policy

apply_cpu_thread_policy()

# The slowest files first. `make test` runs its workers a file at a time, in this order
# (--no-loadscope-reorder): the longest start at once on separate workers and the short files fill in
# behind them, instead of one long file starting last while the other workers run idle.
SLOW_FIRST = ("test_browser.py", "test_demo.py", "test_vllm.py", "test_study.py", "test_faults_study.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: each file's order kept


@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    """An empty runs root the app uses (MOE_LAB_RUNS)."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("MOE_LAB_RUNS", str(root))
    return root
