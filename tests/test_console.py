"""Console and stop signals (``slimray.console``): the resume command, the temporary files a killed writer leaves,
and a SIGTERM in the middle of a real sweep followed by a rerun that keeps the finished trials."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import yaml

from slimray.console import find_temp_files, remove_temp_files, resume_command
from slimray.runlock import LOCK_NAME
from slimray.sweep.trials import read_trial_log

from .conftest import tiny_digits_config


def test_resume_command_is_the_same_command_without_fresh():
    assert resume_command(["run", "--recipe", "digits", "--fresh", "--out", "/tmp/my runs"]) == (
        "slimray run --recipe digits --out '/tmp/my runs'"
    )
    assert resume_command(["sweep", "--recipe", "mnist"]) == "slimray sweep --recipe mnist --resume"
    assert resume_command(["sweep", "--resume"]) == "slimray sweep --resume"


def test_temp_files_of_killed_writers_are_found_and_removed(tmp_path):
    keep = [tmp_path / "student" / "model.safetensors", tmp_path / ".lock", tmp_path / "pruned" / ".prune0.50.lock",
            tmp_path / "ray" / "exp" / ".validate_storage_marker", tmp_path / "trials" / "prune0.50-none" / "spec.json"]
    temp = [tmp_path / ".student.k2j4h5g1" / "model.safetensors",  # _atomic_dir_write's mkdtemp folder
            tmp_path / "trials" / ".prune0.50-none.a8d7f6e5" / "spec.json",
            tmp_path / ".winner.old.4242" / "spec.json", tmp_path / ".config.json.tmp.4242", tmp_path / ".teacher_logits.tmp",
            tmp_path / "cache" / ".teacher.safetensors.tmp.17", tmp_path / "pruned" / ".prune0.50-e1.zzzzzzzz" / "x"]
    for f in keep + temp:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    # each temp folder counts once (its contents are not listed separately), each temp file once
    assert find_temp_files(tmp_path) == sorted(f.parent if f.parent.name.startswith(".") else f for f in temp)
    removed = remove_temp_files(tmp_path)
    assert len(removed) == len(temp)
    assert all(f.exists() for f in keep) and not any(f.exists() for f in temp)
    assert find_temp_files(tmp_path) == []


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "slimray.cli", *args]


@pytest.mark.slow
@pytest.mark.long  # a real digits pipeline twice (~2-4 min on 2 cores): `make test-long`
def test_sigterm_mid_sweep_then_rerun_keeps_finished_trials(tmp_path):
    cfg = tiny_digits_config("sigterm").model_dump()
    cfg["teacher"]["epochs"] = cfg["distill"]["epochs"] = 4
    cfg["distill"]["labels_only_baseline"] = False
    cfg["search"]["space"] = {"prune_ratios": [0.0, 0.5], "quantizations": ["none", "dynamic_int8"], "runtimes": ["torch"]}
    cfg["search"]["finetune_epochs"] = 1
    cfg["search"]["max_concurrent_trials"] = 1  # one trial at a time: the signal lands between finished and pending ones
    cfg["search"]["space_file"] = None
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "runs"
    run_dir = out / "sigterm"
    args = ["run", "--config", str(tmp_path / "cfg.yaml"), "--no-serve", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # Tune's own checkpoint period: as a user runs it
    p = subprocess.Popen(_cli(*args), env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 420
        while sum(e == "end" for e, _ in read_trial_log(run_dir)) < 1:
            assert p.poll() is None, "the run ended before it was interrupted:\n" + p.communicate()[1][-3000:]
            assert time.time() < deadline, "no trial finished within 420 s"
            time.sleep(0.3)
        p.send_signal(signal.SIGTERM)  # the driver alone, as a process manager would
        stdout, stderr = p.communicate(timeout=180)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=60)
    (tmp_path / "interrupted.out").write_text(stdout + "\n--- stderr ---\n" + stderr)  # what a person saw
    assert p.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    m = re.search(r"interrupted \(SIGTERM\).*Resume with:\n  (.+)", stderr, re.S)
    assert m, stderr[-3000:]
    resume = m.group(1).strip()
    assert resume == shlex.join(["slimray", *args])
    assert "Traceback" not in stderr and "Tuner.restore" not in stderr, stderr[-3000:]  # one resume hint: ours
    assert find_temp_files(run_dir) == [] and not (run_dir / LOCK_NAME).exists()
    log_before = read_trial_log(run_dir)
    finished = {k for e, k in log_before if e == "end"}
    assert finished and not (run_dir / "report.json").exists()

    again = subprocess.run(_cli(*shlex.split(resume)[1:]), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert (run_dir / "report.json").exists()
    new_starts = Counter(k for e, k in read_trial_log(run_dir)[len(log_before):] if e == "start")
    assert not (set(new_starts) & finished), f"finished trials ran again: {new_starts}"
    assert {k for e, k in read_trial_log(run_dir) if e == "end"} == {"student-prune0.00-none", "student-prune0.00-dynamic_int8",
                                                                      "student-prune0.50-none", "student-prune0.50-dynamic_int8"}


def test_diverted_logger_writes_to_the_run_logs_not_the_console(tmp_path, capsys):
    import logging

    from slimray.console import divert_logger

    name = "slimray-test.diverted"
    divert_logger(name, tmp_path / "logs" / "tune.log")
    divert_logger(name, tmp_path / "logs" / "tune.log")  # idempotent
    logging.getLogger(name).warning("Experiment has been interrupted")
    assert "interrupted" not in capsys.readouterr().err
    assert (tmp_path / "logs" / "tune.log").read_text().count("Experiment has been interrupted") == 1
