"""The classifier's compression sweep on Ray Tune: one trial per (prune ratio, quantization, runtime), each the
classifier's pure trial (``slimray.families.classifier.search.compression_steps``: a row per fine-tune epoch) run on the
one shared trainable (``slimray.sweep.trials.run_trials``: result files, error records, the timing lock, resume).

Search: ``grid`` (every point), ``random`` or ``optuna`` (TPE over accuracy and latency, two objectives) with
``num_samples`` trials; ``asha`` stops trials early on ``objective`` = -latency, minus a steep penalty per point below the
accuracy floor (so "fastest within the floor" is what survives). A rerun with ``resume`` restores the Tune experiment;
a finished trial (its result file) never runs again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterator

from ray.tune.schedulers import ASHAScheduler

from slimray.config import SearchConfig
from slimray.families.classifier.search import compression_steps, config_key, parse_setting, setting_name
from slimray.sweep.trials import Sampling, run_trials


@dataclass(frozen=True)
class SweepContext:
    run_dir: str
    base_model_dir: str  # artifact to compress (the distilled student)
    x_train: Any  # arrays, or their object-store references
    y_train: Any
    teacher_logits: Any
    x_val: Any
    y_val: Any
    search: dict[str, Any]
    temperature: float
    alpha: float
    seed: int
    accuracy_floor: float | None = None  # for the early-stopping objective (in quality units)
    evaluation: dict[str, Any] | None = None  # EvalConfig: the metric trials are scored on (default: accuracy)
    code_dir: str | None = None  # where a metric of the user's own is imported from

    ARRAYS = ("x_train", "y_train", "teacher_logits", "x_val", "y_val")


def _steps(key: str, data: dict[str, Any], *, ctx: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The trial as the trainable calls it: the search section validated, then the family's steps."""
    yield from compression_steps(key, data, search=SearchConfig.model_validate(ctx["search"]), ctx=ctx)


def run_sweep(ctx: SweepContext, *, run_name: str, max_concurrent_trials: int, resume: bool = True) -> list[dict[str, Any]]:
    """Run (or, with ``resume``, continue) the search on the shared trainable; returns one dict per trial with its
    settings, metrics and status (a trial ASHA stopped early: its last epoch, ``stopped_early``).

    Without ``resume`` an earlier experiment of the same name is an error rather than silently reused.
    """
    search = SearchConfig.model_validate(ctx.search)
    lat_key = f"latency_ms_b{search.serving_batch_size}"
    settings = [setting_name(q, r) for q, r in search.space.settings]
    axes = {"prune_ratio": list(search.space.prune_ratios), "setting": settings}
    candidates = {config_key({"prune_ratio": p, "setting": st}): (float(p), *parse_setting(st)) for p in axes["prune_ratio"] for st in settings}
    scheduler = None
    if search.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="finetune_epochs", metric="objective", mode="max", max_t=search.finetune_epochs,
            grace_period=search.grace_period, reduction_factor=search.reduction_factor,
        )
    sampling = Sampling(algorithm=search.algorithm, num_samples=search.num_trials, metric=["accuracy", lat_key], mode=["max", "min"],
                        num_startup_trials=search.num_startup_trials, seed=0, scheduler=scheduler)
    fields = {k: v for k, v in ctx.__dict__.items() if k not in SweepContext.ARRAYS} | {"candidates": candidates}
    results = run_trials(
        run_dir=ctx.run_dir, keys=list(candidates), measure=functools.partial(_steps, ctx=fields),
        shared={k: getattr(ctx, k) for k in SweepContext.ARRAYS}, run_name=run_name,
        max_concurrent_trials=max_concurrent_trials, axes=axes, key_of=config_key, sampling=sampling, timing_lock=True, resume=resume,
        use_tune=search.use_tune,
    )
    trials = []
    for key, m in results.items():
        ratio, method, runtime = candidates[key]
        row: dict[str, Any] = {"prune_ratio": ratio, "quantization": method, "runtime": runtime, "key": key,
                               "trial_seconds": m.get("trial_seconds")}
        if m.get("status") != "ok":
            row.update(status="error", error=m.get("error"))
            row.update({k: m[k] for k in ("stage", "where", "advice", "explanation") if m.get(k)})
        else:
            row.update(
                {k: m[k] for k in ("status", "accuracy", "metric_value", "params", "size_bytes", "peak_memory_bytes", "artifact",
                                   "finetune_epochs", "runtime_check") if k in m}
            )
            row.update({k: v for k, v in m.items() if k.startswith("latency_ms_b")})
            row["stopped_early"] = m.get("finetune_epochs", 0) < (search.finetune_epochs if ratio > 0 else 0)
        trials.append(row)
    return sorted(trials, key=lambda t: (t["prune_ratio"], t["runtime"], t["quantization"]))
