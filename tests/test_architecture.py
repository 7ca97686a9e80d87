"""The package's layout holds: imports point one way, down the floors README's Architecture names.

Floors, bottom up. A module may import from its own package and from any lower floor, never from
its own floor's other packages or from above. minigpt/__init__.py is the public front (it may
import anything).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minigpt"

FLOORS = [
    {"errors"},                                 # the errors a user can cause
    {"backend", "config", "safeio", "units"},   # array module, run configuration, safe writes, units
    {"counting", "kernels"},                    # the meter, closed form, tables; compiled kernels
    {"nn", "hardware", "tokenizers"},           # the model's math; the machine; text <-> ids
    {"energy"},                                 # a run's energy, over hardware
    {"scale"},                                  # full-size projections, over energy
    {"train"},                                  # the training loop, data, checkpoints, MPI
    {"sampling", "evaluate", "interop"},        # generation, quality, GPT-2 checkpoints in and out
    {"report", "serve"},                        # report.html; the OpenAI-compatible server
    {"tracking"},                               # minigpt.track and the typed Costs, Energy, Estimate
    {"api", "runs"},                            # the Python API: a model; training and scale runs
    {"cli"},                                    # the commands
    {"__main__"},                               # python -m minigpt
]
FLOOR = {unit: i for i, units in enumerate(FLOORS) for unit in units}


def unit_of(module: str) -> str:
    """minigpt.scale.estimate -> 'scale'; minigpt.backend -> 'backend'."""
    return module.split(".")[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def minigpt_imports(path: Path) -> list[tuple[str, int]]:
    """Every minigpt module this file imports, anywhere in it (lazy imports included), with the line."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("minigpt.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "minigpt":  # from minigpt import backend, sampling
                found += [(f"minigpt.{a.name}", node.lineno) for a in node.names]
            elif node.module.startswith("minigpt."):
                found.append((node.module, node.lineno))
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_top_level_name_has_a_floor():
    units = {unit_of(m) for m in MODULES if m != "minigpt"}
    assert units <= set(FLOOR), f"modules or packages with no floor: {sorted(units - set(FLOOR))}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "minigpt"))
def test_imports_point_down(module):
    here = unit_of(module)
    wrong = []
    for target, line in minigpt_imports(MODULES[module]):
        there = unit_of(target)
        if there != here and FLOOR[there] >= FLOOR[here]:
            wrong.append(f"line {line}: {target} (floor {FLOOR[there]}, this is floor {FLOOR[here]})")
    assert not wrong, f"{module} imports sideways or up: {wrong}"


def test_no_import_circle():
    def resolve(target: str) -> str:
        return target if target in MODULES else target.rsplit(".", 1)[0]  # from pkg import name

    graph = {m: {resolve(t) for t, _ in minigpt_imports(p)} - {m} for m, p in MODULES.items()
             if m != "minigpt"}
    done: set[str] = set()
    stack: list[str] = []

    def visit(m: str) -> None:
        assert m not in stack, f"import circle: {' -> '.join(stack[stack.index(m):] + [m])}"
        if m in done or m not in graph:
            return
        stack.append(m)
        for n in sorted(graph[m]):
            # a package's __init__ is entered by importing any module under it
            visit(n)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_the_full_size_work_needs_no_hardware_or_energy():
    """scale.work is the FLOPs and bytes of a full-size model: shapes and the closed form only."""
    targets = {t for t, _ in minigpt_imports(MODULES["minigpt.scale.work"])}
    assert targets <= {"minigpt.scale.scenario", "minigpt.counting", "minigpt.counting.closed_form",
                       "minigpt.errors"}, sorted(targets)


def test_a_wrong_import_is_caught(tmp_path):
    """The walk sees a lazy upward import (a model module reaching for the report)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from minigpt.report import html\n    from minigpt import cli\n")
    assert [t for t, _ in minigpt_imports(bad)] == ["minigpt.report", "minigpt.cli"]


def test_the_readmes_public_names_import():
    """Every `from X import a, b` in the README's table of public names works."""
    import importlib
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("Public names, one place each"):]
    table = table[: table.index("\n\n", table.index("|"))]
    found = re.findall(r"`from ([\w.]+) import ([\w, ]+)`", table)
    assert len(found) >= 8
    for module, names in found:
        mod = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            if not hasattr(mod, name):  # a submodule: `from minigpt.energy import run_energy`
                importlib.import_module(f"{module}.{name}")
