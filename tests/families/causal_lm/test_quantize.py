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
