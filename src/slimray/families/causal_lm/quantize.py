"""Post-training quantization of causal LMs (pure torch, no ray): int8 with sensitive projections kept in float,
torchao int8 weight-only / dynamic, and bf16. Each method is a handler in the one quantization registry
(``slimray.compress.quantize``, family ``causal_lm``); ``QUANT_METHODS``, ``GPU_QUANT_METHODS`` and the config type
``QuantMethod`` are read from it, and ``quantize_lm`` applies one through it.

Methods (``QUANT_METHODS``):
- ``dynamic_int8``: ``torch.ao.quantization.quantize_dynamic`` on the Linear layers (int8 weights, per output
  channel by default; activations quantized dynamically per call, i.e. one scale per input tensor; at batch-1
  decode that is one scale per token). ``keep_float`` names Linear layers (fnmatch patterns on module names, e.g.
  ``"*.down_proj"``, ``"lm_head"``, ``"model.layers.0.*"``) left in float32.
- ``token_int8``: int8 weights per output channel and activations per token (one scale per row), with
  ``torch._int_mm`` for multi-token inputs and the quantize_dynamic kernel for single tokens (where per-tensor
  is per-token); same ``keep_float``. ``torch._int_mm`` is fast only where the CPU has int8 dot-product
  instructions (AVX512-VNNI / AMX); on an AVX2-only CPU (the AMD EPYC these sessions moved to) it measured 50-150x
  *slower* than a float32 matmul (a 256 x 576 by 576 x 49,152 LM head: 35 s against 0.4 s). :func:`int_mm_is_fast`
  measures this once per process; where it is slow the same integer products are summed by a float32 matmul
  (the weight dequantized per call), so the numerics stay W8A8 and no CPU hits the slow loop.
- ``torchao_int8_weight_only`` / ``torchao_int8_dynamic``: torchao's configs (per-token activations for the
  dynamic one); in eager mode these were slower than fp32 here (issue #17).
- ``bf16``: the whole model cast to bfloat16 (helps prefill and batching on AVX512-BF16 CPUs).
- ``int4_weight_only``: ``Int4WeightOnlyLinear``: 4-bit weights (asymmetric, one scale and zero per group of
  ``INT4_GROUP_SIZE`` inputs) in torch's CPU int4 layout, bf16 activations, ``torch._weight_int4pack_mm_for_cpu``
  (a CPU kernel in torch itself; torchao 0.18's Int4WeightOnlyConfig found no CPU packing format here);
  ``keep_float`` as for int8. Layers whose input size is not a multiple of the group size, or whose output size is
  not a multiple of 16 (the packing's tile), stay float.

GPU-only (``GPU_QUANT_METHODS``; ``quantize_lm`` raises ``sparsity.NeedsGPUError`` for a model not on CUDA, and the
search config refuses them, its trials run on CPU; written the standard torchao way, not run on the CPU box):
- ``fp8_weight_only``: torchao ``Float8WeightOnlyConfig`` (float8_e4m3 weights, bf16 activations);
- ``fp8_dynamic``: ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` (per-token activation and
  per-channel weight scales; needs compute capability >= 8.9);
- ``torchao_int4_weight_only``: ``Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")``
  (the tinygemm CUDA kernel; the default "plain" format needs the extra mslk / fbgemm-gpu-genai kernels).
``gpu_quant_config(method)`` builds the config object (importable and testable on CPU).

int4: the SmolLM2 teacher was stored 4-bit (GGUF Q4_1) and dequantized, so int4 on it looks nearly lossless;
say so wherever int4 is reported.

Measured on the SmolLM2 teacher (30 layers; ``bench/llm_notes.md``; perplexity on 8 held-out windows of 256,
fp32 17.40; speeds fastest of 7 interleaved rounds, 1 thread, on a loaded shared 2-core box, so +-30%):
``dynamic_int8`` all layers ppl 62.3 (prefill 1304 tok/s, decode b1 54.7 tok/s); keeping ``*.down_proj`` in float
21.9 (696, 41.5); ``token_int8`` all layers 17.95 (1091, 44.2); ``token_int8`` with ``lm_head`` float 17.78
(982, 31.2); ``torchao_int8_weight_only`` 17.30 (250, 9.6); ``bf16`` 17.40 (982, 25.6); fp32 17.40 (352, 19.2).
Per-token activation scales are what keeps quality: ``token_int8`` is the default int8 to offer.
"""

from __future__ import annotations

import functools
import fnmatch
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimray.compress.quantize import QuantSpec, method_type, quant_methods, quantize, register_quantizer, torchao_config

FAMILY = "causal_lm"
INT4_GROUP_SIZE = 32


