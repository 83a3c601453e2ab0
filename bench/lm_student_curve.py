"""Perplexity per token trained: a SmolLM2-135M student cut to ``--keep`` of 30 layers by measured importance
(the family's ``prune_depth``), then distilled with the teacher in the loop exactly as the smollm recipe does
(full-vocabulary KL + hidden-state MSE at the kept layers, AdamW, lr 3e-4, warm-up then cosine over ``--steps``),
its held-out perplexity measured at each ``--eval-at`` step. One process, ``--threads`` torch threads. Prints JSON
lines; the curve goes to docs/llm-vllm.md ("Why no distilled student wins yet").

    nice -n 5 .venv/bin/python bench/lm_student_curve.py --work /tmp/slimray-curve --keep 24 --steps 400 \\
        --eval-at 0 50 100 200 400 --minutes 30

``--minutes`` stops training at the first evaluation point past that wall time (the last line says where it
stopped), so the run fits a session; the tokens trained are steps x batch x sequence length.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from slimray.families.causal_lm import kd
from slimray.families.causal_lm.evaluate import perplexity
from slimray.families.causal_lm.prune import prune_depth
from slimray.families.causal_lm.teacher import load_causal_lm
from smollm_setup import smollm_setup


class Stop(Exception):
    pass


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/slimray-curve"))
    ap.add_argument("--keep", type=int, default=24)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-at", type=int, nargs="+", default=[0, 50, 100, 200, 400])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--hidden-weight", type=float, default=1.0)
    ap.add_argument("--num-eval-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder, teacher, _, test, calib, train, _ = smollm_setup(args.work, num_eval_windows=args.num_eval_windows,
                                                            train_len=args.seq_len, num_train_windows=args.steps * args.batch_size)
    t_ppl = perplexity(teacher, test, batch_size=1)
    emit(what="teacher", perplexity=t_ppl, test_windows=list(test.shape), train_windows=list(train.shape))

    student = load_causal_lm(folder)[0]
    report = prune_depth(student, calib, num_layers_to_drop=teacher.config.num_hidden_layers - args.keep, batch_size=4)
    params = sum(p.numel() for p in student.parameters())
    tokens_per_step = args.batch_size * args.seq_len
    start = time.perf_counter()

    def evaluate(step: int) -> None:
        ppl = perplexity(student, test, batch_size=1)
        student.train()
        emit(what="point", step=step, tokens_trained=step * tokens_per_step, perplexity=ppl, ratio=ppl / t_ppl,
             seconds=time.perf_counter() - start)

    emit(what="student", kept=report.kept, params=params)
    evaluate(0)
    losses: list[float] = []

    def on_step(s: kd.KDStep) -> None:
        losses.append(s.loss)
        step = s.step + 1
        if step in args.eval_at:
            emit(what="loss", step=step, mean_loss_last_10=sum(losses[-10:]) / len(losses[-10:]))
            evaluate(step)
            if args.minutes is not None and time.perf_counter() - start > 60 * args.minutes:
                raise Stop(step)

    cfg = kd.KDConfig(num_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=max(1, args.steps // 10),
                      hidden_weight=args.hidden_weight)
    try:
        kd.distill(student, train, config=cfg, teacher=teacher, layer_map=report.kept if args.hidden_weight > 0 else None,
                   on_step=on_step)
        emit(what="done", steps=args.steps)
    except Stop as stop:
        emit(what="stopped", step=stop.args[0], minutes=args.minutes)


if __name__ == "__main__":
    main()
