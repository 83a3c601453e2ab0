"""The distillation sweep: Ray Tune trials over distillation hyperparameters, each a Ray Train run.

Every trial is a driver function (Tune over Train, Ray's ``train_tune_interop`` pattern): it turns its
settings into a ``TrainJob`` and fits a ``TorchTrainer`` with ``num_workers`` data-parallel workers under a
stable run name (``<sweep>-<trial id>``), so a resumed sweep resumes each unfinished trial's Train run
from its last checkpoint, and a trial whose Train run loses a worker restarts the worker group from the
checkpoint (``distill.max_failures``) without failing the sweep. Workers report held-out accuracy after
every epoch through ``TuneReportCallback``: that is what ASHA stops trials on (epochs are its budget) and
what Optuna's TPE learns from. Rank 0 writes the trained student after the last epoch.

Resources are worked out before anything starts (``engine.plan_train_trials``): the driver holds no CPU,
each worker ``cpus_per_worker``; a trial that cannot fit the cluster is an error naming the resources.

The best student is the completed trial with the highest held-out (validation) accuracy; trials within
``tie_tolerance`` points of it tie, and ties go to the smaller student, then the faster one (latency timed
side by side in one process after the sweep).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from slimray.families.classifier.artifacts import load_artifact, load_spec
from slimray.config import DistillConfig
from slimray.families.classifier.spec import scale_spec
from slimray.schema import ConfigError
from slimray.sweep.engine import (
    DRIVER_MEMORY_BYTES, ExplainedASHA, PlacementGroupReaper, make_tune_config, read_stops, run_tuner,
)
from slimray.sweep.space import LogUniform, RandInt, SweepSpaceFile, Uniform, domain_values
from slimray.training.classifier_data import TrainData, classifier_job
from slimray.training.distill import TrainJob, run_training

METRIC = "val_accuracy"
TIME_ATTR = "epoch"


@dataclass(frozen=True)
class DistillSweepContext:
    run_dir: str  # trials write under RUN/distill_trials/<trial id>/
    storage_path: str  # Ray Train runs of the trials
    sweep_name: str
    distill: dict[str, Any]  # the recipe's DistillConfig: every setting the space leaves out
    space: dict[str, Any]  # SweepSpaceFile
    input_spec: dict[str, Any]
    data: TrainData
    teacher_dir: str
    student_init_dir: str | None = None  # a student derived from the teacher (no built-in student spec)


def trial_job(settings: dict[str, Any], *, base: DistillConfig, space: SweepSpaceFile, trial_id: str, ctx: DistillSweepContext) -> TrainJob:
    """The Train job of one trial: the recipe's distillation settings with the trial's values put in."""
    if base.student is None:  # derived from the teacher: every trial starts from the same pruned weights
        assert ctx.student_init_dir is not None
        student = load_spec(ctx.student_init_dir).model
    else:
        student = scale_spec(base.student, width=float(settings.get("width", 1.0)), depth=settings.get("depth"))
    loss = settings.get("loss", base.loss)
    kd = loss != "labels"
    trial_dir = Path(ctx.run_dir) / "distill_trials" / trial_id
    return classifier_job(
        label=f"trial {trial_id}", run_name=f"{ctx.sweep_name}-{trial_id}", storage_path=ctx.storage_path,
        spec=student.model_dump(), epochs=int(settings.get("epochs", base.epochs)),
        batch_size=int(settings.get("batch_size", base.batch_size)), lr=float(settings.get("lr", base.lr)),
        lr_schedule=base.lr_schedule, weight_decay=float(settings.get("weight_decay", base.weight_decay)),
        temperature=float(settings.get("temperature", base.temperature)),
        alpha=float(settings.get("alpha", base.alpha)) if kd else 0.0,
        num_workers=space.search.num_workers, cpus_per_worker=space.search.cpus_per_worker, use_gpu=space.search.use_gpu,
        seed=base.seed, max_failures=base.max_failures, strategy=base.strategy, placement_strategy=base.placement_strategy,
        teacher_outputs=base.teacher_outputs, teacher_dir=ctx.teacher_dir, teacher_half_precision=base.teacher_half_precision,
        feature_kd=base.feature_kd if loss == "features" else None,
        metrics_path=str(trial_dir / "metrics.jsonl"), final_dir=str(trial_dir / "model"), input_spec=ctx.input_spec,
    )


def distill_trial(config: dict[str, Any], ctx: DistillSweepContext) -> None:
    """One Tune trial: a Ray Train run with this trial's settings; its workers report every epoch."""
    from ray.tune.integration.ray_train import TuneReportCallback

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    trial_id = tune.get_context().get_trial_id()
    base = DistillConfig.model_validate(ctx.distill)
    space = SweepSpaceFile.model_validate(ctx.space)
    job = trial_job(config, base=base, space=space, trial_id=trial_id, ctx=ctx)
    trial_dir = Path(ctx.run_dir) / "distill_trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "settings.json").write_text(json.dumps({"config": config, "job": job.model_dump()}, indent=2, default=str))
    init_state = load_artifact(ctx.student_init_dir)[0].state_dict() if base.student is None else None
    run_training(job, ctx.data, init_state=init_state, callbacks=[TuneReportCallback()])


