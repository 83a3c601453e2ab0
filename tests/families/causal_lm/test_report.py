"""The causal_lm family's own report sections (pure python, no Ray): the targets and the hidden-state weight a
student's distill report records and report.md's words for them, whether a student is on the Pareto front, and bf16
left out of the search on a CPU without it."""

from __future__ import annotations

from slimray.families.causal_lm.config import LMDistillConfig
from slimray.families.causal_lm.report import describe_distill, distill_settings, distill_settings_of


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
    assert distill_settings_of(old) == {"targets": "topk_cache", "hidden_weight": 0.0}
    assert distill_settings_of({}) is None
    assert "cached top-k logits" in describe_distill(distill_settings_of(old))


def _row(key, student, ppl, tok_s):
    return {"key": key, "student": student, "status": "ok", "perplexity": ppl, "decode_tokens_per_s_b1": tok_s}


def test_report_says_whether_a_student_is_on_the_pareto_front():
    from slimray.families.causal_lm.report import front_students

    rows = [_row("teacher-none", "teacher", 19.0, 15.0), _row("teacher-int8", "teacher", 19.7, 20.8),
            _row("student24-int8", "student24", 21.0, 30.0), _row("student24-int4", "student24", 40.0, 35.0),
            _row("student24-none", "student24", 21.5, 18.0)]  # beaten by teacher-int8 on both
    front = ["student24-int4", "student24-int8", "teacher-int8", "teacher-none"]
    limit = 1.15 * 19.0
    assert front_students(rows, front=front, ppl_limit=limit) == (
        "Distilled students on the Pareto front: within the perplexity budget student24-int8; beyond it student24-int4.")
    assert "none within the perplexity budget; beyond it student24-int4" in front_students(
        rows, front=[k for k in front if k != "student24-int8"], ppl_limit=limit)
    assert "No distilled student is on the Pareto front: every trial of student24 is beaten" in front_students(
        rows, front=["teacher-int8", "teacher-none"], ppl_limit=limit)
    assert front_students(rows[:2], front=["teacher-int8"], ppl_limit=limit) is None  # no student searched


def test_search_leaves_bf16_out_on_a_cpu_without_native_bf16_and_says_so(monkeypatch):
    """On an AVX2-only CPU bf16 prefill ran 41-49 tok/s against fp32's 316: the LM search leaves it out (as the encoder
    search does) and the report says why; with native bf16, or bf16 alone, it stays."""
    from slimray.compress import cpu
    from slimray.families.causal_lm.config import load_lm_config
    from slimray.families.causal_lm.report import bf16_note, searched_quant_methods

    cfg = load_lm_config(recipe="smollm")
    assert "bf16" in cfg.search.quant_methods
    monkeypatch.setattr(cpu, "bf16_slow_reason", lambda: "this CPU has no AVX512-BF16 or AMX-BF16")
    quants, why = searched_quant_methods(cfg)
    assert "bf16" not in quants and quants == [q for q in cfg.search.quant_methods if q != "bf16"] and "AVX512-BF16" in why
    assert "left out of the search" in bf16_note(cfg)
    only = cfg.model_copy(update={"search": cfg.search.model_copy(update={"quant_methods": ["bf16"]})})
    assert searched_quant_methods(only) == (["bf16"], None)
    monkeypatch.setattr(cpu, "bf16_slow_reason", lambda: None)
    assert searched_quant_methods(cfg) == (list(cfg.search.quant_methods), None) and bf16_note(cfg) is None
