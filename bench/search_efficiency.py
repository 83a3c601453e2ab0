"""Search efficiency: the full grid against an adaptive search (Optuna TPE + ASHA), in one invocation.

For each recipe the teacher and the students are distilled once (``slimray distill``'s stages, or a finished run
given with ``--seed-run``); then each search runs the shared stages on a run folder of its own seeded with them
(``slimray sweep``'s path: saved students are searched, none trained; its own pruned-model cache, so neither search
reuses the other's fine-tuning). Reported per search: trials, trial-seconds (the sum of every trial's wall time), the
run's wall time (search, finalists, report), and its winner (the pipeline's rule: fastest within ``max_accuracy_drop``
of the teacher on val, finalists timed side by side). The two winners are then re-timed side by side in this process.

Target (issue #5): the adaptive winner within 0.2 points and 10% latency of the grid's, for at most half
the grid's trial-seconds.

    python bench/search_efficiency.py --recipe digits --recipe mnist [--prune-ratios 0 0.25 0.5 0.7]
        [--adaptive optuna] [--out bench/results]

Prints a table; writes ``OUT/search_efficiency.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from slimray.compress.measure import accuracy, compare_latency
from slimray.config import PipelineConfig, load_config
from slimray.families.classifier.artifacts import load_runnable
from slimray.families.classifier.datasets import load_dataset
from slimray.pipelines import run_pipeline
from slimray.storage import write_json_atomic

SEEDED = ("teacher", "students", "teacher_logits.safetensors", "test_sample.safetensors")


def _seed(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in SEEDED:
        if (src / name).exists() and not (dst / name).exists():
            (shutil.copytree if (src / name).is_dir() else shutil.copyfile)(src / name, dst / name)


def _search(cfg: PipelineConfig, name: str, search: dict[str, Any], *, out: Path, seed: Path) -> dict[str, Any]:
    variant = PipelineConfig.model_validate(cfg.model_dump() | {"name": f"{cfg.name}-{name}", "search": search})
    _seed(seed, out / variant.name)
    t0 = time.perf_counter()
    report = run_pipeline(variant, out_dir=out, train_students=False)
    wall = time.perf_counter() - t0
    trials = report["trials"]
    w = report["winner"]
    return {
        "search": name, "algorithm": search["algorithm"], "scheduler": search["scheduler"], "num_trials": len(trials),
        "num_stopped_early": sum(bool(t.get("stopped_early")) for t in trials),
        "trial_seconds": sum(t.get("trial_seconds") or 0.0 for t in trials), "wall_s": wall,
        "winner": {k: w.get(k) for k in ("key", "accuracy", "params", "size_bytes", "artifact", "examples_per_s")},
        "constraint_met": report["constraint_met"], "floor": report["quality"]["floor"],
    }


def bench_recipe(recipe: str, *, out: Path, prune_ratios: list[float] | None, adaptive: str, seed_run: Path | None = None) -> dict[str, Any]:
    cfg = load_config(recipe=recipe)
    cfg = cfg.model_copy(update={"name": f"{recipe}-search-bench"})
    runs = out / "runs"
    if seed_run is not None:  # reuse a finished run's teacher and students (same recipe) instead of distilling again
        _seed(seed_run, runs / cfg.name)
    run_pipeline(cfg, out_dir=runs, until="distil")
    s = cfg.search
    space = s.space.model_dump() | ({"prune_ratios": prune_ratios} if prune_ratios else {})
    base = s.model_dump() | {"space": space, "space_file": None}
    grid = base | {"algorithm": "grid", "scheduler": "none", "num_samples": None}
    adapt = base | {"algorithm": adaptive, "scheduler": "asha", "num_samples": None}
    if adapt["finetune_epochs"] < 2:
        adapt["finetune_epochs"] = grid["finetune_epochs"] = 2
    rows = [_search(cfg, "grid", grid, out=runs, seed=runs / cfg.name),
            _search(cfg, f"{adaptive}-asha", adapt, out=runs, seed=runs / cfg.name)]
    # the two winners re-timed side by side, and scored on test
    b = s.serving_batch_size
    ds = load_dataset(cfg.data.name, seed=cfg.data.seed)
    x_te, y_te = ds.normalized("test")
    models = {}
    for r in rows:
        models[r["search"]] = load_runnable(r["winner"]["artifact"], num_threads=s.num_threads)[0]
        r["winner"]["test_accuracy"] = accuracy(models[r["search"]], x_te, y_te)
    timed = compare_latency(models, x_te[:b], batch_sizes=[b], num_threads=s.num_threads)
    for r in rows:
        r["winner"]["latency_ms_side_by_side"] = timed[r["search"]][b]
    g, a = rows
    verdict = {
        "accuracy_gap_points": g["winner"]["accuracy"] - a["winner"]["accuracy"],
        "latency_ratio": a["winner"]["latency_ms_side_by_side"] / g["winner"]["latency_ms_side_by_side"],
        "trial_seconds_ratio": a["trial_seconds"] / g["trial_seconds"],
    }
    verdict["target_met"] = (
        verdict["accuracy_gap_points"] <= 0.2 and verdict["latency_ratio"] <= 1.10 and verdict["trial_seconds_ratio"] <= 0.5
        and g["constraint_met"] and a["constraint_met"]
    )
    return {"recipe": recipe, "accuracy_floor": g["floor"], "prune_ratios": space["prune_ratios"], "searches": rows,
            "adaptive_vs_grid": verdict}


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| recipe | search | trials (stopped early) | trial-s | wall s | winner | val acc % | test acc % | ms @ 64 side by side |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["searches"]:
            w = r["winner"] or {}
            lines.append(
                f"| {res['recipe']} | {r['search']} | {r['num_trials']} ({r['num_stopped_early']}) | {r['trial_seconds']:.0f} | "
                f"{r['wall_s']:.0f} | {w.get('key', '-')} | {w.get('accuracy', float('nan')):.2f} | "
                f"{w.get('test_accuracy', float('nan')):.2f} | {w.get('latency_ms_side_by_side', float('nan')):.3f} |"
            )
        v = res["adaptive_vs_grid"]
        if v:
            lines.append(
                f"| {res['recipe']} | adaptive / grid | | {v['trial_seconds_ratio']:.2f}x | | | {-v['accuracy_gap_points']:+.2f} pts | | "
                f"{v['latency_ratio']:.2f}x ({'target met' if v['target_met'] else 'target missed'}) |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", action="append", help="recipe(s) to run (default: digits and mnist)")
    p.add_argument("--prune-ratios", type=float, nargs="+", help="override the recipe's prune ratios (a bigger grid)")
    p.add_argument("--adaptive", choices=["optuna", "random"], default="optuna")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--seed-run", action="append", default=[], metavar="RECIPE=RUN_DIR",
                   help="take teacher and students from a finished run of that recipe (e.g. mnist=runs/mnist)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = dict(item.split("=", 1) for item in args.seed_run)
    results = [
        bench_recipe(r, out=args.out, prune_ratios=args.prune_ratios, adaptive=args.adaptive, seed_run=Path(seeds[r]) if r in seeds else None)
        for r in args.recipe or ["digits", "mnist"]
    ]
    write_json_atomic(args.out / "search_efficiency.json", results)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
