"""Adaptive search on Ray Tune: Optuna TPE (accuracy vs latency) with ASHA over fine-tune epochs, on the one trainable."""

from __future__ import annotations

import pytest
import ray

from slimray.families.classifier.artifacts import ArtifactSpec, save_artifact
from slimray.config import SearchConfig
from slimray.sweep.search import SweepContext, run_sweep

from ..conftest import DIGITS_CNN


@pytest.mark.slow
@pytest.mark.long
def test_optuna_with_asha_stops_weak_trials_on_the_epoch_budget(tmp_path, digits, trained_digits_cnn, ray_session):
    save_artifact(tmp_path / "student", trained_digits_cnn, ArtifactSpec(name="student", model=DIGITS_CNN, input=digits.input))
    (x, y), (xv, yv) = digits.normalized("train"), digits.normalized("val")
    search = SearchConfig(
        space={"prune_ratios": [0.25, 0.5, 0.75], "quantizations": ["none"], "runtimes": ["torch", "onnxruntime"]},
        algorithm="optuna", scheduler="asha", num_samples=4, finetune_epochs=3, reduction_factor=2, num_timing_repeats=3,
    )
    ctx = SweepContext(
        run_dir=str(tmp_path), base_model_dir=str(tmp_path / "student"), x_train=ray.put(x.numpy()), y_train=ray.put(y.numpy()),
        teacher_logits=None, x_val=ray.put(xv.numpy()), y_val=ray.put(yv.numpy()), search=search.model_dump(),
        temperature=4.0, alpha=0.0, seed=0, accuracy_floor=90.0,
    )
    trials = run_sweep(ctx, run_name="adaptive", max_concurrent_trials=2, resume=False)
    # four draws; a point drawn twice is one trial (its result is kept once and reused)
    assert 1 <= len(trials) <= 4 and all(t["status"] == "ok" for t in trials), trials
    assert len({t["key"] for t in trials}) == len(trials)
    for t in trials:
        assert 1 <= t["finetune_epochs"] <= 3
        assert t["stopped_early"] == (t["finetune_epochs"] < 3)
        assert t["trial_seconds"] > 0 and t["latency_ms_b64"] > 0
    assert any(t["finetune_epochs"] == 3 for t in trials)  # the best ran the whole budget
    with pytest.raises(FileExistsError, match="--resume"):
        run_sweep(ctx, run_name="adaptive", max_concurrent_trials=2, resume=False)


def test_without_tune_every_point_runs_in_the_driver(tmp_path, digits, trained_digits_cnn, ray_session):
    """search.use_tune: false runs the classifier's trials in the driver, in order, with the same rows and files."""
    save_artifact(tmp_path / "student", trained_digits_cnn, ArtifactSpec(name="student", model=DIGITS_CNN, input=digits.input))
    (x, y), (xv, yv) = digits.normalized("train"), digits.normalized("val")
    search = SearchConfig(space={"prune_ratios": [0.0, 0.5], "quantizations": ["none"], "runtimes": ["torch"]}, use_tune=False,
                          finetune_epochs=1, num_timing_repeats=3)
    ctx = SweepContext(
        run_dir=str(tmp_path), base_model_dir=str(tmp_path / "student"), x_train=ray.put(x.numpy()), y_train=ray.put(y.numpy()),
        teacher_logits=None, x_val=ray.put(xv.numpy()), y_val=ray.put(yv.numpy()), search=search.model_dump(),
        temperature=4.0, alpha=0.0, seed=0,
    )
    trials = run_sweep(ctx, run_name="driver", max_concurrent_trials=1)
    assert [t["key"] for t in trials] == ["prune0.00-none", "prune0.50-none"] and all(t["status"] == "ok" for t in trials)
    assert trials[1]["finetune_epochs"] == 1 and not trials[1]["stopped_early"] and trials[1]["params"] < trials[0]["params"]
    assert not (tmp_path / "ray" / "driver").exists()  # no Tune experiment
