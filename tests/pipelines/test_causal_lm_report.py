"""What the causal_lm report says about each student's distillation (pure python, no Ray): the targets and the
hidden-state weight a student's distill report records, and report.md's words for them."""

from __future__ import annotations

from slimray.families.causal_lm.config import LMDistillConfig
from slimray.pipelines.causal_lm import _distill_settings_of, describe_distill, distill_settings


def test_settings_recorded_per_target():
    cache = distill_settings(LMDistillConfig(top_k=8))
    assert cache == {"targets": "topk_cache", "top_k": 8, "hidden_weight": 0.0, "temperature": 1.0, "ce_weight": 0.0}
    loop = distill_settings(LMDistillConfig(targets="teacher_in_loop", hidden_weight=0.5))
    assert loop["targets"] == "teacher_in_loop" and loop["top_k"] is None and loop["hidden_weight"] == 0.5


def test_report_md_words():
    loop = distill_settings(LMDistillConfig(targets="teacher_in_loop", hidden_weight=0.5))
    text = describe_distill(loop)
    assert "teacher in the loop" in text and "0.5 x hidden-state MSE" in text and "distill.targets teacher_in_loop" in text
    assert "cached top-8 logits" in describe_distill(distill_settings(LMDistillConfig(top_k=8)))


def test_student_distilled_before_targets_were_recorded_reads_as_the_cache():
    old = {"num_layers": 2, "kept_layers": [0, 29], "seconds": 12.0}  # a distill report from before this option
    assert _distill_settings_of(old) == {"targets": "topk_cache", "hidden_weight": 0.0}
    assert _distill_settings_of({}) is None
    assert "cached top-k logits" in describe_distill(_distill_settings_of(old))
