"""The whole pipeline on local Ray (tiny digits run): report contract, artifacts, winner rule, reuse."""

from __future__ import annotations

import json

import pytest

from slimray.families.classifier.artifacts import load_runnable
from slimray.compress.measure import accuracy
from slimray.config import PipelineConfig
from slimray.runs import prepare_run_dir
from slimray.schema import ConfigError

from .conftest import tiny_digits_config


def test_report_contract(digits_run):
    run_dir, report = digits_run
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["winner"]["key"] == report["winner"]["key"]
    assert report["family"] == "classifier" and report["quality"]["key"] == "accuracy" and report["quality"]["budget"] == 5.0
    teacher = report["teacher"]
    assert report["quality"]["floor"] == pytest.approx(teacher["accuracy"] - 5.0)
    for r in (teacher, report["winner"]):
        for field in ("accuracy", "params", "size_bytes", "latency_ms_b1", "latency_ms_b64", "examples_per_s"):
            assert isinstance(r[field], (int, float)) and r[field] > 0, (r["key"], field)
    assert 0 < teacher["test_accuracy"] <= 100 and 0 < report["winner_test"]["accuracy"] <= 100
    # KD is not taken on trust: the search starts from the student that validates better, and the report says what KD gained
    rows = {r["key"]: r for r in report["students"]}
    kd, labels = rows["student"], rows["student-labels-only"]
    better = labels if labels["accuracy"] > kd["accuracy"] else kd
    assert better.get("search_base") and report["search_bases"] == [better["key"]]
    assert kd["kd_gain"] == pytest.approx(kd["accuracy"] - labels["accuracy"])
    assert "distillation" in (run_dir / "report.md").read_text() and "Search started from" in (run_dir / "report.md").read_text()
    # 2 ratios x (none, static_int8) x (torch, onnxruntime), from the one starting student
    assert len(report["trials"]) == 8 and report["search"]["algorithm"] == "grid" and report["search"]["num_trials"] == 8
    assert {(t["runtime"], t["quantization"]) for t in report["trials"]} == {
        (r, q) for r in ("torch", "onnxruntime") for q in ("none", "static_int8")
    }
    for t in report["trials"]:
        assert t["status"] == "ok" and t["student"] == better["key"] and t["key"].startswith(better["key"] + "-prune"), t
        assert {"accuracy", "size_bytes", "params", "latency_ms_b1", "latency_ms_b64", "peak_memory_bytes", "trial_seconds"} <= set(t)
        assert t["peak_memory_bytes"] > 0 and t["trial_seconds"] > 0
        assert t["finetune_epochs"] == (2 if t["prune_ratio"] > 0 else 0) and not t["stopped_early"]
        if t["runtime"] == "onnxruntime":  # the runtime's outputs were checked against the torch model
            check = t["runtime_check"]
            assert check["num_examples"] > 0 and check["class_agreement"] >= 90.0  # int8 may flip a few close calls
            if t["quantization"] == "none":
                assert check["max_abs_diff"] < 1e-3 and check["class_agreement"] == 100.0
    same = report["speedup_vs_teacher_same_runtime"]
    assert same["runtime"] == report["winner"]["runtime"] and same["batch_64"] > 0
    assert report["speedup_vs_teacher"]["batch_64"] == pytest.approx(report["winner"]["speedup"], rel=1e-6)
    steps = report["gain_breakdown"]
    assert steps[0]["model"] == "teacher" and steps[-1]["model"] == report["winner"]["key"]
    pruned = [t for t in report["trials"] if t["prune_ratio"] == 0.5]
    whole = [t for t in report["trials"] if t["prune_ratio"] == 0.0]
    assert max(t["params"] for t in pruned) < min(t["params"] for t in whole)
    for f in ("report.md", "pareto.png", "teacher/spec.json", "students/student/model.safetensors", "winner/spec.json",
              "sample_request.json"):
        assert (run_dir / f).exists(), f
    assert (run_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Where the gain comes from" in (run_dir / "report.md").read_text()


def test_winner_is_fastest_feasible_finalist(digits_run):
    _, report = digits_run
    floor = report["quality"]["floor"]
    finalists = report["finalists"]
    assert finalists and all(t["accuracy"] >= floor for t in finalists) and report["winner"]["meets_constraint"]
    assert report["constraint_met"]
    fastest = max(finalists, key=lambda t: t["examples_per_s"])
    w = report["winner"]
    # the fastest wins unless its lead is inside the noise, where the smaller of the tied wins
    assert w["key"] == fastest["key"] or fastest["key"] in w["tied_with"]
    assert report["rounds"][w["key"]] and len(report["rounds"][w["key"]]) >= 3


def test_winner_artifact_reloads_with_reported_accuracy(digits_run, digits):
    run_dir, report = digits_run
    model, spec = load_runnable(run_dir / "winner")
    x, y = digits.normalized("test")
    assert accuracy(model, x, y) == pytest.approx(report["winner_test"]["accuracy"], abs=1e-6)
    assert spec.quantization.method == report["winner"]["quantization"]
    assert spec.runtime.name == report["winner"]["runtime"]


def test_rerun_reuses_stages_and_refuses_a_changed_config(digits_run):
    run_dir, _ = digits_run
    cfg = tiny_digits_config()
    assert prepare_run_dir(cfg, run_dir.parent) == run_dir  # same config: allowed, stages reused
    changed = PipelineConfig.model_validate({**cfg.model_dump(), "distill": {**cfg.distill.model_dump(), "epochs": 3}})
    with pytest.raises(ConfigError, match="different config"):
        prepare_run_dir(changed, run_dir.parent)


def test_distill_runs_the_stages_up_to_distillation_and_reuses_them(digits_run, capsys):
    """`slimray distill` is ``run_pipeline(until="distil")`` for every family: here the finished run's teacher and students
    are reused, no search runs and the report stays as it was; an unknown stage is refused."""
    from slimray.pipelines import run_pipeline

    run_dir, _ = digits_run
    before = (run_dir / "report.json").stat().st_mtime_ns
    run_pipeline(tiny_digits_config(), out_dir=run_dir.parent, until="distil")
    out = capsys.readouterr().out + capsys.readouterr().err
    assert "stage 4/9: distil" in out and "stage 5/9" not in out and "reused" in out
    assert (run_dir / "report.json").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="no stage 'derive'"):
        run_pipeline(tiny_digits_config(), out_dir=run_dir.parent, until="derive")


