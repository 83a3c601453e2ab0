"""Distillation sweeps: Tune trials that each run a Ray Train job; space files, resources, best student."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from slimray.families.classifier.artifacts import ArtifactSpec, load_artifact, save_artifact
from slimray.config import DistillConfig, check_distill_space
from slimray.families.classifier.spec import CNNSpec, MLPSpec, count_params, scale_spec
from slimray.schema import ClusterTooSmallError, ConfigError
from slimray.sweep.distill_search import _id_from_path, pick_best, read_history
from slimray.sweep.space import SweepSpaceFile, load_space_file

from ..conftest import DIGITS_CNN, REPO

STUDENT = DIGITS_CNN.model_copy(update={"conv_channels": [8, 16], "fc_hidden": [32]})


# ---- space files (no Ray) ----


def test_shipped_space_files_load():
    digits = load_space_file(REPO / "tune" / "digits-distill.yaml")
    assert digits.num_trials == 2 and digits.distill.varying() == ["temperature"] and digits.search.num_workers == 1
    mnist = load_space_file(REPO / "tune" / "mnist-distill.yaml")
    assert mnist.search.algorithm == "optuna" and mnist.search.scheduler == "asha" and mnist.num_trials == 8
    legacy = load_space_file(REPO / "tune" / "mnist-grid.yaml")  # a bare compression space
    assert legacy.distill is None and "prune_ratios" in legacy.compress


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"distill": {"lr": {"uniform": [0.001, 0.01]}}}, "grid' takes lists only"),
        ({"distill": {"lr": {"uniform": [0.001, 0.01]}}, "search": {"algorithm": "optuna"}}, "num_samples is required"),
        ({"distill": {"alpha": [0.5, 1.5]}}, "alpha: 1.5 is out of range"),
        ({"distill": {"temperature": [0.0, 2.0]}}, "temperature: 0.0 is out of range"),
        ({"distill": {"lr": {"loguniform": [0.01, 0.001]}}, "search": {"algorithm": "random", "num_samples": 2}}, "lo < hi"),
        ({"distill": {"temperature": [2.0]}, "search": {"scheduler": "asha"}}, "distill.epochs as one number"),
        ({"distill": {"epochs": [4, 8]}, "search": {"scheduler": "asha"}}, "distill.epochs as one number"),
        ({"distill": {"epochs": 2}, "search": {"scheduler": "asha", "grace_period": 2}}, "must exceed search.grace_period"),
        ({"distill": {"temprature": [2.0]}}, "distill.temprature: unknown field"),
        ({"distill": {"batch_size": []}}, "batch_size: an empty list"),
        ({"search": {"num_workers": 1}}, "neither a 'distill' nor a 'compress'"),
        ({"compress": {"prune_ratios": [1.5]}}, "prune ratios must be in [0, 1)"),
    ],
)
def test_bad_space_files_fail_at_load_naming_the_field(tmp_path, data, needle):
    import yaml

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_space_file(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_space_is_checked_against_the_student():
    base = DistillConfig(student=STUDENT)
    check_distill_space(SweepSpaceFile.model_validate({"distill": {"width": [0.5, 2.0], "depth": [1, 2, 3]}}).distill, base)
    with pytest.raises(ValueError, match="depth 4 gives no valid student: .*image_size 8 must be divisible"):
        check_distill_space(SweepSpaceFile.model_validate({"distill": {"depth": [2, 4]}}).distill, base)
    with pytest.raises(ValueError, match="loss 'features' needs distill.feature_kd"):
        check_distill_space(SweepSpaceFile.model_validate({"distill": {"loss": ["logits", "features"]}}).distill, base)


def test_space_round_trips_through_json():
    space = load_space_file(REPO / "tune" / "mnist-distill.yaml")
    again = SweepSpaceFile.model_validate_json(space.model_dump_json())
    assert again == space


def test_scale_spec_changes_width_and_depth():
    assert scale_spec(STUDENT, width=0.5).conv_channels == [4, 8] and scale_spec(STUDENT, width=0.5).fc_hidden == [16]
    assert scale_spec(STUDENT, depth=1).conv_channels == [8]
    assert scale_spec(STUDENT, depth=3).conv_channels == [8, 16, 32]
    assert scale_spec(MLPSpec(in_features=64, hidden=[32], num_classes=10), depth=2, width=2.0).hidden == [64, 64]
    with pytest.raises(ValueError):
        scale_spec(STUDENT, depth=4)  # 8x8 images cannot be halved 4 times
    assert isinstance(scale_spec(STUDENT, width=1.0), CNNSpec)


def test_pick_best_breaks_ties_by_size_then_speed():
    c = [
        {"key": "a", "val_accuracy": 98.00, "params": 900, "lat": 1.0},
        {"key": "b", "val_accuracy": 97.95, "params": 500, "lat": 2.0},  # ties with a (0.1 points), smaller
        {"key": "c", "val_accuracy": 97.95, "params": 500, "lat": 1.5},  # same size as b, faster
        {"key": "d", "val_accuracy": 97.00, "params": 100, "lat": 0.1},  # smallest but not tied
    ]
    assert pick_best(c, tie_tolerance=0.1, latency_key="lat")["key"] == "c"
    assert pick_best(c, tie_tolerance=0.0, latency_key="lat")["key"] == "a"
    with pytest.raises(ConfigError, match="no distillation trial completed"):
        pick_best([], tie_tolerance=0.1, latency_key="lat")


def test_history_keeps_the_last_line_per_epoch(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in [{"epoch": 1, "val_accuracy": 50}, {"epoch": 2, "val_accuracy": 60},
                                                     {"epoch": 2, "val_accuracy": 61}, {"epoch": 3, "val_accuracy": 70}]))
    assert [h["val_accuracy"] for h in read_history(p)] == [50, 61, 70]
    assert _id_from_path("/x/distill_trial_ab12c_00001_1_temperature=2.0000_2026") == "ab12c_00001"


def test_asha_records_why_it_stopped_a_trial(tmp_path):
    from types import SimpleNamespace

    from slimray.sweep.engine import ExplainedASHA, read_stops

    asha = ExplainedASHA(stops_path=str(tmp_path / "stops.jsonl"), time_attr="epoch", metric="val_accuracy", mode="max",
                         max_t=6, grace_period=2, reduction_factor=2, stop_last_trials=False)
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(3)]
    for t in trials:
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, trials[0], {"epoch": 1, "val_accuracy": 50.0}) == asha.CONTINUE  # before the rung
    assert asha.on_trial_result(None, trials[0], {"epoch": 2, "val_accuracy": 90.0}) == asha.CONTINUE
    assert asha.on_trial_result(None, trials[1], {"epoch": 2, "val_accuracy": 80.0}) == asha.STOP
    assert asha.on_trial_result(None, trials[2], {"epoch": 2, "val_accuracy": 95.0}) == asha.CONTINUE
    stops = read_stops(tmp_path / "stops.jsonl")
    assert list(stops) == ["t1"] and stops["t1"]["epoch"] == 2 and stops["t1"]["cutoff"] == pytest.approx(90.0)


# ---- on Ray ----


def test_trials_that_cannot_fit_fail_fast_naming_the_resources(ray_session):
    from slimray.sweep.engine import plan_train_trials

    kw = dict(num_trials=4, cpus_per_worker=1.0, use_gpu=False)
    assert plan_train_trials(num_workers=1, max_concurrent_trials=None, what="sweep", **kw) == 2
    assert plan_train_trials(num_workers=2, max_concurrent_trials=None, what="sweep", **kw) == 1
    with pytest.raises(ClusterTooSmallError, match=r"3 worker\(s\) x 1 CPU = 3 CPU, but the cluster has 2 CPU; lower search.num_workers"):
        plan_train_trials(num_workers=3, max_concurrent_trials=None, what="sweep", **kw)
    with pytest.raises(ClusterTooSmallError, match="max_concurrent_trials 3 .* lower search.max_concurrent_trials to 2"):
        plan_train_trials(num_workers=1, max_concurrent_trials=3, what="sweep", **kw)
    with pytest.raises(ClusterTooSmallError, match="1 GPU"):
        plan_train_trials(num_workers=1, max_concurrent_trials=None, what="sweep", num_trials=1, cpus_per_worker=1.0, use_gpu=True)


@pytest.mark.slow
def test_sweep_cli_fails_fast_before_training_anything(ray_session, tmp_path, capsys):
    from slimray.cli import main

    space = tmp_path / "big.yaml"
    space.write_text("distill: {temperature: [2.0, 4.0]}\nsearch: {num_workers: 3}\n")
    t0 = time.monotonic()
    code = main(["sweep", "--recipe", "digits", "--space", str(space), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "3 worker(s) x 1 CPU = 3 CPU" in err and "cluster has 2 CPU" in err and "search.num_workers" in err
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "runs" / "digits" / "teacher").exists()  # nothing was trained


def _sweep_ctx(tmp_path, digits, trained_digits_cnn, *, space: dict, name: str, **distill):
    import ray

    from slimray.compress.measure import predict_logits
    from slimray.sweep.distill_search import DistillSweepContext
    from slimray.training.classifier_data import TrainData

    save_artifact(tmp_path / "teacher", trained_digits_cnn, ArtifactSpec(name="teacher", model=DIGITS_CNN, input=digits.input))
    (x, y), (xv, yv) = digits.normalized("train"), digits.normalized("val")
    logits = predict_logits(trained_digits_cnn, x)
    data = TrainData(ray.put(x.numpy()), ray.put(y.numpy()), ray.put(xv.numpy()), ray.put(yv.numpy()), ray.put(logits.numpy()))
    base = DistillConfig(student=STUDENT, labels_only_baseline=False, **distill)
    sweep = SweepSpaceFile.model_validate(space)
    check_distill_space(sweep.distill, base)
    return DistillSweepContext(
        run_dir=str(tmp_path), storage_path=str(tmp_path / "ray"), sweep_name=name, distill=base.model_dump(),
        space=sweep.model_dump(), input_spec=digits.input.model_dump(), data=data, teacher_dir=str(tmp_path / "teacher"),
    )


def _checkpointed_epoch(storage: Path, prefix: str) -> int:
    best = 0
    for snap in [*storage.glob(f"{prefix}-*/checkpoint_manager_snapshot.json"), storage / prefix / "checkpoint_manager_snapshot.json"]:
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, json.JSONDecodeError):  # not there (yet), or being written
            continue
        best = max(best, int((latest.get("metrics") or {}).get("epoch", 0)))
    return best


@pytest.mark.slow
@pytest.mark.long  # over a minute (kills and restarts): `make test-long`, which CI runs after `make test`
def test_two_trials_one_worker_each_and_a_lost_worker_retries(tmp_path, ray_session, digits, trained_digits_cnn):
    """2 trials x 1 Ray Train worker on 2 CPUs, side by side; their workers are killed mid-run and each
    trial restarts from its last checkpoint without failing the sweep."""
    import ray
    from ray.util.state import list_actors

    from slimray.sweep.distill_search import run_distill_sweep
    from slimray.sweep.engine import plan_train_trials

    ctx = _sweep_ctx(
        tmp_path, digits, trained_digits_cnn, name="dsweep",
        space={"distill": {"temperature": [2.0, 6.0]}, "search": {"num_workers": 1}},
        epochs=12, batch_size=16, lr=5e-3, max_failures=2,  # ~0.3 s an epoch: time to kill a worker mid-run
    )
    concurrent = plan_train_trials(num_trials=2, num_workers=1, cpus_per_worker=1.0, use_gpu=False, max_concurrent_trials=None, what="t")
    assert concurrent == 2
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("rows", run_distill_sweep(ctx, max_concurrent_trials=concurrent, resume=False)),
                         daemon=True)
    t.start()
    deadline = time.monotonic() + 240
    while _checkpointed_epoch(tmp_path / "ray", "dsweep") < 3:
        assert time.monotonic() < deadline and t.is_alive(), "no trial registered a checkpoint"
        time.sleep(0.2)
    gcs = ray.get_runtime_context().gcs_address
    workers = list_actors(address=gcs, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert workers
    for w in workers:  # every trial's worker: the one with the checkpoint must resume from it
        os.kill(w.pid, signal.SIGKILL)
    t.join(timeout=400)
    assert not t.is_alive(), "the sweep did not finish"
    rows = out["rows"]
    assert len(rows) == 2 and {r["settings"]["temperature"] for r in rows} == {2.0, 6.0}
    for r in rows:
        assert r["status"] == "completed", r
        assert r["epochs_run"] == 12 and [h["epoch"] for h in r["history"]] == list(range(1, 13))
        model, spec = load_artifact(r["artifact"])
        assert spec.model == STUDENT and count_params(model) > 0
        assert r["val_accuracy"] > 80.0
    lines = [json.loads(x) for r in rows for x in (tmp_path / "distill_trials" / r["trial_id"] / "metrics.jsonl").read_text().splitlines()]
    assert any(m["resumed_after_epoch"] > 0 for m in lines), "the killed worker's trial did not resume from a checkpoint"
    for r in rows:
        settings = json.loads((tmp_path / "distill_trials" / r["trial_id"] / "settings.json").read_text())
        assert settings["job"]["num_workers"] == 1 and settings["job"]["task"]["temperature"] == r["settings"]["temperature"]
    _wait(lambda: ray.available_resources().get("CPU", 0) == 2, 30, "both CPUs free after the sweep")  # no leaked workers


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.long
def test_optuna_and_asha_stop_weak_trials_and_free_their_workers(tmp_path, ray_session, digits, trained_digits_cnn):
    import ray

    from slimray.sweep.distill_search import run_distill_sweep

    ctx = _sweep_ctx(
        tmp_path, digits, trained_digits_cnn, name="asha",
        space={
            "distill": {"lr": {"loguniform": [1e-5, 1e-2]}, "epochs": 6},
            "search": {"algorithm": "optuna", "num_samples": 6, "num_startup_trials": 3, "scheduler": "asha", "grace_period": 2,
                       "reduction_factor": 2, "num_workers": 1},
        },
        batch_size=32,
    )
    rows = run_distill_sweep(ctx, max_concurrent_trials=2, resume=False)
    assert len(rows) == 6 and not [r for r in rows if r["status"] == "error"], rows
    stopped = [r for r in rows if r["status"] == "stopped"]
    done = [r for r in rows if r["status"] == "completed"]
    assert stopped, "ASHA stopped no trial"
    assert done and all(r["epochs_run"] == 6 for r in done)
    for r in stopped:
        assert r["epochs_run"] < 6 and "ASHA stopped it after epoch" in r["stop_reason"] and "cutoff" in r["stop_reason"]
    _wait(lambda: ray.available_resources().get("CPU", 0) == 2, 30, "stopped trials' workers to be released")


RESUME_DRIVER = """
import sys, ray
from slimray.runtime import init_ray
from slimray.families.classifier.artifacts import load_artifact
from slimray.compress.measure import predict_logits
from slimray.config import DistillConfig
from slimray.families.classifier.datasets import load_digits
from slimray.sweep.distill_search import DistillSweepContext, run_distill_sweep
from slimray.sweep.space import SweepSpaceFile
from slimray.training.classifier_data import TrainData
init_ray(num_cpus=2)
run_dir = sys.argv[1]
ds = load_digits(seed=0)
(x, y), (xv, yv) = ds.normalized("train"), ds.normalized("val")
teacher, _ = load_artifact(run_dir + "/teacher")
data = TrainData(ray.put(x.numpy()), ray.put(y.numpy()), ray.put(xv.numpy()), ray.put(yv.numpy()),
                 ray.put(predict_logits(teacher, x).numpy()))
