"""zopt's import graph read from the source with ``ast`` (nothing is imported): every module, and
the zopt modules each one imports at any depth (module level, inside functions, ``TYPE_CHECKING``
blocks, ``importlib.import_module`` of a literal name). Shared by the layering tests."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "zopt"


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _known(name: str) -> str | None:
    """The longest prefix of dotted ``name`` that is a zopt module."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in MODULES:
            return cand
        parts.pop()
    return None


def imports_of(mod: str) -> list[tuple[str, int]]:
    """(imported zopt module, line) for every import statement in ``mod``, at any depth."""
    tree = ast.parse(MODULES[mod].read_text(), str(MODULES[mod]))
    package = mod if is_package(mod) else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            if (t := _known(node.args[0].value)) is not None:  # importlib.import_module("zopt.x.y")
                out.append((t, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if (t := _known(a.name)) is not None:
                    out.append((t, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("zopt"):
                continue
            for a in node.names:
                t = _known(f"{base}.{a.name}") or _known(base)
                if t is not None:
                    out.append((t, node.lineno))
    return out
