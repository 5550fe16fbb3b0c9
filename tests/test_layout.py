"""The layering rules, read from every import in graphopt/ (module level and inside functions):

    top level (cli, export, pipeline, report, recipe, __init__) -> passes/<family>/ -> analysis/ -> core/

core imports nothing above it, analysis never imports a pass, a pass family never imports another family (nor
the top level); passes/base.py stands below the families and above analysis.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "graphopt"
LEAVES = {"graphopt._version"}  # import nothing themselves: any layer may use them


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_modules(module: str, source: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every graphopt module `source` imports, relative imports resolved; `from pkg import
    name` counts as `pkg.name` where that is a module."""
    tree = ast.parse(source)
    here = module.split(".") if is_package else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if sub in known else target))
    return [(line, m) for line, m in out if m == "graphopt" or m.startswith("graphopt.")]


def layer(module: str) -> tuple[int, str]:
    """(rank, unit): a module may import modules of a lower rank, or of its own unit."""
    parts = module.split(".")
    if module in LEAVES:
        return 0, module
    if len(parts) > 1 and parts[1] == "core":
        return 1, "core"
    if len(parts) > 1 and parts[1] == "analysis":
        return 2, "analysis"
    if parts[1:3] == ["passes", "base"]:
        return 3, "passes.base"
    if len(parts) > 2 and parts[1] == "passes":
        return 4, f"passes.{parts[2]}"  # a family
    if parts[1:] == ["passes"]:
        return 5, "passes"  # the registry package: gathers every family
    return 6, "top"


def violations(module: str, source: str, is_package: bool = False, known: set[str] | None = None) -> list[str]:
    known = set(module_files()) if known is None else known
    rank, unit = layer(module)
    out = []
    for line, target in imported_modules(module, source, is_package, known):
        t_rank, t_unit = layer(target)
        if t_unit == unit or t_rank < rank:
            continue
        if unit == "passes" and t_rank == 4:  # the registry package imports the families
            continue
        if rank == 4 and t_rank == 4:
            why = "a pass family imports another family (move what they share down a layer)"
        else:
            why = f"{unit} imports {t_unit}, a layer above it or beside it"
        out.append(f"{module}:{line} imports {target}: {why}")
    return out


def test_every_module_keeps_the_layering():
    files = module_files()
    known = set(files)
    found = []
    for module, path in files.items():
        found += violations(module, path.read_text(encoding="utf-8"), path.name == "__init__.py", known)
    assert not found, "\n".join(found)


def test_the_checker_reads_every_kind_of_import():
    known = set(module_files())
    assert imported_modules("graphopt.passes.qdq.qdq", "from . import sites\nfrom .quant import QParams\n"
                            "from ..base import Pass\nfrom ...core import model\n", False, known) == [
        (1, "graphopt.passes.qdq.sites"), (2, "graphopt.passes.qdq.quant"), (3, "graphopt.passes.base"),
        (4, "graphopt.core.model")]
    assert imported_modules("graphopt.core", "from .model import Model", True, known) == [(1, "graphopt.core.model")]
    assert imported_modules("graphopt.core.x", "import os\nimport graphopt.analysis.depgraph as d\n", False,
                            known) == [(2, "graphopt.analysis.depgraph")]


@pytest.mark.parametrize("module,source", [
    ("graphopt.core.fake", "def f():\n    from ..analysis.depgraph import DependencyGraph\n"),
    ("graphopt.core.fake", "import graphopt.pipeline\n"),
    ("graphopt.analysis.fake", "from ..passes.prune import build\n"),
    ("graphopt.analysis.fake", "from ..passes.base import Pass\n"),
    ("graphopt.passes.prune.fake", "from ..qdq.quant import QParams\n"),
    ("graphopt.passes.lowrank.fake", "from graphopt.passes.prune.build import build\n"),
    ("graphopt.passes.qdq.fake", "from ... import pipeline\n"),
    ("graphopt.passes.base", "from .qdq import QDQ\n"),
])
def test_the_checker_flags_a_violating_import(module, source):
    assert violations(module, source), f"{module}: {source!r} breaks the layering"


@pytest.mark.parametrize("module,source", [
    ("graphopt.core.fake", "from .editing import node_inputs\nfrom .._version import __version__\n"),
    ("graphopt.analysis.fake", "from ..core.model import Model\nfrom .depgraph import DependencyGraph\n"),
    ("graphopt.passes.prune.fake", "from ..base import Pass\nfrom ...analysis.channel_groups import analyse\n"
                                   "from .build import build\n"),
    ("graphopt.pipeline", "from .passes.qdq import QDQ\n"),
])
def test_the_checker_passes_a_legal_import(module, source):
    assert not violations(module, source)


def test_every_family_folder_says_what_it_does_and_may_import():
    families = [p for p in sorted((PACKAGE / "passes").iterdir()) if (p / "__init__.py").is_file()]
    assert families, "no pass families found"
    for folder in families + [PACKAGE / "core", PACKAGE / "analysis"]:
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "May import" in doc, f"{folder.name}/__init__.py needs a docstring saying what it may import"
