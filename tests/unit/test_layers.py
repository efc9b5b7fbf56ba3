"""The floors of the house: no module imports a package on a higher floor (or a sibling on its own floor).

The order is megatron_regdpo.LAYERS (plain data beside __version__; docs/architecture.md). Every module under
megatron_regdpo/ and kernels/ is parsed, not imported; module-level and function-level imports both count,
relative ones resolved. Imports by name at run time (importlib) are not seen.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from megatron_regdpo import LAYERS

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("megatron_regdpo", "kernels")
FLOOR = {unit: i for i, floor in enumerate(LAYERS) for unit in floor}


def unit_of(module: str) -> str | None:
    """The layer unit of a dotted module name: 'kernels', a subpackage or top-level module of megatron_regdpo,
    or None (the package root itself, or anything not ours)."""
    parts = module.split(".")
    if parts[0] == "kernels":
        return "kernels"
    if parts[0] == "megatron_regdpo" and len(parts) > 1:
        return parts[1]
    return None


def imported_modules(tree: ast.AST, module: str, is_package: bool):
    """(line, dotted name, statement) for every import in `tree`, relative imports resolved against `module`."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import sub` may name a submodule: judge pkg.sub
                yield (node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base,
                       f"from {'.' * node.level}{node.module or ''} import {alias.name}")


def violations(source: str, module: str, is_package: bool = False, where: str = "") -> list[str]:
    src = unit_of(module)
    if src is None:
        return []
    out = []
    for line, target, statement in imported_modules(ast.parse(source), module, is_package):
        dst = unit_of(target)
        if dst is None or dst == src or dst not in FLOOR:
            continue
        if FLOOR[dst] >= FLOOR[src]:
            kind = "a higher floor" if FLOOR[dst] > FLOOR[src] else "its own floor (a sibling)"
            out.append(f"{where or module}:{line}: `{statement}`: {src} (floor {FLOOR[src]}) imports {dst}, "
                       f"on {kind} ({FLOOR[dst]})")
    return out


def modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            yield path, ".".join(parts[:-1] if is_package else parts), is_package


def test_layers_are_declared_once():
    units = [u for floor in LAYERS for u in floor]
    assert len(units) == len(set(units)), units


def test_every_module_has_a_floor():
    missing = sorted({f"{unit_of(m)} ({p.relative_to(ROOT)})" for p, m, _ in modules()
                      if unit_of(m) is not None and unit_of(m) not in FLOOR})
    assert not missing, "add these to megatron_regdpo.LAYERS: " + ", ".join(missing)


def test_no_import_runs_up():
    found = []
    for path, module, is_package in modules():
        found += violations(path.read_text(), module, is_package, str(path.relative_to(ROOT)))
    assert not found, "imports against megatron_regdpo.LAYERS:\n" + "\n".join(found)


@pytest.mark.parametrize("source, module, is_package, bad", [
    ("from megatron_regdpo.training.step import x", "megatron_regdpo.parallel.comm", False, True),
    ("def f():\n    from ..training import step", "megatron_regdpo.parallel.comm", False, True),
    ("from .. import experiments", "megatron_regdpo.capacity", True, True),
    ("import megatron_regdpo.objectives.reg_dpo", "megatron_regdpo.models.wan.model", False, True),
    ("from megatron_regdpo import data", "kernels.sq_err.function", False, True),
    ("from .comm_count import count", "megatron_regdpo.parallel.comm_model", False, False),
    ("from ..parallel.context import x", "megatron_regdpo.models.lora", False, False),
    ("from megatron_regdpo import __version__\nimport torch", "megatron_regdpo.parallel.groups", False, False),
    ("from megatron_regdpo.smoke import main", "megatron_regdpo.train", False, False),
])
def test_the_check_sees_what_it_should(source, module, is_package, bad):
    assert bool(violations(source, module, is_package)) == bad
