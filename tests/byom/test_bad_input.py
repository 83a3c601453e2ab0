"""Bad input from a user's own project fails before training, names the field and the file, and leaves no
finished-looking stage behind: `slimray run --config` on each broken variant of a small project."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

import project
import user_models

from slimray.cli import main

STAGES = ("teacher", "students", "teacher_outputs", "winner", "report.json")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A small valid project: an untrained MLP as the teacher (nothing here trains), Parquet data."""
    root = tmp_path_factory.mktemp("project")
    x, y = project.digits_arrays()
    project.write_parquet(root / "data.parquet", x[:300], y[:300])
    save_file(user_models.mlp(num_features=64, num_classes=10, hidden=[32]).state_dict(), str(root / "teacher.safetensors"))
    cfg = {
        "name": "bad-input",
        "data": {"source": "files", "train": "data.parquet", "input_column": "pixels", "label_column": "label"},
        "teacher": {"source": "module", "factory": "user_models:mlp", "kwargs": {"num_features": 64, "num_classes": 10, "hidden": [32]},
                    "weights": "teacher.safetensors", "code_dir": str(project.CODE_DIR)},
        "distill": {"epochs": 1, "num_workers": 1},
    }
    return root, cfg, x[:300], y[:300]


def _run(tmp_path: Path, good, mutate) -> tuple[int, str, Path]:
    root, cfg, x, y = good
    work = tmp_path / "p"
    shutil.copytree(root, work)
    cfg = yaml.safe_load(yaml.safe_dump(cfg))
    mutate(work, cfg, x, y)
    (work / "slimray.yaml").write_text(yaml.safe_dump(cfg))
    return work


def _assert_refused(capsys, work: Path, *needles: str) -> str:
    code = main(["run", "--config", str(work / "slimray.yaml"), "--no-serve", "--out", str(work / "runs")])
    err = capsys.readouterr().err
    assert code == 2, err
    # the one line the CLI prints (Ray's own loggers may also write to this captured stream)
    line = next((ln for ln in err.splitlines() if ln.startswith("slimray: ")), "")
    for n in needles:
        assert n in line, err
    run_dir = work / "runs" / "bad-input"
    left = [s for s in STAGES if (run_dir / s).exists()]
    assert left == [], f"stages left behind: {left}"
    return err


def test_factory_that_cannot_be_imported(tmp_path, good, capsys):
    def m(w, cfg, x, y):
        cfg["teacher"]["factory"] = "user_modelz:mlp"
    work = _run(tmp_path, good, m)
    _assert_refused(capsys, work, "teacher.factory", "user_modelz")


def test_weights_that_do_not_match_the_factory(tmp_path, good, capsys):
    def m(w, cfg, x, y):
        save_file(user_models.mlp(num_features=64, num_classes=10, hidden=[48]).state_dict(), str(w / "teacher.safetensors"))
    work = _run(tmp_path, good, m)
    _assert_refused(capsys, work, "teacher.weights", str(work / "teacher.safetensors"), "shape of 'body.0.weight'")


def test_a_pickled_module_is_refused_with_how_to_save_weights(tmp_path, good, capsys):
    def m(w, cfg, x, y):
        torch.save(user_models.mlp(num_features=64, num_classes=10, hidden=[32]), w / "teacher.pt")
        cfg["teacher"]["weights"] = "teacher.pt"
    work = _run(tmp_path, good, m)
    _assert_refused(capsys, work, "teacher.weights", "teacher.pt", "save_file(model.state_dict()")


def test_a_data_file_without_the_named_column(tmp_path, good, capsys, ray_session):
    def m(w, cfg, x, y):
        cfg["data"]["label_column"] = "target"
    work = _run(tmp_path, good, m)
    _assert_refused(capsys, work, "data.label_column", "'target'", str(work / "data.parquet"))


def test_examples_of_mixed_shapes(tmp_path, good, capsys, ray_session):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def m(w, cfg, x, y):
        rows = [r.reshape(-1).tolist() for r in x]
        rows[11] = rows[11][:40]
        pq.write_table(pa.table({"pixels": rows, "label": y}), w / "data.parquet")
    work = _run(tmp_path, good, m)
    _assert_refused(capsys, work, "data.input_column", "different shapes", str(work / "data.parquet"))


def test_labels_outside_num_classes(tmp_path, good, capsys, ray_session):
    def m(w, cfg, x, y):
        cfg["data"]["num_classes"] = 5
    work = _run(tmp_path, good, m)
    _assert_refused(capsys, work, "data.num_classes", str(work / "data.parquet"))


def test_unreadable_images(tmp_path, good, capsys, ray_session):
    def m(w, cfg, x, y):
        project.write_image_folder(w / "imgs", x[:60], y[:60])
        broken = sorted((w / "imgs" / "class_2").iterdir())[0]
        broken.write_bytes(b"\x89PNG but truncated")
        cfg["data"] = {"source": "files", "train": "imgs"}
        cfg["teacher"]["kwargs"]["num_features"] = 64
    work = _run(tmp_path, good, m)
    _assert_refused(capsys, work, "data.train", "unreadable image", "class_2")


def test_a_teacher_that_does_not_take_the_data(tmp_path, good, capsys, ray_session):
    def m(w, cfg, x, y):
        save_file(user_models.mlp(num_features=32, num_classes=10, hidden=[32]).state_dict(), str(w / "teacher.safetensors"))
        cfg["teacher"]["kwargs"]["num_features"] = 32
    work = _run(tmp_path, good, m)
    _assert_refused(capsys, work, "teacher.factory", "fails on a batch of examples shaped [64]")


def test_init_writes_a_config_that_runs_the_checks(tmp_path, good, capsys, monkeypatch):
    root, cfg, x, y = good
    monkeypatch.chdir(tmp_path)
    code = main(["init", "--model", "user_models:mlp", "--weights", str(root / "teacher.safetensors"), "--data", str(root / "data.parquet"),
                 "--code-dir", str(project.CODE_DIR), "--kwargs", '{"num_features": 64, "num_classes": 10, "hidden": [32]}'])
    assert code == 0, capsys.readouterr().err
    from slimray.config import load_config

    written = load_config(config=tmp_path / "slimray.yaml")
    assert written.teacher.factory == "user_models:mlp" and written.data.format == "parquet"
    assert Path(written.teacher.weights) == (root / "teacher.safetensors").resolve()
    assert written.distill.student is None and written.distill.derive.keep == 0.5
    # an already trained teacher gets its inputs as read unless its normalisation is stated
    assert written.data.mean == 0.0 and written.data.std == 1.0
    # a wrong weights file is refused before anything is written
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    code = main(["init", "--model", "user_models:mlp", "--weights", str(tmp_path / "other.safetensors"), "--data", str(root / "data.parquet"),
                 "--code-dir", str(project.CODE_DIR), "--out", str(tmp_path / "x.yaml")])
    assert code == 2 and "--weights" in capsys.readouterr().err and not (tmp_path / "x.yaml").exists()
