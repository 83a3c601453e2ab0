"""Runtimes a compressed model can run in, and which (device, runtime, quantization) combinations work.

- ``torch``: eager PyTorch (the teacher "as given").
- ``torch_compile``: ``torch.compile`` (inductor, weights frozen for inference); compiling costs seconds
  per model and per new batch shape, so the first calls are warm-up.
- ``onnxruntime``: the float model exported to ONNX (dynamic batch), run by an ONNX Runtime session with
  its threads fixed at creation (the replica's CPUs); quantization ``static_int8`` here means ONNX
  Runtime's own QDQ int8 with calibration on real batches, not torch's int8 modules. On a GPU replica the
  session uses the CUDA execution provider.

``unsupported_reason`` is the single table of what can run where; the config uses it to reject settings a
device cannot run and to drop impossible combinations from a search space at load time.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from slimray.compress.export import INPUT_NAME, onnx_bytes
from slimray.schema import StrictModel

RuntimeName = Literal["torch", "torch_compile", "onnxruntime"]
Device = Literal["cpu", "cuda"]
ONNX_FILE = "model.onnx"

# quantization methods each device's kernels can run (eager torch)
DEVICE_METHODS: dict[str, set[str]] = {
    "cpu": {"none", "dynamic_int8", "static_int8", "bf16", "torchao_int8_dynamic"},
    "cuda": {"none", "fp16", "bf16", "torchao_int8_weight_only", "fp8_dynamic"},
}
# quantization methods each runtime can apply, per device
RUNTIME_METHODS: dict[tuple[str, str], set[str]] = {
    ("cpu", "torch"): {"none", "dynamic_int8", "static_int8", "bf16"},
    ("cpu", "torch_compile"): {"none", "bf16", "torchao_int8_dynamic"},
    ("cpu", "onnxruntime"): {"none", "static_int8"},
    ("cuda", "torch"): {"none", "fp16", "bf16", "torchao_int8_weight_only", "fp8_dynamic"},
    ("cuda", "torch_compile"): {"none", "fp16", "bf16", "torchao_int8_weight_only", "fp8_dynamic"},
    ("cuda", "onnxruntime"): {"none"},
}


class RuntimeSpec(StrictModel):
    name: RuntimeName = "torch"


def unsupported_reason(*, device: str, runtime: str, method: str) -> str | None:
    """Why ``method`` cannot run in ``runtime`` on ``device``; ``None`` when it can."""
    if method not in DEVICE_METHODS[device]:
        return f"quantization {method!r} has no {device} kernels (on {device}: {sorted(DEVICE_METHODS[device])})"
    if method not in RUNTIME_METHODS[(device, runtime)]:
        return f"runtime {runtime!r} cannot run quantization {method!r} on {device} (it runs {sorted(RUNTIME_METHODS[(device, runtime)])})"
    if runtime == "torch_compile" and device == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        return "torch.compile on CPU needs a C++ compiler (none found on PATH)"
    return None


class OrtModel(nn.Module):
    """An ONNX Runtime session behind the ``nn.Module`` call interface (float32 tensors in and out)."""

    def __init__(self, onnx_model: bytes | str | Path, *, num_threads: int = 1, device: str = "cpu"):
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        src = str(onnx_model) if isinstance(onnx_model, Path) else onnx_model
        self.session = ort.InferenceSession(src, sess_options=opts, providers=providers)
        self.num_threads = num_threads
        self.providers = self.session.get_providers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: arr})[0])


def quantize_onnx_static(model_bytes: bytes, calibration: Iterable[torch.Tensor], *, per_channel: bool = True) -> bytes:
    """ONNX Runtime static int8 (QDQ format, int8 weights per channel, uint8 activations) calibrated on batches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [b.float().numpy() for b in calibration]
    if not batches:
        raise ValueError("static int8 in ONNX Runtime needs at least one calibration batch")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self):
            b = next(self._it, None)
            return None if b is None else {INPUT_NAME: b}

    with tempfile.TemporaryDirectory(prefix="slimray-ortq-") as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("float.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(model_bytes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            except Exception:  # pre-processing only helps; quantize the raw graph if it fails
                shutil.copy(src, pre)
            quantize_static(
                str(pre), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            )
        return dst.read_bytes()


def onnx_for(model: nn.Module, example: torch.Tensor, *, method: str, calibration: Iterable[torch.Tensor] | None = None) -> bytes:
    """The ONNX graph that runtime ``onnxruntime`` runs for quantization ``method`` (float model in)."""
    graph = onnx_bytes(model, example)
    if method == "none":
        return graph
    if method == "static_int8":
        if calibration is None:
            raise ValueError("static_int8 needs calibration batches")
        return quantize_onnx_static(graph, calibration)
    raise ValueError(f"onnxruntime cannot apply quantization {method!r}")


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile`` for inference: inductor with frozen weights (the first calls compile)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(copy.deepcopy(model).eval(), dynamic=False)


def as_numpy_logits(out: torch.Tensor | np.ndarray) -> np.ndarray:
    return out if isinstance(out, np.ndarray) else out.detach().float().cpu().numpy()
