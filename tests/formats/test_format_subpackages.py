"""Inside each format subpackage imports only look one way: the package entry (``__init__``) may
import its modules, no module imports the entry, and the modules' imports form no cycle. Module-
and function-level imports both count (read from the source with ast, nothing is imported)."""

from __future__ import annotations

from pathlib import Path

import pytest
from import_graph import MODULES, ROOT, imports_of

SUBPACKAGES = ("formats/gguf", "formats/lowbit")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The zopt modules ``path`` imports, at any depth (the layering tests' walker)."""
    return {t for t, _ in imports_of(_module_name(path))}


def _graph(package: str) -> dict[str, set[str]]:
    modules = {_module_name(p) for p in (ROOT / package).glob("*.py")}
    return {m: imported_modules(MODULES[m]) & modules for m in modules}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n] if n in path else path + [n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_no_module_imports_its_package_entry(package):
    graph = _graph(package)
    entry = _module_name(ROOT / package / "__init__.py")
    upward = sorted(m for m, deps in graph.items() if m != entry and entry in deps)
    assert not upward, f"modules importing {entry}: {upward}"


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_no_import_cycle_inside_the_subpackage(package):
    graph = _graph(package)
    entry = _module_name(ROOT / package / "__init__.py")
    graph = {m: deps - {entry} for m, deps in graph.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path):
    """The walk counts imports inside functions, and the cycle finder finds a two-module cycle."""
    assert "zopt.formats.gguf.loader" in imported_modules(ROOT / "formats/gguf/__init__.py")  # inside load()
    assert _cycle({"a": {"b"}, "b": {"a"}}) in (["a", "b", "a"], ["b", "a", "b"])
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_ggml_dequantizer_is_a_leaf_below_the_formats():
    """zopt.ggml serves the read path, so it may import nothing of zopt but the error types."""
    own = {m for m in imported_modules(ROOT / "ggml.py") if m.startswith("zopt")}
    assert own <= {"zopt.errors"}, own
