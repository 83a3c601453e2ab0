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


def _row(key, model, ppl, tok_s, teacher_ppl=19.0):
    return {"key": key, "model": model, "status": "ok", "perplexity": ppl, "perplexity_ratio": ppl / teacher_ppl,
            "decode_tokens_per_s_b1": tok_s}


def test_pareto_front_section_says_whether_a_student_is_on_it():
    from slimray.pipelines.causal_lm import lm_pareto_front, render_markdown  # noqa: F401 (the section renders from trials)

    rows = [_row("teacher-none", "teacher", 19.0, 15.0), _row("teacher-int8", "teacher", 19.7, 20.8),
            _row("student24-int8", "student24", 21.0, 30.0), _row("student24-int4", "student24", 40.0, 35.0),
            _row("student24-none", "student24", 21.5, 18.0)]  # beaten by teacher-int8 on both
    assert [r["key"] for r in lm_pareto_front(rows)] == ["student24-int4", "student24-int8", "teacher-int8", "teacher-none"]
    md = _section(rows, budget=1.15)
    assert "| student24-int8 | student24 | 21.00 | 1.105 | 30.0 | yes |" in md
    assert "within the perplexity budget student24-int8; beyond it student24-int4" in md
    md = _section([r for r in rows if r["key"] != "student24-int8"], budget=1.15)
    assert "none within the perplexity budget; beyond it student24-int4" in md
    md = _section([r for r in rows if r["key"] in ("teacher-none", "teacher-int8", "student24-none")], budget=1.15)
    assert "No distilled student is on the front: every trial of student24 is beaten" in md


def _section(rows, *, budget):
    """The Pareto section of report.md for these trials (the rest of the report from a minimal document)."""
    from slimray.pipelines.causal_lm import render_markdown

    speed = {"prefill_tokens_per_s": 1.0, "decode_tokens_per_s_b1": 1.0, "decode_tokens_per_s_b8": 1.0}
    row = {"perplexity": 19.0, "top1_agreement": 1.0, "size_bytes": 1, **speed}
    trial = {"top1_agreement": 1.0, "prefill_tokens_per_s": 1.0, "size_bytes": 1, "trial_seconds": 1.0}
    r = {"name": "t", "recipe": "t", "data": {"documents": {"train": 1}, "split": "by article"},
         "evaluation": {"perplexity": "p", "speed": "s"}, "teacher": row,
         "winner": {**row, "key": "teacher-int8", "storage": "int8"}, "speedup_vs_teacher_as_given": speed,
         "speedup_vs_teacher_same_runtime": None, "targets": {"perplexity_ratio": {"value": 1.0, "target": budget, "met": True}},
         "students": [{"name": "student24", "num_layers": 24, "kept_layers": [], "width": None, "distill_metrics": []}],
         "trials": [{**trial, **x} for x in rows], "int4": "n/a", "stage_seconds": {}, "wall_s": 1.0}
    md = render_markdown(r)
    return md[md.index("## Pareto front"):md.index("## Students")]


def test_search_leaves_bf16_out_on_a_cpu_without_native_bf16_and_says_so(monkeypatch):
    """On an AVX2-only CPU bf16 prefill ran 41-49 tok/s against fp32's 316: the LM search leaves it out (as the encoder
    search does) and the report says why; with native bf16, or bf16 alone, it stays."""
    from slimray.compress import cpu
    from slimray.families.causal_lm.config import load_lm_config
    from slimray.pipelines.causal_lm import _bf16_note, searched_quant_methods

    cfg = load_lm_config(recipe="smollm")
    assert "bf16" in cfg.search.quant_methods
    monkeypatch.setattr(cpu, "bf16_slow_reason", lambda: "this CPU has no AVX512-BF16 or AMX-BF16")
    quants, why = searched_quant_methods(cfg)
    assert "bf16" not in quants and quants == [q for q in cfg.search.quant_methods if q != "bf16"] and "AVX512-BF16" in why
    assert "left out of the search" in _bf16_note(cfg)
    only = cfg.model_copy(update={"search": cfg.search.model_copy(update={"quant_methods": ["bf16"]})})
    assert searched_quant_methods(only) == (["bf16"], None)
    monkeypatch.setattr(cpu, "bf16_slow_reason", lambda: None)
    assert searched_quant_methods(cfg) == (list(cfg.search.quant_methods), None) and _bf16_note(cfg) is None
