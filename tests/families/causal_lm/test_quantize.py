"""Quantized variants stay close to float on a tiny model, keep_float leaves the named projections alone, and the
original model is untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimray.families.causal_lm.evaluate import perplexity
from slimray.families.causal_lm.quantize import TokenInt8Linear, linear_names, quantize_lm
from slimray.families.causal_lm.runtime import greedy_decode, make_session


def test_token_int8_linear_matches_float():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    q = TokenInt8Linear(lin)
    for rows in (1, 5, 40):
        x = torch.randn(rows, 64)
        x[0] *= 50  # an outlier token must not spoil the others' scales
        ref = lin(x)
        rel = ((q(x) - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
        assert rel < 0.03, rows


def test_token_int8_float_summed_path_gives_the_int_mm_result(monkeypatch):
    """CPUs without int8 dot products sum the same integer products in float32: the same W8A8 numbers."""
    from slimray.families.causal_lm import quantize

    assert isinstance(quantize.int_mm_is_fast(), bool)  # the probe runs on this CPU
    torch.manual_seed(0)
    q = TokenInt8Linear(nn.Linear(256, 96))
    x = torch.randn(3, 40, 256)
    out = {}
    for fast in (True, False):
        monkeypatch.setattr(quantize, "int_mm_is_fast", lambda fast=fast: fast)
        out[fast] = q(x)
    assert out[True].shape == out[False].shape == (3, 40, 96)
    assert torch.allclose(out[True], out[False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["bf16", "dynamic_int8", "token_int8", "torchao_int8_weight_only"])
def test_methods_keep_quality(tiny_model, tiny_windows, method):
    base = perplexity(tiny_model, tiny_windows[:4])
    q = quantize_lm(tiny_model, method=method)
    assert perplexity(q, tiny_windows[:4]) == pytest.approx(base, rel=0.05)
    assert isinstance(tiny_model.model.layers[0].mlp.down_proj, nn.Linear)  # the original is untouched
    ids = tiny_windows[:1, :8]
    out = greedy_decode(make_session(q, "hf_eager", max_cache_len=32), ids, num_new_tokens=4)
    assert out.shape == (1, 4)


def test_keep_float(tiny_model):
    names = linear_names(tiny_model, keep_float=["*.down_proj", "lm_head"])
    assert "lm_head" not in names and not any(n.endswith("down_proj") for n in names)
    q = quantize_lm(tiny_model, method="token_int8", keep_float=["*.down_proj", "lm_head"])
    assert isinstance(q.model.layers[0].mlp.down_proj, nn.Linear) and isinstance(q.lm_head, nn.Linear)
    assert isinstance(q.model.layers[0].mlp.up_proj, TokenInt8Linear)
    assert q.lm_head.weight is q.model.embed_tokens.weight  # still tied when lm_head stays float
    q2 = quantize_lm(tiny_model, method="dynamic_int8", keep_float=["model.layers.0.*"])
    assert isinstance(q2.model.layers[0].self_attn.q_proj, nn.Linear)
    assert not isinstance(q2.model.layers[1].self_attn.q_proj, nn.Linear)
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_lm(tiny_model, method="int3")


def test_int4_weight_only_close_to_float(tiny_model):
    """4-bit grouped weights through torch's CPU int4 kernel (bf16 activations): the Linear layers replaced (not the
    300-token lm_head: the packing needs outputs in multiples of 16), logits close."""
    from slimray.families.causal_lm.quantize import Int4WeightOnlyLinear, quantize_lm

    q = quantize_lm(tiny_model, method="int4_weight_only")
    assert isinstance(q.model.layers[0].mlp.down_proj, Int4WeightOnlyLinear) and isinstance(q.lm_head, nn.Linear)
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, got = tiny_model(ids).logits, q(ids).logits
    assert got.dtype == ref.dtype and ((got - ref).norm() / ref.norm()) < 0.25  # random weights: 4 bits cost ~10%/layer
    # one layer against its own dequantized weights (min-max over each group of 32 and zero, an integer zero point
    # zp in -8..7, w = (q - zp) * scale with q in -8..7: compressed-tensors' asymmetric W4A16): bf16-activation exact
    lin = nn.Linear(64, 48, bias=True)
    q4 = Int4WeightOnlyLinear(lin)
    wg = lin.weight.detach().reshape(48, 2, 32)
    lo, hi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15
    zp = (-lo / scale).round().sub(8).clamp(-8, 7)
    deq = (((wg / scale + zp).round().clamp(-8, 7) - zp) * scale).reshape(48, 64)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        want = x.bfloat16().float() @ deq.t() + lin.bias
        assert torch.allclose(q4(x), want, atol=0.05 * want.abs().max().item())


def test_lm_methods_are_the_registry_s():
    """The causal LM's methods, GPU-only ones and config type are read from the one registry: a method registered for
    the family is accepted by its search config; one of another family is refused, naming it."""
    from pydantic import ValidationError

    from slimray.compress.quantize import _QUANTIZERS, quant_methods, register_quantizer
    from slimray.families.causal_lm import quantize as q
    from slimray.families.causal_lm.config import LMSearchConfig

    assert q.QUANT_METHODS == tuple(quant_methods("causal_lm")) and set(q.GPU_QUANT_METHODS) < set(q.QUANT_METHODS)
    assert LMSearchConfig(quant_methods=["token_int8"]).quant_methods == ["token_int8"]
    with pytest.raises(ValidationError, match="unknown quantization 'static_int8' for causal_lm"):
        LMSearchConfig(quant_methods=["static_int8"])  # a classifier method
    register_quantizer("halved_lm", family="causal_lm")(lambda model, spec, calibration, **o: model)
    try:
        assert LMSearchConfig(quant_methods=["halved_lm"]).quant_methods == ["halved_lm"]
    finally:
        del _QUANTIZERS[("halved_lm", "causal_lm")]
