"""The codebase stays readable in an afternoon (CONTRIBUTING.md): no function in
python/flextron over 60 lines, no class over 250."""

from __future__ import annotations

import ast
from pathlib import Path

import flextron

MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 250


def oversized(package: Path) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit = MAX_FUNCTION_LINES
            elif isinstance(node, ast.ClassDef):
                limit = MAX_CLASS_LINES
            else:
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append(f"{path.relative_to(package)}: {node.name} has {lines} lines")
    return found


def test_no_function_over_60_lines_and_no_class_over_250():
    found = oversized(Path(flextron.__file__).parent)
    assert not found, "split these (CONTRIBUTING.md, rules of the house):\n" + "\n".join(found)


def test_the_size_check_sees_a_long_function_and_a_long_class(tmp_path):
    (tmp_path / "long.py").write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    (tmp_path / "big.py").write_text("class C:\n" + "    x = 1\n" * MAX_CLASS_LINES)
    (tmp_path / "fine.py").write_text("def g():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1))
    assert oversized(tmp_path) == ["big.py: C has 251 lines", "long.py: f has 61 lines"]
