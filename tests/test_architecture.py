"""The package's import structure: no circles between modules, and every import points down.

Every import counts: module level, inside functions, and under ``TYPE_CHECKING`` (a circle
hidden behind a local import is still a circle). The layers, bottom first, are documented in
docs/architecture.md; a module may import its own layer and the layers below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "mixprec"

# Bottom first. A name is a subpackage or a top-level module of mixprec; the last layer holds the
# entry points, which nothing in the package imports.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),  # typed exceptions
    ("core",),  # precisions, granularities, param specs
    ("quant",),  # quantization math, observers, quantizer modules
    ("config",),  # the sim config
    ("capture",),  # graph capture
    ("sim",),  # placement, runtime, calibration, effective precisions, PrecisionState
    ("export",),  # ONNX export, the encodings file
    ("plan",),  # mixed-precision requests, targets, resolution
    ("report",),  # the report of a plan, text and HTML
    ("quantsim",),  # QuantizationSimModel: the composition root of the engine
    ("mixed", "checkpoint"),  # MixedPrecisionConfigurator and profiles; save/load_checkpoint
    ("analysis",),  # sensitivity analysis on the sim, with profiles to start from
    ("cli", "cli_sensitivity", "demo", "__init__", "__main__"),  # entry points and the public API
)
LAYER_OF = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _owning_module(dotted: str) -> str | None:
    """The module of the package that ``dotted`` names or lives in (None: outside the package)."""
    while dotted:
        if dotted in MODULES:
            return dotted
        dotted = dotted.rpartition(".")[0]
    return None


def imports_of(name: str) -> set[str]:
    """Every mixprec module that module ``name`` imports, wherever the import statement is."""
    path = MODULES[name]
    return imports_in(name, path.read_text(encoding="utf-8"), is_package=path.name == "__init__.py")


def imports_in(name: str, source: str, is_package: bool = False) -> set[str]:
    """Every mixprec module that ``source``, the text of module ``name``, imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from pkg import mod" imports the module pkg.mod; "from mod import name" imports mod
            submodules = [f"{prefix}.{alias.name}" for alias in node.names]
            targets = [t for t in submodules if t in MODULES] or [prefix]
        else:
            continue
        for target in targets:
            owner = _owning_module(target)
            if owner is not None and owner != name:
                found.add(owner)
    return found


GRAPH: dict[str, set[str]] = {name: imports_of(name) for name in MODULES}


def layer(module: str) -> int:
    """The rank of a module's layer: its subpackage, or the top-level module itself."""
    parts = module.split(".")
    key = "__init__" if len(parts) == 1 else parts[1]
    return LAYER_OF[key]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_every_module_belongs_to_a_layer() -> None:
    unplaced = []
    for name in MODULES:
        try:
            layer(name)
        except KeyError:
            unplaced.append(name)
    assert not unplaced, f"add these to LAYERS (and to docs/architecture.md): {unplaced}"


def test_the_walk_sees_local_and_type_checking_imports() -> None:
    # The walk must not miss the kinds of import that used to hide circles.
    source = (
        "from typing import TYPE_CHECKING\n"
        "import torch\n"
        "from . import placement\n"
        "if TYPE_CHECKING:\n    from mixprec.quantsim import QuantizationSimModel\n"
        "def f():\n    from ..export import exporter\n    import mixprec.report.html\n"
        "    from ..core.precision import Precision\n"
    )
    assert imports_in("mixprec.sim.probe", source) == {
        "mixprec.sim.placement",
        "mixprec.quantsim",
        "mixprec.export.exporter",
        "mixprec.report.html",
        "mixprec.core.precision",
    }


def test_find_cycle_reports_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name: str) -> None:
    upward = sorted(dep for dep in GRAPH[name] if layer(dep) > layer(name))
    assert not upward, f"{name} (layer {LAYERS[layer(name)]}) imports from higher layers: " + ", ".join(
        f"{dep} ({LAYERS[layer(dep)]})" for dep in upward
    )
