"""SmolLM2-135M: depth pruning 30 -> 20 layers by measured importance (one-shot and iterative), then a short KD
recovery; teacher-in-loop vs cached top-k step cost. Prints JSON lines; figures go to bench/llm_notes.md.

    nice -n 5 .venv/bin/python bench/llm_prune_kd.py --work /tmp/slimray-llm [--steps 100]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from slimray.families.causal_lm import data as D
from slimray.families.causal_lm import kd
from slimray.families.causal_lm.evaluate import perplexity
from slimray.families.causal_lm.prune import prune_depth
from smollm_setup import smollm_setup


def emit(**kw):
    print(json.dumps(kw), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/slimray-llm"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--keep", type=int, default=20)
    ap.add_argument("--num-eval-windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, teacher, tok, test, calib, train, splits = smollm_setup(args.work, num_eval_windows=args.num_eval_windows,
                                                               train_len=128, num_train_windows=4000)
    emit(what="data", test_windows=list(test.shape), train_windows=list(train.shape), calib_windows=list(calib.shape))
    t0 = time.perf_counter()
    emit(what="teacher", perplexity=perplexity(teacher, test, batch_size=1), seconds=time.perf_counter() - t0)

    drop = teacher.config.num_hidden_layers - args.keep
    results = {}
    for iterative in (False, True):
        student = copy.deepcopy(teacher)
        t0 = time.perf_counter()
        report = prune_depth(student, calib, num_layers_to_drop=drop, iterative=iterative, batch_size=4)
        secs = time.perf_counter() - t0
        ppl = perplexity(student, test, batch_size=1)
        ppl_val = perplexity(student, D.pack_windows(splits["val"], tok, window_len=256, num_windows=8), batch_size=1)
        results[iterative] = (ppl_val, student, report)
        emit(what="depth_prune", iterative=iterative, kept=report.kept, dropped=report.dropped, seconds=secs,
             test_perplexity=ppl, val_perplexity=ppl_val, importance=[round(x, 4) for x in report.importance])
    ppl_val, student, report = min(results.values(), key=lambda r: r[0])
    emit(what="chosen_by_val", iterative=report.iterative)

    # step cost: teacher in the loop vs cached top-k (k=32), 5 steps each after 1 warm-up
    cfg = kd.KDConfig(num_steps=6, batch_size=2, lr=0.0, warmup_steps=1)
    for mode in ("teacher", "topk"):
        s = copy.deepcopy(student)
        if mode == "teacher":
            hist = kd.distill(s, train, config=cfg, teacher=teacher)
        else:
            t0 = time.perf_counter()
            tv, ti = kd.cache_teacher_topk(teacher, train[:16], k=32, batch_size=4)
            cache_s = (time.perf_counter() - t0) / 16
            hist = kd.distill(s, train[:16], config=cfg, topk=(tv, ti))
        step_s = sorted(h.seconds for h in hist[1:])[len(hist[1:]) // 2]
        extra = {"teacher_topk_seconds_per_window": cache_s,
                 "cache_bytes_per_token": (tv.element_size() + ti.element_size()) * 32} if mode == "topk" else {}
        emit(what="kd_step_cost", mode=mode, median_step_seconds=step_s, **extra)

    cfg = kd.KDConfig(num_steps=args.steps, batch_size=2, lr=1e-4, warmup_steps=10, temperature=1.0)
    t0 = time.perf_counter()
    hist = kd.distill(student, train, config=cfg, teacher=teacher)
    emit(what="kd", steps=args.steps, batch="2x128", lr=1e-4, seconds=time.perf_counter() - t0,
         first_losses=[round(h.loss, 3) for h in hist[:5]], last_losses=[round(h.loss, 3) for h in hist[-5:]],
         test_perplexity=perplexity(student, test, batch_size=1))
    out = args.work / f"student{args.keep}"
    student.save_pretrained(out)
    tok.save_pretrained(out)
    emit(what="saved", path=str(out))


if __name__ == "__main__":
    main()
