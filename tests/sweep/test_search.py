"""The classifier's search on the shared stages (``slimray sweep --student``'s path): Optuna TPE (accuracy vs latency)
with ASHA over fine-tune epochs on the one trainable, and every point in the driver without Tune."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimray.config import PipelineConfig
from slimray.families.classifier.artifacts import ArtifactSpec, save_artifact

from ..conftest import DIGITS_CNN, tiny_digits_config


def given_run(tmp_path: Path, digits, model, name: str, **search) -> tuple[PipelineConfig, Path]:
    """A digits config whose run already holds its teacher (``model``) and a student artifact to search (``model`` too)."""
    data = tiny_digits_config(name).model_dump()
    data["search"].update(search)
    cfg = PipelineConfig.model_validate(data)
    save_artifact(tmp_path / name / "teacher", model, ArtifactSpec(name="teacher", model=DIGITS_CNN, input=digits.input))
    student = tmp_path / "given" / "student"
    if not (student / "spec.json").exists():
        save_artifact(student, model, ArtifactSpec(name="student", model=DIGITS_CNN, input=digits.input))
    return cfg, student


@pytest.mark.slow
@pytest.mark.long
def test_optuna_with_asha_stops_weak_trials_on_the_epoch_budget(tmp_path, digits, trained_digits_cnn, ray_session):
    from slimray.pipelines import run_pipeline

    cfg, student = given_run(
        tmp_path, digits, trained_digits_cnn, "adaptive", max_accuracy_drop=10.0,
        space={"prune_ratios": [0.25, 0.5, 0.75], "quantizations": ["none"], "runtimes": ["torch", "onnxruntime"]},
        algorithm="optuna", scheduler="asha", num_samples=4, finetune_epochs=3, reduction_factor=2, num_timing_repeats=3)
    report = run_pipeline(cfg, out_dir=tmp_path, student=student, train_students=False, resume=False)
    trials = report["trials"]
    # four draws; a point drawn twice is one trial (its result is kept once and reused)
    assert 1 <= len(trials) <= 4 and all(t["status"] == "ok" for t in trials), trials
    assert len({t["key"] for t in trials}) == len(trials) and report["search_bases"] == ["student"]
    for t in trials:
        assert 1 <= t["finetune_epochs"] <= 3
        assert t["stopped_early"] == (t["finetune_epochs"] < 3)
        assert t["trial_seconds"] > 0 and t["latency_ms_b64"] > 0
    assert any(t["finetune_epochs"] == 3 for t in trials)  # the best ran the whole budget
    with pytest.raises(FileExistsError, match="--resume"):
        run_pipeline(cfg, out_dir=tmp_path, student=student, train_students=False, resume=False)


def test_without_tune_every_point_runs_in_the_driver(tmp_path, digits, trained_digits_cnn, ray_session):
    """search.use_tune: false runs the classifier's trials in the driver, in order, with the same rows and files."""
    from slimray.pipelines import run_pipeline

    cfg, student = given_run(tmp_path, digits, trained_digits_cnn, "driver", use_tune=False, finetune_epochs=1, num_timing_repeats=3,
                             space={"prune_ratios": [0.0, 0.5], "quantizations": ["none"], "runtimes": ["torch"]})
    report = run_pipeline(cfg, out_dir=tmp_path, student=student, train_students=False)
    trials = report["trials"]
    assert [t["key"] for t in trials] == ["student-prune0.00-none", "student-prune0.50-none"]
    assert all(t["status"] == "ok" for t in trials)
    assert trials[1]["finetune_epochs"] == 1 and not trials[1]["stopped_early"] and trials[1]["params"] < trials[0]["params"]
    assert not (tmp_path / "driver" / "ray" / "classifier-search").exists()  # no Tune experiment
