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

A quantization is a config object (``QuantSpec``: the method and its options, JSON round trip) and a handler
in one registry keyed by (method, model family), torchao's ``quantize_(model, Config)`` style, for every family (the
sentence encoder's and the causal LM's handlers register from their own folders, with ``family=``): a new method is
one ``@register_quantizer("name")`` function; configs, artifacts and sweeps accept exactly the registered methods of
their family (``method_type(family)``, ``quant_methods(family)``) and refuse others at load, naming the field.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, Field
from torch import nn

from slimray.schema import StrictModel


@dataclass(frozen=True)
class Quantizer:
    """One registered quantization: ``fn(model, spec, calibration, **options)`` returns the quantized model (it
    may change ``model``, which ``quantize`` has already copied). ``at_load``: its artifacts keep float weights
    and are quantized again when loaded (tensor subclasses that safetensors cannot hold)."""

    method: str
    family: str
    fn: Callable[..., nn.Module]
    at_load: bool = False
    gpu_only: bool = False  # needs a model on CUDA (its handler refuses another device)


_QUANTIZERS: dict[tuple[str, str], Quantizer] = {}


def register_quantizer(method: str, *, family: str = "classifier", at_load: bool = False, gpu_only: bool = False):
    """Decorator: ``fn(model, spec, calibration, **options)`` quantizes ``family``'s models with ``method``."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _QUANTIZERS[(method, family)] = Quantizer(method, family, fn, at_load, gpu_only)
        return fn

    return add


def quant_methods(family: str | None = "classifier", *, gpu_only: bool | None = None) -> list[str]:
    """The methods registered for ``family`` (``None``: for any family), in registration order; ``gpu_only`` filters."""
    out = [m for (m, f), q in _QUANTIZERS.items() if (family is None or f == family) and gpu_only in (None, q.gpu_only)]
    return list(dict.fromkeys(out))


def quantizer(method: str, family: str = "classifier") -> Quantizer:
    try:
        return _QUANTIZERS[(method, family)]
    except KeyError:
        raise ValueError(f"unknown quantization {method!r} for {family} models; known: {', '.join(quant_methods(family))}") from None


#: former names, read as the method they name now (a config or an artifact written with them still loads)
ALIASES = {"fp8": "fp8_dynamic"}


def check_method(method: str, family: str | None = "classifier") -> str:
    """``method`` as registered for ``family`` (a former name read as its current one); ``None``: for any family."""
    method = ALIASES.get(method, method)
    if family is None:
        if method not in quant_methods(None):
            raise ValueError(f"unknown quantization {method!r}; known: {', '.join(quant_methods(None))}")
        return method
    quantizer(method, family)
    return method


def method_type(family: str | None) -> Any:
    """The config type of a family's quantization field: a string checked against the registry at load."""
    return Annotated[str, AfterValidator(lambda m: check_method(m, family))]


QuantMethod = method_type("classifier")


class QuantSpec(StrictModel):
    """A quantization as a config object: the method (registered for some family; ``quantize`` checks it against the
    model's) and the int8 options of the classifier's torch.ao methods."""

    method: Annotated[str, AfterValidator(lambda m: check_method(m, None))] = "none"
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


def quantize(model: nn.Module, spec: QuantSpec, *, calibration: Iterable[torch.Tensor] | None = None,
             family: str = "classifier", inplace: bool = False, **options: Any) -> nn.Module:
    """Return a quantized copy of ``model`` (in eval mode); ``model`` itself is left as it was, unless ``inplace`` (a
    loader's own model: the copy would double the float model's memory). ``calibration`` yields input batches
    (already normalised); required for ``static_int8``. ``options`` go to the family's handler (e.g. ``keep_float``)."""
    q = quantizer(spec.method, family)
    return q.fn((model if inplace else copy.deepcopy(model)).eval(), spec, calibration, **options).eval()


