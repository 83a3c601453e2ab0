"""A user module's artifact carries the factory's code: listed with relative paths and sha256s (no absolute path),
rebuilt from the folder alone after the user's code folder is moved or deleted, imported under a private name
(two versions side by side), through copies, derived students and the bytes that travel to Ray workers; damaged,
traversing or symlinked code refused naming the file; older artifacts naming only a code_dir load while it exists
and ask for a re-run once it is gone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimray.families.classifier.artifacts import (
    ArtifactSpec, artifact_files, copy_artifact, load_artifact, load_artifact_bytes, load_spec, save_artifact,
)
from slimray.families.classifier.spec import InputSpec, ModuleSpec, build_model, spec_from_model
from slimray.schema import ConfigError
from slimray.storage import DamagedArtifactError, verify_artifact
from tests.byom.project import user_code_folder

INPUT = InputSpec(shape=[1, 8, 8], min_value=0.0, max_value=1.0)
KWARGS = {"num_features": 64, "num_classes": 10, "hidden": [32, 16]}


def _teacher(tmp_path: Path, module: str, *, package: bool = False) -> tuple[Path, Path, torch.nn.Module]:
    """(code folder, teacher artifact, teacher) for a user MLP whose code lives only in ``tmp_path/code``."""
    code = user_code_folder(tmp_path / "code", module=module, package=package)
    torch.manual_seed(0)
    spec = ModuleSpec(factory=f"{module}:mlp", kwargs=KWARGS, code_dir=str(code))
    model = build_model(spec).eval()
    save_artifact(tmp_path / "teacher", model, ArtifactSpec(name="teacher", model=spec, input=INPUT))
    return code, tmp_path / "teacher", model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.rand(4, 1, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(a(x), b(x))


def test_the_spec_lists_the_code_relative_and_hashed_with_no_absolute_path(tmp_path):
    code, art, _ = _teacher(tmp_path, "t25_listing")
    text = (art / "spec.json").read_text()
    assert str(tmp_path) not in text and '"/' not in text  # no absolute path anywhere
    spec = json.loads(text)
    assert spec["model"]["code_dir"] is None
    (rel,) = spec["model"]["code"]
    assert rel == "t25_listing.py" and spec["files"]["code/t25_listing.py"] == spec["model"]["code"][rel]
    assert (art / "code" / "t25_listing.py").read_bytes() == (code / "t25_listing.py").read_bytes()
    verify_artifact(art, ArtifactSpec)


@pytest.mark.parametrize("package", [False, True], ids=["module", "package"])
def test_loads_after_the_code_folder_is_deleted_and_the_artifact_moved(tmp_path, package):
    module = "t25_pkg" if package else "t25_moved"
    code, art, teacher = _teacher(tmp_path, module, package=package)
    shutil.rmtree(code)
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    art.rename(moved)
    model, spec = load_artifact(moved)
    _same(model, teacher)
    assert type(model).__module__.startswith("_slimray_code_"), type(model).__module__  # the artifact's copy, not the user's
    files = sorted(spec.model.code)
    assert files == ([f"{module}/__init__.py", f"{module}/nets.py"] if package else [f"{module}.py"])
    # a fresh process (nothing imported, nothing on sys.path) rebuilds it from the folder alone
    out = subprocess.run([sys.executable, "-c", "import sys; from slimray.families.classifier.artifacts import load_artifact; "
                          "m, _ = load_artifact(sys.argv[1]); print(type(m).__module__)", str(moved)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().startswith("_slimray_code_"), out.stderr[-2000:]


def test_derived_students_copies_and_worker_bytes_carry_the_code(tmp_path):
    from slimray.compress.prune import prune_to_fraction

    code, art, teacher = _teacher(tmp_path, "t25_derived")
    shutil.rmtree(code)
    loaded, tspec = load_artifact(art)
    student, _ = prune_to_fraction(loaded.train(), keep=0.5, example_inputs=torch.rand(1, 1, 8, 8))
    student.eval()
    sspec = ArtifactSpec(name="student", model=spec_from_model(student, tspec.model), input=INPUT)
    assert sspec.model.resized_modules and sspec.model.code == tspec.model.code
    save_artifact(tmp_path / "student", student, sspec)
    copy_artifact(tmp_path / "student", tmp_path / "winner", update={"name": "winner"})
    assert load_spec(tmp_path / "winner").files["code/t25_derived.py"]
    _same(load_artifact(tmp_path / "winner")[0], student)
    blobs = artifact_files(tmp_path / "winner")
    assert set(blobs) == {"spec.json", "model.safetensors", "code/t25_derived.py"}
    _same(load_artifact_bytes(blobs)[0], student)
    with pytest.raises(ValueError, match="bad artifact file name"):
        load_artifact_bytes({**blobs, "../evil.py": b"x"})


def test_two_versions_of_one_module_load_side_by_side(tmp_path):
    _, first, _ = _teacher(tmp_path / "a", "t25_twice")
    code_b = user_code_folder(tmp_path / "b" / "code", module="t25_twice")
    src = (code_b / "t25_twice.py").read_text()
    (code_b / "t25_twice.py").write_text(src.replace("return self.out(self.body(x.flatten(1)))", "return -self.out(self.body(x.flatten(1)))"))
    spec_b = ModuleSpec(factory="t25_twice:mlp", kwargs=KWARGS, code_dir=str(code_b))
    a, _ = load_artifact(first)
    save_artifact(tmp_path / "b" / "teacher", a, ArtifactSpec(name="b", model=spec_b, input=INPUT))  # same weights, other code
    b, _ = load_artifact(tmp_path / "b" / "teacher")
    assert type(a).__module__ != type(b).__module__
    x = torch.rand(3, 1, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(b(x), -a(x))


def test_changed_code_is_refused_naming_the_file(tmp_path):
    _, art, _ = _teacher(tmp_path, "t25_tampered")
    f = art / "code" / "t25_tampered.py"
    f.write_text(f.read_text() + "\nimport os  # added later\n")
    with pytest.raises(DamagedArtifactError, match=r"code/t25_tampered.py.*sha256"):
        load_artifact(art)
    with pytest.raises(DamagedArtifactError, match="sha256") as err:
        verify_artifact(art, ArtifactSpec)
    assert err.value.path == f


def test_symlinks_and_paths_leaving_the_folder_are_refused(tmp_path):
    code, art, _ = _teacher(tmp_path, "t25_links")
    # the same bytes through a symlink: the hash matches, the link is still refused
    outside = tmp_path / "outside.py"
    shutil.copyfile(art / "code" / "t25_links.py", outside)
    (art / "code" / "t25_links.py").unlink()
    (art / "code" / "t25_links.py").symlink_to(outside)
    with pytest.raises(DamagedArtifactError, match="symlink"):
        load_artifact(art)
    with pytest.raises(DamagedArtifactError, match="symlink"):
        verify_artifact(art)
    # a spec naming files outside the folder
    data = json.loads((art / "spec.json").read_text())
    for bad in ("../outside.py", "/etc/hostname"):
        (art / "spec.json").write_text(json.dumps({**data, "files": {bad: "0" * 64}}))
        with pytest.raises(DamagedArtifactError, match="not inside the artifact folder"):
            verify_artifact(art)
    for bad in ("../t25_links.py", "/abs/t25_links.py", "other.py", "t25_links/../../x.py"):
        spec = {**data["model"], "code": {bad: "0" * 64}}
        with pytest.raises(Exception, match="code entry"):
            ModuleSpec.model_validate(spec)


def test_packing_refuses_what_the_artifact_could_not_import(tmp_path):
    code = user_code_folder(tmp_path / "abs", module="t25_abs", package=True)
    (code / "t25_abs" / "__init__.py").write_text("from t25_abs.nets import mlp  # noqa: F401\n")
    with pytest.raises(ConfigError, match="relatively"):
        save_artifact(tmp_path / "x", build_model(ModuleSpec(factory="t25_abs:mlp", kwargs=KWARGS, code_dir=str(code))),
                      ArtifactSpec(name="x", model=ModuleSpec(factory="t25_abs:mlp", kwargs=KWARGS, code_dir=str(code)), input=INPUT))
    code = user_code_folder(tmp_path / "sib", module="t25_sib")
    (code / "t25_helpers.py").write_text("WIDTH = 3\n")
    (code / "t25_sib.py").write_text((code / "t25_sib.py").read_text() + "\nimport t25_helpers  # noqa: E402,F401\n")
    spec = ModuleSpec(factory="t25_sib:mlp", kwargs=KWARGS, code_dir=str(code))
    with pytest.raises(ConfigError, match="t25_helpers.*would not carry"):
        save_artifact(tmp_path / "y", build_model(spec), ArtifactSpec(name="y", model=spec, input=INPUT))
    assert not (tmp_path / "y").exists()


def test_an_older_artifact_naming_only_code_dir(tmp_path):
    """Written before the code was carried: loads from code_dir while that folder exists (and a copy carries the
    code from then on); once it is gone, the error asks for a re-run."""
    code, art, teacher = _teacher(tmp_path, "t25_legacy")
    data = json.loads((art / "spec.json").read_text())
    data["model"].update(code={}, code_dir=str(code))
    data["files"] = {k: v for k, v in data["files"].items() if not k.startswith("code/")}
    shutil.rmtree(art / "code")
    (art / "spec.json").write_text(json.dumps(data))
    _same(load_artifact(art)[0], teacher)
    copy_artifact(art, tmp_path / "copied")
    assert load_spec(tmp_path / "copied").model.code and load_spec(tmp_path / "copied").model.code_dir is None
    gone = json.loads((art / "spec.json").read_text())
    gone["model"].update(factory="t25_legacy_gone:mlp", code_dir=str(tmp_path / "no-such-folder"))
    (art / "spec.json").write_text(json.dumps(gone))
    with pytest.raises(ConfigError, match=r"no-such-folder.*re-run `slimray run`"):
        load_artifact(art)
