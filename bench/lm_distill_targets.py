"""The causal_lm family's two distillation targets on Ray Train, side by side in one process and one Ray: the
teacher's cached top-k logits (``distill.targets: topk_cache``; the cache built once on the driver, timed apart)
vs the teacher in the loop (``teacher_in_loop``, each worker loading SmolLM2 from its folder), optionally also
with the hidden-state loss. Same student, windows, workers (gloo, 1 torch thread each) and steps; the modes run
in turn, ``--rounds`` times. Prints JSON lines; the figures go to ``kd.py``'s docstring.

    nice -n 19 .venv/bin/python bench/lm_distill_targets.py --work /tmp/slimray-kd-targets            # smollm-tiny sizes
    nice -n 19 .venv/bin/python bench/lm_distill_targets.py --keep 27 --seq-len 128 --batch-size 2    # smollm sizes

Seconds per step: the second (last) epoch's wall time over its steps (the first carries the workers' warm-up).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from slimray.compress.measure import torch_threads
from slimray.families.causal_lm import data as D
from slimray.families.causal_lm.kd import cache_teacher_topk
from slimray.families.causal_lm.prune import drop_layers
from slimray.families.causal_lm.teacher import ensure_smollm2_teacher, load_causal_lm


def emit(**kw):
    print(json.dumps(kw), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/slimray-kd-targets"))
    ap.add_argument("--keep", type=int, default=2, help="student layers (evenly spaced teacher layers, first and last kept)")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1, help="windows per worker per step")
    ap.add_argument("--steps", type=int, default=6, help="steps per worker per epoch (2 epochs)")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden-weight", type=float, default=0.5, help="also time teacher_in_loop with this hidden weight (0: no)")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()

    from slimray.runtime import init_ray
    from slimray.training.distill import TrainJob, run_training

    folder = ensure_smollm2_teacher(args.work / "teacher")
    teacher, tok = load_causal_lm(folder)
    n = teacher.config.num_hidden_layers
    keep = sorted({round(i * (n - 1) / max(1, args.keep - 1)) for i in range(args.keep)})
    student = drop_layers(copy.deepcopy(teacher), keep=keep)
    splits = D.split_documents(D.load_wiki_summaries(), seed=0, val_fraction=0.05, test_fraction=0.05)
    windows = D.pack_windows(splits["train"], tok, window_len=args.seq_len, num_windows=args.steps * args.batch_size * args.num_workers)
    val = D.pack_windows(splits["val"], tok, window_len=args.seq_len, num_windows=1)
    emit(what="setup", teacher_layers=n, student_layers=keep, windows=list(windows.shape), workers=args.num_workers,
         batch=f"{args.batch_size}x{args.seq_len}", cpus=os.cpu_count(), load=os.getloadavg())
    init_ray(num_cpus=args.num_workers)
    init_state = student.state_dict()
    modes = [("topk_cache", 0.0), ("teacher_in_loop", 0.0)] + ([("teacher_in_loop", args.hidden_weight)] if args.hidden_weight > 0 else [])
    for r in range(args.rounds):
        for targets, hidden in modes:
            label = f"{targets}{'-hidden' if hidden else ''}-r{r}"
            task = {"hf_config": student.config.to_dict(), "temperature": 1.0, "ce_weight": 0.0, "warmup_steps": 1,
                    "bf16_autocast": False, "targets": targets}
            data = {"windows": windows.numpy(), "val_windows": val.numpy()}
            extra = {}
            if targets == "topk_cache":
                t0 = time.perf_counter()
                with torch_threads(os.cpu_count() or 1):  # as the pipeline builds it: on the driver, all cores
                    values, indices = cache_teacher_topk(teacher, windows, k=args.top_k)
                extra = {"cache_s": time.perf_counter() - t0, "cache_s_per_window": (time.perf_counter() - t0) / len(windows)}
                data.update(topk_values=values.numpy(), topk_indices=indices.numpy())
            else:
                task.update(teacher_path=str(folder), hidden_weight=hidden, layer_map=keep)
            metrics_path = args.work / f"metrics-{label}-{time.time_ns()}.jsonl"
            job = TrainJob(label=label, family="causal_lm", run_name=f"bench-{label}-{time.time_ns()}",
                           storage_path=str(args.work / "ray"), spec={}, epochs=2, batch_size=args.batch_size, lr=1e-4,
                           num_workers=args.num_workers, max_failures=0, metrics_path=str(metrics_path), task=task)
            t0 = time.perf_counter()
            run_training(job, data, init_state={k: v.clone() for k, v in init_state.items()})
            wall = time.perf_counter() - t0
            lines = [json.loads(line) for line in metrics_path.read_text().splitlines()]
            emit(what="step_cost", targets=targets, hidden_weight=hidden, round=r,
                 s_per_step_epoch=[round(m["epoch_s"] / args.steps, 3) for m in lines], run_wall_s=round(wall, 1), **extra)


if __name__ == "__main__":
    main()
