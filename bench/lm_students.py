"""How small a SmolLM2 student must be to decode 1.5x faster than the uncompressed teacher in vLLM, and what the
cut costs before any training: one invocation, side by side.

Students are cut from the teacher the way the causal_lm family derives them (``families/causal_lm/prune.py``):
layers dropped by measured importance (KL when skipped, on held-out windows), then optionally MLP neurons by
activation. Each is stored as slimray stores a winner (W8A8 compressed-tensors, ``token_int8``) and timed in vLLM's
CPU build (a worker process per model, ``bench/lm_engines.py``'s ``VllmRow``, 1 thread), interleaved with the bf16
teacher in vLLM over ``--rounds`` rounds. Speed does not depend on the weights' values, so untrained students time
what a trained one would. The quality column is the student's held-out perplexity right after the cut (no
distillation; with the teacher, same windows), the starting point distillation has to bring within the 1.15x
budget.

    python bench/lm_students.py --out bench/results/lm_students.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

PLANS = [(30, None), (24, None), (20, None), (16, None), (24, 1024), (20, 1024), (16, 1024)]  # (layers, MLP neurons)
# each timed row is a live vLLM worker (about 2.3 GB with its 1 GiB KV cache): the default times four students beside
# the teacher (~12 GB); --all-plans times all seven (~19 GB), the perplexity column is computed for every plan either way
TIMED = {(30, None), (20, None), (20, 1024), (16, 1024)}


def main(argv: list[str] | None = None) -> int:
    from lm_engines import VllmRow, write_results

    from slimray.families.causal_lm import data as D
    from slimray.families.causal_lm.artifacts import LMArtifactMeta, save_lm
    from slimray.families.causal_lm.evaluate import perplexity_and_agreement
    from slimray.families.causal_lm.prune import layer_importance, drop_layers, prune_width
    from slimray.families.causal_lm.teacher import ensure_smollm2_teacher, load_causal_lm
    from slimray.sweep.select import rounds_summary

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-windows", type=int, default=8, help="held-out windows of 256 tokens for perplexity")
    p.add_argument("--all-plans", action="store_true", help="time every plan, not only the default four (needs ~19 GB)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lm-students-"))
    teacher_dir = ensure_smollm2_teacher(work / "teacher")
    teacher, tok = load_causal_lm(teacher_dir)
    splits = D.split_documents(D.load_wiki_summaries(), seed=0)
    windows = D.pack_windows(splits["test"], tok, window_len=256, num_windows=args.num_windows)
    val = D.pack_windows(splits["val"], tok, window_len=128, num_windows=4)
    t0 = time.perf_counter()
    importance = layer_importance(teacher, val)
    print(f"layer importance (KL nats/token when skipped) in {time.perf_counter() - t0:.0f}s: "
          + ", ".join(f"{i}:{v:.3f}" for i, v in enumerate(importance)), flush=True)
    t_ppl, _ = perplexity_and_agreement(teacher, windows)
    results = {"load": os.getloadavg(), "teacher_perplexity": t_ppl, "importance": importance, "rows": {}}
    folders, ppl, timed = {}, {}, set()
    order = sorted(range(len(importance)), key=lambda i: -importance[i])
    for layers, neurons in PLANS:
        name = f"L{layers}" + (f"-ff{neurons}" if neurons else "")
        model, _ = load_causal_lm(teacher_dir)
        if layers < len(importance):
            drop_layers(model, keep=sorted(order[:layers]))
        if neurons:
            prune_width(model, intermediate_size=neurons, calibration=val)
        model.config.num_hidden_layers = layers
        ppl[name] = perplexity_and_agreement(model, windows)[0] if name != "L30" else t_ppl
        if args.all_plans or (layers, neurons) in TIMED:
            timed.add(name)
        folders[name] = save_lm(model, tok, work / name, meta=LMArtifactMeta(quant_method="token_int8", storage="int8"))
        print(f"{name}: {sum(x.numel() for x in model.parameters()) / 1e6:.1f}M params, perplexity after the cut "
              f"{ppl[name]:.2f} ({ppl[name] / t_ppl:.2f}x the teacher's)", flush=True)
        del model
    rows = {"teacher bf16": VllmRow(Path(sys.executable), teacher_dir, dtype="bfloat16", threads=1)}
    for name, folder in folders.items():
        if name not in timed:
            continue
        rows[f"{name} W8A8"] = VllmRow(Path(sys.executable), folder, dtype="auto", threads=1)
    samples: dict[str, list[float]] = {k: [] for k in rows}
    keys = list(rows)
    for r in range(args.rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            samples[key].append(rows[key].time()["decode_tokens_per_s_b1"])
            print(f"round {r + 1}: {key}: decode b1 {samples[key][-1]:.1f} tok/s", flush=True)
    base = max(samples["teacher bf16"])
    results["perplexity_after_cut"] = {name: {"perplexity": v, "ratio": v / t_ppl} for name, v in ppl.items()}
    lines = ["| model (vLLM, 1 thread) | decode b1 tok/s (best) | spread | vs bf16 teacher | perplexity after the cut (no training) |",
             "| --- | --- | --- | --- | --- |"]
    for key, v in samples.items():
        s = rounds_summary(v)
        name = key.split(" ")[0]
        q = f"{ppl[name]:.2f} ({ppl[name] / t_ppl:.2f}x)" if name in ppl else f"{t_ppl:.2f} (1.00x)"
        results["rows"][key] = {"decode_tokens_per_s_b1": s, "vs_teacher_bf16": s["best"] / base,
                                "perplexity": ppl.get(name, t_ppl), "load_s": rows[key].load_s}
        lines.append(f"| {key} | {s['best']:.1f} | {100 * s['spread']:.0f}% | {s['best'] / base:.2f}x | {q} |")
        rows[key].close()
    results["load_after"] = os.getloadavg()
    write_results(results, lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
