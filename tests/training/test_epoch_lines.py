"""A quiet console still shows one line per finished epoch of a Train run (read from rank 0's metrics file)."""

from __future__ import annotations

import json
import time

from slimray.training.distill import EpochLines, TrainJob


def test_one_line_per_epoch_from_the_metrics_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLIMRAY_VERBOSE", "0")
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"epoch": 1, "loss": 9.0}) + "\n")  # an earlier run's line: not repeated
    job = TrainJob(label="student", run_name="r", storage_path=str(tmp_path), spec={}, family="classifier", epochs=3, batch_size=8, lr=1e-3,
                   metrics_path=str(path))
    with EpochLines(job, poll_s=0.05):
        for e in (2, 3):
            with open(path, "a") as f:
                f.write(json.dumps({"epoch": e, "loss": 1.0 / e, "val_accuracy": 90.0 + e, "samples_per_s": 10.0,
                                    "resumed_after_epoch": 1}) + "\n")
            time.sleep(0.2)
        with open(path, "a") as f:
            f.write('{"epoch": 4, "lo')  # half-written: waits for the rest of the line
    out = [line for line in capsys.readouterr().out.splitlines() if "student: epoch" in line]
    assert len(out) == 2 and "epoch 2/3" in out[0] and "val acc 93.00%" in out[1] and "resumed after epoch 1" in out[1]


def test_verbose_mode_leaves_it_to_the_workers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLIMRAY_VERBOSE", "1")
    path = tmp_path / "m.jsonl"
    job = TrainJob(label="s", run_name="r", storage_path=str(tmp_path), spec={}, family="classifier", epochs=1, batch_size=8, lr=1e-3, metrics_path=str(path))
    with EpochLines(job, poll_s=0.05):
        path.write_text(json.dumps({"epoch": 1, "loss": 1.0}) + "\n")
        time.sleep(0.2)
    assert "epoch" not in capsys.readouterr().out
