"""Transformers through pruning, int8 and ONNX: ``nn.TransformerEncoder`` (fused fast path in eval) and a
timm-style attention block (one ``qkv`` linear, ``num_heads`` / ``head_dim`` attributes)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimray.compress.export import check_outputs, onnx_bytes
from slimray.compress.prune import PruneSpec, attention_heads, prune
from slimray.compress.quantize import QuantSpec, quantize
from slimray.compress.runtime import OrtModel
from slimray.families.classifier.usermodule import apply_structure, structure_changes


class EncoderNet(nn.Module):
    def __init__(self, dim: int = 44, heads: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, stride=2)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.encoder(self.patch(x).flatten(2).transpose(1, 2) + self.pos).mean(1))


class QKVAttention(nn.Module):
    """timm's Attention, reduced: qkv -> (3, heads, head_dim) -> softmax attention -> proj."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_dim = dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim**-0.5, dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, self.attn_dim))


class QKVNet(nn.Module):
    def __init__(self, dim: int = 48, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = QKVAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x.reshape(len(x), 8, 8))
        t = t + self.attn(self.norm(t))
        return self.head((t + self.mlp(t)).mean(1))


X = torch.rand(32, 1, 8, 8)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.3, 0.5])
def test_encoder_pruning_removes_channels_from_every_head_alike(ratio):
    torch.manual_seed(0)
    net = EncoderNet().eval()
    pruned = prune(copy.deepcopy(net).train(), PruneSpec(ratio=ratio), example_inputs=X[:1]).eval()
    for layer in pruned.encoder.layers:
        attn = layer.self_attn
        assert attn.embed_dim < 44 and attn.embed_dim % attn.num_heads == 0 and attn.head_dim * attn.num_heads == attn.embed_dim
    with torch.inference_mode():
        assert pruned(X).shape == (32, 10)
    # the structure is recorded as data and rebuilds the same network (what a derived student's artifact holds)
    attrs, shapes = structure_changes(net, pruned)
    rebuilt = apply_structure(EncoderNet(), attrs, shapes)
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt.eval()(X), pruned(X))


def test_qkv_attention_keeps_its_heads_and_its_attributes_follow():
    torch.manual_seed(0)
    net = QKVNet().eval()
    assert list(attention_heads(net).values()) == [4]
    pruned = prune(copy.deepcopy(net).train(), PruneSpec(ratio=0.25), example_inputs=X[:1]).eval()
    a = pruned.attn
    assert a.qkv.out_features < 3 * 48 and a.num_heads == 4
    assert a.qkv.out_features == 3 * a.num_heads * a.head_dim and a.attn_dim == a.num_heads * a.head_dim == a.proj.in_features
    with torch.inference_mode():
        assert pruned(X).shape == (32, 10)


def test_fused_encoder_exports_to_onnx_with_the_same_outputs():
    net = EncoderNet().eval()
    check = check_outputs(net, OrtModel(onnx_bytes(net, X)), X)
    assert check["max_abs_diff"] < 1e-4 and check["class_agreement"] == 100.0
    assert torch.backends.mha.get_fastpath_enabled()  # turned back on after the export


def test_dynamic_int8_encoder_runs_in_eval_mode():
    net = EncoderNet().eval()
    q = quantize(net, QuantSpec(method="dynamic_int8"))
    with torch.inference_mode():
        assert torch.isfinite(q(X)).all()
