"""Structured pruning that really shrinks tensors, on torch-pruning's dependency graph.

Whole conv channels and hidden neurons are removed (the next layer's inputs with them, the flatten
between conv and linear included), so the pruned model is a smaller dense model that runs faster, and
``slimray.families.classifier.spec_from_model`` reads its new widths back into a spec.

Attention is pruned by heads' rules: an ``nn.MultiheadAttention`` (inside ``nn.TransformerEncoderLayer`` too)
ties its embedding width to the residual stream, so the channels removed from it are removed alike from
every head (each head keeps the same width and ``embed_dim`` stays a multiple of ``num_heads``); a timm-style
attention block (a ``qkv`` linear and a ``num_heads`` attribute) loses head dimensions the same way and its
``num_heads`` / ``head_dim`` / ``attn_dim`` are rewritten to match. Depthwise and grouped convolutions keep
their groups (torch-pruning's channel groups), LayerNorm and squeeze-excite follow their producers on the
dependency graph. ``attention_heads`` lists what the pruner treats as attention. The derived student and
every sweep ratio go through ``prune``, so they share these rules.

Importance: ``l1`` / ``l2`` rank channels by weight magnitude; ``taylor`` ranks them by the first-order
Taylor estimate of the loss change |w * dL/dw| (Molchanov et al.), accumulated over a few labelled
batches, so it needs ``gradient_batches``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch_pruning as tp
from pydantic import Field
from torch import nn

from slimray.schema import StrictModel


class PruneSpec(StrictModel):
    """Remove ``ratio`` of the channels of every prunable layer (the output layer is kept whole)."""

    ratio: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of channels/neurons removed per layer")
    importance: Literal["l1", "l2", "taylor"] = Field("l1", description="channel ranking: weight norm, or Taylor (gradients)")
    round_to: int | None = Field(None, ge=1, description="keep widths a multiple of this (kernel-friendly)")


def _output_layer(model: nn.Module) -> nn.Module:
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not last:
        raise ValueError("model has no Linear or Conv2d layer to prune")
    return last[-1]


def _qkv_attention(module: nn.Module) -> bool:
    """A timm-style attention block: one ``qkv`` linear producing q, k and v for ``num_heads`` heads."""
    qkv, heads = getattr(module, "qkv", None), getattr(module, "num_heads", None)
    return isinstance(qkv, nn.Linear) and isinstance(heads, int) and qkv.out_features % (3 * heads) == 0


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """Head counts the pruner must respect: each ``nn.MultiheadAttention`` and each timm-style block's ``qkv``."""
    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            heads[m] = m.num_heads
        elif _qkv_attention(m):
            heads[m.qkv] = m.num_heads
    return heads


def _sync_attention(model: nn.Module, heads: dict[nn.Module, int]) -> None:
    """After pruning: each timm-style block's head count and width attributes match its pruned ``qkv``."""
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            if m.embed_dim % m.num_heads:
                raise AssertionError(f"pruning left embed_dim {m.embed_dim} not divisible by num_heads {m.num_heads}")
        elif _qkv_attention(m) or (hasattr(m, "qkv") and m.qkv in heads):
            m.num_heads = heads.get(m.qkv, m.num_heads)
            head_dim = m.qkv.out_features // (3 * m.num_heads)
            if isinstance(getattr(m, "head_dim", None), int):
                m.head_dim = head_dim
            if isinstance(getattr(m, "attn_dim", None), int):
                m.attn_dim = m.num_heads * head_dim


def prune(
    model: nn.Module,
    spec: PruneSpec,
    *,
    example_inputs: torch.Tensor,
    gradient_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> nn.Module:
    """Prune ``model`` in place and return it. ``ratio == 0`` leaves it untouched.

    ``gradient_batches`` yields (inputs, labels) for the ``taylor`` criterion (cross-entropy gradients).
    """
    if spec.ratio == 0.0:
        return model
    if spec.importance == "taylor":
        importance = tp.importance.TaylorImportance()
    else:
        importance = tp.importance.MagnitudeImportance(p=1 if spec.importance == "l1" else 2)
    heads = attention_heads(model)
    # nn.MultiheadAttention's width is the residual stream's: its channels are grouped by head, so the same
    # positions go from every head; a qkv linear is the pruner's own attention case (head dims, num_heads)
    mha = {m: n for m, n in heads.items() if isinstance(m, nn.MultiheadAttention)}
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs,
        importance=importance,
        pruning_ratio=spec.ratio,
        ignored_layers=[_output_layer(model)],
        round_to=spec.round_to,
        num_heads={m: n for m, n in heads.items() if m not in mha},
        prune_head_dims=True,
        prune_num_heads=False,
        in_channel_groups=dict(mha),
        out_channel_groups=dict(mha),
    )
    if spec.importance == "taylor":
        batches = list(gradient_batches or [])
        if not batches:
            raise ValueError("taylor importance needs gradient_batches (inputs, labels)")
        was_training = model.training
        model.eval()  # gradients of the deployed function; no batch-norm statistics updates
        model.zero_grad()
        for x, y in batches:
            nn.functional.cross_entropy(model(x), y).backward()
        model.train(was_training)
    pruner.step()
    _sync_attention(model, pruner.num_heads)
    model.zero_grad(set_to_none=True)
    return model


def prunable_channels(model: nn.Module) -> int:
    """Channels/neurons the pruner may remove: the outputs of every layer but the last."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    return sum(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for m in layers)


def model_size(model: nn.Module, *, by: Literal["params", "macs"], example_inputs: torch.Tensor) -> float:
    if by == "params":
        return float(sum(p.numel() for p in model.parameters()))
    macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    return float(macs)


def prune_to_fraction(
    model: nn.Module,
    *,
    keep: float,
    by: Literal["params", "macs"] = "params",
    importance: Literal["l1", "l2", "taylor"] = "l1",
    round_to: int | None = None,
    example_inputs: torch.Tensor,
    gradient_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    tolerance: float = 0.02,
    max_steps: int = 12,
) -> tuple[nn.Module, dict[str, float]]:
    """A structurally pruned copy of ``model`` keeping about ``keep`` of its parameters (or MACs).

    The per-layer channel ratio that gets there is found by bisection (a layer's cost falls roughly with the
    square of its kept width, so the ratio is not ``1 - keep``). Returns the pruned copy and what was reached.
    """
    import copy

    if not 0.0 < keep < 1.0:
        raise ValueError(f"keep must be in (0, 1), got {keep}")
    example_inputs = example_inputs[:1]
    full = model_size(model, by=by, example_inputs=example_inputs)
    lo, hi = 0.0, 0.99
    best: tuple[float, nn.Module, float] | None = None
    for _ in range(max_steps):
        ratio = (lo + hi) / 2
        candidate = prune(copy.deepcopy(model), PruneSpec(ratio=ratio, importance=importance, round_to=round_to),
                          example_inputs=example_inputs, gradient_batches=gradient_batches)
        frac = model_size(candidate, by=by, example_inputs=example_inputs) / full
        if best is None or abs(frac - keep) < abs(best[2] - keep):
            best = (ratio, candidate, frac)
        if abs(frac - keep) <= tolerance:
            break
        if frac > keep:
            lo = ratio
        else:
            hi = ratio
    assert best is not None
    ratio, pruned, frac = best
    return pruned, {"channel_ratio": ratio, "kept_fraction": frac, "by": by, "target": keep}
