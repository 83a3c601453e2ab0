"""The classifier's compression sweep: one trial per (prune ratio, quantization, runtime), run as trials of the one
shared trainable (``slimray.sweep.trials.run_trials``: result files, error records, resume, the timing lock).

A trial prunes the student (structured, torch-pruning), fine-tunes it epoch by epoch with KD from the
cached teacher logits, quantizes it, and after every fine-tune epoch reports held-out accuracy (the
epochs are ASHA's budget). At its first report it also measures what does not change with more
fine-tuning: bytes on disk, peak memory to load the artifact and run one serving batch (measured in a
fresh process, ``slimray.compress.memprobe``), and latency at
batch 1 and the serving batch size in the trial's runtime, on the replica's thread count. Timing is
serialised across trials by the sweep's timing lock so that two trials never time at once on the same cores.

The pruned model of a ratio after ``k`` fine-tune epochs is computed once and cached in the run folder
(under a file lock), so every quantization/runtime trial of one ratio, and every epoch count, shares it.

Search: ``grid`` (every point), ``random`` or ``optuna`` (TPE over accuracy and latency, two objectives)
with ``num_samples`` trials; ``asha`` stops trials early on ``objective`` = -latency, minus a steep penalty
per point below the accuracy floor (so "fastest within the floor" is what survives).

A rerun with ``resume`` restores the Tune experiment; a finished trial (its result file) never runs again.
"""

from __future__ import annotations

import fcntl
import functools
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
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
from slimray.sweep.explain import explain
from slimray.storage import reusable
from slimray.sweep.trials import Sampling, run_trials
from slimray.families.classifier.kd import finetune

PENALTY_PER_POINT = 1000.0  # objective units (ms) lost per accuracy point below the floor
NUM_GRADIENT_BATCHES = 8  # labelled batches the taylor criterion accumulates gradients over


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


def setting_name(method: str, runtime: str) -> str:
    return f"{method}@{runtime}"


def parse_setting(setting: str) -> tuple[str, str]:
    method, _, runtime = setting.partition("@")
    return method, runtime or "torch"


def trial_key(prune_ratio: float, method: str, runtime: str = "torch") -> str:
    base = f"prune{prune_ratio:.2f}-{method}"
    return base if runtime == "torch" else f"{base}-{runtime}"


def config_key(config: dict[str, Any]) -> str:
    """The key of a trial's config (``prune_ratio`` and ``setting``, the axes Tune samples)."""
    return trial_key(float(config["prune_ratio"]), *parse_setting(str(config["setting"])))


def objective(accuracy_pct: float, latency: float, floor: float | None) -> float:
    """Higher is better: -latency, minus PENALTY_PER_POINT per accuracy point under the floor."""
    short = 0.0 if floor is None else max(0.0, floor - accuracy_pct)
    return -latency - PENALTY_PER_POINT * short


def _pruned(ctx: dict[str, Any], data: dict[str, Any], search: SearchConfig, ratio: float, *, epochs: int):
    """The base model pruned at ``ratio`` and fine-tuned ``epochs`` epochs; each epoch count cached on disk."""
    base, base_spec = load_artifact(ctx["base_model_dir"])
    if ratio == 0.0:
        return base, base_spec
    root = Path(ctx["run_dir"]) / "pruned"
    root.mkdir(parents=True, exist_ok=True)
    name = f"prune{ratio:.2f}"

    def cached(k: int) -> Path:
        return root / f"{name}-e{k}"

    with open(root / f".{name}.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if reusable(cached(epochs), spec_cls=ArtifactSpec, log=print):  # verified; a damaged cache entry is recomputed
            return load_artifact(cached(epochs))
        done = max((k for k in range(epochs + 1) if reusable(cached(k), spec_cls=ArtifactSpec, log=print)), default=None)
        x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
        logits = torch.from_numpy(data["teacher_logits"]) if data.get("teacher_logits") is not None else None
        prune_spec = search.space.prune_spec(ratio)
        if done is None:
            torch.manual_seed(ctx["seed"])
            grads = [(x[i * 128 : (i + 1) * 128], y[i * 128 : (i + 1) * 128]) for i in range(NUM_GRADIENT_BATCHES)]
            model = prune(base.train(), prune_spec, example_inputs=x[:1], gradient_batches=grads)
            spec = base_spec.model_copy(update={"model": spec_from_model(model, base_spec.model), "prune": prune_spec})
            done = 0
            save_artifact(cached(0), model.eval(), spec.model_copy(update={"name": f"{name}-e0"}))
        model, spec = load_artifact(cached(done))
        for k in range(done + 1, epochs + 1):
            finetune(
                model.train(), x, y, logits, epochs=1, lr=search.finetune_lr, temperature=ctx["temperature"],
                alpha=ctx["alpha"] if logits is not None else 0.0, seed=ctx["seed"] + k,
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


def compression_steps(key: str, data: dict[str, Any], *, ctx: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One trial of the shared trainable (``slimray.sweep.trials``): prune, then after every fine-tune epoch quantize,
    save, score and yield a row (the epochs are ASHA's budget); size, memory and latency measured at the first.
    ``data``: the arrays (``SweepContext.ARRAYS``) and ``timing`` (the sweep's timing lock); ``ctx``: the rest of the
    ``SweepContext``. A failure is a row too (``status`` error, with the stage and a line of advice)."""
    t_start = time.perf_counter()
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    search = SearchConfig.model_validate(ctx["search"])
    metric = load_metric(EvalConfig.model_validate(ctx["evaluation"] or {}), default_max_drop=search.max_accuracy_drop,
                         code_dir=ctx["code_dir"])
    ratio, method, runtime = ctx["candidates"][key]
    out = Path(ctx["run_dir"]) / "trials" / key
    epochs = search.finetune_epochs if ratio > 0 else 0
    fixed: dict[str, Any] = {}
    stage = "prune"  # what the trial is doing, for the explanation of a failure
    try:
        x_train = torch.from_numpy(data["x_train"])
        x_val, y_val = torch.from_numpy(data["x_val"]), torch.from_numpy(data["y_val"])
        qspec = search.space.quant_spec(method)
        calib = [x_train[i * 64 : (i + 1) * 64] for i in range(qspec.num_calibration_batches)]
        example = x_val[: search.serving_batch_size]
        for epoch in range(min(epochs, 1), epochs + 1):
            stage = "prune" if epoch <= 1 else "finetune"
            model, spec = _pruned(ctx, data, search, ratio, epochs=epoch)
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
                with data["timing"](key):
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
            yield {
                "key": key, "status": "ok", "accuracy": acc, "metric_value": value, "finetune_epochs": epoch, "artifact": str(out),
                "objective": objective(acc, lat, ctx["accuracy_floor"]), "trial_seconds": time.perf_counter() - t_start, **fixed,
            }
    except Exception as err:  # a broken setting is a result, not a crashed sweep
        why = explain(err, stage=stage, ratio=ratio, method=method, runtime=runtime)
        print(f"trial {key}: {why['line']}", flush=True)
        yield {
            "key": key, "status": "error", "error": why["error"], "where": why["where"], "stage": stage, "advice": why["advice"],
            "explanation": why["line"], "traceback": traceback.format_exc()[-2000:],
            "objective": -1e12, "trial_seconds": time.perf_counter() - t_start,
        }


def _load_and_run(path: Path, example: torch.Tensor, *, num_threads: int):
    model, _ = load_runnable(path, num_threads=num_threads)
    with torch.inference_mode():
        model(example)
    return model


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
        run_dir=ctx.run_dir, keys=list(candidates), measure=functools.partial(compression_steps, ctx=fields),
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
