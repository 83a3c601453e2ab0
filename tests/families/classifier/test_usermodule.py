"""The user's own module: factories by import path, safetensors weights checked key by key, pruned
structures recorded as JSON and rebuilt without pickle (no Ray)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slimray.compress.prune import model_size, prune_to_fraction
from slimray.families.classifier.spec import ModuleSpec, build_model, parse_spec, spec_from_model
from slimray.families.classifier.usermodule import build_from_factory, import_factory, load_weights
from slimray.schema import ConfigError

CODE_DIR = str(Path(__file__).resolve().parents[2] / "byom")


def test_factory_is_imported_from_code_dir_and_called_with_kwargs():
    model = build_from_factory("user_models:resnet", {"width": 8}, code_dir=CODE_DIR)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    ("factory", "code_dir", "needle"),
    [
        ("no_such_pkg.net:build", None, "cannot import module 'no_such_pkg.net'"),
        ("user_models:no_such", CODE_DIR, "has no attribute 'no_such'"),
        ("user_models:annotations", CODE_DIR, "is not callable"),
        ("not a path", None, "must look like 'package.module:function'"),
    ],
)
def test_bad_factories_name_the_field(factory, code_dir, needle):
    with pytest.raises((ConfigError, ValueError)) as err:
        import_factory(factory, code_dir=code_dir)
    assert needle in str(err.value)


def test_factory_returning_a_non_module_is_refused():
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        build_from_factory("json:dumps", {"obj": 1})


def test_weights_mismatch_lists_the_first_differences(tmp_path):
    small = build_from_factory("user_models:mlp", {"hidden": [32, 16]}, code_dir=CODE_DIR)
    path = tmp_path / "w.safetensors"
    save_file(small.state_dict(), str(path))
    big = build_from_factory("user_models:mlp", {"hidden": [64, 16]}, code_dir=CODE_DIR)
    with pytest.raises(ConfigError) as err:
        load_weights(big, path)
    msg = str(err.value)
    assert "teacher.weights" in msg and str(path) in msg and "shape of 'body.0.weight'" in msg


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_pickled_files_are_refused_with_how_to_save_safetensors(tmp_path, suffix):
    model = build_from_factory("user_models:mlp", {}, code_dir=CODE_DIR)
    path = tmp_path / f"teacher{suffix}"
    torch.save(model, path)  # a whole pickled module, as many checkpoints are
    with pytest.raises(ConfigError, match="loads no pickle.*save_file\\(model.state_dict\\(\\)"):
        load_weights(model, path)


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    path = tmp_path / "teacher.safetensors"
    path.write_bytes(b"\x80\x04not really")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        load_weights(build_from_factory("user_models:mlp", {}, code_dir=CODE_DIR), path)


@pytest.mark.parametrize(
    ("factory", "kwargs", "shape"),
    [("user_models:resnet", {"width": 16}, (1, 8, 8)), ("user_models:mlp", {"hidden": [128, 64]}, (64,))],
)
@pytest.mark.parametrize("keep", [0.3, 0.6])
def test_derived_student_reaches_its_size_and_rebuilds_from_json(factory, kwargs, shape, keep):
    spec = ModuleSpec(factory=factory, kwargs=kwargs, code_dir=CODE_DIR)
    torch.manual_seed(0)
    teacher = build_model(spec)
    example = torch.randn(1, *shape)
    student, info = prune_to_fraction(teacher.train(), keep=keep, example_inputs=example)
    frac = model_size(student, by="params", example_inputs=example) / model_size(teacher, by="params", example_inputs=example)
    assert abs(frac - keep) < 0.03 and abs(info["kept_fraction"] - frac) < 1e-9
    student.eval()
    derived = spec_from_model(student, spec)
    again = parse_spec(derived.model_dump(mode="json"))  # through JSON, as the artifact stores it
    rebuilt = build_model(again)
    rebuilt.load_state_dict(student.state_dict(), strict=True)
    rebuilt.eval()
    x = torch.randn(5, *shape)
    torch.testing.assert_close(rebuilt(x), student(x))
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in student.parameters())


def test_macs_target_is_met_too():
    teacher = build_from_factory("user_models:resnet", {"width": 16}, code_dir=CODE_DIR)
    example = torch.randn(1, 1, 8, 8)
    student, info = prune_to_fraction(teacher.train(), keep=0.5, by="macs", example_inputs=example)
    frac = model_size(student, by="macs", example_inputs=example) / model_size(teacher, by="macs", example_inputs=example)
    assert abs(frac - 0.5) < 0.03 and info["by"] == "macs"


def test_code_dir_must_exist():
    with pytest.raises(ConfigError, match="is not a folder"):  # and the module is not importable without it
        import_factory("user_models_nowhere:mlp", code_dir="/no/such/folder")


@pytest.fixture(autouse=True)
def _clean_sys_path():
    before = list(sys.path)
    yield
    sys.path[:] = before


def test_repeated_blocks_are_found_dropped_by_importance_and_rebuilt():
    from slimray.families.classifier.usermodule import block_importance, drop_modules, repeated_blocks

    spec = ModuleSpec(factory="user_models:resnet", kwargs={"width": 8}, code_dir=CODE_DIR)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    x = torch.randn(32, 1, 8, 8)
    names = repeated_blocks(model, x[:2])
    assert names == ["stage1.0", "stage1.1"]  # stage2 is a lone block; the down-sampling stage changes the shape
    assert repeated_blocks(build_model(ModuleSpec(factory="user_models:mlp", code_dir=CODE_DIR)), torch.zeros(2, 64)) == []  # norms are no blocks
    importance = block_importance(model, names, x)
    assert set(importance) == set(names) and all(v >= 0 for v in importance.values())
    drop = min(importance, key=importance.get)
    drop_modules(model, [drop])
    student, _ = prune_to_fraction(model.train(), keep=0.6, example_inputs=x[:1])
    student.eval()
    derived = parse_spec(spec_from_model(student, spec).model_dump(mode="json"))
    assert derived.removed_modules == [drop]
    rebuilt = build_model(derived)
    rebuilt.load_state_dict(student.state_dict(), strict=True)
    torch.testing.assert_close(rebuilt.eval()(x), student(x))
