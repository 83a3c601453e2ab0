"""Post-training quantization: dynamic int8, static int8 with calibration, bf16/fp16, torchao int8/fp8.

- ``dynamic_int8``: Linear weights int8, activations quantized on the fly (``quantize_dynamic``).
- ``static_int8``: FX graph mode, per-channel int8 weights and activations calibrated on real batches;
  the one that speeds up convolutions (measured 4-6x on the MNIST CNN here).
- ``bf16`` / ``fp16``: weights and activations in bfloat16 / float16, inputs cast on the way in, logits
  returned as float32 (fp16 is a GPU setting).
- ``torchao_int8_dynamic``: torchao int8 dynamic activations + int8 weights; pays off on CPU only under
  ``torch.compile`` (runtime ``torch_compile``).
- ``torchao_int8_weight_only`` / ``fp8``: torchao weight-only int8 and float8 (dynamic activations) for
  GPUs (fp8 needs compute capability 8.9+, checked when the model is quantized).
  torchao tensors are tensor subclasses that safetensors cannot hold, so artifacts of these methods store
  the float weights and are quantized again at load (deterministic: same weights in, same int8 out).

``torch.ao.quantization`` warns it is deprecated in favour of torchao; torchao's int8 paths only pay off
under ``torch.compile`` on this CPU (see the project notes), so the eager FX path stays the default.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimray.schema import StrictModel

QuantMethod = Literal[
    "none", "dynamic_int8", "static_int8", "bf16", "fp16", "torchao_int8_dynamic", "torchao_int8_weight_only", "fp8"
]
# methods whose artifacts keep float weights and re-quantize at load
QUANTIZE_AT_LOAD = frozenset({"torchao_int8_dynamic", "torchao_int8_weight_only", "fp8"})


class QuantSpec(StrictModel):
    method: QuantMethod = "none"
    backend: Literal["x86", "fbgemm", "qnnpack"] = Field("x86", description="int8 kernel backend")
    num_calibration_batches: int = Field(16, ge=1, description="batches observed for static_int8")


class HalfModel(nn.Module):
    """Runs ``inner`` in a 16-bit float dtype; takes and returns float32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self.inner = inner.to(dtype)

    def forward(self, x):
        return self.inner(x.to(self.dtype)).float()


Bf16Model = HalfModel  # the name earlier artifacts' code used


def _torchao(model: nn.Module, method: str) -> nn.Module:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    if method == "fp8":
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
            raise ValueError("fp8 needs a CUDA GPU with compute capability 8.9 or newer")
        config = Float8DynamicActivationFloat8WeightConfig()
    elif method == "torchao_int8_weight_only":
        config = Int8WeightOnlyConfig()
    else:
        config = Int8DynamicActivationInt8WeightConfig()
    quantize_(model, config)
    return model


def quantize(model: nn.Module, spec: QuantSpec, *, calibration: Iterable[torch.Tensor] | None = None) -> nn.Module:
    """Return a quantized copy of ``model`` (in eval mode); ``model`` itself is left as it was.

    ``calibration`` yields input batches (already normalised); required for ``static_int8``.
    """
    model = copy.deepcopy(model).eval()
    if spec.method == "none":
        return model
    if spec.method in ("bf16", "fp16"):
        return HalfModel(model, torch.bfloat16 if spec.method == "bf16" else torch.float16).eval()
    if spec.method in QUANTIZE_AT_LOAD:
        return _torchao(model, spec.method).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.backends.quantized.engine = "x86" if spec.backend == "x86" else spec.backend
        if spec.method == "dynamic_int8":
            return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        if spec.method == "static_int8":
            from torch.ao.quantization import get_default_qconfig_mapping
            from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

            if calibration is None:
                raise ValueError("static_int8 needs calibration batches")
            batches = iter(calibration)
            first = next(batches, None)
            if first is None:
                raise ValueError("static_int8 needs at least one calibration batch")
            prepared = prepare_fx(model, get_default_qconfig_mapping(spec.backend), example_inputs=(first,))
            with torch.inference_mode():
                prepared(first)
                for i, batch in enumerate(batches, start=1):
                    if i >= spec.num_calibration_batches:
                        break
                    prepared(batch)
            return convert_fx(prepared).eval()
    raise AssertionError(f"unhandled quantization method {spec.method}")
