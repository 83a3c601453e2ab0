"""Distillation throughput: Ray Train with 1 and 2 workers vs a plain single-process PyTorch loop.

All runs use the recipe's student, data, per-process batch size and epoch count, with the teacher's logits
precomputed once (what ``slimray distill`` does by default); one extra run puts the teacher in the loop
(``teacher_outputs: in_loop``) to measure what precomputing saves. Every run goes through the same
``train_epoch`` with ``profile=True``, which splits each epoch into data loading, teacher, forward (+ loss),
backward and optimizer step. For DDP the gradient all-reduce is measured two ways before training: the bare
collective on a gradient-sized buffer, and a synchronised backward minus a ``no_sync()`` one (the part of
the all-reduce that the backward pass does not hide), both scaled to the epoch's steps.

    python bench/distill_throughput.py --recipe mnist --epochs 2

Prints a table (samples/s per epoch, ratio to the plain loop, wall time with Ray's start-up) and writes the
same numbers as JSON to ``bench/results/``. Ray is started in-process (``address="local"``, no clash with
another Ray on the machine) with as many CPUs as the machine has; Ray workers use one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from slimray.families.classifier.artifacts import ArtifactSpec, save_artifact
from slimray.compress.measure import predict_logits
from slimray.config import load_config
from slimray.families.classifier.datasets import load_dataset
from slimray.families.classifier import build_model, load_ccexam_mnist_teacher
from slimray.families.classifier.kd import finetune, train_epoch

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("data_s", "teacher_s", "forward_s", "backward_s", "step_s")


def _teacher(cfg, ds):
    if cfg.teacher.source == "ccexam_mnist":
        return load_ccexam_mnist_teacher()
    torch.manual_seed(cfg.distill.seed)
    model = build_model(cfg.teacher.model)
    x, y = ds.normalized("train")
    return finetune(model, x, y, None, epochs=cfg.teacher.epochs, lr=cfg.teacher.lr, batch_size=cfg.distill.batch_size), cfg.teacher.model


def plain_loop(cfg, x, y, logits, *, epochs: int, batch_size: int, threads: int) -> dict:
    """The reference: one process, a shuffled DataLoader, the same train_epoch, no Ray, no DDP."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.distill.seed)
        model = build_model(cfg.distill.student)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.distill.lr)
        gen = torch.Generator().manual_seed(cfg.distill.seed)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, logits), batch_size=batch_size, shuffle=True, generator=gen)
        start = time.perf_counter()
        per_epoch = []
        for _ in range(epochs):
            s = train_epoch(model, loader, opt, temperature=cfg.distill.temperature, alpha=cfg.distill.alpha, profile=True)
            per_epoch.append({"epoch_s": s.seconds, "samples_per_s": s.samples_per_s, **s.breakdown})
        return {"per_epoch": per_epoch, "wall_s": time.perf_counter() - start}
    finally:
        torch.set_num_threads(before)


def ray_run(cfg, data, *, workers: int, epochs: int, batch_size: int, storage: Path, name: str, **extra) -> dict:
    from slimray.training.classifier_data import classifier_job
    from slimray.training.distill import run_training

    metrics = storage / f"{name}.jsonl"
    job = classifier_job(
        label=name, run_name=name, storage_path=str(storage / "ray"), spec=cfg.distill.student.model_dump(), epochs=epochs,
        batch_size=batch_size, lr=cfg.distill.lr, temperature=cfg.distill.temperature, alpha=cfg.distill.alpha,
        num_workers=workers, seed=cfg.distill.seed, max_failures=0, profile=True, metrics_path=str(metrics), **extra,
    )
    start = time.perf_counter()
    run_training(job, data)
    wall = time.perf_counter() - start
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    keep = ("epoch_s", "samples_per_s", *PARTS, "allreduce_est_s", "sync_overhead_est_s")
    return {"per_epoch": [{k: m[k] for k in keep if k in m} for m in lines], "wall_s": wall}


