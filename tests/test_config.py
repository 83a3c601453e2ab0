"""Pipeline configs: strict, validated at load time, clear errors naming the field."""

from __future__ import annotations

import json

import subprocess
import sys

import pytest
import yaml

from slimray.sweep.space import load_space_file
from slimray.config import PipelineConfig, SearchSpace, load_config, recipe_names
from slimray.schema import ConfigError

from .conftest import REPO


def _write(tmp_path, data, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if name.endswith(".yaml") else json.dumps(data))
    return p


def _digits_dict():
    return load_config(recipe="digits").model_dump()


def test_recipes_ship_with_the_package():
    assert {"mnist", "digits"} <= set(recipe_names())
    assert load_config().data.name == "mnist"  # the default recipe
    assert load_config(recipe="digits").teacher.source == "train"


def test_unknown_field_is_named(tmp_path):
    d = _digits_dict()
    d["distill"]["temprature"] = 3.0
    with pytest.raises(ConfigError, match=r"distill\.temprature: unknown field"):
        PipelineConfig.from_file(_write(tmp_path, d))


def test_bad_literal_lists_allowed_values(tmp_path):
    d = _digits_dict()
    d["search"]["space"]["quantizations"] = ["int3"]
    with pytest.raises(ConfigError) as err:
        PipelineConfig.from_file(_write(tmp_path, d, "cfg.json"))
    msg = str(err.value)
    assert "search.space.quantizations.0" in msg
    for allowed in ("none", "dynamic_int8", "static_int8", "bf16"):
        assert allowed in msg


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (("distill", "alpha"), 1.5, "distill.alpha"),
        (("search", "space", "prune_ratios"), [0.5, 1.0], "prune ratios must be in [0, 1)"),
        (("data", "name"), "cifar", "data.name"),
        (("name",), "../escape", "name"),
        (("distill", "student", "image_size"), 10, "divisible"),
    ],
)
def test_invalid_values_fail_at_load(tmp_path, path, value, needle):
    d = _digits_dict()
    node = d
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=None) as err:
        PipelineConfig.from_file(_write(tmp_path, d))
    assert needle in str(err.value)


def test_cross_field_rule(tmp_path):
    d = _digits_dict()
    d["teacher"] = {"source": "ccexam_mnist"}
    with pytest.raises(ConfigError, match="needs data.name 'mnist'"):
        PipelineConfig.from_file(_write(tmp_path, d))


