"""The layer map (``slimray.layers``) holds on the real source, transitively and for lazy imports too, and the same
checker fails on a planted bad import of each kind: each case below copies the package, plants one import into a
real module and expects exactly that violation. Plus: importing every module of the no-ray layers loads no ray."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import slimray
from slimray import layers
from slimray.layers import Layer, check, layer_of, scan

PKG = Path(slimray.__file__).parent


def test_the_package_keeps_to_its_layers():
    problems = check(scan(PKG))
    assert problems == [], "\n".join(map(str, problems))


def test_every_module_is_placed_and_the_map_reads_as_documented():
    graph = scan(PKG)
    assert {m for m in graph.files if layer_of(m) is None} == set()
    assert layer_of("slimray.families.causal_lm.serving").name == "families"
    assert layer_of("slimray.families.causal_lm.config").name == "config"  # the longest prefix wins
    assert layer_of("slimray.serving.app").name == "serving" and layer_of("slimray.serving.options").name == "config"
    assert layer_of("slimray.raycompat").name == "raybase" and layer_of("slimray.pipelines.flow").name == "entry"
    assert all(why for layer in layers.LAYERS for why in layer.modules.values())


def test_no_python_modules_in_top_level_folders():
    repo = PKG.parents[1]
    for folder in ("cluster", "jobs", "serve", "tune"):
        assert (repo / folder).is_dir()
        assert not list((repo / folder).rglob("*.py")), folder
        assert list((repo / folder).rglob("*.yaml")), folder


def test_importing_the_no_ray_layers_loads_no_ray():
    """The static rule, checked at run time: every module of core, families and config imported in one process."""
    modules = sorted(m for m in scan(PKG).files if not layer_of(m).ray and not m.endswith("__main__"))
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + \
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout[-500:]
    assert len(modules) > 50


# ------------------------------------------------------------------------------------- planted bad imports


@pytest.fixture(scope="module")
def clean_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean") / "slimray"
    shutil.copytree(PKG, root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def planted(clean_copy: Path, tmp_path: Path, edits: dict[str, str]) -> list[layers.Violation]:
    """Copy the package, append each text to its file (a new file is created), and check the copy."""
    root = tmp_path / "slimray"
    shutil.copytree(clean_copy, root)
    for rel, text in edits.items():
        f = root / rel
        f.write_text((f.read_text() + "\n\n" if f.exists() else "") + text + "\n")
    return check(scan(root))


def found(problems, rule: str, module: str, last: str | None = None) -> list[layers.Violation]:
    return [p for p in problems if p.rule == rule and p.module == module and (last is None or p.path[-1] == last)]


def test_the_copy_is_clean(clean_copy):
    assert check(scan(clean_copy)) == []


def test_a_family_importing_serving_fails(clean_copy, tmp_path):
    problems = planted(clean_copy, tmp_path, {"families/base.py": "from slimray.serving.http import json_bytes"})
    (bad,) = found(problems, "layer", "slimray.families.base", "slimray.serving.http")
    assert "families may not import slimray.serving.http (serving)" in str(bad) and bad.line > 100


def test_a_family_importing_ray_lazily_fails(clean_copy, tmp_path):
    problems = planted(clean_copy, tmp_path, {"families/hf.py": "def _lazy():\n    import ray.train\n    return ray"})
    (bad,) = found(problems, "no-ray", "slimray.families.hf", "ray")
    assert [p.rule for p in problems] == ["no-ray"] * len(problems)  # and whoever imports families.hf, transitively
    assert found(problems, "no-ray", "slimray.config")  # config -> families.hf -> ray


def test_a_family_importing_stages_fails(clean_copy, tmp_path):
    text = ("def _lazy():\n    from slimray.training import distill\n    from slimray.sweep.engine import run_tuner\n"
            "    from slimray.pipelines import Stages\n    from slimray import cli")
    problems = planted(clean_copy, tmp_path, {"families/classifier/kd.py": text})
    bad = {p.path[-1] for p in found(problems, "layer", "slimray.families.classifier.kd") if len(p.path) == 2}
    assert bad == {"slimray.training.distill", "slimray.sweep.engine", "slimray.pipelines", "slimray.cli"}


def test_serving_importing_stage_code_fails(clean_copy, tmp_path):
    text = ("def _lazy():\n    from slimray.training.distill import TrainJob\n    from slimray.sweep import select\n"
            "    from slimray.pipelines.flow import FlowStages")
    problems = planted(clean_copy, tmp_path, {"serving/checks.py": text})
    bad = {p.path[-1] for p in found(problems, "layer", "slimray.serving.checks") if len(p.path) == 2}
    assert bad == {"slimray.training.distill", "slimray.sweep.select", "slimray.pipelines.flow"}


def test_core_importing_a_family_or_entry_fails(clean_copy, tmp_path):
    problems = planted(clean_copy, tmp_path, {
        "storage.py": "def _lazy():\n    from slimray.families.base import TrainTask",
        "report.py": "def _lazy():\n    from slimray.cli import main",
    })
    assert found(problems, "layer", "slimray.storage", "slimray.families.base")
    assert found(problems, "layer", "slimray.report", "slimray.cli")


def test_a_transitive_import_fails_with_its_chain(clean_copy, tmp_path):
    """families.base -> runs (core: allowed) -> serving.http (lazy): a violation of families.base as well as of runs."""
    problems = planted(clean_copy, tmp_path, {
        "families/base.py": "from slimray.runs import log",
        "runs.py": "def _lazy():\n    from slimray.serving.http import json_bytes",
    })
    (bad,) = found(problems, "layer", "slimray.families.base", "slimray.serving.http")
    assert bad.path == ("slimray.families.base", "slimray.runs", "slimray.serving.http")
    assert "through slimray.runs" in str(bad)
    assert found(problems, "layer", "slimray.runs", "slimray.serving.http")


def test_what_a_package_init_imports_counts_against_the_importer(clean_copy, tmp_path):
    """config imports data.files_config, which runs data/__init__.py: ray planted there reaches the config layer."""
    problems = planted(clean_copy, tmp_path, {"data/__init__.py": "import ray"})
    (bad,) = found(problems, "no-ray", "slimray.config", "ray")
    assert bad.path == ("slimray.config", "slimray.data", "ray")
    assert not found(problems, "no-ray", "slimray.data")  # the data layer itself may use ray


def test_an_import_cycle_across_packages_fails(clean_copy, tmp_path):
    problems = planted(clean_copy, tmp_path, {"sweep/space.py": "def _lazy():\n    from slimray.config import PipelineConfig"})
    (bad,) = [p for p in problems if p.rule == "cycle"]
    assert set(bad.path) == {"slimray.config", "slimray.sweep.space"} and "across packages" in bad.message


def test_a_module_level_cycle_fails_even_within_a_package(clean_copy, tmp_path):
    problems = planted(clean_copy, tmp_path, {"families/classifier/features.py": "from slimray.families.classifier import kd"})
    (bad,) = [p for p in problems if p.rule == "cycle"]
    assert set(bad.path) == {"slimray.families.classifier.features", "slimray.families.classifier.kd"}
    assert bad.message.startswith("module-level import cycle")


def test_a_private_ray_api_outside_raycompat_fails(clean_copy, tmp_path):
    text = ("from ray import serve\n\n\ndef _lazy(pg_hex):\n    from ray._raylet import PlacementGroupID\n"
            "    serve.delete('app', _blocking=True)\n    return ray._private.worker._global_node, PlacementGroupID")
    problems = planted(clean_copy, tmp_path, {"sweep/engine.py": text})
    names = sorted(p.message.split("private ")[1].split(":")[0] for p in found(problems, "private-ray", "slimray.sweep.engine"))
    assert names == ["ray._private.worker._global_node", "ray._raylet", "serve.delete(_blocking=...)"]
    assert not found(planted(clean_copy, tmp_path / "b", {"raycompat.py": text}), "private-ray", "slimray.raycompat")


def test_an_unplaced_module_fails(clean_copy, tmp_path):
    problems = planted(clean_copy, tmp_path, {"newthing.py": '"""A module nobody placed."""'})
    assert [str(p) for p in found(problems, "unplaced", "slimray.newthing")] == [
        "slimray.newthing:0: is in no layer: add its prefix to slimray.layers.LAYERS"]


def test_a_cycle_between_layers_fails(monkeypatch):
    core = layers.LAYERS[0]
    monkeypatch.setattr(layers, "LAYERS", (Layer("core", core.why, ("families",), ray=False, modules=core.modules),
                                           *layers.LAYERS[1:]))
    assert [p.message for p in check(layers.Graph({}, set(), {}, {})) if p.rule == "layer-cycle"] == [
        "the layers form a cycle: core -> families -> core"]
