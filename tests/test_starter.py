"""`slimray init`'s starter config: the training budget sized to the data, and a held-out test file as the
accuracy budget's reference."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "byom"))
import user_models  # noqa: E402

from slimray.config import load_config  # noqa: E402
from slimray.schema import ConfigError  # noqa: E402
from slimray.starter import MIN_DISTILL_STEPS, MIN_FINETUNE_STEPS, starter_budget, write_starter  # noqa: E402


def test_large_data_keeps_the_defaults_and_small_data_gets_enough_steps():
    assert starter_budget(60_000, num_workers=2, held_out_test=False) == {"batch_size": 128, "finetune_epochs": 1}
    assert starter_budget(None, num_workers=2, held_out_test=False) == {"batch_size": 128, "finetune_epochs": 1}
    # 1,437 examples, a held-out test file: ~1,293 to train on; batch 128 on 2 workers would be 6 steps an epoch
    small = starter_budget(1437, num_workers=2, held_out_test=True)
    assert small == {"batch_size": 32, "finetune_epochs": 6}
    num_train = round(1437 * 0.9)
    assert 10 * -(-num_train // (2 * small["batch_size"])) >= MIN_DISTILL_STEPS
    assert small["finetune_epochs"] * -(-num_train // 128) >= MIN_FINETUNE_STEPS
    assert starter_budget(100, num_workers=2, held_out_test=False) == {"batch_size": 16, "finetune_epochs": 6}  # floors


@pytest.fixture
def user_project(tmp_path):
    model = user_models.mlp(num_features=64, num_classes=10, hidden=[32])
    save_file(model.state_dict(), str(tmp_path / "teacher.safetensors"))
    rng = np.random.default_rng(0)
    for name, n in (("train.npz", 1437), ("heldout.npz", 360)):
        np.savez(tmp_path / name, x=rng.random((n, 64)).astype(np.float32), y=rng.integers(0, 10, n))
    return tmp_path


def _write(root: Path, **kw) -> Path:
    return write_starter(root / "slimray.yaml", model="user_models:mlp", weights=str(root / "teacher.safetensors"),
                         data=str(root / "train.npz"), code_dir=str(Path(user_models.__file__).parent),
                         kwargs={"num_features": 64, "num_classes": 10, "hidden": [32]}, **kw)


def test_a_held_out_test_file_is_the_budget_reference(user_project):
    out = _write(user_project, test=str(user_project / "heldout.npz"))
    cfg = load_config(config=out)
    assert Path(cfg.data.test) == (user_project / "heldout.npz").resolve()
    assert cfg.search.teacher_reference_split == "test" and cfg.search.max_accuracy_drop == 1.0
    assert cfg.distill.batch_size == 32 and cfg.search.finetune_epochs == 6
    assert "1437 in train.npz" in out.read_text()
    raw = yaml.safe_load(out.read_text())
    assert raw["data"]["test"] == "heldout.npz"  # relative to the config file


def test_without_a_test_file_the_teacher_is_scored_on_val(user_project):
    cfg = load_config(config=_write(user_project))
    assert cfg.data.test is None and cfg.search.teacher_reference_split == "val"
    assert cfg.distill.batch_size == 16 and cfg.search.finetune_epochs == 6  # 80% of 1,437 to train on: 18 steps an epoch at 32


def test_a_test_file_of_another_format_is_refused(user_project):
    (user_project / "heldout.csv").write_text("a,y\n1,0\n")
    with pytest.raises(ConfigError, match="--test .*not the same format as --data"):
        _write(user_project, test=str(user_project / "heldout.csv"))
    assert not (user_project / "slimray.yaml").exists()
