"""The compression sweep on Ray Tune: one trial per (prune ratio, quantization, runtime).

A trial prunes the student (structured, torch-pruning), fine-tunes it epoch by epoch with KD from the
cached teacher logits, quantizes it, and after every fine-tune epoch reports held-out accuracy (the
epochs are ASHA's budget). At its first report it also measures what does not change with more
fine-tuning: bytes on disk, peak memory to load the artifact and run one serving batch (measured in a
fresh process, ``slimray.compress.memprobe``), and latency at
batch 1 and the serving batch size in the trial's runtime, on the replica's thread count. Timing is
serialised across trials by ``TimingLock`` so that two trials never time at once on the same cores.

The pruned model of a ratio after ``k`` fine-tune epochs is computed once and cached in the run folder
(under a file lock), so every quantization/runtime trial of one ratio, and every epoch count, shares it.

Search: ``grid`` (every point), ``random`` or ``optuna`` (TPE over accuracy and latency, two objectives)
with ``num_samples`` trials; ``asha`` stops trials early on ``objective`` = -latency, minus a steep penalty
per point below the accuracy floor (so "fastest within the floor" is what survives).

A rerun with ``resume`` restores the Tune experiment and does not rerun finished trials.
"""

from __future__ import annotations

import fcntl
import os
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from slimray.families.classifier.artifacts import ArtifactSpec, artifact_bytes, load_artifact, load_runnable, save_artifact
from slimray.compress import memprobe
from slimray.compress.export import check_outputs
from slimray.compress.measure import latency_ms, peak_memory_bytes
from slimray.compress.prune import prune
from slimray.compress.quantize import QUANTIZE_AT_LOAD, quantize
from slimray.compress.runtime import ONNX_FILE, onnx_for
from slimray.config import SearchConfig
from slimray.evaluation import EvalConfig, load_metric
from slimray.families.classifier.spec import count_params, spec_from_model
from slimray.sweep.engine import make_tune_config, run_tuner
from slimray.sweep.explain import explain
from slimray.storage import reusable
from slimray.sweep.lock import TimingLock, hold
from slimray.families.classifier.kd import finetune

PENALTY_PER_POINT = 1000.0  # objective units (ms) lost per accuracy point below the floor
NUM_GRADIENT_BATCHES = 8  # labelled batches the taylor criterion accumulates gradients over


@dataclass(frozen=True)
class SweepContext:
    run_dir: str
    base_model_dir: str  # artifact to compress (the distilled student)
    x_train: ray.ObjectRef
    y_train: ray.ObjectRef
    teacher_logits: ray.ObjectRef | None
    x_val: ray.ObjectRef
    y_val: ray.ObjectRef
    search: dict[str, Any]
    temperature: float
    alpha: float
    seed: int
    accuracy_floor: float | None = None  # for the early-stopping objective (in quality units)
    lock: Any = None
    evaluation: dict[str, Any] | None = None  # EvalConfig: the metric trials are scored on (default: accuracy)
    code_dir: str | None = None  # where a metric of the user's own is imported from


def setting_name(method: str, runtime: str) -> str:
    return f"{method}@{runtime}"


def parse_setting(setting: str) -> tuple[str, str]:
    method, _, runtime = setting.partition("@")
    return method, runtime or "torch"


def trial_key(prune_ratio: float, method: str, runtime: str = "torch") -> str:
    base = f"prune{prune_ratio:.2f}-{method}"
    return base if runtime == "torch" else f"{base}-{runtime}"


def objective(accuracy_pct: float, latency: float, floor: float | None) -> float:
    """Higher is better: -latency, minus PENALTY_PER_POINT per accuracy point under the floor."""
    short = 0.0 if floor is None else max(0.0, floor - accuracy_pct)
    return -latency - PENALTY_PER_POINT * short


