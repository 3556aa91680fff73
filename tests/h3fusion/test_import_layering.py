"""Layering (issue 14 item 4): no import cycle through the fusion I/O modules or the CLI, and no CLI subcommand
imports another one. Imports inside functions count too (a lazy import hides a cycle, it does not remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

from h3fusion.cli import SUBCOMMANDS

PACKAGE = Path(__file__).resolve().parents[2] / "python" / "h3fusion"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The h3fusion modules `path` imports anywhere (top level or inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return False


def test_no_cycle_through_fusion_io_or_cli():
    graph = _graph()
    watched = [m for m in graph if m.startswith(("h3fusion.models.", "h3fusion.cli.", "h3fusion.utils."))]
    watched = [m for m in watched if not m.endswith("__init__") and m.count(".") == 2]
    assert "h3fusion.models.checkpoint_io" in watched and "h3fusion.models.lora_merge" in watched
    cycles = [m for m in watched if _reaches({k: v - {"h3fusion", "h3fusion.models"} for k, v in graph.items()}, m, m)]
    assert not cycles, f"import cycles through {cycles}"


def test_subcommands_do_not_import_each_other():
    graph = _graph()
    subcommands = {f"h3fusion.cli.{m}" for m in SUBCOMMANDS.values()}
    for name in subcommands:
        assert not graph[name] & subcommands, f"{name} imports {graph[name] & subcommands}"


def test_the_checker_sees_lazy_imports():
    # the checker must find an import inside a function, or the tests above could pass on a hidden cycle
    assert "h3fusion.models.fuse" in _imports(PACKAGE / "cli" / "fuse.py", set(_graph()))  # inside run()
    assert _reaches({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a", "a") and not _reaches({"a": {"b"}}, "a", "a")