def linear_names(model: nn.Module, *, keep_float: Sequence[str] = ()) -> list[str]:
    """Names of the Linear layers to quantize: all but those matching a ``keep_float`` pattern."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(fnmatch.fnmatchcase(name, p) for p in keep_float)]


def untie_lm_head(model: nn.Module) -> None:
    # quantizing lm_head must not touch the embedding it is tied to: give lm_head its own weight
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False


def _qengine() -> None:
    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = "x86" if "x86" in engines else ("fbgemm" if "fbgemm" in engines else engines[0])


@functools.cache
def int_mm_is_fast() -> bool:
    """Whether ``torch._int_mm`` beats a float32 matmul of the same shape on this CPU (best of 3, once per process;
    ~10-30 ms). False on CPUs without int8 dot-product instructions, where torch runs a reference loop."""
    a = torch.randint(-127, 128, (64, 512), dtype=torch.int8)
    b = torch.randint(-127, 128, (512, 512), dtype=torch.int8)
    af, bf = a.float(), b.float()

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    return best(lambda: torch._int_mm(a, b)) < best(lambda: af @ bf)


class TokenInt8Linear(nn.Module):
    """int8 Linear with per-output-channel weight scales and per-token (per-row) activation scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-8) / 127.0
        q = w / scale[:, None]  # one float temporary (in-place rounding): loaders build these layer by layer
        self.register_buffer("weight_t", q.round_().clamp_(-127, 127).to(torch.int8).t().contiguous())
        del q
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.device("meta"):  # no weights of its own: it shares the float ones until they are packed
            single = nn.Linear(self.in_features, self.out_features, bias=linear.bias is not None)
        single.weight = nn.Parameter(w, requires_grad=False)
        if linear.bias is not None:
            single.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.single = quantize_linear(single, method="dynamic_int8")  # the one-token kernel (per-channel weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if x2.shape[0] == 1:
            return self.single(x2).reshape(*shape[:-1], self.out_features).to(x.dtype)
        s = x2.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127.0
        q = (x2 / s).round().clamp(-127, 127).to(torch.int8)
        if int_mm_is_fast():
            rows = q.shape[0]
            if rows <= 16:  # _int_mm wants more than 16 rows
                q = torch.cat([q, q.new_zeros(17 - rows, q.shape[1])])
            acc = torch._int_mm(q, self.weight_t)[:rows].float()
        else:  # the same integer products, summed in float32 (exact below 2**24, which K * 127 * 127 rarely reaches)
            acc = q.float() @ self.weight_t.float()
        y = acc * s * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def int4_group_quantize(w: torch.Tensor, *, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [n, k]`` -> ``(q int32 [n, k] in 0..15, lo [n, k/group], scale [n, k/group])`` with ``w ~ q * scale + lo``
    per group of ``group_size`` inputs (asymmetric min-max: ``scale = (max - min) / 15``, and ``lo = -(zp + 8) *
    scale`` with an integer zero point ``zp`` in -8..7, the convention of compressed-tensors' W4A16, computed the
    way it computes codes: ``q - 8 = clamp(round(w / scale + zp), -8, 7)``), so the artifact's stored codes and
    this function agree exactly."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo).clamp(min=1e-8) / 15.0
    zp = (-lo / scale).round().sub(8).clamp(-8, 7)
    q = (wg / scale + zp).round().clamp(-8, 7).add(8).to(torch.int32).reshape(n, k)
    return q, (-(zp + 8) * scale)[..., 0], scale[..., 0]


def int4_linear_names(model: nn.Module, *, keep_float: Sequence[str] = ()) -> list[str]:
    """The Linear layers ``int4_weight_only`` replaces: not kept float, inputs a multiple of the group size,
    outputs a multiple of 16 (the CPU packing's tile)."""
    return [n for n in linear_names(model, keep_float=keep_float)
            if model.get_submodule(n).in_features % INT4_GROUP_SIZE == 0 and model.get_submodule(n).out_features % 16 == 0]


class Int4WeightOnlyLinear(nn.Module):
    """4-bit weight-only Linear: per group of ``group_size`` inputs, ``w = (q - 8) * scale + zero`` with ``q`` in
    0..15 (torch's tinygemm convention), packed by ``torch._convert_weight_to_int4pack_for_cpu``; activations run
    in bfloat16 through ``torch._weight_int4pack_mm_for_cpu`` (its float32 path was ~20x slower here)."""

    def __init__(self, linear: nn.Linear, *, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        w = linear.weight.detach().float()
        n, k = w.shape
        if k % group_size or n % 16:
            raise ValueError(f"in_features={k} must be a multiple of the int4 group size {group_size}, out_features={n} of 16")
        self._set_codes(*int4_group_quantize(w, group_size=group_size), group_size=group_size)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    @classmethod
    def from_codes(cls, q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, *, bias: torch.Tensor | None = None,
                   group_size: int = INT4_GROUP_SIZE) -> "Int4WeightOnlyLinear":
        """The layer of stored codes (``int4_group_quantize``'s ``q``, ``lo``, ``scale``), without a float weight."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._set_codes(q.to(torch.int32), lo.float(), scale.float(), group_size=group_size)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        return self

    def _set_codes(self, q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, *, group_size: int) -> None:
        zero = lo + 8 * scale  # torch's convention: w = (q - 8) * scale + zero
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16))
        self.out_features, self.in_features = q.shape
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.packed, self.group_size,
                                              self.scales_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


LAYERWISE_METHODS: tuple[str, ...] = ("token_int8", "int4_weight_only", "dynamic_int8")


def quantized_linear_names(model: nn.Module, *, method: str, keep_float: Sequence[str] = ()) -> list[str]:
    """The Linear layers ``method`` replaces in ``model`` (int4: those its packing takes; others: all not kept float)."""
    return int4_linear_names(model, keep_float=keep_float) if method == "int4_weight_only" else linear_names(model, keep_float=keep_float)


def quantize_linear(linear: nn.Linear, *, method: str, per_channel: bool = True) -> nn.Module:
    """One Linear as ``quantize_lm`` replaces it, for the ``LAYERWISE_METHODS`` (loaders quantize layer by layer so
    the whole float model never exists at once)."""
    if method == "token_int8":
        return TokenInt8Linear(linear)
    if method == "int4_weight_only":
        return Int4WeightOnlyLinear(linear)
    if method == "dynamic_int8":
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig if per_channel else torch.ao.quantization.default_dynamic_qconfig
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _qengine()
            return torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear: qconfig}, dtype=torch.qint8,
                                                          inplace=True)[0]  # swaps the module in the wrapper, no copy
    raise ValueError(f"{method!r} is not quantized layer by layer (one of {LAYERWISE_METHODS})")


def replace_modules(model: nn.Module, names: Sequence[str], make) -> None:
    """Replace each named submodule ``m`` of ``model`` by ``make(m)``."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))


def gpu_quant_config(method: str):
    """The torchao config object of a GPU-only ``method`` (the shared table: ``slimray.compress.quantize.torchao_config``)."""
    if method not in GPU_QUANT_METHODS:
        raise ValueError(f"{method!r} is not one of the GPU-only methods {GPU_QUANT_METHODS}")
    return torchao_config(method)


def _none(model: nn.Module, spec: QuantSpec, calibration: Any, **options: Any) -> nn.Module:
    return model


def _bf16(model: nn.Module, spec: QuantSpec, calibration: Any, **options: Any) -> nn.Module:
    return model.to(torch.bfloat16)


def _layerwise(model: nn.Module, spec: QuantSpec, calibration: Any, *, keep_float: Sequence[str] = (), per_channel: bool = True,
               **options: Any) -> nn.Module:
    if "lm_head" not in keep_float:
        untie_lm_head(model)
    replace_modules(model, quantized_linear_names(model, method=spec.method, keep_float=keep_float),
                    lambda linear: quantize_linear(linear, method=spec.method, per_channel=per_channel))
    return model


def _torchao_int8(model: nn.Module, spec: QuantSpec, calibration: Any, *, keep_float: Sequence[str] = (), **options: Any) -> nn.Module:
    from torchao.quantization import quantize_

    if keep_float:
        raise ValueError(f"keep_float is not supported with {spec.method}")
    untie_lm_head(model)
    quantize_(model, torchao_config(spec.method))
    return model


def _gpu(model: nn.Module, spec: QuantSpec, calibration: Any, *, keep_float: Sequence[str] = (), **options: Any) -> nn.Module:
    from torchao.quantization import quantize_

    from slimray.families.causal_lm.sparsity import NeedsGPUError

    device = next(model.parameters()).device
    if device.type != "cuda":
        raise NeedsGPUError(f"quant_method {spec.method!r} needs a GPU (CUDA): the model is on {device.type}")
    if keep_float:
        raise ValueError(f"keep_float is not supported with {spec.method}")
    untie_lm_head(model)
    quantize_(model.to(torch.bfloat16), gpu_quant_config(spec.method))
    return model


for _method, _fn in (("none", _none), ("bf16", _bf16), ("dynamic_int8", _layerwise), ("token_int8", _layerwise),
                    ("int4_weight_only", _layerwise), ("torchao_int8_weight_only", _torchao_int8),
                    ("torchao_int8_dynamic", _torchao_int8)):
    register_quantizer(_method, family=FAMILY)(_fn)
for _method in ("fp8_weight_only", "fp8_dynamic", "torchao_int4_weight_only"):
    register_quantizer(_method, family=FAMILY, gpu_only=True)(_gpu)

#: read from the registry (in the order registered above): what configs and artifacts accept
QUANT_METHODS: tuple[str, ...] = tuple(quant_methods(FAMILY))
GPU_QUANT_METHODS: tuple[str, ...] = tuple(quant_methods(FAMILY, gpu_only=True))
QuantMethod = method_type(FAMILY)


def quantize_lm(model: nn.Module, *, method: str, keep_float: Sequence[str] = (),
                per_channel: bool = True, inplace: bool = False) -> nn.Module:
    """A quantized copy of ``model`` (eval mode; ``model`` itself untouched unless ``inplace``: use that when
    loading for serving, the copy doubles the float model's memory), through the registry. Not saveable with
    safetensors except ``none``/``bf16``: store the float folder plus the method and re-quantize at load."""
    if method not in QUANT_METHODS:
        raise ValueError(f"unknown quantization method {method!r}; one of {QUANT_METHODS}")
    return quantize(model, QuantSpec(method=method), family=FAMILY, inplace=inplace, keep_float=tuple(keep_float),
                    per_channel=per_channel)
