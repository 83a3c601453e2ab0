"""The causal_lm winner rule on the finalists' side-by-side figures (pure python, no Ray)."""

from __future__ import annotations

from slimray.pipelines.causal_lm import choose_winner


def row(key: str, *, ppl: float, b1: float, prefill: float, size: int) -> dict:
    return {"key": key, "status": "ok", "perplexity": ppl, "accuracy": -ppl, "size_bytes": size,
            "ms_per_token_b1": 1000.0 / b1, "final": {"prefill_tokens_per_s": prefill, "decode_tokens_per_s_b1": b1}}


def test_fastest_decode_within_budget_ties_to_smaller():
    rows = [row("int4", ppl=20.0, b1=46.8, prefill=386, size=250), row("int8", ppl=19.7, b1=40.7, prefill=951, size=250),
            row("over", ppl=23.0, b1=60.0, prefill=2000, size=100), row("int4-big", ppl=20.0, b1=46.8, prefill=386, size=400)]
    w, ok = choose_winner(rows, teacher_ppl=19.0, ppl_budget=1.15, teacher_prefill=318)
    assert ok and w["key"] == "int4"  # 23.0 > 1.15 x 19 = 21.85; the tie at 46.8 tok/s goes to the smaller


def test_prefill_constraint():
    rows = [row("int4", ppl=20.0, b1=46.8, prefill=386, size=250), row("int8", ppl=19.7, b1=40.7, prefill=951, size=250)]
    w, ok = choose_winner(rows, teacher_ppl=19.0, ppl_budget=1.15, teacher_prefill=318, min_prefill_speedup=1.5)
    assert ok and w["key"] == "int8" and rows[0]["meets_prefill"] is False
    w, ok = choose_winner(rows, teacher_ppl=19.0, ppl_budget=1.15, teacher_prefill=318, min_prefill_speedup=10)
    assert not ok and w["key"] == "int4"  # no finalist reaches 10x: the perplexity rule alone, flagged infeasible


def test_noise_rule_holds_when_no_finalist_meets_the_prefill_floor():
    """The smollm run of 2026-12-06 on an AVX2 box: no finalist reached 1.5x prefill, and the student in bf16 led by
    2.6% (median over 2 side-by-side rounds, under the 3% margin): a tie, so the smaller teacher in int8 wins."""
    rows = [row("student27-bf16-vllm", ppl=21.72, b1=21.4, prefill=48, size=251_343_215),
            row("teacher-token_int8-hf_eager", ppl=19.71, b1=20.8, prefill=244, size=223_800_000)]
    rounds = {"student27-bf16-vllm": [21.4, 18.4], "teacher-token_int8-hf_eager": [20.8, 18.0]}
    w, ok = choose_winner(rows, teacher_ppl=19.0, ppl_budget=1.15, teacher_prefill=307, min_prefill_speedup=1.5,
                          rounds=rounds)
    assert not ok and w["key"] == "teacher-token_int8-hf_eager" and w["tied_with"] == ["student27-bf16-vllm"]
    rounds["student27-bf16-vllm"] = [23.0, 20.0]  # beyond the margin in both rounds: the faster wins
    w, ok = choose_winner(rows, teacher_ppl=19.0, ppl_budget=1.15, teacher_prefill=307, min_prefill_speedup=1.5,
                          rounds=rounds)
    assert not ok and w["key"] == "student27-bf16-vllm" and w["tied_with"] == []
