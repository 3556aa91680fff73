"""h3fusion.data is the bottom layer: none of its modules imports the trainers, models or losses (not even inside a
function), so there is no data <-> trainers import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import h3fusion.data

_ABOVE = ("trainers", "models", "losses", "cli")


def _imported_modules(path: Path) -> list[str]:
    """Every module a file imports, absolute (relative imports resolved against h3fusion.data)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ["h3fusion", "data"][: max(2 - (node.level - 1), 0)] if node.level else []
            out.append(".".join(base + ([node.module] if node.module else [])))
    return out


def test_data_imports_nothing_above_it():
    files = sorted(Path(h3fusion.data.__file__).parent.glob("*.py"))
    assert any(f.name == "preference.py" for f in files)
    bad = [
        (f.name, m)
        for f in files
        for m in _imported_modules(f)
        if any(m == f"h3fusion.{layer}" or m.startswith(f"h3fusion.{layer}.") for layer in _ABOVE)
    ]
    assert not bad, bad


def test_the_checker_sees_a_function_level_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def g():\n    from ..trainers.sequence_logprobs import encode_example\n")
    assert "h3fusion.trainers.sequence_logprobs" in _imported_modules(f)
