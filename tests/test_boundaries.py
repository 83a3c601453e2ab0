"""Model and compression code stays free of distributed code: no ray in families/ (every model family) or compress/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import slimray

PKG = Path(slimray.__file__).parent


def test_no_ray_import_in_pure_torch_packages():
    offenders = []
    for sub in ("families", "compress"):
        for f in (PKG / sub).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [f"{f.name}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert offenders == []


def test_importing_them_does_not_load_ray():
    code = ("import sys, slimray.families, slimray.families.classifier, slimray.families.sentence_encoder, slimray.compress, "
            "slimray.artifacts; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_python_modules_in_top_level_folders():
    repo = PKG.parents[1]
    for folder in ("cluster", "jobs", "serve", "tune"):
        assert (repo / folder).is_dir()
        assert not list((repo / folder).rglob("*.py")), folder
        assert list((repo / folder).rglob("*.yaml")), folder