@register_quantizer("none")
def _none(model: nn.Module, spec: QuantSpec, calibration: Any) -> nn.Module:
    return model


@register_quantizer("bf16")
def _bf16(model: nn.Module, spec: QuantSpec, calibration: Any) -> nn.Module:
    return HalfModel(model, torch.bfloat16)


@register_quantizer("fp16")
def _fp16(model: nn.Module, spec: QuantSpec, calibration: Any) -> nn.Module:
    return HalfModel(model, torch.float16)


TORCHAO_INT4_GROUP_SIZE = 128


def torchao_config(method: str):
    """The torchao config object of a method name, one place for every family (``quantize_(model, config)``):
    ``torchao_int8_weight_only``, ``torchao_int8_dynamic``, and the GPU-only ``fp8_weight_only``, ``fp8_dynamic``
    (per-row scales: per-token activations, per-channel weights; compute capability >= 8.9) and
    ``torchao_int4_weight_only`` (the tinygemm CUDA kernel's tile-packed format)."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, PerRow)

    table = {
        "torchao_int8_weight_only": Int8WeightOnlyConfig,
        "torchao_int8_dynamic": Int8DynamicActivationInt8WeightConfig,
        "fp8_weight_only": Float8WeightOnlyConfig,
        "fp8_dynamic": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        "torchao_int4_weight_only": lambda: Int4WeightOnlyConfig(group_size=TORCHAO_INT4_GROUP_SIZE,
                                                                 int4_packing_format="tile_packed_to_4d"),
    }
    if method not in table:
        raise ValueError(f"{method!r} has no torchao config; one of {sorted(table)}")
    return table[method]()


@register_quantizer("torchao_int8_dynamic", at_load=True)
@register_quantizer("torchao_int8_weight_only", at_load=True)
@register_quantizer("fp8_dynamic", at_load=True)
def _torchao(model: nn.Module, spec: QuantSpec, calibration: Any) -> nn.Module:
    from torchao.quantization import quantize_

    if spec.method.startswith("fp8") and (not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)):
        raise ValueError("fp8 needs a CUDA GPU with compute capability 8.9 or newer")
    quantize_(model, torchao_config(spec.method))
    return model


@register_quantizer("dynamic_int8")
def _dynamic_int8(model: nn.Module, spec: QuantSpec, calibration: Any) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.backends.quantized.engine = "x86" if spec.backend == "x86" else spec.backend
        return _unfused_encoder_layers(torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8))


def _unfused_encoder_layers(model: nn.Module) -> nn.Module:
    """Keep ``nn.TransformerEncoderLayer`` off its fused eval fast path once its linears are int8 modules: the
    fused kernel takes float weight tensors (an int8 module's ``weight`` is a method, and the fast-path check
    fails on it). The layer then runs its ordinary path, which calls the int8 linears."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and not isinstance(m.linear1.weight, torch.Tensor):
            m.activation_relu_or_gelu = 0  # the attribute the fast path requires; the plain path uses ``activation``
    return model


@register_quantizer("static_int8")
def _static_int8(model: nn.Module, spec: QuantSpec, calibration: Iterable[torch.Tensor] | None) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if calibration is None:
        raise ValueError("static_int8 needs calibration batches")
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ValueError("static_int8 needs at least one calibration batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.backends.quantized.engine = "x86" if spec.backend == "x86" else spec.backend
        prepared = prepare_fx(model, get_default_qconfig_mapping(spec.backend), example_inputs=(first,))
        with torch.inference_mode():
            prepared(first)
            for i, batch in enumerate(batches, start=1):
                if i >= spec.num_calibration_batches:
                    break
                prepared(batch)
        return convert_fx(prepared)


# methods whose (classifier) artifacts keep float weights and re-quantize at load
QUANTIZE_AT_LOAD = frozenset(m for (m, f), q in _QUANTIZERS.items() if f == "classifier" and q.at_load)
