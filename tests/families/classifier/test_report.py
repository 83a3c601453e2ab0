"""The classifier's report through the shared renderer: its tables are rows and columns (a failed trial shows its
error, stage and advice), the pruning speedups are measured ratios, and report.md / pareto.png are written."""

from __future__ import annotations

from slimray.families.classifier.report import distill_sweep_md, pruning_rows, report_md, write_report_files


def _trial(ratio, q, *, ms, params, status="ok", **extra):
    t = {"key": f"prune{ratio:.2f}-{q}", "prune_ratio": ratio, "quantization": q, "runtime": "torch", "status": status, **extra}
    if status == "ok":
        t.update(val_accuracy=95.0 - 10 * ratio, params=params, size_bytes=4 * params, peak_memory_bytes=2**20,
                 latency_ms={"batch_1": ms / 8, "batch_8": ms}, finetune_epochs=1 if ratio else 0, trial_seconds=2.0)
    return t


def _report():
    lat = lambda ms: {"batch_1": ms / 8, "batch_8": ms}  # noqa: E731
    return {
        "name": "r", "recipe": "digits", "serving_batch_size": 8, "max_accuracy_drop": 2.0, "accuracy_floor": 93.0,
        "constraint_met": True, "metric": {"name": "accuracy"}, "timing": {"num_threads": 1},
        "teacher": {"accuracy": 96.0, "params": 1000, "size_bytes": 4000, "latency_ms": lat(4.0)},
        "student": {"accuracy": 95.0, "params": 400, "size_bytes": 1600, "latency_ms": lat(2.0),
                    "labels_only": {"accuracy": 94.0, "params": 400, "latency_ms": lat(2.0)}},
        "winner": {"key": "prune0.50-none", "accuracy": 94.5, "params": 100, "size_bytes": 400, "latency_ms": lat(1.0),
                   "prune_ratio": 0.5, "quantization": "none", "runtime": "torch"},
        "search_base": {"student": "student", "kd_gain_points": 1.0, "val_accuracy_distilled": 95.0, "val_accuracy_labels_only": 94.0},
        "speedup_vs_teacher": {"batch_1": 4.0, "batch_8": 4.0},
        "gain_breakdown": [{"step": "teacher (fp32, torch)", "latency_ms": 4.0, "speedup_vs_teacher": 1.0},
                           {"step": "+ pruning 0.50 (fp32, torch)", "latency_ms": 1.0, "speedup_vs_teacher": 4.0}],
        "trials": [_trial(0.0, "none", ms=2.0, params=400), _trial(0.5, "none", ms=1.0, params=100),
                   _trial(0.5, "static_int8", ms=0, params=0, status="error", error="NotImplementedError: no kernel",
                          stage="quantize", advice="leave 'static_int8' out of search.space.quantizations")],
        "pareto_front": [{"key": "prune0.50-none"}],
        "search": {"algorithm": "grid", "scheduler": "none", "num_trials": 3, "trial_seconds": 4.0, "wall_s": 3.0, "left_out": []},
    }


def test_tables_are_rows_and_a_failed_trial_says_why(tmp_path):
    md = "\n".join(report_md(_report()))
    assert "| winner (torch) | 94.50 | 100 |" in md
    assert "| student (labels only) | 94.00 |" in md
    assert "| prune0.50-static_int8 | failed: NotImplementedError: no kernel at quantize; leave 'static_int8' out" in md
    assert "Distillation gained 1.00 points" in md
    write_report_files(_report(), tmp_path)
    assert (tmp_path / "report.md").read_text() == md
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_pruning_rows_are_measured_ratios():
    rows = pruning_rows(_report())
    assert [r["key"] for r in rows] == ["prune 0.0", "prune 0.5"]
    assert rows[1]["param_ratio"] == 4.0 and rows[1]["speedup"] == 2.0


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