student = {"kind": "cnn", "in_channels": 1, "image_size": 8, "conv_channels": [8, 16], "fc_hidden": [32], "num_classes": 10}
base = DistillConfig(student=student, epochs=10, batch_size=16, lr=5e-3, labels_only_baseline=False)
space = SweepSpaceFile.model_validate({"distill": {"temperature": [2.0, 4.0, 6.0]}, "search": {"num_workers": 1}})
ctx = DistillSweepContext(run_dir=run_dir, storage_path=run_dir + "/ray", sweep_name="resume-dsweep", distill=base.model_dump(),
                          space=space.model_dump(), input_spec=ds.input.model_dump(), data=data, teacher_dir=run_dir + "/teacher")
rows = run_distill_sweep(ctx, max_concurrent_trials=1, resume=True)
print("DONE", len(rows), sum(r["status"] == "completed" for r in rows))
"""


@pytest.mark.slow
@pytest.mark.long
def test_interrupted_distillation_sweep_resumes(tmp_path, digits, trained_digits_cnn, ray_session):
    """Driver killed after one trial completed: the rerun keeps that trial, and the trial that was running
    resumes its Ray Train run from its last checkpoint."""
    import subprocess
    import sys

    save_artifact(tmp_path / "teacher", trained_digits_cnn, ArtifactSpec(name="teacher", model=DIGITS_CNN, input=digits.input))
    script = tmp_path / "driver.py"
    script.write_text(RESUME_DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"TUNE_GLOBAL_CHECKPOINT_S": "0"}
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trials = tmp_path / "distill_trials"
    try:
        deadline = time.monotonic() + 400
        # one trial completed and a trial still running has a registered checkpoint
        def running_checkpointed() -> bool:
            for d in trials.glob("*/settings.json"):
                tid = d.parent.name
                if not (d.parent / "model" / "spec.json").exists() and _checkpointed_epoch(tmp_path / "ray", f"resume-dsweep-{tid}") >= 2:
                    return True
            return False

        while not (len(list(trials.glob("*/model/spec.json"))) >= 1 and running_checkpointed()):
            assert p.poll() is None, "the first driver ended before it was interrupted:\n" + p.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no trial completed within 400 s"
            time.sleep(0.3)
        time.sleep(2)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    done_before = {d.parents[1].name: (d.parents[1] / "settings.json").stat().st_mtime_ns for d in trials.glob("*/model/spec.json")}
    assert 1 <= len(done_before) < 3
    again = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    out = again.stdout + again.stderr
    assert "DONE 3 3" in again.stdout, out[-3000:]
    assert "resuming" in out
    for trial_id, mtime in done_before.items():  # a finished trial did not start again
        assert (trials / trial_id / "settings.json").stat().st_mtime_ns == mtime, trial_id
    resumed = [json.loads(x)["resumed_after_epoch"] for f in trials.glob("*/metrics.jsonl") for x in f.read_text().splitlines()]
    assert max(resumed) >= 1, "the interrupted trial restarted its Train run from scratch"
