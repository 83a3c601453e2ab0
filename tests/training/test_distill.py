"""Ray Train distillation: 2 DDP workers on local Ray, a checkpoint per epoch, resume, fail fast."""

from __future__ import annotations

import json
import time

import pytest
import torch

from slimray.compress.measure import accuracy, predict_logits
from slimray.training.classifier_data import TrainData, classifier_job
from slimray.training.distill import ClusterTooSmallError, run_training
from slimray.families.classifier.kd import kd_loss

from ..conftest import DIGITS_CNN


def test_kd_loss_reduces_to_cross_entropy_without_teacher():
    s, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, y, None, temperature=4, alpha=0.7), ce)
    assert torch.allclose(kd_loss(s, y, torch.randn(8, 10), temperature=4, alpha=0.0), ce)
    # a student that matches the teacher exactly pays only the label term
    assert torch.allclose(kd_loss(s, y, s.clone(), temperature=4, alpha=0.5), 0.5 * ce, atol=1e-6)


@pytest.fixture(scope="module")
def kd_data(ray_session, digits, trained_digits_cnn):
    ray = ray_session
    x, y = digits.normalized("train")
    xv, yv = digits.normalized("val")
    logits = predict_logits(trained_digits_cnn, x)
    return TrainData(ray.put(x.numpy()), ray.put(y.numpy()), ray.put(xv.numpy()), ray.put(yv.numpy()), ray.put(logits.numpy()))


def _job(tmp_path, **kw):
    base = dict(
        label="student", run_name="kd", storage_path=str(tmp_path / "ray"),
        spec=DIGITS_CNN.model_copy(update={"conv_channels": [8, 16], "fc_hidden": [32]}).model_dump(),
        epochs=8, batch_size=64, lr=5e-3, temperature=4.0, alpha=0.7, num_workers=2,
        metrics_path=str(tmp_path / "metrics.jsonl"),
    )
    base.update(kw)
    return classifier_job(**base)


def test_two_worker_distillation_learns_and_checkpoints(tmp_path, kd_data, digits):
    model, metrics = run_training(_job(tmp_path), kd_data)
    x, y = digits.normalized("test")
    assert accuracy(model, x, y) > 85.0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == list(range(1, 9))
    assert metrics["epoch"] == 8 and lines[-1]["loss"] < lines[0]["loss"]
    # a checkpoint per epoch was reported (Ray keeps the newest 2)
    ckpts = sorted(p for p in (tmp_path / "ray" / "kd").glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2 and (ckpts[-1] / "model.safetensors").exists() and (ckpts[-1] / "train_state.pt").exists()


@pytest.mark.long  # a minute; the killed-driver test (test_fault.py) resumes from a checkpoint too
def test_rerun_with_same_name_resumes_from_last_checkpoint(tmp_path, kd_data):
    run_training(_job(tmp_path, epochs=3), kd_data)
    # the same run name, now asked for 5 epochs: only epochs 4 and 5 run
    run_training(_job(tmp_path, epochs=5), kd_data)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5]


def test_more_workers_than_cpus_fails_fast(tmp_path, kd_data):
    start = time.monotonic()
    with pytest.raises(ClusterTooSmallError, match=r"needs 3 workers x 1 CPU = 3 CPUs, but the cluster has 2"):
        run_training(_job(tmp_path, num_workers=3), kd_data)
    assert time.monotonic() - start < 5
