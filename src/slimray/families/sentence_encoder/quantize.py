"""The sentence encoder's quantizations, registered in the one quantization registry
(``slimray.compress.quantize``, family ``sentence_encoder``): what configs, artifacts and the search accept.

``dynamic_int8``: Linear layers through torch.ao (per-channel int8 weights, activations quantized on the fly);
``bf16``: the whole encoder in bfloat16; ``torchao_int8_dynamic``: torchao int8 weights + int8 dynamic
activations on every Linear, run under ``torch.compile`` (inductor, frozen weights, dynamic shapes: one graph
for every batch size and sequence length), the path where torchao pays off on CPU. Compilation happens at the
first call (tens of seconds); ``compile=False`` gives the eager torchao model (same numbers, slower). Its
artifacts keep the float weights and are quantized again at load.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from slimray.compress.quantize import QuantSpec, method_type, register_quantizer

FAMILY = "sentence_encoder"
EncoderQuantMethod = method_type(FAMILY)


@register_quantizer("none", family=FAMILY)
def _none(model: nn.Module, spec: QuantSpec, calibration: Any, **options: Any) -> nn.Module:
    return model


@register_quantizer("bf16", family=FAMILY)
def _bf16(model: nn.Module, spec: QuantSpec, calibration: Any, **options: Any) -> nn.Module:
    from slimray.families.sentence_encoder.models import Bf16Encoder

    return Bf16Encoder(model)


@register_quantizer("dynamic_int8", family=FAMILY)
def _dynamic_int8(model: nn.Module, spec: QuantSpec, calibration: Any, **options: Any) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "x86"
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig  # per-channel weights: closer to fp32 on BERT
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8)


@register_quantizer("torchao_int8_dynamic", family=FAMILY, at_load=True)
def _torchao_int8_dynamic(model: nn.Module, spec: QuantSpec, calibration: Any, *, compile: bool = True, **options: Any) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    from slimray.families.sentence_encoder.models import compile_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return compile_encoder(model) if compile else model
