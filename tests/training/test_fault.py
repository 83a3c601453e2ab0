"""Fault tolerance of distillation: a killed worker restarts the group from the last checkpoint, and a
killed driver is resumed by a rerun with the same run name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from slimray.compress.measure import accuracy
from slimray.training.distill import run_training

from .test_distill import _job, kd_data  # noqa: F401  (fixture)


def _epochs(path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.long  # two 30-epoch runs; the fast suite's worker-kill check is tests/sweep/test_distill_search.py
def test_killed_worker_restarts_from_checkpoint(tmp_path, kd_data, digits):  # noqa: F811
    import ray
    from ray.util.state import list_actors

    slow = dict(epochs=30, batch_size=16)  # ~0.3 s an epoch: time to kill a worker mid-run
    ref_model, _ = run_training(_job(tmp_path / "ref", run_name="ref", **slow), kd_data)
    x, y = digits.normalized("test")
    ref_acc = accuracy(ref_model, x, y)

    job = _job(tmp_path / "faulty", run_name="faulty", max_failures=2, **slow)
    metrics = tmp_path / "faulty" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("result", run_training(job, kd_data)), daemon=True)
    t.start()
    snapshot = tmp_path / "faulty" / "ray" / "faulty" / "checkpoint_manager_snapshot.json"

    def checkpointed_epoch() -> int:  # the newest checkpoint Ray Train has registered (reports are async)
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, json.JSONDecodeError):
            return 0
        return int((latest.get("metrics") or {}).get("epoch", 0))

    _wait_for(lambda: checkpointed_epoch() >= 2, 180, "a registered checkpoint after epoch 2")
    gcs = ray.get_runtime_context().gcs_address  # this test's Ray, even if another one runs on the machine
    workers = list_actors(address=gcs, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGKILL)
    t.join(timeout=300)
    assert not t.is_alive(), "the run did not finish after the worker was killed"
    model, metrics_last = out["result"]
    epochs = _epochs(metrics)
    assert epochs[-1] == 30 and metrics_last["epoch"] == 30
    # each line says which checkpoint its worker group started from (0: fresh); the kill may land right after
    # a checkpoint, so the epoch sequence itself need not repeat
    resumed = sorted({m["resumed_after_epoch"] for m in _lines(metrics)} - {0})
    assert resumed, f"the kill did not interrupt the run: {epochs}"
    assert resumed[0] >= 2, f"restarted after epoch {resumed[0]}: expected the checkpoint of epoch 2 or later"
    assert epochs.count(1) == 1
    # A resumed run is the uninterrupted run: weights, Adam state, epoch and torch RNG come from the checkpoint,
    # the sampler's order is a function of (seed, epoch) and runs resume at epoch boundaries, and the lr is a
    # function of the epoch. So every epoch after the restart repeats the reference's loss, the final weights
    # match, and the accuracy lands within 0.5 points (the Done-when bound) -- in practice on the same value.
    ref_loss = {m["epoch"]: m["loss"] for m in _lines(tmp_path / "ref" / "metrics.jsonl")}
    got_loss = {m["epoch"]: m["loss"] for m in _lines(metrics)}  # the last line per epoch: after the restart
    assert got_loss == pytest.approx(ref_loss, rel=1e-5)
    ref_state, state = ref_model.state_dict(), model.state_dict()
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-5)
    assert abs(accuracy(model, x, y) - ref_acc) <= 0.5


DRIVER = textwrap.dedent(
    """
    import sys, ray
    from slimray.runtime import init_ray
    from slimray.families.classifier.datasets import load_digits
    from slimray.training.classifier_data import TrainData, classifier_job
    from slimray.training.distill import run_training
    init_ray(num_cpus=2)
    ds = load_digits(seed=0)
    (x, y), (xv, yv) = ds.normalized("train"), ds.normalized("val")
    data = TrainData(ray.put(x.numpy()), ray.put(y.numpy()), ray.put(xv.numpy()), ray.put(yv.numpy()))
    spec = {"kind": "cnn", "in_channels": 1, "image_size": 8, "conv_channels": [8, 16], "fc_hidden": [32], "num_classes": 10}
    job = classifier_job(label="driver", run_name="driver-run", storage_path=sys.argv[1] + "/ray", spec=spec, epochs=int(sys.argv[2]),
                   batch_size=32, lr=3e-3, num_workers=1, metrics_path=sys.argv[1] + "/metrics.jsonl")
    run_training(job, data)
    print("DONE")
    """
)


@pytest.mark.long  # over a minute (kills and restarts): `make test-long`, which CI runs after `make test`
def test_killed_driver_resumes_on_rerun(tmp_path, ray_session):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    metrics = tmp_path / "metrics.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path), "40"], env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: len(_epochs(metrics)) >= 3, 240, "three epochs in the first driver")
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray it started in-process
        p.wait(timeout=60)
    done_before = max(_epochs(metrics))
    assert done_before < 40
    time.sleep(2)
    # verbose: the workers' own lines (the resume message among them) reach this driver's output
    again = subprocess.run([sys.executable, str(script), str(tmp_path), "40"], env={**env, "SLIMRAY_VERBOSE": "1"},
                           capture_output=True, text=True, timeout=600)
    assert "DONE" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resumed from checkpoint" in again.stdout + again.stderr
    epochs = _epochs(metrics)
    second = epochs[epochs.index(done_before) + 1 :] if done_before in epochs else epochs
    assert epochs[-1] == 40
    assert second[0] > 1, "the rerun started from a checkpoint, not from epoch 1"
