"""The causal_lm distil stage with the teacher in the loop, on a tiny teacher folder (no SmolLM2): no top-k cache
is built, the workers get the teacher's folder and the student's kept layers, and the student's distill report
records the targets and the hidden-state weight that report.md shows."""

from __future__ import annotations

import copy
import time

import pytest

from tests.families.causal_lm.conftest import SENTENCES, make_model, make_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.long]  # one 2-worker Ray Train run: ~1 min on 2 shared cores


def test_distil_stage_teacher_in_loop(ray_session, tmp_path):
    from slimray.families.causal_lm.artifacts import load_lm, load_meta
    from slimray.families.causal_lm.config import LMPipelineConfig
    from slimray.families.causal_lm.data import Document, pack_windows
    from slimray.families.causal_lm.prune import drop_layers
    from slimray.pipelines.causal_lm import CausalLMStages, StudentPlan, _distill_settings_of, describe_distill

    tok = make_tokenizer()
    folder = tmp_path / "teacher"
    make_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = LMPipelineConfig.from_dict({
        "family": "causal_lm", "name": "tiny-loop", "teacher": {"source": "huggingface", "path": str(folder)},
        "data": {"source": "jsonl", "path": str(tmp_path / "unused.jsonl")}, "student": {"depths": [2]},
        "distill": {"targets": "teacher_in_loop", "hidden_weight": 0.5, "num_steps": 2, "epochs": 1, "batch_size": 1,
                    "seq_len": 32, "warmup_steps": 1, "num_workers": 2, "max_failures": 0, "mixed_precision": "none"},
    }, source="t.yaml")
    windows = pack_windows([Document(group=f"d{i}", text=s) for i, s in enumerate(SENTENCES)], tok, window_len=32)
    run = tmp_path / "run"
    stages = CausalLMStages(cfg)
    stages.open(run, time.perf_counter())
    from slimray.families.causal_lm.teacher import load_causal_lm

    stages.teacher_dir = folder
    stages.teacher, stages.tokenizer = load_causal_lm(folder)
    stages.val_windows, stages.train_windows = windows[:2], windows[2:2 + cfg.distill.num_train_windows()]
    keep = [0, 3]
    plan = StudentPlan(name="student2", num_layers=2, kept=keep, folder=run / "students" / "student2",
                       model=drop_layers(copy.deepcopy(stages.teacher), keep=keep))
    stages.students = [plan]
    stages.distil()
    assert not (run / "cache" / "teacher_topk.safetensors").exists()  # no cache in this mode
    report = load_meta(plan.folder).reports["distill"]
    assert report["targets"] == "teacher_in_loop" and report["hidden_weight"] == 0.5 and report["top_k"] is None
    assert report["last_metrics"]["loss_hidden"] > 0 and report["kept_layers"] == keep
    student, _, _ = load_lm(plan.folder)
    assert len(student.model.layers) == 2
    assert "0.5 x hidden-state MSE" in describe_distill(_distill_settings_of(report))