@pytest.mark.parametrize(
    ("fmt", "trial", "suffix"),
    [("onnx", None, "onnx"), ("onnx", "prune0.50-none", "onnx"), ("onnx", "prune0.50-static_int8-onnxruntime", "onnx"),
     ("torch-export", "prune0.50-none", "pt2")],
)
def test_export_cli_writes_a_checked_model(digits_run, tmp_path, fmt, trial, suffix, capsys):
    from slimray.cli import main

    run_dir, report = digits_run
    trial = f"{report['search_bases'][0]}-{trial}" if trial else None  # a trial's key names its starting student
    out = tmp_path / f"model.{suffix}"
    args = ["export", str(run_dir), "--format", fmt, "--out", str(out)] + (["--trial", trial] if trial else [])
    assert main(args) == 0
    check = json.loads((tmp_path / f"model.{suffix}.check.json").read_text())
    assert out.stat().st_size == check["bytes"] > 0 and check["num_examples"] == 359
    # fp32 exports match the model the run measured; the ONNX Runtime int8 trial exports its own graph
    assert check["class_agreement"] == 100.0 and check["max_abs_diff"] < 1e-3, check
    assert "same class 100.00%" in capsys.readouterr().out


def test_export_cli_rejects_bad_trials(digits_run, tmp_path, capsys):
    from slimray.cli import main

    run_dir, report = digits_run
    base = report["search_bases"][0]
    for trial in ("../../etc", "nope"):
        assert main(["export", str(run_dir), "--format", "onnx", "--trial", trial, "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "must match" in err and f"trials in this run: {base}-prune0.00-none" in err
    assert main(["export", str(run_dir), "--format", "onnx", "--trial", f"{base}-prune0.50-static_int8",
                 "--out", str(tmp_path / "q.onnx")]) == 2
    assert "quantize it in ONNX Runtime" in capsys.readouterr().err