def trial_log(run_dir: str | Path, key: str, event: str) -> None:
    """One line per trial start/end in ``RUN/trials.log`` (progress at a glance; shows reruns)."""
    path = Path(run_dir) / "trials.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {event} {key} pid={os.getpid()}\n")


def read_trial_log(run_dir: str | Path) -> list[tuple[str, str]]:
    """(event, key) pairs from ``RUN/trials.log``, in order."""
    path = Path(run_dir) / "trials.log"
    if not path.exists():
        return []
    return [(parts[1], parts[2]) for parts in (line.split() for line in path.read_text().splitlines()) if len(parts) >= 3]


def _pruned(ctx: SweepContext, search: SearchConfig, ratio: float, *, epochs: int):
    """The base model pruned at ``ratio`` and fine-tuned ``epochs`` epochs; each epoch count cached on disk."""
    base, base_spec = load_artifact(ctx.base_model_dir)
    if ratio == 0.0:
        return base, base_spec
    root = Path(ctx.run_dir) / "pruned"
    root.mkdir(parents=True, exist_ok=True)
    name = f"prune{ratio:.2f}"

    def cached(k: int) -> Path:
        return root / f"{name}-e{k}"

    with open(root / f".{name}.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if reusable(cached(epochs), spec_cls=ArtifactSpec, log=print):  # verified; a damaged cache entry is recomputed
            return load_artifact(cached(epochs))
        done = max((k for k in range(epochs + 1) if reusable(cached(k), spec_cls=ArtifactSpec, log=print)), default=None)
        x = torch.from_numpy(ray.get(ctx.x_train))
        y = torch.from_numpy(ray.get(ctx.y_train))
        logits = torch.from_numpy(ray.get(ctx.teacher_logits)) if ctx.teacher_logits is not None else None
        prune_spec = search.space.prune_spec(ratio)
        if done is None:
            torch.manual_seed(ctx.seed)
            grads = [(x[i * 128 : (i + 1) * 128], y[i * 128 : (i + 1) * 128]) for i in range(NUM_GRADIENT_BATCHES)]
            model = prune(base.train(), prune_spec, example_inputs=x[:1], gradient_batches=grads)
            spec = base_spec.model_copy(update={"model": spec_from_model(model, base_spec.model), "prune": prune_spec})
            done = 0
            save_artifact(cached(0), model.eval(), spec.model_copy(update={"name": f"{name}-e0"}))
        model, spec = load_artifact(cached(done))
        for k in range(done + 1, epochs + 1):
            finetune(
                model.train(), x, y, logits, epochs=1, lr=search.finetune_lr, temperature=ctx.temperature,
                alpha=ctx.alpha if logits is not None else 0.0, seed=ctx.seed + k,
            )
            save_artifact(cached(k), model.eval(), spec.model_copy(update={"name": f"{name}-e{k}", "metadata": {"finetune_epochs": k}}))
        return load_artifact(cached(epochs))


def save_trial(out: Path, model, qmodel, spec, search: SearchConfig, *, method: str, runtime: str, example, calib) -> None:
    """Save one trial's artifact as its runtime loads it: float weights + ONNX graph (int8 QDQ when quantized) for
    ONNX Runtime, float weights for methods quantized at load, else the quantized torch model."""
    qspec, rspec = search.space.quant_spec(method), search.space.runtime_spec(runtime)
    tspec = spec.model_copy(update={"quantization": qspec, "runtime": rspec, "name": out.name})
    if runtime == "onnxruntime":
        save_artifact(out, model, tspec, extra_files={ONNX_FILE: onnx_for(model, example, method=method, calibration=calib)})
    elif method in QUANTIZE_AT_LOAD:
        save_artifact(out, model, tspec)
    else:
        save_artifact(out, qmodel, tspec)


def compression_trial(config: dict[str, Any], ctx: SweepContext) -> None:
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    search = SearchConfig.model_validate(ctx.search)
    metric = load_metric(EvalConfig.model_validate(ctx.evaluation or {}), default_max_drop=search.max_accuracy_drop, code_dir=ctx.code_dir)
    ratio = float(config["prune_ratio"])
    method, runtime = parse_setting(str(config["setting"]))
    key = trial_key(ratio, method, runtime)
    out = Path(ctx.run_dir) / "trials" / key
    epochs = search.finetune_epochs if ratio > 0 else 0
    fixed: dict[str, Any] = {}
    stage = "prune"  # what the trial is doing, for the explanation of a failure
    trial_log(ctx.run_dir, key, "start")
    try:
        x_train = torch.from_numpy(ray.get(ctx.x_train))
        x_val, y_val = torch.from_numpy(ray.get(ctx.x_val)), torch.from_numpy(ray.get(ctx.y_val))
        qspec = search.space.quant_spec(method)
        calib = [x_train[i * 64 : (i + 1) * 64] for i in range(qspec.num_calibration_batches)]
        example = x_val[: search.serving_batch_size]
        for epoch in range(min(epochs, 1), epochs + 1):
            stage = "prune" if epoch <= 1 else "finetune"
            model, spec = _pruned(ctx, search, ratio, epochs=epoch)
            stage = "quantize"
            qmodel = quantize(model, qspec, calibration=calib) if runtime != "onnxruntime" else model
            stage = "export" if runtime == "onnxruntime" else "quantize"
            save_trial(out, model, qmodel, spec, search, method=method, runtime=runtime, example=example, calib=calib)
            if not fixed:  # size, memory and latency do not change with more fine-tuning: measure once
                stage = "memory_probe"
                if search.space.device == "cuda":
                    peak, _ = peak_memory_bytes(lambda: _load_and_run(out, example, num_threads=search.num_threads), device="cuda")
                else:  # in a fresh process: this one's allocator still holds what fine-tuning freed
                    peak = memprobe.probe(out, loader="slimray.families.classifier.artifacts:load_runnable", input_shape=spec.input.shape,
                                          batch_size=search.serving_batch_size, num_threads=search.num_threads)
                stage = "timing"
                with hold(ctx.lock, key):
                    runnable = _load_and_run(out, example, num_threads=search.num_threads)
                    fixed = {
                        f"latency_ms_b{b}": latency_ms(
                            runnable, example, batch_size=b, num_threads=search.num_threads, num_repeats=search.num_timing_repeats
                        )
                        for b in sorted({1, search.serving_batch_size})
                    }
                fixed.update(params=count_params(model), size_bytes=artifact_bytes(out), peak_memory_bytes=peak)
                if runtime != "torch":  # the runtime's outputs against the torch model it came from
                    fixed["runtime_check"] = check_outputs(qmodel, runnable, x_val[:1000])
            else:
                runnable = _load_and_run(out, example, num_threads=search.num_threads)
            # scored in the runtime that serves it; a compiled module in serving-size batches (fewer recompiles)
            stage = "evaluate"
            value = metric.value(runnable, x_val, y_val, batch_size=search.serving_batch_size if runtime == "torch_compile" else 1024)
            acc = metric.quality(value)  # "accuracy" below: the signed quality every selection rule compares
            lat = fixed[f"latency_ms_b{search.serving_batch_size}"]
            tune.report(
                {
                    "key": key, "status": "ok", "accuracy": acc, "metric_value": value, "finetune_epochs": epoch, "artifact": str(out),
                    "objective": objective(acc, lat, ctx.accuracy_floor), "trial_seconds": time.perf_counter() - t_start, **fixed,
                }
            )
        trial_log(ctx.run_dir, key, "end")
    except Exception as err:  # a broken setting is a result, not a crashed sweep
        why = explain(err, stage=stage, ratio=ratio, method=method, runtime=runtime)
        print(f"trial {key}: {why['line']}", flush=True)
        tune.report(
            {
                "key": key, "status": "error", "error": why["error"], "where": why["where"], "stage": stage, "advice": why["advice"],
                "explanation": why["line"], "traceback": traceback.format_exc()[-2000:],
                "objective": -1e12, "trial_seconds": time.perf_counter() - t_start,
            }
        )


def _load_and_run(path: Path, example: torch.Tensor, *, num_threads: int):
    model, _ = load_runnable(path, num_threads=num_threads)
    with torch.inference_mode():
        model(example)
    return model


def _param_space(search: SearchConfig) -> dict[str, Any]:
    settings = [setting_name(q, r) for q, r in search.space.settings]
    if search.algorithm == "grid":
        return {"prune_ratio": tune.grid_search(search.space.prune_ratios), "setting": tune.grid_search(settings)}
    return {"prune_ratio": tune.choice(search.space.prune_ratios), "setting": tune.choice(settings)}


def _tune_config(search: SearchConfig, *, max_concurrent_trials: int, lat_key: str) -> tune.TuneConfig:
    scheduler = None
    if search.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="finetune_epochs", metric="objective", mode="max", max_t=search.finetune_epochs,
            grace_period=search.grace_period, reduction_factor=search.reduction_factor,
        )
    return make_tune_config(
        algorithm=search.algorithm, num_samples=search.num_trials, max_concurrent_trials=max_concurrent_trials,
        metric=["accuracy", lat_key], mode=["max", "min"], seed=0, scheduler=scheduler, num_startup_trials=search.num_startup_trials,
    )


