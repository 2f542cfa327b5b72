"""The package's layers as a contract (issue 18): no import cycle anywhere in ``moe_core``, imports
made inside functions included, and each layer imports only the layers below it.

Why a test and not only a habit: a flat folder once hid a 22-module cycle behind imports made
inside functions. ``grimp`` (import-linter's graph) reads every import statement, wherever it sits.
"""

from __future__ import annotations

import grimp
import pytest

# top to bottom; a layer may import only layers after it in this list. Names in one tuple are
# siblings: independent of each other.
LAYERS: list[tuple[str, ...]] = [
    ("moe_core.__main__",),
    ("moe_core.cli",),
    ("moe_core.jobs", "moe_core.study", "moe_core.demo", "moe_core.doctor", "moe_core.compat"),
    ("moe_core.pipeline",),
    ("moe_core.specs",),
    ("moe_core.eval",),
    ("moe_core.train",),
    ("moe_core.analysis",),
    ("moe_core.model",),
    ("moe_core.judge",),
    ("moe_core.batching",),
    ("moe_core.store",),
    ("moe_core.errors", "moe_core.types"),
]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # imports under `if TYPE_CHECKING:` count too: a type named from a layer above is a dependency all the same
    return grimp.build_graph(
        "moe_core", include_external_packages=False, exclude_type_checking_imports=False, cache_dir=None
    )


def _layer_of(module: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return None


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def test_there_is_no_import_cycle(graph: grimp.ImportGraph) -> None:
    assert _cycles(_edges(graph)) == []


def test_each_layer_imports_only_the_layers_below_it(graph: grimp.ImportGraph) -> None:
    wrong = []
    for a, targets in _edges(graph).items():
        la = _layer_of(a)
        for b in targets:
            lb = _layer_of(b)
            if la is None or lb is None or b == "moe_core":
                continue
            same_sibling = la == lb and a.split(".")[:2] == b.split(".")[:2]
            if lb < la or (lb == la and not same_sibling):
                wrong.append(f"{a} -> {b}")
    assert not wrong, "imports against the layers (see LAYERS):\n  " + "\n  ".join(sorted(wrong))


def test_every_module_has_a_layer(graph: grimp.ImportGraph) -> None:
    loose = sorted(
        m
        for m in graph.modules
        if m != "moe_core"
        and _layer_of(m) is None
        and not m.startswith(("moe_core.configs", "moe_core.resources"))
    )
    assert loose == [], "add these modules to LAYERS"


def test_the_checks_catch_a_cycle_and_a_layer_break() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _layer_of("moe_core.store.run") > _layer_of("moe_core.train.sft")  # lower layers sit later


def test_the_top_folder_stays_small() -> None:
    from pathlib import Path

    top = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "moe_core").glob("*.py"))
    assert len(top) <= 12, top
