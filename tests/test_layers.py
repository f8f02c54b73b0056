"""The import graph of ``zopt`` only looks down.

Every module's imports are read with ``ast`` (module level, function level and ``TYPE_CHECKING``
blocks alike, plus ``importlib.import_module`` of a literal name: a lazy import is still a
dependency) and checked against one declared order, lowest first. A module may import modules of its own layer or of a lower one; an import of a higher layer
is an *upward edge* and fails the test, as does any import cycle whose modules belong to different
packages (each top-level module of ``zopt`` counts as its own package).

The order follows the data flow of the design (source -> family -> platform -> policy -> format
-> runtime -> bench -> publish -> commands -> cli -> facade), with these choices the code asked for:

* ``families`` sits right above ``checkpoint``: a family reads sources (key maps are lazy
  ``TensorSource`` views) and builds its own tiny model, but knows no format, backend or runtime.
  ``zopt.models`` is kept there as the old address of the tiny/synthetic builders.
* ``platform`` (hardware, backend registry) sits below ``policy`` and ``formats``: formats declare
  their kernels to it, never the other way round.
* ``lora`` joins ``policy``: reading LoRA files and merging them is per-tensor data that converters
  consume, and the run-time branches are attached by the formats above it.
* ``publish`` and ``card`` share a layer (the card renders what publishing assembled).
* The facade ``zopt/__init__.py`` is the top: nothing inside the package imports it; the version
  lives in the leaf ``zopt._version``.

A module that matches no layer fails the test too, so a new top-level module must be placed.
"""

from __future__ import annotations

import ast

import pytest
from import_graph import MODULES, ROOT, imports_of, is_package  # noqa: F401

# lowest first; a name covers the module and everything below it
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("leaves", ("zopt.errors", "zopt._version", "zopt._io", "zopt.progress", "zopt.safetensors_io",
                "zopt._compile", "zopt.quiet", "zopt.validate", "zopt.ggml")),
    ("checkpoint", ("zopt.checkpoint",)),
    ("families", ("zopt.families", "zopt.models")),
    ("platform", ("zopt.platform",)),
    ("policy", ("zopt.policy", "zopt.lora")),
    ("formats", ("zopt.formats",)),
    ("runtime", ("zopt.runtime",)),
    # the micro model's training script samples through the runtime's pipeline, as users do
    ("training", ("zopt.families.zimage.micro.train",)),
    ("bench", ("zopt.bench",)),
    ("publish", ("zopt.publish", "zopt.card")),
    ("commands", ("zopt.commands",)),
    ("cli", ("zopt.cli",)),
    ("facade", ("zopt",)),
)

# Edges that exist only until backends become registry data (formats declare their kernels to the
# platform layer; select() runs once and its choice is passed into load). Each is to be removed
# then; nothing else may be added here.
UNTIL_BACKENDS_ARE_REGISTRY_DATA: frozenset[tuple[str, str]] = frozenset()


def layer_of(mod: str) -> int | None:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def unit_of(mod: str) -> str:
    """The package a module belongs to; top-level modules of zopt are each their own."""
    if is_package(mod):
        return mod
    parent = mod.rpartition(".")[0]
    return mod if parent == "zopt" else parent


def graph() -> dict[str, dict[str, int]]:
    g: dict[str, dict[str, int]] = {}
    for m in MODULES:
        edges: dict[str, int] = {}
        for t, line in imports_of(m):
            if t != m:
                edges.setdefault(t, line)
        g[m] = edges
    return g


def strongly_connected(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _where(mod: str, line: int) -> str:
    return f"{MODULES[mod].relative_to(ROOT.parent)}:{line}"


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, "modules in no declared layer (add them to LAYERS): " + ", ".join(missing)


def test_no_upward_edges():
    g = graph()
    bad, allowed = [], set()
    for m, edges in sorted(g.items()):
        for t, line in sorted(edges.items()):
            lm, lt = layer_of(m), layer_of(t)
            if lm is None or lt is None or lt <= lm:
                continue
            if (m, t) in UNTIL_BACKENDS_ARE_REGISTRY_DATA:
                allowed.add((m, t))
                continue
            bad.append(f"{_where(m, line)}: {m} ({LAYERS[lm][0]}) imports {t} ({LAYERS[lt][0]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)
    stale = UNTIL_BACKENDS_ARE_REGISTRY_DATA - allowed
    assert not stale, f"allowlisted edges that no longer exist (remove them): {sorted(stale)}"


def test_no_cycles_between_packages():
    # the allowlisted edges are on their way out: cycles must not depend on them either
    g = {m: {t: line for t, line in edges.items() if (m, t) not in UNTIL_BACKENDS_ARE_REGISTRY_DATA}
         for m, edges in graph().items()}
    bad = []
    for comp in strongly_connected(g):
        if len({unit_of(m) for m in comp}) < 2:
            continue  # a cycle inside one package is that package's own business
        members = set(comp)
        edges = [f"  {_where(m, line)}: {m} -> {t}" for m in comp for t, line in sorted(g[m].items())
                 if t in members]
        bad.append(f"cycle through {', '.join(comp)}:\n" + "\n".join(edges))
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_facade():
    g = graph()
    bad = [f"{_where(m, line)}: {m}" for m, edges in sorted(g.items()) for t, line in edges.items()
           if t == "zopt" and m != "zopt"]
    assert not bad, "modules importing the root facade (import from zopt._version etc. instead):\n" + "\n".join(bad)


def _names_zimage_class(tree: ast.AST) -> list[tuple[str, int]]:
    hits = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Name):
            name = node.id
        elif isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.alias):
            name = node.name.rpartition(".")[2]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            name = node.value
        if name and name.startswith("ZImage") and name.isidentifier():
            hits.append((name, getattr(node, "lineno", 0)))
    return hits


def test_only_families_name_zimage_classes():
    """Z-Image's classes (diffusers' model and pipeline, the export graph) are reached through the
    family, so a second family needs no edit outside ``zopt/families``."""
    bad = []
    for m, f in MODULES.items():
        if m == "zopt.families" or m.startswith("zopt.families."):
            continue
        for name, line in _names_zimage_class(ast.parse(f.read_text())):
            bad.append(f"{_where(m, line)}: {name}")
    assert not bad, "Z-Image classes named outside zopt/families:\n" + "\n".join(bad)


@pytest.mark.parametrize("src, expected", [
    ("from ..formats import FORMATS\n", "zopt.formats"),
    ("def f():\n    from ..formats.gguf import loader\n", "zopt.formats.gguf.loader"),
    ("import zopt.runtime.pipeline as P\n", "zopt.runtime.pipeline"),
    ("import importlib\nimportlib.import_module('zopt.bench.worker')\n", "zopt.bench.worker"),
])
def test_the_walker_sees_lazy_and_relative_imports(tmp_path, monkeypatch, src, expected):
    """The checks above are only as good as the walker: a function-level relative import, an
    absolute import and an ``importlib`` call by literal name must each show up as an edge."""
    monkeypatch.setitem(MODULES, "zopt.platform.hardware", tmp_path / "hardware.py")
    (tmp_path / "hardware.py").write_text(src)
    assert [t for t, _ in imports_of("zopt.platform.hardware")] == [expected]
