"""Why the user ViT of issue 26 missed the starter config's 1-point budget: the teacher's reference and the
distillation budget, measured in-process (no Ray; one thread).

    .venv/bin/python bench/user_vit_budget.py [--layout heldout|all] [--seeds 3]

Rebuilds ``tests/byom/project.vit_project``'s teacher (Adam 1e-3, 40 epochs, seeded), carves val/test as a
``data.source: files`` run does (slimray's seeded hash), derives the student the way a run does (pruned to half its
params), then distils it single-process from the teacher's logits with the run's loss (T=4, alpha 0.7, cosine per
epoch), at the old starter budget (10 epochs of 2 workers x batch 128: one batch of 256 per step) and at the sized
one (batch 2 x 32), several shuffling seeds each. ``--layout all``: the teacher trained on every example, val and
test carved from the same file (the old test); ``heldout``: trained on an 80% training file, 20% held out as the
test file, val carved from the training file (the test now). Prints the teacher's accuracy per split and each
student's val/test accuracy; then the sweep's fine-tune of the student pruned at 0.25 and 0.5 after 1-10 epochs.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "byom")]

import project  # noqa: E402
import user_models  # noqa: E402

from slimray.compress.prune import PruneSpec, prune, prune_to_fraction  # noqa: E402
from slimray.families.classifier.kd import batch_loss, finetune  # noqa: E402

BUDGETS = {"starter before (60 steps)": 256, "sized (batch 2 x 32)": 64}  # examples per optimizer step


def carve(x: np.ndarray, y: np.ndarray, lo: float, hi: float, *, seed: int = 0) -> np.ndarray:
    """Indices whose seeded hash falls in [lo, hi), as ``slimray.data.files`` carves val/test out of a file."""
    key = seed.to_bytes(8, "little", signed=True)
    u = np.array([int.from_bytes(hashlib.blake2b(r.tobytes() + bytes([int(lab) % 256]), digest_size=8, key=key).digest(), "little") / 2**64
                  for r, lab in zip(x, y)])
    return np.where((u >= lo) & (u < hi))[0]


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return 100.0 * (model.eval()(x).argmax(1) == y).float().mean().item()


def distil(student: torch.nn.Module, x, y, logits, *, per_step: int, seed: int, epochs: int = 10, lr: float = 3e-3) -> torch.nn.Module:
    model = copy.deepcopy(student).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        perm = torch.randperm(len(y), generator=gen)
        model.train()
        for i in range(0, len(y), per_step):
            b = perm[i : i + per_step]
            opt.zero_grad()
            batch_loss(model, (x[b], y[b], logits[b]), temperature=4.0, alpha=0.7)[0].backward()
            opt.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", choices=["heldout", "all"], default="heldout")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = project.digits_arrays(seed=4)
    x = x[:, None].astype(np.float32)
    if args.layout == "all":
        i_val, i_test, i_train = carve(x, y, 0.0, 0.1), carve(x, y, 0.1, 0.2), carve(x, y, 0.2, 1.0)
        seen = np.arange(len(y))
    else:
        n = int(0.8 * len(y))
        v = carve(x[:n], y[:n], 0.0, 0.1)
        i_val, i_test, i_train = v, np.arange(n, len(y)), np.setdiff1d(np.arange(n), v)
        seen = np.arange(n)
    split = {k: (torch.from_numpy(x[i]), torch.from_numpy(y[i])) for k, i in (("train", i_train), ("val", i_val), ("test", i_test))}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    teacher = project.train_teacher(user_models.vit(), x[seen], y[seen], epochs=40, lr=1e-3)
    print(f"layout {args.layout}: {', '.join(f'{k} {len(v[1])}' for k, v in split.items())}; teacher trained on {len(seen)} "
          f"({time.perf_counter() - t0:.0f} s): " + ", ".join(f"{k} {accuracy(teacher, *v):.2f}%" for k, v in split.items()))
    (xt, yt), (xv, yv), (xs, ys) = split["train"], split["val"], split["test"]
    with torch.inference_mode():
        logits = teacher(xt)
    student, reached = prune_to_fraction(copy.deepcopy(teacher).train(), keep=0.5, example_inputs=xt[:1])
    print(f"derived student: {100 * reached['kept_fraction']:.1f}% of the params, val {accuracy(student, xv, yv):.2f}% before distillation")
    best = None
    for name, per_step in BUDGETS.items():
        steps = 10 * math.ceil(len(yt) / per_step)
        for seed in range(args.seeds):
            m = distil(student, xt, yt, logits, per_step=per_step, seed=seed)
            print(f"  {name}, {steps} steps, seed {seed}: val {accuracy(m, xv, yv):.2f}%  test {accuracy(m, xs, ys):.2f}%", flush=True)
            best = m
    for ratio in (0.25, 0.5):  # the sweep's fine-tune (batch 128, lr 1e-3) of the sized student pruned at `ratio`
        p = prune(copy.deepcopy(best).train(), PruneSpec(ratio=ratio), example_inputs=xt[:1]).eval()
        done = 0
        for k in (1, 3, 6, 10):
            finetune(p.train(), xt, yt, logits, epochs=k - done, lr=1e-3, seed=k)
            done = k
            print(f"  pruned {ratio}, fine-tuned {k} epochs ({k * math.ceil(len(yt) / 128)} steps): val {accuracy(p, xv, yv):.2f}%  "
                  f"test {accuracy(p, xs, ys):.2f}%", flush=True)


if __name__ == "__main__":
    main()
