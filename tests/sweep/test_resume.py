"""An interrupted sweep (driver killed after some trials finished) resumes without rerunning them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest

from slimray.families.classifier.artifacts import ArtifactSpec, save_artifact
from slimray.sweep.trials import read_trial_log

from ..conftest import DIGITS_CNN

pytestmark = [pytest.mark.slow, pytest.mark.long]  # two drivers starting Ray in subprocesses: `make test-long`

DRIVER = textwrap.dedent(
    """
    import sys, ray
    from slimray.runtime import init_ray
    from slimray.data import load_digits
    from slimray.config import SearchConfig
    from slimray.sweep.search import SweepContext, run_sweep
    init_ray(num_cpus=2)
    run_dir = sys.argv[1]
    ds = load_digits(seed=0)
    (x, y), (xv, yv) = ds.normalized("train"), ds.normalized("val")
    search = SearchConfig(space={"prune_ratios": [0.0, 0.5], "quantizations": ["none", "dynamic_int8", "static_int8"]},
                          finetune_epochs=1, num_timing_repeats=3)
    ctx = SweepContext(run_dir=run_dir, base_model_dir=run_dir + "/student", x_train=ray.put(x.numpy()), y_train=ray.put(y.numpy()),
                       teacher_logits=None, x_val=ray.put(xv.numpy()), y_val=ray.put(yv.numpy()), search=search.model_dump(),
                       temperature=4.0, alpha=0.0, seed=0)
    trials = run_sweep(ctx, run_name="resume-sweep", max_concurrent_trials=1, resume=True)
    print("DONE", len(trials), sum(t["status"] == "ok" for t in trials))
    """
)


def _finished_in_experiment(path: str) -> set[str]:
    from ray.tune import ExperimentAnalysis

    from slimray.families.classifier.search import parse_setting, trial_key

    ea = ExperimentAnalysis(path)
    return {
        trial_key(t.config["prune_ratio"], *parse_setting(t.config["setting"])) for t in ea.trials if t.status == "TERMINATED"
    }


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, digits, trained_digits_cnn, ray_session):
    save_artifact(tmp_path / "student", trained_digits_cnn, ArtifactSpec(name="student", model=DIGITS_CNN, input=digits.input))
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"TUNE_GLOBAL_CHECKPOINT_S": "0"}
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while sum(e == "end" for e, _ in read_trial_log(tmp_path)) < 2:
            assert p.poll() is None, "the first driver ended before it was interrupted"
            assert time.time() < deadline, "no two trials finished within 300 s"
            time.sleep(0.5)
        time.sleep(3)  # let Tune record the finished trials
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray it started in-process
        p.wait(timeout=60)
    finished = _finished_in_experiment(str(tmp_path / "ray" / "resume-sweep"))
    starts_before = Counter(k for e, k in read_trial_log(tmp_path) if e == "start")
    assert 2 <= len(finished) < 6, finished

    again = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    out = again.stdout + again.stderr
    assert "DONE 6 6" in again.stdout, out[-3000:]
    assert "resuming" in out
    starts = Counter(k for e, k in read_trial_log(tmp_path) if e == "start")
    assert len(starts) == 6  # every point of the grid ran
    for key in finished:  # ... and no finished trial ran again
        assert starts[key] == starts_before[key] == 1, (key, starts)
