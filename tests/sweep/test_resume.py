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

from slimray.sweep.trials import read_trial_log

from .test_search import given_run

pytestmark = [pytest.mark.slow, pytest.mark.long]  # two drivers starting Ray in subprocesses: `make test-long`

DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from slimray.config import PipelineConfig
    from slimray.pipelines import run_pipeline
    cfg = PipelineConfig.model_validate_json(Path(sys.argv[2]).read_text())
    report = run_pipeline(cfg, out_dir=sys.argv[1], student=Path(sys.argv[3]), train_students=False, resume=True)
    print("DONE", len(report["trials"]), sum(t["status"] == "ok" for t in report["trials"]))
    """
)


def _finished_in_experiment(path: str) -> set[str]:
    from ray.tune import ExperimentAnalysis

    ea = ExperimentAnalysis(path)
    return {t.config["key"] for t in ea.trials if t.status == "TERMINATED"}


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, digits, trained_digits_cnn, ray_session):
    cfg, student = given_run(tmp_path, digits, trained_digits_cnn, "resume-sweep", finetune_epochs=1, num_timing_repeats=3,
                             space={"prune_ratios": [0.0, 0.5], "quantizations": ["none", "dynamic_int8", "static_int8"]})
    run_dir = tmp_path / "resume-sweep"
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    args = [sys.executable, str(script), str(tmp_path), str(tmp_path / "cfg.json"), str(student)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"TUNE_GLOBAL_CHECKPOINT_S": "0"}
    p = subprocess.Popen(args, env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while sum(e == "end" for e, _ in read_trial_log(run_dir)) < 2:
            assert p.poll() is None, "the first driver ended before it was interrupted"
            assert time.time() < deadline, "no two trials finished within 300 s"
            time.sleep(0.5)
        time.sleep(3)  # let Tune record the finished trials
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray it started in-process
        p.wait(timeout=60)
    finished = _finished_in_experiment(str(run_dir / "ray" / "classifier-search"))
    starts_before = Counter(k for e, k in read_trial_log(run_dir) if e == "start")
    assert 2 <= len(finished) < 6, finished

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    out = again.stdout + again.stderr
    assert "DONE 6 6" in again.stdout, out[-3000:]
    assert "resuming" in out
    starts = Counter(k for e, k in read_trial_log(run_dir) if e == "start")
    assert len(starts) == 6  # every point of the grid ran
    for key in finished:  # ... and no finished trial ran again
        assert starts[key] == starts_before[key] == 1, (key, starts)