def run_sweep(ctx: SweepContext, *, run_name: str, storage_path: str, max_concurrent_trials: int, resume: bool = True) -> list[dict[str, Any]]:
    """Run (or, with ``resume``, continue) the search; returns one dict per trial with its settings, metrics and status.

    Without ``resume`` an earlier experiment of the same name is an error rather than silently reused.
    """
    search = SearchConfig.model_validate(ctx.search)
    lat_key = f"latency_ms_b{search.serving_batch_size}"
    lock = TimingLock.remote()
    ctx = SweepContext(**{**ctx.__dict__, "lock": lock})
    trainable = tune.with_resources(tune.with_parameters(compression_trial, ctx=ctx), {"cpu": 1})
    try:
        grid = run_tuner(
            trainable, param_space=_param_space(search),
            tune_config=_tune_config(search, max_concurrent_trials=max_concurrent_trials, lat_key=lat_key),
            run_name=run_name, storage_path=storage_path, resume=resume,
            describe=lambda c: trial_key(float(c["prune_ratio"]), *parse_setting(str(c["setting"]))),
        )
    except FileExistsError:
        ray.kill(lock)
        raise
    trials = []
    for result in grid:
        m = dict(result.metrics or {})
        method, runtime = parse_setting(str(result.config["setting"]))
        row: dict[str, Any] = {
            "prune_ratio": result.config["prune_ratio"], "quantization": method, "runtime": runtime,
            "trial_id": getattr(result, "path", None) and Path(result.path).name,
            "trial_seconds": m.get("trial_seconds"),
        }
        if result.error is not None or m.get("status") != "ok":
            row.update(status="error", error=m.get("error") or str(result.error))
            row.update({k: m[k] for k in ("key", "stage", "where", "advice", "explanation") if m.get(k)})
        else:
            row.update(
                {k: m[k] for k in ("key", "status", "accuracy", "metric_value", "params", "size_bytes", "peak_memory_bytes", "artifact",
                                   "finetune_epochs", "runtime_check") if k in m}
            )
            row.update({k: v for k, v in m.items() if k.startswith("latency_ms_b")})
            row["stopped_early"] = m.get("finetune_epochs", 0) < (search.finetune_epochs if row["prune_ratio"] > 0 else 0)
        trials.append(row)
    ray.kill(lock)
    return sorted(trials, key=lambda t: (t["prune_ratio"], t["runtime"], t["quantization"]))
