"""The causal_lm family on the shared pipeline (``FlowStages`` over ``CausalLMRecipe``), end to end on a tiny local
teacher folder and a JSONL file: data split by document, a depth-pruned student distilled on Ray Train, {teacher,
student} x {none, token_int8} as trials, the finalists timed side by side with the teacher (and, for a student
finalist, the dense teacher in its quantization), the winner stored as an HF folder that ``load_lm`` reads, and the
report with the family's own sections. A rerun reuses everything."""

from __future__ import annotations

import json

import pytest

from tests.families.causal_lm.conftest import SENTENCES, make_model, make_tokenizer

pytestmark = pytest.mark.slow  # one 1-worker Ray Train run and 4 trials: ~1 min on 2 cores


def _config(tmp_path, **distill):
    from slimray.families.causal_lm.config import LMPipelineConfig

    tok = make_tokenizer()
    folder = tmp_path / "teacher"
    make_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    lines = [{"text": " ".join(SENTENCES[i:i + 6]), "doc": f"d{i}"} for i in range(len(SENTENCES))]
    (tmp_path / "text.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return LMPipelineConfig.from_dict({
        "family": "causal_lm", "name": "tiny-flow", "teacher": {"source": "huggingface", "path": str(folder)},
        "data": {"source": "jsonl", "path": str(tmp_path / "text.jsonl"), "group_field": "doc", "val_fraction": 0.2,
                 "test_fraction": 0.2, "window_len": 32, "num_eval_windows": 2},
        "student": {"depths": [2], "num_importance_windows": 1},
        "distill": {"num_steps": 2, "epochs": 1, "batch_size": 1, "seq_len": 32, "warmup_steps": 1, "num_workers": 1,
                    "max_failures": 0, "mixed_precision": "none", "num_val_windows": 1, "top_k": 4, **distill},
        "search": {"quant_methods": ["none", "token_int8"], "runtimes": ["hf_eager"], "ppl_budget": 100.0, "num_rounds": 1,
                   "max_rounds": 1, "num_finalists": 2, "use_tune": False, "peak_memory": False, "num_repeats": 1,
                   "prefill_len": 16, "num_new_tokens": 4},
    }, source="t.yaml")


def test_lm_end_to_end_on_the_shared_stages(ray_session, tmp_path):
    from slimray.families.causal_lm.artifacts import load_lm, load_meta
    from slimray.pipelines import run_pipeline

    cfg = _config(tmp_path)
    report = run_pipeline(cfg, out_dir=tmp_path / "runs", fresh=True)
    run = tmp_path / "runs" / "tiny-flow"
    assert report["family"] == "causal_lm" and report["search_bases"] == ["student2", "teacher"]
    assert {t["key"] for t in report["trials"]} == {f"{m}-{q}-hf_eager" for m in ("student2", "teacher") for q in ("none", "token_int8")}
    assert all(t["status"] == "ok" and t["perplexity"] > 0 for t in report["trials"]), report["trials"]
    teacher_trial = next(t for t in report["trials"] if t["key"] == "teacher-none-hf_eager")
    assert teacher_trial["perplexity"] == pytest.approx(report["teacher"]["perplexity"], rel=1e-4)  # the identity trial
    t = report["teacher"]
    assert t["top1_agreement"] == 1.0 and t["num_layers"] == 4 and t["size_bytes"] > 0
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s_b1", "decode_tokens_per_s_b8"):
        assert t[key] > 0 and report["winner"][key] > 0  # timed side by side
    (student,) = [r for r in report["students"] if r["key"] == "student2"]
    assert student["num_layers"] == 2 and student["search_base"] and "decode_tokens_per_s_b1" in student
    assert [m["epoch"] for m in report["distill_metrics"]["student2"]] == [1]  # the one Ray Train loop, one epoch
    for r in report["finalists"]:  # a student finalist is timed beside the dense teacher in its quantization
        if r["student"] == "student2" and r["quantization"] == "token_int8":
            assert "teacher-token_int8-hf_eager" in {b["key"] for b in report["beside"]} | {f["key"] for f in report["finalists"]}
    for b in report["beside"]:  # the teacher as it is is timed once, as "teacher", whatever name a finalist asks for
        if b["key"] == "teacher-none-hf_eager":
            assert b["decode_tokens_per_s_b1"] == t["decode_tokens_per_s_b1"] and b["perplexity"] == t["perplexity"]
    assert set(report["targets"]) == {"decode_b1_speedup", "prefill_speedup", "perplexity_ratio", "size_ratio", "wall_time_s"}
    assert report["lm_students"][0]["kept_layers"] == report["lm_students"][0]["kept_layers"][:2] and len(report["importance"]) == 4
    winner, _, meta = load_lm(run / "winner")
    assert meta.quant_method == report["winner"]["quantization"] and meta.runtime == "hf_eager"
    assert report["winner_reloaded"]["perplexity"] == pytest.approx(report["winner"]["perplexity"], rel=1e-3)
    assert load_meta(run / "students" / "student2").reports["distill"]["kept_layers"] == report["lm_students"][0]["kept_layers"]
    md = (run / "report.md").read_text()
    assert md.startswith("# tiny-flow: causal_lm") and "## Targets (issue #17)" in md and "## Every trial" in md

    again = run_pipeline(cfg, out_dir=tmp_path / "runs")  # a rerun reuses the student and every trial (and times again)
    assert again["winner"]["key"] in {t["key"] for t in report["trials"]}
    assert again["distill_metrics"] == report["distill_metrics"]
    assert {t["key"]: t["perplexity"] for t in again["trials"]} == {t["key"]: t["perplexity"] for t in report["trials"]}


@pytest.mark.long  # a 2-worker Ray Train run with the teacher on every worker
def test_teacher_in_the_loop_with_the_hidden_state_loss(ray_session, tmp_path):
    """``distill.targets: teacher_in_loop``: no top-k cache is built, each of the 2 workers loads the teacher from its
    folder and adds the hidden-state loss at the kept layers; the student's distill report records it and report.md
    says so."""
    from slimray.families.causal_lm.artifacts import load_lm, load_meta
    from slimray.families.causal_lm.report import describe_distill, distill_settings_of
    from slimray.pipelines import run_pipeline

    cfg = _config(tmp_path, targets="teacher_in_loop", hidden_weight=0.5, num_workers=2)
    report = run_pipeline(cfg, out_dir=tmp_path / "runs", fresh=True)
    run = tmp_path / "runs" / "tiny-flow"
    assert not (run / "cache" / "teacher_topk.safetensors").exists()  # no cache in this mode
    saved = load_meta(run / "students" / "student2").reports["distill"]
    assert saved["targets"] == "teacher_in_loop" and saved["hidden_weight"] == 0.5 and saved["top_k"] is None
    assert saved["kept_layers"] == report["lm_students"][0]["kept_layers"] and len(saved["kept_layers"]) == 2
    assert report["distill_metrics"]["student2"][-1]["loss_hidden"] > 0
    student, _, _ = load_lm(run / "students" / "student2")
    assert len(student.model.layers) == 2
    assert "0.5 x hidden-state MSE" in describe_distill(distill_settings_of(saved))
    assert "0.5 x hidden-state MSE" in (run / "report.md").read_text()
