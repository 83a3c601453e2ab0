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
