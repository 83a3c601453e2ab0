"""The whole pipeline on local Ray (tiny digits run): report contract, artifacts, winner rule, reuse."""

from __future__ import annotations

import json

import pytest
import torch

from slimray.artifacts import load_artifact
from slimray.compress.measure import accuracy
from slimray.config import PipelineConfig
from slimray.pipeline import prepare_run_dir
from slimray.schema import ConfigError

from .conftest import tiny_digits_config


def test_report_contract(digits_run):
    run_dir, report = digits_run
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["winner"]["key"] == report["winner"]["key"]
    assert report["recipe"] == "digits" and report["max_accuracy_drop"] == 5.0
    for role in ("teacher", "student", "winner"):
        r = report[role]
        for field in ("accuracy", "params", "size_bytes"):
            assert isinstance(r[field], (int, float)) and r[field] > 0, (role, field)
        assert set(r["latency_ms"]) == {"batch_1", "batch_64"} and all(v > 0 for v in r["latency_ms"].values())
    assert 0 < report["student"]["accuracy_without_distillation"] <= 100
    assert report["winner"]["prune_ratio"] in (0.0, 0.5)
    assert report["winner"]["quantization"] in ("none", "static_int8")
    assert len(report["trials"]) == 4
    for t in report["trials"]:
        assert {"prune_ratio", "quantization", "status"} <= set(t)
        assert t["status"] == "ok", t
        assert {"val_accuracy", "size_bytes", "params", "latency_ms"} <= set(t)
    pruned = [t for t in report["trials"] if t["prune_ratio"] == 0.5]
    whole = [t for t in report["trials"] if t["prune_ratio"] == 0.0]
    assert max(t["params"] for t in pruned) < min(t["params"] for t in whole)
    for f in ("report.md", "pareto.png", "teacher/spec.json", "student/model.safetensors", "winner/spec.json"):
        assert (run_dir / f).exists(), f
    assert (run_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| winner |" in (run_dir / "report.md").read_text()


def test_winner_is_fastest_feasible_finalist(digits_run):
    _, report = digits_run
    floor = report["accuracy_floor"]
    assert floor == pytest.approx(report["teacher"]["val_accuracy"] - report["max_accuracy_drop"])
    finalists = [t for t in report["trials"] if t.get("finalist")]
    assert finalists and all(t["val_accuracy"] >= floor for t in finalists)
    fastest = min(finalists, key=lambda t: (t["latency_ms_side_by_side"]["batch_64"], t["size_bytes"]))
    assert report["winner"]["key"] == fastest["key"] and report["constraint_met"]


def test_winner_artifact_reloads_with_reported_accuracy(digits_run, digits):
    run_dir, report = digits_run
    model, spec = load_artifact(run_dir / "winner")
    x, y = digits.normalized("test")
    assert accuracy(model, x, y) == pytest.approx(report["winner"]["accuracy"], abs=1e-6)
    assert spec.quantization.method == report["winner"]["quantization"]


def test_rerun_reuses_stages_and_refuses_a_changed_config(digits_run):
    run_dir, _ = digits_run
    cfg = tiny_digits_config()
    assert prepare_run_dir(cfg, run_dir.parent) == run_dir  # same config: allowed, stages reused
    changed = PipelineConfig.model_validate({**cfg.model_dump(), "distill": {**cfg.distill.model_dump(), "epochs": 3}})
    with pytest.raises(ConfigError, match="different config"):
        prepare_run_dir(changed, run_dir.parent)
