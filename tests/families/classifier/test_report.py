"""The classifier's own report sections (``ClassifierRecipe.report_extras``; the shared renderer writes the rest): the
gain breakdown and the pruning speedups are measured ratios in rows and columns, the distillation sweep marks its best."""

from __future__ import annotations

from slimray.families.classifier.report import distill_sweep_md, gain_breakdown_md, pruning_md


def _trial(base, ratio, q, *, ms, params, status="ok"):
    t = {"key": f"{base}-prune{ratio:.2f}-{q}", "student": base, "prune_ratio": ratio, "quantization": q, "runtime": "torch",
         "status": status}
    if status == "ok":
        t.update(params=params, latency_ms_serving=ms)
    return t


def test_gain_breakdown_is_cumulative_speedups():
    md = "\n".join(gain_breakdown_md([{"step": "teacher (fp32, torch)", "latency_ms": 4.0, "speedup_vs_teacher": 1.0},
                                      {"step": "+ pruning 0.50 (fp32, torch)", "latency_ms": 1.0, "speedup_vs_teacher": 4.0}],
                                     batch_size=8))
    assert "Where the gain comes from (batch 8" in md and "| + pruning 0.50 (fp32, torch) | 1.000 | 4.00x |" in md


def test_pruning_speedups_are_measured_ratios_per_starting_student():
    trials = [_trial("student", 0.0, "none", ms=2.0, params=400), _trial("student", 0.5, "none", ms=1.0, params=100),
              _trial("student", 0.5, "static_int8", ms=0.5, params=100),
              _trial("student", 0.75, "none", ms=0, params=0, status="error")]
    md = "\n".join(pruning_md(trials, batch_size=8))
    assert "Real speedup of pruning student" in md
    assert "| prune 0.5 | 100 | 4.00x | 1.000 | 2.00x |" in md and "prune 0.75" not in md and "static_int8" not in md
    assert pruning_md(trials[:1], batch_size=8) == []  # one ratio: nothing to compare


def test_distill_sweep_section_marks_the_best_trial():
    summary = {
        "serving_batch_size": 8, "varying": ["lr"], "search": {"algorithm": "random", "scheduler": "asha", "num_workers": 1,
                                                              "tie_tolerance": 0.1},
        "max_concurrent_trials": 2, "trial_seconds": 10.0, "wall_s": 6.0,
        "trials": [{"trial_id": "t1", "settings": {"lr": 0.01}, "student": {"kind": "mlp", "hidden": [32]}, "epochs_run": 2,
                    "epochs": 4, "stop_reason": "asha", "val_accuracy": 90.0, "status": "stopped"}],
        "candidates": [{"key": "t1", "params": 50, "latency_ms": {"batch_1": 0.1, "batch_8": 0.4}}],
        "best": {"key": "t1", "val_accuracy": 90.0, "test_accuracy": 89.0, "params": 50, "settings": {"lr": 0.01},
                 "latency_ms": {"batch_1": 0.1, "batch_8": 0.4}},
    }
    md = "\n".join(distill_sweep_md(summary))
    assert "| t1 **best** | 0.01 | [32] | 2/4 | asha | 90.00 | 50 | 0.400 | - |" in md
    assert "| best (trial t1) | lr=0.01 | 90.00 | 89.00 | 50 | 0.100 | 0.400 |" in md
