"""``slimray.sweep.engine.TrialLines``: one console line per trial start and end, named by its key. No Ray cluster."""

from __future__ import annotations

from types import SimpleNamespace

from slimray.sweep.engine import TrialLines
from slimray.families.classifier.search import parse_setting, trial_key


def test_one_line_per_trial_start_and_end_named_by_its_key(capsys):
    lines = TrialLines(lambda c: trial_key(c["prune_ratio"], *parse_setting(c["setting"])))
    ok = SimpleNamespace(trial_id="t1", config={"prune_ratio": 0.5, "setting": "static_int8@onnxruntime"},
                         last_result={"status": "ok", "accuracy": 97.25, "latency_ms_b1": 0.0123, "latency_ms_b64": 0.5})
    bad = SimpleNamespace(trial_id="t2", config={"prune_ratio": 0.0, "setting": "bf16@torch"},
                          last_result={"status": "error", "error": "DiskFullError: [Errno 28] no space left\ntraceback..."})
    for trial in (ok, bad):
        lines.on_trial_start(0, [], trial)
        lines.on_trial_complete(0, [], trial)
    out = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert out == [
        "trial prune0.50-static_int8-onnxruntime: started",
        "trial prune0.50-static_int8-onnxruntime: done (97.25% val, 0.0123 ms at batch 1, 0.5 ms at batch 64)",
        "trial prune0.00-bf16: started",
        "trial prune0.00-bf16: failed: DiskFullError: [Errno 28] no space left",
    ]
