"""Code shape (issue 9): no module of ``moe_core`` over MODULE_LIMIT statements and no function over
FUNCTION_LIMIT statements without a reason written next to it. Fast: reads the sources with ``ast`` and
``tokenize``, imports nothing.

Sizes are counted in logical lines (statements: tokenize's NEWLINE tokens), not physical lines, so the
formatter's wrapping (``ruff format`` puts one argument per line past 110 characters) does not change
them. The limits match the old ones (520 and 65 dense physical lines were about 340 and 45 statements).

- A module may pass MODULE_LIMIT when its docstring or first 5 lines say ``long module: <reason>``.
- A function or method may pass FUNCTION_LIMIT (``def`` to its last line) when the line right
  above its ``def`` (or above its decorators) is a comment ``# long: <reason>``.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moe_core"
APP_HELPERS = PACKAGE.parent / "ui"  # the app's shared page helpers: the same limits
MODULE_LIMIT = 320  # statements
FUNCTION_LIMIT = 45  # statements
LONG_MODULE = re.compile(r"long module:\s*\S")
LONG_FUNCTION = re.compile(r"#\s*long:\s*\S")


def _modules() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *APP_HELPERS.glob("*.py")])  # every subpackage, and the app's ui/


def _statement_lines(text: str) -> list[int]:
    """The line on which each logical line (statement) ends."""
    return [
        t.start[0] for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.NEWLINE
    ]


def _module_excused(tree: ast.Module, lines: list[str]) -> bool:
    doc = ast.get_docstring(tree) or ""
    return bool(LONG_MODULE.search(doc) or LONG_MODULE.search("\n".join(lines[:5])))


def _function_excused(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> bool:
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    above = lines[first - 2].strip() if first >= 2 else ""  # lines are 0-based, linenos 1-based
    return bool(LONG_FUNCTION.match(above))


def _offenders() -> tuple[list[str], list[str]]:
    long_modules, long_functions = [], []
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text, filename=str(path))
        name = path.relative_to(PACKAGE.parent).as_posix()
        ends = _statement_lines(text)
        if len(ends) > MODULE_LIMIT and not _module_excused(tree, lines):
            long_modules.append(f"{name}: {len(ends)} statements (+{len(ends) - MODULE_LIMIT})")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            n = sum(1 for e in ends if node.lineno <= e <= node.end_lineno)  # type: ignore[operator]
            if n > FUNCTION_LIMIT and not _function_excused(node, lines):
                long_functions.append(
                    f"{name}:{node.lineno} {node.name}(): {n} statements (+{n - FUNCTION_LIMIT})"
                )
    return long_modules, long_functions


def test_the_walk_sees_the_package() -> None:
    assert len(_modules()) >= 50 and PACKAGE.joinpath("store", "run.py") in _modules()


def test_modules_and_functions_are_short_or_say_why() -> None:
    long_modules, long_functions = _offenders()
    report = []
    if long_modules:
        report.append(
            f"modules over {MODULE_LIMIT} statements (split them, or write 'long module: <reason>' in the docstring):\n  "
            + "\n  ".join(long_modules)
        )
    if long_functions:
        report.append(
            f"functions over {FUNCTION_LIMIT} statements (split them, or put '# long: <reason>' right above the def):\n  "
            + "\n  ".join(long_functions)
        )
    assert not report, "\n".join(report)


def test_the_checks_catch_what_they_should(tmp_path) -> None:
    """The excuse markers are read where the rule says, and nowhere else."""
    body = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION_LIMIT))
    src = f"# long: builds one table in one pass\ndef excused():\n{body}\n\n\ndef plain():\n{body}\n"
    src += f"\n\n# long: a reason\n@staticmethod\ndef decorated():\n{body}\n"
    tree = ast.parse(src)
    lines = src.splitlines()
    funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert _function_excused(funcs["excused"], lines)
    assert not _function_excused(funcs["plain"], lines)
    assert _function_excused(funcs["decorated"], lines)
    assert not _function_excused(funcs["excused"], ["# long:", *lines[1:]])  # a reason is required
    doc = ast.parse('"""Tables.\n\nlong module: one format, read and written together."""\n')
    assert _module_excused(doc, []) and not _module_excused(ast.parse('"""Tables."""\n'), ["x = 1"])
