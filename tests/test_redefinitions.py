"""No module defines the same top-level function or class twice: the later one silently replaces the earlier
(two test sections each writing a helper of the same name broke the earlier section's tests once)."""

import ast
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for d in ("src", "tests", "tools", "benchmarks") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_top_level_name_is_defined_twice(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = Counter(
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name != "_"
    )
    twice = sorted(name for name, n in names.items() if n > 1)
    assert not twice, f"{path.relative_to(ROOT)} defines {', '.join(twice)} more than once"