def _mean(rows: list[dict], key: str) -> float:
    vals = [r.get(key, 0.0) for r in rows]
    return sum(vals) / max(len(vals), 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="mnist")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, help="per process (default: the recipe's)")
    p.add_argument("--plain-threads", type=int, nargs="+", default=sorted({os.cpu_count() or 1, 1}, reverse=True),
                   help="torch threads of the plain loop(s); the fastest is the baseline (default: all cores, and 1)")
    p.add_argument("--limit", type=int, help="use only the first N training samples (smoke runs)")
    p.add_argument("--no-in-loop", action="store_true", help="skip the 2-worker run with the teacher in the loop")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    cfg = load_config(recipe=args.recipe)
    batch = args.batch_size or cfg.distill.batch_size
    ds = load_dataset(cfg.data.name, seed=cfg.data.seed)
    x, y = ds.normalized("train")
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    xv, yv = ds.normalized("val")
    teacher, teacher_spec = _teacher(cfg, ds)
    t0 = time.perf_counter()
    logits = predict_logits(teacher, x, batch_size=512).contiguous()
    precompute_s = time.perf_counter() - t0
    load_before = os.getloadavg()
    print(f"[{time.strftime('%H:%M:%S')}] {args.recipe}: {len(x)} training samples, batch {batch} per process, {args.epochs} epochs, "
          f"teacher logits precomputed in {precompute_s:.1f}s; load average {load_before[0]:.2f}", flush=True)

    results: dict[str, dict] = {}
    for threads in args.plain_threads:
        label = f"plain PyTorch, {threads} thread{'s' if threads > 1 else ''}"
        results[label] = plain_loop(cfg, x, y, logits, epochs=args.epochs, batch_size=batch, threads=threads)
        print(f"[{time.strftime('%H:%M:%S')}] {label}: {_mean(results[label]['per_epoch'], 'samples_per_s'):.0f} samples/s", flush=True)

    import ray

    from slimray.runtime import init_ray
    from slimray.training.classifier_data import TrainData

    init_ray(num_cpus=os.cpu_count() or 1)
    try:
        data = TrainData(ray.put(x.numpy()), ray.put(y.numpy()), ray.put(xv.numpy()), ray.put(yv.numpy()), ray.put(logits.numpy()))
        with tempfile.TemporaryDirectory() as tmp:
            storage = Path(tmp)
            runs = [(f"Ray Train, {w} worker{'s' if w > 1 else ''}", dict(workers=w)) for w in (1, 2)]
            if not args.no_in_loop:
                tdir = storage / "teacher"
                save_artifact(tdir, teacher, ArtifactSpec(name="teacher", model=teacher_spec, input=ds.input))
                runs.append(("Ray Train, 2 workers, teacher in loop", dict(workers=2, teacher_outputs="in_loop", teacher_dir=str(tdir))))
            for i, (label, kw) in enumerate(runs):
                results[label] = ray_run(cfg, data, epochs=args.epochs, batch_size=batch, storage=storage, name=f"bench{i}", **kw)
                print(f"[{time.strftime('%H:%M:%S')}] {label}: {_mean(results[label]['per_epoch'], 'samples_per_s'):.0f} samples/s", flush=True)
    finally:
        ray.shutdown()
    load_after = os.getloadavg()

    # the baseline is the fastest plain loop: the ratio never flatters Ray
    base = max(_mean(r["per_epoch"], "samples_per_s") for k, r in results.items() if k.startswith("plain"))
    header = ("run", "samples/s", "x best plain", "epoch s", "data", "teacher", "fwd+loss", "bwd", "step", "allreduce*", "sync cost*", "wall s")
    rows = []
    for label, r in results.items():
        e = r["per_epoch"]
        sps = _mean(e, "samples_per_s")
        r["summary"] = {"samples_per_s": sps, "ratio_to_plain": sps / base, "epoch_s": _mean(e, "epoch_s"),
                        **{k: _mean(e, k) for k in (*PARTS, "allreduce_est_s", "sync_overhead_est_s")}}
        s = r["summary"]
        rows.append((label, f"{sps:.0f}", f"{sps / base:.2f}", f"{s['epoch_s']:.2f}", *(f"{s[k]:.2f}" for k in PARTS),
                     f"{s['allreduce_est_s']:.2f}" if "Ray" in label and "1 worker" not in label else "-",
                     f"{s['sync_overhead_est_s']:.2f}" if "Ray" in label and "1 worker" not in label else "-", f"{r['wall_s']:.1f}"))
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    table = "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
    print()
    print(table)
    print(f"\nseconds per epoch (rank 0 for Ray); * estimated per epoch from per-step timings before training. "
          f"Load average {load_before[0]:.2f} before, {load_after[0]:.2f} after.")
    two = next((r for k, r in results.items() if k == "Ray Train, 2 workers"), None)
    if two is not None:
        ratio = two["summary"]["ratio_to_plain"]
        print(f"target: 2 workers >= 0.85x the (fastest) plain loop -> {ratio:.2f}x, {'met' if ratio >= 0.85 else 'MISSED'}")

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"distill_throughput-{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "recipe": args.recipe, "epochs": args.epochs,
        "batch_size_per_process": batch, "train_samples": len(x), "teacher_precompute_s": precompute_s,
        "cpus": os.cpu_count(), "machine": platform.platform(), "torch": torch.__version__, "ray": ray.__version__,
        "load_average_before": load_before, "load_average_after": load_after, "runs": results, "table": table,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
