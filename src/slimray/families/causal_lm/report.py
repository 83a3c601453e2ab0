"""The causal-LM family's own report sections, beside the shared report (``slimray.pipelines.flow``): the winner
reloaded from its folder and scored again, bytes on disk and peak memory of teacher and winner (a fresh process
each), the speedups against the teacher as given, in the winner's quantization and runtime, and in vLLM, the
targets of issue #17, the students (layers kept, how they were distilled, validation perplexity per epoch), the layer
importance, and what the search left out or must not be read as (bf16 on a CPU without it, int4 on a 4-bit teacher,
sparsity on CPU). Pure: no Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from slimray.compress.cpu import without_slow_bf16
from slimray.compress.measure import torch_threads

SPEED_FIGURES = ("prefill_tokens_per_s", "decode_tokens_per_s_b1", "decode_tokens_per_s_b8")
DISTILL_SETTINGS = ("targets", "top_k", "hidden_weight", "temperature", "ce_weight")


def searched_quant_methods(cfg: Any) -> tuple[list[str], str | None]:
    """``search.quant_methods`` as searched: bf16 left out on a CPU without native bf16 (its prefill ran 41-49 tok/s
    against fp32's 316 on an AVX2-only box, so it could only lose, and it won as the least bad finalist), with why."""
    return without_slow_bf16(list(cfg.search.quant_methods))


def bf16_note(cfg: Any) -> str | None:
    """What the report says about bf16 when the search left it out; None otherwise."""
    why = searched_quant_methods(cfg)[1]
    return None if why is None else (f"left out of the search: {why}; it stays searched on a CPU with AVX512-BF16 or "
                                     "AMX-BF16 and on GPU")


def int4_note(cfg: Any) -> str:
    searched = "int4_weight_only" in cfg.search.quant_methods
    what = ("searched as int4_weight_only (torch's CPU int4 kernel, groups of 32 inputs, bf16 activations)" if searched
            else "not searched (add int4_weight_only to search.quant_methods)")
    if cfg.teacher.source == "smollm2":
        return (f"{what}; this teacher's GGUF weights were 4-bit (Q4_1) before dequantization, so int4 looks nearly free "
                "on it: do not read its perplexity as what int4 costs a model trained in float")
    return what


def sparsity_note(cfg: Any) -> str | None:
    """What the report says about sparsity: None when not searched."""
    sparse = [sp for sp in cfg.search.sparsities if sp != "none"]
    if not sparse:
        return None
    return (f"searched {sparse} (magnitude pruning of the Linear layers but {cfg.search.sparsity_keep_dense}, no recovery "
            "training) with " + str([q for q in cfg.search.quant_methods if q in cfg.search.sparse_quant_methods])
            + "; sparse layers are stored packed (2:4: kept values + 2-bit positions; unstructured: values + bitmask), "
            "so sparsity is for size on disk and for GPU speed (2:4 sparse tensor cores): on CPU the weights run dense "
            "and no CPU speedup is claimed, whatever the trial timings show")


def lm_notes(cfg: Any) -> list[str]:
    """The search's notes for the shared report (and the console)."""
    notes = [f"int4: {int4_note(cfg)}"]
    if bf16 := bf16_note(cfg):
        notes.append(f"bf16: {bf16}")
    if sparse := sparsity_note(cfg):
        notes.append(f"sparsity: {sparse}")
    return notes


def distill_settings(d: Any) -> dict[str, Any]:
    """What a student's distill report records of ``LMDistillConfig`` ``d``: the targets and the loss weights
    (``top_k`` only for the cache: the teacher in the loop gives the full vocabulary)."""
    return {"targets": d.targets, "top_k": d.top_k if d.targets == "topk_cache" else None, "hidden_weight": d.hidden_weight,
            "temperature": d.temperature, "ce_weight": d.ce_weight}


def distill_settings_of(report: dict[str, Any]) -> dict[str, Any] | None:
    """The settings part of a student's distill report; a student distilled before ``targets`` was recorded (only
    the top-k cache existed then) reads as that. None for a report without one."""
    if not report:
        return None
    out = {k: report[k] for k in DISTILL_SETTINGS if k in report}
    out.setdefault("targets", "topk_cache")
    out.setdefault("hidden_weight", 0.0)
    return out


def describe_distill(settings: dict[str, Any]) -> str:
    """report.md's words for a student's distill settings (``distill_settings``)."""
    if settings["targets"] == "teacher_in_loop":
        text = "the teacher in the loop (full-vocabulary KL)"
    else:
        k = settings.get("top_k")
        text = f"the teacher's cached top-{k} logits" if k else "the teacher's cached top-k logits"
    if settings.get("hidden_weight"):
        text += f" + {settings['hidden_weight']:g} x hidden-state MSE at the kept layers"
    if settings.get("ce_weight"):
        text += f" + {settings['ce_weight']:g} x next-token cross-entropy"
    if settings.get("temperature") not in (None, 1.0):
        text += f", temperature {settings['temperature']:g}"
    return f"{text} (distill.targets {settings['targets']}, hidden_weight {settings.get('hidden_weight', 0.0):g})"


def front_students(trials: list[dict[str, Any]], *, front: list[str], ppl_limit: float) -> str | None:
    """Whether a distilled student is on the Pareto front (``front``: the keys of the trials no other beats on both
    perplexity and batch-1 decode tok/s), within the perplexity budget (``ppl_limit``) or beyond it; None when no
    student was searched."""
    ok = [t for t in trials if t.get("status") == "ok"]
    names = sorted({t["student"] for t in ok if t["student"] != "teacher"})
    if not names:
        return None
    on = [t for t in ok if t["key"] in set(front) and t["student"] != "teacher"]
    inside = sorted(t["key"] for t in on if t["perplexity"] <= ppl_limit + 1e-9)
    outside = sorted(t["key"] for t in on if t["perplexity"] > ppl_limit + 1e-9)
    if not on:
        return (f"No distilled student is on the Pareto front: every trial of {', '.join(names)} is beaten on both "
                "perplexity and decode speed by a trial of the teacher.")
    return ("Distilled students on the Pareto front: " + (f"within the perplexity budget {', '.join(inside)}" if inside else
            "none within the perplexity budget") + (f"; beyond it {', '.join(outside)}" if outside else "") + ".")


def _ratios(w: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, float] | None:
    if ref is None:
        return None
    return {k: w[k] / ref[k] for k in SPEED_FIGURES if w.get(k) and ref.get(k)}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report_extras(cfg: Any, result: dict[str, Any], *, importance: list[float] | None,
                  plans: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(report.json keys, report.md lines): see the module docstring."""
    from slimray.families.causal_lm.artifacts import load_lm, load_meta
    from slimray.families.causal_lm.evaluate import dir_size_bytes, perplexity_and_agreement, probe_peak_memory
    from slimray.families.causal_lm.search import candidate_key

    s, run_dir, data = cfg.search, Path(result["run_dir"]), result["data"]
    t, w, beside = result["teacher"], result["winner"], result["beside"]
    reloaded, _, meta = load_lm(run_dir / "winner")
    with torch_threads(os.cpu_count() or 1):
        ppl, agree = perplexity_and_agreement(reloaded, data.eval_windows, reference_argmax=data.teacher_argmax)
    del reloaded
    w_size = dir_size_bytes(run_dir / "winner")
    t_peak = probe_peak_memory(data.teacher_dir, quant_method="none") if s.peak_memory else None
    w_peak = probe_peak_memory(run_dir / "winner", quant_method="artifact") if s.peak_memory else None
    dense_teacher = w["student"] == "teacher" and w.get("sparsity", "none") == "none"
    same_key = w["key"] if dense_teacher else candidate_key("teacher", w["quantization"], w["runtime"])
    same = w if dense_teacher else beside.get(same_key)
    vllm_key = candidate_key("teacher", "bf16", "vllm")
    vs_given, vs_same = _ratios(w, t), _ratios(w, same)
    vs_vllm = _ratios(w, beside.get(vllm_key)) if w["key"] != vllm_key else None
    targets = {
        "decode_b1_speedup": (vs_given["decode_tokens_per_s_b1"], 2.0, ">="),
        "prefill_speedup": (vs_given["prefill_tokens_per_s"], 1.5, ">="),
        "perplexity_ratio": (ppl / t["perplexity"], s.ppl_budget, "<="),
        "size_ratio": (t["size_bytes"] / w_size, 2.0, ">="),
        "wall_time_s": (result["seconds"], 2400.0, "<="),
    }
    if vs_vllm is not None:  # the gain is the compression's, not only the engine's
        targets["decode_b1_speedup_vs_vllm_teacher"] = (vs_vllm["decode_tokens_per_s_b1"], 1.5, ">=")
    students = []
    for name, plan in plans.items():
        distilled = load_meta(run_dir / "students" / name).reports.get("distill", {})
        students.append({"name": name, "num_layers": plan.spec["num_layers"], "kept_layers": plan.spec["kept_layers"],
                         "width": plan.spec["width"] or distilled.get("width"), "distill": distill_settings_of(distilled)})
    extra: dict[str, Any] = {
        "data": data.info,
        "evaluation": {"perplexity": f"token-level over {len(data.eval_windows)} held-out windows of {cfg.data.window_len} "
                                     "tokens (stride = window, first token unscored)",
                       "speed": f"1 torch thread; prefill one [1, {s.prefill_len}] forward; decode {s.num_new_tokens} new "
                                f"tokens after a 16-token prompt, prefill subtracted; median of {s.num_repeats} per round, median "
                                f"of the side-by-side rounds"},
        "winner_reloaded": {"perplexity": ppl, "top1_agreement": agree, "size_bytes": w_size, "peak_memory_bytes": w_peak,
                            "storage": meta.storage, "sparsity": meta.sparsity,
                            "kept_layers": meta.reports.get("search", {}).get("kept_layers")},
        "teacher_peak_memory_bytes": t_peak,
        "speedup_vs_teacher_as_given": vs_given,
        "speedup_vs_teacher_same_runtime": vs_same, "teacher_same_runtime_key": same_key if same is not None else None,
        "speedup_vs_teacher_vllm": vs_vllm, "teacher_vllm_key": vllm_key if vs_vllm is not None else None,
        "targets": {k: {"value": v, "target": tg, "met": (v >= tg - 1e-9) if op == ">=" else (v <= tg + 1e-9)}
                    for k, (v, tg, op) in targets.items()},
        "importance": importance, "lm_students": students,
        "students_on_front": front_students(result["trials"], front=result["pareto_front"], ppl_limit=s.ppl_budget * t["perplexity"]),
        "int4": int4_note(cfg), "sparsity": sparsity_note(cfg), "bf16": bf16_note(cfg),
    }
    return extra, _markdown(extra, w=w, t=t, run_dir=run_dir)


def _markdown(r: dict[str, Any], *, w: dict[str, Any], t: dict[str, Any], run_dir: Path) -> list[str]:
    rw = r["winner_reloaded"]
    mib = lambda v: "-" if v is None else f"{v / 2**20:.0f}"  # noqa: E731
    lines = ["## The winner reloaded, size and memory", "",
             f"Reloaded from {run_dir / 'winner'} ({rw['storage']} storage): perplexity {rw['perplexity']:.2f} (trial "
             f"{w['perplexity']:.2f}), top-1 agreement {rw['top1_agreement']:.3f}, {rw['size_bytes'] / 1e6:.1f} MB on disk "
             f"against the teacher's {t['size_bytes'] / 1e6:.1f} MB; peak memory loading and running it {mib(rw['peak_memory_bytes'])} "
             f"MiB against the teacher's {mib(r['teacher_peak_memory_bytes'])} MiB (a fresh process each).", "",
             f"Data: {', '.join(f'{v} {k}' for k, v in r['data']['documents'].items())} documents ({r['data']['split']}). "
             f"Perplexity: {r['evaluation']['perplexity']}. Speed: {r['evaluation']['speed']}.", "",
             "## Speedups of the winner (side by side)", "", "| reference | prefill | decode b1 | decode b8 |", "| --- | --- | --- | --- |"]
    refs = [("teacher as given (fp32, hf_eager)", r["speedup_vs_teacher_as_given"]),
            (f"teacher in the winner's quantization and runtime ({r['teacher_same_runtime_key']})", r["speedup_vs_teacher_same_runtime"]),
            (f"the uncompressed teacher in vLLM ({r['teacher_vllm_key']}): what the compression adds beyond the engine",
             r["speedup_vs_teacher_vllm"])]
    for label, v in refs:
        if v:
            lines.append(f"| {label} | " + " | ".join(f"{v[k]:.2f}x" if k in v else "-" for k in SPEED_FIGURES) + " |")
    if rw["sparsity"] != "none":
        lines += ["", f"The winner is {rw['sparsity']} sparse: on CPU its weights run as dense tensors, so its speed against "
                  "the dense teacher in the same quantization and runtime is timing noise, not a speedup from sparsity "
                  "(none is claimed on CPU); the sparsity buys size on disk, and GPU speed where 2:4 kernels run (2:4 only)."]
    lines += ["", "## Targets (issue #17)", "", "| target | value | required | met |", "| --- | --- | --- | --- |"]
    for k, v in r["targets"].items():
        op = "<=" if k in ("perplexity_ratio", "wall_time_s") else ">="
        lines.append(f"| {k} | {v['value']:.3f} | {op} {v['target']:g} | {'yes' if v['met'] else 'no'} |")
    if r["students_on_front"]:
        lines += ["", r["students_on_front"]]
    if r["lm_students"]:
        lines += ["", "## How the students were made", ""]
        for st in r["lm_students"]:
            m = _read_jsonl(run_dir / "logs" / f"{st['name']}_metrics.jsonl")
            lines.append(f"- {st['name']}: {st['num_layers']} layers kept {st['kept_layers']}"
                         + (f", width {st['width']}" if st["width"] else "")
                         + (f"; distilled from {describe_distill(st['distill'])}" if st.get("distill") else "")
                         + "; val perplexity per epoch: " + (", ".join(f"{e.get('val_perplexity', float('nan')):.2f}" for e in m) or "-"))
        if r.get("importance"):
            lines.append("- layer importance (KL nats/token when skipped): "
                         + ", ".join(f"{i}: {v:.3f}" for i, v in enumerate(r["importance"])))
    return lines + [""]
