"""The classifier's compression trial, pure torch (no Ray): prune the student (structured, torch-pruning), fine-tune it
epoch by epoch with KD from the teacher's logits, quantize it, save it as its runtime loads it, and after every
fine-tune epoch score it on held-out data and yield a row (the epochs are ASHA's budget). At the first row it also
measures what more fine-tuning does not change: bytes on disk, peak memory to load the artifact and run one serving
batch (in a fresh process, ``slimray.compress.memprobe``), latency at batch 1 and the serving batch size in the
trial's runtime on the replica's thread count (under the sweep's timing lock, so two trials never time at once), and
for another runtime its outputs against the torch model.

The pruned model of a ratio after ``k`` fine-tune epochs is computed once and cached in the run folder (under a file
lock), so every quantization/runtime trial of one ratio, and every epoch count, shares it. The sweep that runs these
trials on Ray Tune is the shared trainable (``slimray.sweep.trials``), through ``ClassifierRecipe.measure_steps``.
"""

from __future__ import annotations

import fcntl
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from slimray.compress import memprobe
from slimray.compress.export import check_outputs
from slimray.compress.measure import latency_ms, peak_memory_bytes
from slimray.compress.prune import prune
from slimray.compress.quantize import QUANTIZE_AT_LOAD, quantize
from slimray.compress.runtime import ONNX_FILE, OrtModel, compile_model, onnx_for
from slimray.evaluation import EvalConfig, load_metric
from slimray.families.classifier.artifacts import ArtifactSpec, artifact_bytes, load_artifact, load_runnable, save_artifact
from slimray.families.classifier.explain import explain
from slimray.families.classifier.kd import finetune
from slimray.families.classifier.spec import count_params, spec_from_model
from slimray.storage import reusable

PENALTY_PER_POINT = 1000.0  # objective units (ms) lost per accuracy point below the floor
NUM_GRADIENT_BATCHES = 8  # labelled batches the taylor criterion accumulates gradients over


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


def pruned(ctx: dict[str, Any], data: dict[str, Any], search: Any, ratio: float, *, epochs: int):
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


def save_trial(out: Path, model, qmodel, spec, search: Any, *, method: str, runtime: str, example, calib) -> None:
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


def compression_steps(key: str, data: dict[str, Any], *, search: Any, ctx: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One trial: prune, then after every fine-tune epoch quantize, save, score and yield a row (the epochs are ASHA's
    budget); size, memory and latency measured at the first. ``data``: the arrays (``x_train``, ``y_train``,
    ``teacher_logits``, ``x_val``, ``y_val``) and ``timing`` (``with data["timing"](key):`` holds the sweep's timing
    lock); ``search``: the run's search section; ``ctx``: ``run_dir``, ``base_model_dir``, ``candidates`` (key -> (prune
    ratio, quantization, runtime)), ``temperature``, ``alpha``, ``seed``, ``accuracy_floor``, ``evaluation``,
    ``code_dir``. A failure is a row too (``status`` error, with the stage and a line of advice)."""
    t_start = time.perf_counter()
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
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
            model, spec = pruned(ctx, data, search, ratio, epochs=epoch)
            stage = "quantize"
            qmodel = quantize(model, qspec, calibration=calib) if runtime != "onnxruntime" else model
            stage = "export" if runtime == "onnxruntime" else "quantize"
            save_trial(out, model, qmodel, spec, search, method=method, runtime=runtime, example=example, calib=calib)
            if not fixed:  # size, memory and latency do not change with more fine-tuning: measure once
                stage = "memory_probe"
                if search.space.device == "cuda":
                    peak, _ = peak_memory_bytes(lambda: load_and_run(out, example, num_threads=search.num_threads), device="cuda")
                else:  # in a fresh process: this one's allocator still holds what fine-tuning freed
                    peak = memprobe.probe(out, loader="slimray.families.classifier.artifacts:load_runnable", input_shape=spec.input.shape,
                                          batch_size=search.serving_batch_size, num_threads=search.num_threads)
                stage = "timing"
                with data["timing"](key):
                    runnable = load_and_run(out, example, num_threads=search.num_threads)
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
                runnable = load_and_run(out, example, num_threads=search.num_threads)
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


def load_and_run(path: Path, example: torch.Tensor, *, num_threads: int):
    model, _ = load_runnable(path, num_threads=num_threads)
    with torch.inference_mode():
        model(example)
    return model


def in_runtime(teacher: torch.nn.Module, runtime: str, example: torch.Tensor, *, num_threads: int) -> torch.nn.Module:
    """An fp32 model (the teacher) in another runtime, to tell what the runtime bought from what compression bought."""
    if runtime == "onnxruntime":
        return OrtModel(onnx_for(teacher, example, method="none"), num_threads=num_threads)
    if runtime == "torch_compile":
        return compile_model(teacher)
    return teacher
