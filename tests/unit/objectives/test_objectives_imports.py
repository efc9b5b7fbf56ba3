"""objectives/ imports only torch and the standard library (the trainer is the one place that knows all)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import megatron_regdpo.objectives as objectives

ALLOWED = {"torch", "__future__"}


def test_objectives_import_only_torch_and_stdlib():
    for path in Path(objectives.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            bad = {r for r in roots if r not in ALLOWED and r not in sys.stdlib_module_names}
            assert not bad, f"{path.name}:{node.lineno} imports {bad}"