def to_tune(domain: Any, *, grid: bool) -> Any:
    """A Ray Tune search-space entry for one domain of a space file."""
    if isinstance(domain, Uniform):
        return tune.uniform(*domain.uniform)
    if isinstance(domain, LogUniform):
        return tune.loguniform(*domain.loguniform)
    if isinstance(domain, RandInt):
        lo, hi = domain.randint
        return tune.randint(lo, hi + 1)
    values = domain_values(domain)
    if len(values) == 1:
        return values[0]
    return tune.grid_search(values) if grid else tune.choice(values)


def _param_space(space: SweepSpaceFile) -> dict[str, Any]:
    grid = space.search.algorithm == "grid"
    return {k: to_tune(v, grid=grid) for k, v in space.distill.params().items()}


def _epochs(space: SweepSpaceFile, base: DistillConfig) -> int:
    values = domain_values(space.distill.epochs)
    return int(values[0]) if len(values) == 1 else base.epochs


def run_distill_sweep(ctx: DistillSweepContext, *, max_concurrent_trials: int, resume: bool = True) -> list[dict[str, Any]]:
    """Run (or continue) the distillation sweep; one row per trial: settings, epochs run, why it stopped,
    held-out accuracy, the trial's artifact (completed trials) and its trial-seconds."""
    space = SweepSpaceFile.model_validate(ctx.space)
    base = DistillConfig.model_validate(ctx.distill)
    s = space.search
    stops_path = str(Path(ctx.run_dir) / "distill_trials" / "asha_stops.jsonl")
    scheduler = None
    if s.scheduler == "asha":
        scheduler = ExplainedASHA(
            stops_path=stops_path, time_attr=TIME_ATTR, metric=METRIC, mode="max", max_t=_epochs(space, base),
            grace_period=s.grace_period, reduction_factor=s.reduction_factor, stop_last_trials=False,
        )
    tune_config = make_tune_config(
        algorithm=s.algorithm, num_samples=space.num_trials, max_concurrent_trials=max_concurrent_trials,
        metric=METRIC, mode="max", seed=s.seed, num_startup_trials=s.num_startup_trials, scheduler=scheduler,
    )
    trainable = tune.with_resources(
        tune.with_parameters(distill_trial, ctx=ctx), {"cpu": 0, "memory": DRIVER_MEMORY_BYTES},
    )
    t0 = time.perf_counter()
    grid = run_tuner(
        trainable, param_space=_param_space(space), tune_config=tune_config, run_name=ctx.sweep_name,
        storage_path=ctx.storage_path, resume=resume, callbacks=[PlacementGroupReaper()],
    )
    wall = time.perf_counter() - t0
    stops = read_stops(stops_path)
    rows = []
    for result in grid:
        m = dict(result.metrics or {})
        trial_id = m.get("trial_id") or _id_from_path(result.path) or "unknown"
        trial_dir = Path(ctx.run_dir) / "distill_trials" / trial_id
        job = trial_job(result.config, base=base, space=space, trial_id=trial_id, ctx=ctx)
        history = read_history(trial_dir / "metrics.jsonl")
        epochs_run = int(m.get(TIME_ATTR) or (history[-1]["epoch"] if history else 0))
        row: dict[str, Any] = {
            "trial_id": trial_id, "settings": {k: _plain(v) for k, v in result.config.items()},
            "student": job.spec, "epochs": job.epochs, "epochs_run": epochs_run,
            "val_accuracy": m.get(METRIC), "trial_seconds": m.get("time_total_s"),
            "history": [{"epoch": h["epoch"], "val_accuracy": h.get("val_accuracy"), "loss": h.get("loss")} for h in history],
        }
        if result.error is not None:
            row.update(status="error", stop_reason=f"error: {str(result.error).strip().splitlines()[-1][:300]}")
        elif epochs_run >= job.epochs and (trial_dir / "model" / "spec.json").exists():
            row.update(status="completed", stop_reason=f"completed all {job.epochs} epochs", artifact=str(trial_dir / "model"))
        elif trial_id in stops:
            st = stops[trial_id]
            cut = st.get("cutoff")
            row.update(
                status="stopped",
                stop_reason=(f"ASHA stopped it after epoch {st[TIME_ATTR]}: val acc {st[METRIC]:.2f}% below the rung's cutoff "
                             f"{cut:.2f}%" if cut is not None else f"ASHA stopped it after epoch {st[TIME_ATTR]}"),
            )
        else:
            row.update(status="unfinished", stop_reason=f"ended after {epochs_run} of {job.epochs} epochs without a result")
        rows.append(row)
    for r in rows:
        r["sweep_wall_s"] = wall
    return sorted(rows, key=lambda r: r["trial_id"])


