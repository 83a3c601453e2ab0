"""Scoring a model: accuracy on held-out data, bytes on disk, latency.

Latency is the median of repeated timed forward passes after warm-up, with torch's thread count fixed
for the measurement, at each requested batch size. Peak memory is the growth of the process's peak
resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) while a model is loaded and run;
on a GPU, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent."""
    pred = predict_logits(model, x, batch_size=batch_size).argmax(1)
    return 100.0 * (pred == y).float().mean().item()


@torch.inference_mode()
def latency_ms(
    model: nn.Module,
    example: torch.Tensor,
    *,
    batch_size: int,
    num_threads: int = 1,
    num_warmup: int = 5,
    num_repeats: int = 30,
    min_seconds: float = 0.0,
) -> float:
    """Median wall time of one forward pass on ``batch_size`` rows of ``example`` (repeated to size)."""
    model.eval()
    reps = -(-batch_size // len(example))
    x = example.repeat(reps, *([1] * (example.dim() - 1)))[:batch_size].contiguous()
    with torch_threads(num_threads):
        for _ in range(num_warmup):
            model(x)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < num_repeats or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def compare_latency(
    models: dict[str, nn.Module],
    example: torch.Tensor,
    *,
    batch_sizes: list[int],
    num_threads: int = 1,
    num_rounds: int = 7,
    runs_per_round: int = 10,
) -> dict[str, dict[int, float]]:
    """Time several models side by side: rounds interleave the models, so drift hits all of them alike.

    Returns the median per-forward milliseconds for every model and batch size.
    """
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batch_sizes} for name in models}
    inputs = {}
    for b in batch_sizes:
        reps = -(-b // len(example))
        inputs[b] = example.repeat(reps, *([1] * (example.dim() - 1)))[:b].contiguous()
    with torch.inference_mode(), torch_threads(num_threads):
        for m in models.values():
            m.eval()
            for b in batch_sizes:
                for _ in range(3):
                    m(inputs[b])
        for _ in range(num_rounds):
            for name, m in models.items():
                for b in batch_sizes:
                    for _ in range(runs_per_round):
                        t0 = time.perf_counter()
                        m(inputs[b])
                        times[name][b].append(time.perf_counter() - t0)
    return {name: {b: 1e3 * statistics.median(v) for b, v in per.items()} for name, per in times.items()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_bytes(run: Callable[[], Any], *, device: str = "cpu") -> tuple[int | None, Any]:
    """Peak memory ``run()`` adds on top of what the process held before; returns (bytes, run's result).

    CPU: peak resident set growth (Linux only; ``None`` where ``/proc/self/clear_refs`` cannot be written).
    CUDA: peak allocated bytes of torch's caching allocator during ``run``.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = run()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base), out
    try:
        base = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, KeyError):
        return None, run()
    out = run()
    return max(0, _status_kb("VmHWM") - base) * 1024, out
