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
                             space={"prune_ratios": [0.0, 0.5], "quantizations": ["none"], "runtimes": ["torch"]}, include_teacher=True)
    report = run_pipeline(cfg, out_dir=tmp_path, student=student, train_students=False)
    trials = {t["key"]: t for t in report["trials"]}
    # include_teacher: the teacher's own compressions are searched beside the student's (is a student needed at all?)
    assert list(trials) == [f"{b}-prune{r}-none" for b in ("student", "teacher") for r in ("0.00", "0.50")]
    assert report["search_bases"] == ["student", "teacher"] and all(t["status"] == "ok" for t in trials.values())
    pruned, whole = trials["student-prune0.50-none"], trials["student-prune0.00-none"]
    assert pruned["finetune_epochs"] == 1 and not pruned["stopped_early"] and pruned["params"] < whole["params"]
    assert not (tmp_path / "driver" / "ray" / "classifier-search").exists()  # no Tune experiment


@pytest.mark.slow
@pytest.mark.long
def test_sweep_cli_runs_the_distillation_sweep_and_searches_its_best_student(tmp_path, ray_session, capsys):
    """`slimray sweep --space` with a distill and a compress part, on the shared stages: the teacher is trained, no
    student of the recipe is, the distillation sweep's trials (Tune over Train, one worker each) compete, the best is
    copied to students/student-best and is the one starting model of the compression search."""
    import json

    import yaml

    from slimray.cli import main

    cfg = tiny_digits_config("dsweep-cli").model_dump(mode="json")
    cfg["teacher"]["epochs"] = 6
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({
        "distill": {"temperature": [2.0, 6.0], "epochs": 4}, "search": {"num_workers": 1},
        "compress": {"prune_ratios": [0.0], "quantizations": ["none"], "runtimes": ["torch"]}}))
    code = main(["sweep", "--config", str(tmp_path / "cfg.yaml"), "--space", str(tmp_path / "space.yaml"), "--out", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0 and "best student:" in out
    run_dir = tmp_path / "runs" / "dsweep-cli"
    summary = json.loads((run_dir / "distill_sweep.json").read_text())
    assert len(summary["trials"]) == 2 and summary["default"] is None  # no recipe-settings student was trained
    assert (run_dir / "students" / "student-best" / "spec.json").exists() and not (run_dir / "students" / "student").exists()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["search_bases"] == ["student-best"] and report["distill_sweep"]["best"]["key"] == summary["best"]["key"]
    assert [t["key"] for t in report["trials"]] == ["student-best-prune0.00-none"] and report["winner"]["key"]
    assert "## Distillation sweep" in (run_dir / "report.md").read_text()