def _id_from_path(path: str | None) -> str | None:
    """Tune's trial id from a trial folder name (``<trainable>_<trial id>_<index>_<params>...``)."""
    if not path:
        return None
    parts = Path(path).name.split("_")
    for i in range(len(parts) - 1):
        if len(parts[i]) == 5 and parts[i + 1].isdigit() and len(parts[i + 1]) == 5:
            return f"{parts[i]}_{parts[i + 1]}"
    return None


def _plain(v: Any) -> Any:
    try:
        return v.item()  # numpy scalars from Tune's samplers
    except AttributeError:
        return v


def read_history(path: Path) -> list[dict[str, Any]]:
    """Per-epoch metrics of a trial (the last line per epoch: a resumed run writes an epoch again)."""
    if not path.exists():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            e = json.loads(line)
            by_epoch[int(e["epoch"])] = e
    return [by_epoch[k] for k in sorted(by_epoch)]


def pick_best(candidates: list[dict[str, Any]], *, tie_tolerance: float, latency_key: str) -> dict[str, Any]:
    """Highest held-out accuracy; within ``tie_tolerance`` points of it, the fewest parameters, then the
    lowest latency. ``candidates`` carry ``val_accuracy``, ``params`` and ``latency_key``."""
    if not candidates:
        raise ConfigError("no distillation trial completed: nothing to pick a student from (see the trial table)")
    top = max(c["val_accuracy"] for c in candidates)
    tied = [c for c in candidates if c["val_accuracy"] >= top - tie_tolerance - 1e-9]
    return min(tied, key=lambda c: (c["params"], c[latency_key], -c["val_accuracy"]))


BEST_STUDENT = "student-best"


def _recipe_settings(distill: DistillConfig, fields: dict[str, Any]) -> dict[str, Any]:
    """The recipe's values of the fields a distillation space ranges over (how the default student was made)."""
    out: dict[str, Any] = {}
    for k in fields:
        if k == "width":
            out[k] = 1.0
        elif k == "depth":
            s = distill.student
            out[k] = len(s.conv_channels) if s.kind == "cnn" else len(s.hidden)
        else:
            out[k] = getattr(distill, k)
    out["epochs"] = distill.epochs
    out["num_workers"] = distill.num_workers
    return out


def check_student_sweep(cfg: Any) -> None:
    """Before anything trains: the distillation sweep's trials must fit the cluster (an error names the resources)."""
    from slimray.sweep.engine import plan_train_trials

    space = cfg.distill_sweep
    if space is None or space.distill is None:
        return
    s = space.search
    plan_train_trials(num_trials=space.num_trials, num_workers=s.num_workers, cpus_per_worker=s.cpus_per_worker, use_gpu=s.use_gpu,
                      max_concurrent_trials=s.max_concurrent_trials, what="distillation sweep")


