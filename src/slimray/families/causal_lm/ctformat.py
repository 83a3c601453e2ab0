"""compressed-tensors storage of int8 / int4 causal-LM artifacts (pure torch, no ray): the quantized-checkpoint
format llm-compressor writes and vLLM and ``transformers`` read, written with the ``compressed-tensors`` library.

- ``int8`` (``token_int8`` / ``dynamic_int8`` / torchao int8 methods): the ``W8A8`` scheme, ``int-quantized``
  format: each quantized Linear's ``weight`` as int8 ``[out, in]`` (symmetric, one scale per output channel,
  ``scale = max|w_row| / 127``: slimray's round-to-nearest rule) plus ``weight_scale`` ``[out, 1]``; activations
  declared dynamic per token (what ``token_int8`` does, and what vLLM's int8 kernels run).
- ``int4`` (``int4_weight_only``): the ``W4A16`` asymmetric scheme, ``pack-quantized`` format, one scale and one
  integer zero point per group of ``INT4_GROUP_SIZE`` inputs: ``weight_packed`` (eight 4-bit codes per int32),
  ``weight_scale``, ``weight_zero_point`` (packed), ``weight_shape``.

Layers kept float (``keep_float``, and layers the int4 packing cannot take) are listed in the config's ``ignore``
and stored as they are. ``config.json`` gets the ``quantization_config`` block the engines read. Writing goes
through the library's own path (``apply_quantization_config`` on a copy, slimray's scales set, ``ModelCompressor``
compresses and writes the config); reading (``compact_layers``) takes the codes back without dequantizing, so a
loader rebuilds slimray's modules one layer at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from slimray.families.causal_lm.quantize import INT4_GROUP_SIZE, int4_group_quantize

CT_FORMATS = {"int8": "int-quantized", "int4": "pack-quantized"}


def _scheme(storage: str):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if storage == "int8":
        return QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False),
            input_activations=QuantizationArgs(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True))
    assert storage == "int4", storage
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", strategy="group", group_size=INT4_GROUP_SIZE, symmetric=False, dynamic=False))


def write_compressed(model: nn.Module, folder: str | Path, *, storage: str, names: Sequence[str]) -> None:
    """``save_pretrained`` of ``model`` into ``folder`` with the Linear layers ``names`` quantized as ``storage``
    (``int8`` / ``int4``, see the module doc) in compressed-tensors; ``model`` itself is untouched. Returns whether
    ``lm_head`` was stored quantized (then the stored config is untied)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    m = copy.deepcopy(model).float().eval()
    names = set(names)
    if "lm_head" in names:
        raise ValueError("write_compressed: lm_head stays float in compressed-tensors storage")
    ignore = sorted(n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and n not in names)
    config = QuantizationConfig(config_groups={"group_0": _scheme(storage)}, ignore=ignore, quantization_status="frozen")
    apply_quantization_config(m, config)
    with torch.no_grad():
        for name in names:
            mod = m.get_submodule(name)
            w = mod.weight.detach().float()
            if storage == "int8":
                mod.weight_scale.copy_((w.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127.0).to(mod.weight_scale.dtype))
            else:
                _, lo, scale = int4_group_quantize(w, group_size=INT4_GROUP_SIZE)
                mod.weight_scale.copy_(scale.to(mod.weight_scale.dtype))
                # lo = -(zero_point + 8) * scale (int4_group_quantize keeps the zero point an integer)
                mod.weight_zero_point.copy_((-(lo / scale) - 8).round().to(mod.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(m, quantization_format=CT_FORMATS[storage])
    compressor.compress_model(m)
    m.save_pretrained(folder)
    compressor.update_config(str(folder))


def quantization_config(config: dict) -> dict | None:
    """The compressed-tensors ``quantization_config`` of a parsed ``config.json``, or None."""
    q = config.get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == "compressed-tensors" else None


def compact_layers(keys: Sequence[str], dtype_of) -> dict[str, str]:
    """``{module name: "int8" | "int4"}`` for the quantized Linear layers among a compressed-tensors file's ``keys``
    (``dtype_of(key)`` gives a key's safetensors dtype string, e.g. ``"I8"``)."""
    out: dict[str, str] = {}
    for key in keys:
        module, _, attr = key.rpartition(".")
        if attr == "weight_packed":
            out[module] = "int4"
        elif attr == "weight" and dtype_of(key) == "I8":
            out[module] = "int8"
    return out


SIDE_PARTS = ("weight_scale", "weight_zero_point", "weight_shape", "weight_packed")


def read_int8(stored, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 weight [out, in], float32 scale [out])`` of one ``int-quantized`` Linear."""
    return stored.get_tensor(f"{module}.weight"), stored.get_tensor(f"{module}.weight_scale").float().reshape(-1)


def read_int4(stored, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes int32 [out, in] in 0..15, lo [out, in/group], scale [out, in/group])`` of one ``pack-quantized``
    Linear, in ``int4_group_quantize``'s convention (``w = codes * scale + lo``)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = torch.Size(stored.get_tensor(f"{module}.weight_shape").tolist())
    scale = stored.get_tensor(f"{module}.weight_scale").float()
    q = unpack_from_int32(stored.get_tensor(f"{module}.weight_packed"), 4, shape).to(torch.int32)  # -8..7
    zp = unpack_from_int32(stored.get_tensor(f"{module}.weight_zero_point"), 4, torch.Size((shape[0], scale.shape[1])),
                           packed_dim=0).float()
    return q + 8, -(zp + 8) * scale, scale
