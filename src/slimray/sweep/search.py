"""The compression sweep on Ray Tune: one trial per (prune ratio, quantization).

A trial prunes the student (structured, torch-pruning), fine-tunes it with KD from the cached teacher
logits, quantizes it, and measures accuracy on held-out data, bytes on disk and latency at batch 1 and
the serving batch size. The pruned + fine-tuned model of a ratio is computed once and cached in the run
folder (under a file lock), so the quantization trials of one ratio share it. Timing is serialised
across trials by ``TimingLock``. A rerun with the same run name restores the experiment and does not
rerun finished trials.
"""

from __future__ import annotations

import fcntl
import os
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from slimray.artifacts import ArtifactSpec, artifact_bytes, load_artifact, save_artifact
from slimray.compress.measure import accuracy, latency_ms
from slimray.compress.prune import prune
from slimray.compress.quantize import quantize
from slimray.config import SearchConfig
from slimray.models.spec import count_params, spec_from_model
from slimray.sweep.lock import TimingLock, hold
from slimray.training.loop import finetune


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
    lock: Any = None


def trial_key(prune_ratio: float, method: str) -> str:
    return f"prune{prune_ratio:.2f}-{method}"


def _pruned(ctx: SweepContext, search: SearchConfig, ratio: float):
    """The base model pruned at ``ratio`` and fine-tuned; computed once per ratio, cached on disk."""
    base, base_spec = load_artifact(ctx.base_model_dir)
    if ratio == 0.0:
        return base, base_spec
    cache = Path(ctx.run_dir) / "pruned" / f"prune{ratio:.2f}"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f".{cache.name}.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if (cache / "spec.json").exists():
            return load_artifact(cache)
        x = torch.from_numpy(ray.get(ctx.x_train))
        prune_spec = search.space.prune_spec(ratio)
        model = prune(base.train(), prune_spec, example_inputs=x[:1])
        logits = torch.from_numpy(ray.get(ctx.teacher_logits)) if ctx.teacher_logits is not None else None
        torch.manual_seed(ctx.seed)
        finetune(
            model, x, torch.from_numpy(ray.get(ctx.y_train)), logits, epochs=search.finetune_epochs,
            lr=search.finetune_lr, temperature=ctx.temperature, alpha=ctx.alpha if logits is not None else 0.0, seed=ctx.seed,
        )
        spec = base_spec.model_copy(update={"model": spec_from_model(model, base_spec.model), "prune": prune_spec, "name": cache.name})
        save_artifact(cache, model, spec)
        return load_artifact(cache)


def compression_trial(config: dict[str, Any], ctx: SweepContext) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    search = SearchConfig.model_validate(ctx.search)
    ratio, method = float(config["prune_ratio"]), str(config["quantization"])
    key = trial_key(ratio, method)
    try:
        model, spec = _pruned(ctx, search, ratio)
        x_train = torch.from_numpy(ray.get(ctx.x_train))
        calib = [x_train[i * 64 : (i + 1) * 64] for i in range(search.space.quant_spec(method).num_calibration_batches)]
        qspec = search.space.quant_spec(method)
        qmodel = quantize(model, qspec, calibration=calib)
        x_val, y_val = torch.from_numpy(ray.get(ctx.x_val)), torch.from_numpy(ray.get(ctx.y_val))
        acc = accuracy(qmodel, x_val, y_val)
        out = Path(ctx.run_dir) / "trials" / key
        save_artifact(out, qmodel, spec.model_copy(update={"quantization": qspec, "name": key}))
        example = x_val[: search.serving_batch_size]
        with hold(ctx.lock, key):
            lat = {
                f"latency_ms_b{b}": latency_ms(qmodel, example, batch_size=b, num_threads=search.num_threads, num_repeats=search.num_timing_repeats)
                for b in sorted({1, search.serving_batch_size})
            }
        tune.report(
            {
                "key": key, "status": "ok", "accuracy": acc, "params": count_params(model),
                "size_bytes": artifact_bytes(out), "artifact": str(out), **lat,
            }
        )
    except Exception as err:  # a broken setting is a result, not a crashed sweep
        tune.report({"key": key, "status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]})


def run_sweep(ctx: SweepContext, *, run_name: str, storage_path: str, max_concurrent_trials: int, resume: bool = True) -> list[dict[str, Any]]:
    """Run (or, with ``resume``, continue) the grid; returns one dict per trial with its settings, metrics and status.

    Without ``resume`` an earlier experiment of the same name is an error rather than silently reused.
    """
    search = SearchConfig.model_validate(ctx.search)
    lock = TimingLock.remote()
    ctx = SweepContext(**{**ctx.__dict__, "lock": lock})
    trainable = tune.with_resources(tune.with_parameters(compression_trial, ctx=ctx), {"cpu": 1})
    path = os.path.join(storage_path, run_name)
    if tune.Tuner.can_restore(path) and not resume:
        raise FileExistsError(f"a sweep already exists at {path}: pass --resume to continue it, or use another run name")
    if tune.Tuner.can_restore(path):
        print(f"[sweep] resuming {path}: finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={
                "prune_ratio": tune.grid_search(search.space.prune_ratios),
                "quantization": tune.grid_search(search.space.quantizations),
            },
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent_trials),
            run_config=tune.RunConfig(name=run_name, storage_path=storage_path, verbose=1),
        )
    grid = tuner.fit()
    trials = []
    for result in grid:
        m = dict(result.metrics or {})
        row = {"prune_ratio": result.config["prune_ratio"], "quantization": result.config["quantization"]}
        if result.error is not None or m.get("status") != "ok":
            row.update(status="error", error=m.get("error") or str(result.error))
        else:
            row.update({k: m[k] for k in ("key", "status", "accuracy", "params", "size_bytes", "artifact") if k in m})
            row.update({k: v for k, v in m.items() if k.startswith("latency_ms_b")})
        trials.append(row)
    ray.kill(lock)
    return sorted(trials, key=lambda t: (t["prune_ratio"], t["quantization"]))