def sweep_students(cfg: Any, *, run_dir: Path, data: Any, train_data: dict[str, Any], stream: Any, init_dir: Path | None,
                   default_dir: Path | None, resume: bool = True) -> tuple[Path, dict[str, Any]]:
    """The classifier's distillation sweep (its family's ``student_sweep`` hook): Tune over Train, one Ray Train run per
    point of ``cfg.distill_sweep.distill``; the best student (held-out accuracy; ties: smaller, then faster, timed side
    by side) among the completed trials and the recipe-settings student (``default_dir``, when trained) is copied to
    ``RUN/students/student-best``. ``data``: the recipe's data (val/test tensors); ``train_data``: the arrays the Train
    workers share (the recipe's ``train_data``); ``init_dir``: a derived student's starting weights. Returns (the best
    student's folder, the summary, also written as ``RUN/distill_sweep.{json,md,png}``)."""
    import ray

    from slimray.compress.measure import accuracy, compare_latency
    from slimray.families.classifier.artifacts import ArtifactSpec, copy_artifact
    from slimray.families.classifier.report import write_distill_sweep
    from slimray.families.classifier.spec import count_params
    from slimray.runs import log
    from slimray.storage import reusable
    from slimray.sweep.engine import plan_train_trials

    space = cfg.distill_sweep
    best_dir = run_dir / "students" / BEST_STUDENT
    summary_path = run_dir / "distill_sweep.json"
    if summary_path.exists() and reusable(best_dir, spec_cls=ArtifactSpec, log=log):
        log("distillation sweep: reusing the finished sweep")
        return best_dir, json.loads(summary_path.read_text())
    s = space.search
    concurrent = plan_train_trials(num_trials=space.num_trials, num_workers=s.num_workers, cpus_per_worker=s.cpus_per_worker,
                                   use_gpu=s.use_gpu, max_concurrent_trials=s.max_concurrent_trials, what="distillation sweep")
    log(f"distillation sweep ({s.algorithm}{', asha' if s.scheduler == 'asha' else ''}): {space.num_trials} trials over "
        f"{space.distill.varying() or list(space.distill.params())}, {s.num_workers} Ray Train worker(s) each, {concurrent} at a time")
    put = {k: (ray.put(v) if v is not None else None) for k, v in train_data.items() if k in ("x_train", "y_train", "x_val", "y_val", "teacher_logits")}
    ctx = DistillSweepContext(
        run_dir=str(run_dir), storage_path=str((run_dir / "ray").resolve()), sweep_name=f"{cfg.name}-distill-sweep",
        distill=cfg.distill.model_dump(), space=space.model_dump(), input_spec=data.input.model_dump(),
        data=TrainData(**put, train_stream=stream), teacher_dir=str(run_dir / "teacher"),
        student_init_dir=str(init_dir) if init_dir is not None else None,
    )
    rows = run_distill_sweep(ctx, max_concurrent_trials=concurrent, resume=resume)
    log(f"distillation sweep: {sum(r['status'] == 'completed' for r in rows)}/{len(rows)} trials completed")
    b = cfg.search.serving_batch_size
    models = {r["trial_id"]: load_artifact(r["artifact"])[0] for r in rows if r["status"] == "completed"}
    if default_dir is not None and (default_dir / "spec.json").exists():
        models["default"] = load_artifact(default_dir)[0]
    log(f"timing {len(models)} students side by side (batch 1 and {b})")
    timed = compare_latency(models, data.x_test[:b], batch_sizes=sorted({1, b}), num_threads=cfg.search.num_threads)
    settings = {r["trial_id"]: r["settings"] for r in rows}
    settings["default"] = _recipe_settings(cfg.distill, space.distill.params()) if cfg.distill.student is not None else {}
    candidates = [
        {"key": k, "settings": settings.get(k, {}), "val_accuracy": accuracy(m, data.x_val, data.y_val),
         "test_accuracy": accuracy(m, data.x_test, data.y_test), "params": count_params(m),
         "latency_ms": {f"batch_{bb}": v for bb, v in timed[k].items()}, "lat": timed[k][b]}
        for k, m in models.items()
    ]
    best = pick_best(candidates, tie_tolerance=s.tie_tolerance, latency_key="lat")
    src = default_dir if best["key"] == "default" else Path(next(r["artifact"] for r in rows if r["trial_id"] == best["key"]))
    copy_artifact(src, best_dir, update={"name": BEST_STUDENT, "metadata": {"trial": best["key"]}})
    log(f"distillation sweep: best student {best['key']} ({best['val_accuracy']:.2f}% val, {best['params']} params)")
    drop = lambda c: {k: v for k, v in c.items() if k != "lat"}  # noqa: E731
    summary = {
        "search": s.model_dump(), "space": space.distill.model_dump(exclude_none=True), "varying": space.distill.varying(),
        "serving_batch_size": b, "max_concurrent_trials": concurrent, "wall_s": rows[0]["sweep_wall_s"] if rows else 0.0,
        "trial_seconds": sum(r.get("trial_seconds") or 0.0 for r in rows),
        "trials": [{k: v for k, v in r.items() if k != "sweep_wall_s"} for r in rows],
        "candidates": [drop(c) for c in candidates], "best": drop(best),
        "default": next((drop(c) for c in candidates if c["key"] == "default"), None),
    }
    write_distill_sweep(summary, run_dir)
    return best_dir, summary