def test_unparseable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="cannot parse"):
        PipelineConfig.from_file(bad)
    with pytest.raises(ConfigError, match="not found"):
        PipelineConfig.from_file(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_config(recipe="nope")


def test_cli_rejects_bad_config_before_ray_starts(tmp_path):
    d = _digits_dict()
    d["serve"]["prot"] = 1
    code = (
        "import sys, slimray.cli as c; rc = c.main(sys.argv[1:]); "
        "print('ray-imported' if 'ray' in sys.modules else 'no-ray'); sys.exit(rc)"
    )
    args = ["run", "--config", str(_write(tmp_path, d)), "--no-serve", "--out", str(tmp_path)]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "serve.prot: unknown field" in out.stderr
    assert out.stdout.strip() == "no-ray"  # failed before Ray was even imported
    assert not (tmp_path / "digits").exists()


def test_tune_spaces_validate_and_plug_into_a_config(tmp_path):
    files = sorted((REPO / "tune").glob("*.yaml"))
    assert files
    for f in files:
        space = load_space_file(f)  # a compression space, a distillation space, or both
        if space.compress is not None:
            assert SearchSpace.from_dict(space.compress).num_trials >= 2
        if space.distill is not None:
            assert space.num_trials >= 2
    d = _digits_dict()
    d["search"] = {"space_file": str(REPO / "tune" / "digits-grid.yaml")}
    cfg = PipelineConfig.model_validate(d)
    assert cfg.search.space == SearchSpace.from_file(REPO / "tune" / "digits-grid.yaml")


def test_quantization_the_device_cannot_run_is_rejected_at_load(tmp_path):
    d = _digits_dict()
    d["search"]["space"]["quantizations"] = ["none", "fp16"]
    with pytest.raises(ConfigError, match=r"search\.space.*\['fp16'\] cannot run on device 'cpu'"):
        PipelineConfig.from_file(_write(tmp_path, d))
    d["search"]["space"] = {"device": "cuda", "quantizations": ["none", "static_int8"]}
    with pytest.raises(ConfigError, match=r"\['static_int8'\] cannot run on device 'cuda'"):
        PipelineConfig.from_file(_write(tmp_path, d))
    d["search"]["space"] = {"device": "cuda", "quantizations": ["none", "fp16", "fp8"], "runtimes": ["torch", "onnxruntime"]}
    space = PipelineConfig.from_file(_write(tmp_path, d)).search.space
    assert ("fp8_dynamic", "torch") in space.settings and ("fp16", "onnxruntime") not in space.settings  # fp8: its former name


def test_runtime_pairs_that_cannot_run_are_left_out_of_the_space():
    space = SearchSpace(prune_ratios=[0.0, 0.5], quantizations=["none", "dynamic_int8", "bf16"], runtimes=["torch", "onnxruntime"])
    assert space.settings == [("none", "torch"), ("dynamic_int8", "torch"), ("bf16", "torch"), ("none", "onnxruntime")]
    assert {(q, r) for q, r, _ in space.dropped} == {("dynamic_int8", "onnxruntime"), ("bf16", "onnxruntime")}
    assert space.num_trials == 8
    with pytest.raises(ValueError, match="no \\(quantization, runtime\\) pair"):
        SearchSpace(quantizations=["bf16"], runtimes=["onnxruntime"])


@pytest.mark.parametrize(
    ("search", "needle"),
    [
        ({"scheduler": "asha", "finetune_epochs": 1}, "asha' needs finetune_epochs >= 2"),
        ({"algorithm": "grid", "num_samples": 3}, "num_samples applies to algorithm random/optuna"),
        ({"algorithm": "bayes"}, "search.algorithm"),
    ],
)
def test_search_algorithm_settings_are_checked(tmp_path, search, needle):
    d = _digits_dict()
    d["search"].update(search)
    with pytest.raises(ConfigError, match=needle):
        PipelineConfig.from_file(_write(tmp_path, d))


def test_adaptive_search_defaults_to_half_the_grid():
    cfg = load_config(recipe="digits").model_dump()
    cfg["search"].update(algorithm="optuna", scheduler="asha", finetune_epochs=2)
    s = PipelineConfig.model_validate(cfg).search
    assert s.num_trials == max(1, s.space.num_trials // 2)


def _files_cfg(**over):
    base = {
        "name": "u",
        "data": {"source": "files", "train": "d.parquet"},
        "teacher": {"source": "module", "factory": "pkg.net:build", "weights": "t.safetensors"},
        "distill": {},
    }
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) else v
        base[k] = {kk: vv for kk, vv in base[k].items() if vv is not None or kk == "model"} if isinstance(base[k], dict) else base[k]
    return base


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"teacher": {"weights": None}}, "needs teacher.weights"),
        ({"teacher": {"factory": "pkg/net.py"}}, "must look like 'package.module:function'"),
        ({"teacher": {"source": "train", "factory": None, "weights": None, "model": None}}, "teacher.model is required"),
        ({"teacher": {"source": "ccexam_mnist"}}, "teacher.factory is only for source: module"),
        ({"distill": {"derive": {"keep": 1.5}}}, "distill.derive.keep"),
        ({"distill": {"derive": {"keep": 0.5}, "student": {"kind": "mlp", "in_features": 4, "num_classes": 2}}}, "not both"),
        ({"data": {"mean": [0.1, 0.2], "feature_columns": []}}, "at least one column"),
        ({"distill": {"derive": {"keep": 1.0}}}, "derives nothing smaller"),
        ({"teacher": {"source": "ccexam_mnist", "factory": None, "weights": None}, "data": {"source": "builtin", "name": "mnist", "train": None},
          "distill": {"derive": {"drop_blocks": 1}}}, "drop_blocks needs a teacher of your own"),
        ({"data": {"source": "files", "train": "d.parquet", "unknown": 1}}, "data.unknown: unknown field"),
    ],
)
def test_user_model_and_files_configs_fail_at_load_naming_the_field(over, needle):
    with pytest.raises(ConfigError) as err:
        PipelineConfig.from_dict(_files_cfg(**over))
    assert needle in str(err.value)


def test_a_student_is_derived_when_none_is_given_and_paths_resolve_against_the_file(tmp_path):
    from slimray.config import load_config

    path = tmp_path / "sub" / "c.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(_files_cfg(teacher={"code_dir": "code"})))
    cfg = load_config(config=path)
    assert cfg.distill.student is None and cfg.distill.derive.keep == 0.5 and cfg.distill.derive.by == "params"
    assert cfg.data.train == str(path.parent / "d.parquet")
    assert cfg.teacher.weights == str(path.parent / "t.safetensors") and cfg.teacher.code_dir == str(path.parent / "code")
    again = PipelineConfig.model_validate_json(cfg.model_dump_json())  # what config.json and submitted jobs carry
    assert again == cfg
