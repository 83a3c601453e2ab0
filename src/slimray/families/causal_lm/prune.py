"""Structured pruning of Llama-style causal LMs (pure torch, no ray): whole decoder layers (depth) and whole
KV groups with their query heads plus MLP neurons (width). Tensors really shrink and the HF config is updated, so
``save_pretrained`` writes a folder that plain ``transformers`` loads with no slimray code.

Depth: a layer's importance is the mean per-token KL(full model || model with that layer skipped) on a few
calibration windows; the least important layers are dropped, in one shot from the full model's scores or
iteratively (drop one, re-score the rest). ``num_hidden_layers`` (and ``layer_types`` if present) are updated and
the kept attention modules renumbered (``layer_idx`` indexes the KV cache). Evenly spaced layers instead of
measured ones were catastrophic on SmolLM2 (issue #17: perplexity 3161 vs 81.7 for importance-chosen, 20/30).

Width: the HF Llama config holds one ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size``
for all layers, so every layer keeps the same counts (the most important ones of its own). With grouped-query
attention, whole KV groups are removed together with the query heads that read them (k/v rows, q rows, o_proj
columns); ``head_dim`` stays. Importance is weight magnitude (L2 of the group's q/k/v rows and o columns; of a
neuron's gate/up rows times its down column) or, given calibration windows, activation-weighted for MLP neurons
(mean |act(gate)*up| times the down column's norm).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slimray.schema import StrictModel


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def _set_layers(model: nn.Module, layers: Sequence[nn.Module]) -> None:
    model.model.layers = nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)


@torch.inference_mode()
def _log_probs(model: nn.Module, windows: torch.Tensor, *, batch_size: int) -> list[torch.Tensor]:
    return [F.log_softmax(model(windows[i:i + batch_size], use_cache=False).logits.float(), -1)
            for i in range(0, len(windows), batch_size)]


def _kl_to(ref: list[torch.Tensor], model: nn.Module, windows: torch.Tensor, *, batch_size: int) -> float:
    out = _log_probs(model, windows, batch_size=batch_size)
    num = sum(F.kl_div(o, r, log_target=True, reduction="sum").item() for o, r in zip(out, ref))
    return num / sum(r.shape[0] * r.shape[1] for r in ref)


def layer_importance(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4) -> list[float]:
    """Per layer, the mean per-token KL (nats) from the model as it is to the same model with that layer skipped."""
    model.eval()
    layers = list(_layers(model))
    ref = _log_probs(model, windows, batch_size=batch_size)
    scores = []
    try:
        for i in range(len(layers)):
            _set_layers(model, layers[:i] + layers[i + 1:])
            scores.append(_kl_to(ref, model, windows, batch_size=batch_size))
    finally:
        _set_layers(model, layers)
    return scores


def drop_layers(model: nn.Module, *, keep: Sequence[int]) -> nn.Module:
    """Keep only the decoder layers ``keep`` (indices into the current layers, order preserved); in place."""
    layers = list(_layers(model))
    keep = sorted(set(keep))
    if not keep or keep[0] < 0 or keep[-1] >= len(layers):
        raise ValueError(f"keep={keep}: need at least one index in [0, {len(layers)})")
    kept = [layers[i] for i in keep]
    for new_idx, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_idx
    _set_layers(model, kept)
    types = getattr(model.config, "layer_types", None)
    if types:
        model.config.layer_types = [types[i] for i in keep]
    return model


class DepthPruneReport(StrictModel):
    """Which of the original layers were kept/dropped and the importance scores that chose them."""

    num_layers_before: int
    kept: list[int]
    dropped: list[int]
    importance: list[float]  # of the original layers (one-shot), KL nats/token when skipped
    iterative: bool


def prune_depth(model: nn.Module, windows: torch.Tensor, *, num_layers_to_drop: int, iterative: bool = False,
                batch_size: int = 4) -> DepthPruneReport:
    """Drop the ``num_layers_to_drop`` least important layers (in place); indices in the report are original ones."""
    n = len(_layers(model))
    if not 0 <= num_layers_to_drop < n:
        raise ValueError(f"num_layers_to_drop={num_layers_to_drop}: must be in [0, {n})")
    scores = layer_importance(model, windows, batch_size=batch_size)
    alive = list(range(n))
    if not iterative:
        drop = sorted(sorted(range(n), key=lambda i: scores[i])[:num_layers_to_drop])
        alive = [i for i in alive if i not in drop]
        drop_layers(model, keep=[i for i in range(n) if i in alive])
    else:
        current = scores
        for _ in range(num_layers_to_drop):
            worst = min(range(len(alive)), key=lambda j: current[j])
            del alive[worst]
            drop_layers(model, keep=[j for j in range(len(current)) if j != worst])
            if len(alive) > n - num_layers_to_drop:
                current = layer_importance(model, windows, batch_size=batch_size)
    return DepthPruneReport(num_layers_before=n, kept=alive, dropped=[i for i in range(n) if i not in alive],
                            importance=scores, iterative=iterative)


def _shrink(linear: nn.Linear, idx: torch.Tensor, *, dim: int) -> nn.Linear:
    w = linear.weight.detach().index_select(dim, idx).clone()
    bias = linear.bias is not None
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=w.dtype, device=w.device)
    out.weight.data.copy_(w)
    if bias:
        b = linear.bias.detach()
        out.bias.data.copy_(b.index_select(0, idx) if dim == 0 else b)
    return out


def kv_group_scores(attn: nn.Module, *, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """L2 weight mass of each KV group: its k/v rows, its query heads' q rows and o_proj columns."""
    rep = num_heads // num_kv_heads
    q = attn.q_proj.weight.detach().float().reshape(num_kv_heads, rep * head_dim, -1).pow(2).sum((1, 2))
    k = attn.k_proj.weight.detach().float().reshape(num_kv_heads, head_dim, -1).pow(2).sum((1, 2))
    v = attn.v_proj.weight.detach().float().reshape(num_kv_heads, head_dim, -1).pow(2).sum((1, 2))
    o = attn.o_proj.weight.detach().float().reshape(attn.o_proj.weight.shape[0], num_kv_heads, rep * head_dim).pow(2).sum((0, 2))
    return (q + k + v + o).sqrt()


def neuron_scores(mlp: nn.Module, *, mean_abs_act: torch.Tensor | None = None) -> torch.Tensor:
    """Per intermediate neuron: |gate row|*|up row|*|down column| (weights), or mean|act(gate)*up|*|down column|."""
    down = mlp.down_proj.weight.detach().float().norm(dim=0)
    if mean_abs_act is not None:
        return mean_abs_act * down
    return mlp.gate_proj.weight.detach().float().norm(dim=1) * mlp.up_proj.weight.detach().float().norm(dim=1) * down


@torch.inference_mode()
def mlp_activation_means(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4) -> list[torch.Tensor]:
    """Per layer, the mean |act(gate(x)) * up(x)| of each intermediate neuron over the calibration tokens."""
    sums = [None] * len(_layers(model))
    count = 0
    hooks = []
    for i, layer in enumerate(_layers(model)):
        def hook(mod, args, i=i):
            a = args[0].detach().float().abs().sum((0, 1))
            sums[i] = a if sums[i] is None else sums[i] + a
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    try:
        for j in range(0, len(windows), batch_size):
            model(windows[j:j + batch_size], use_cache=False)
            count += windows[j:j + batch_size].numel()
    finally:
        for h in hooks:
            h.remove()
    return [s / count for s in sums]


class WidthPruneReport(StrictModel):
    """Per layer, the original KV groups and MLP neurons kept (sorted indices)."""

    num_kv_heads_before: int
    num_kv_heads_after: int
    num_heads_after: int
    intermediate_size_before: int
    intermediate_size_after: int
    kv_groups_kept: list[list[int]]
    importance: str


def prune_width(model: nn.Module, *, num_kv_heads: int | None = None, intermediate_size: int | None = None,
                calibration: torch.Tensor | None = None, batch_size: int = 4) -> WidthPruneReport:
    """Keep ``num_kv_heads`` KV groups (with their query heads) and ``intermediate_size`` MLP neurons in every
    layer (None: unchanged); in place, config updated. ``calibration`` windows switch MLP scores to activations."""
    cfg = model.config
    heads, kv, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    inter = cfg.intermediate_size
    new_kv = kv if num_kv_heads is None else num_kv_heads
    new_inter = inter if intermediate_size is None else intermediate_size
    if not 1 <= new_kv <= kv:
        raise ValueError(f"num_kv_heads={num_kv_heads}: must be in [1, {kv}]")
    if not 1 <= new_inter <= inter:
        raise ValueError(f"intermediate_size={intermediate_size}: must be in [1, {inter}]")
    rep = heads // kv
    acts = mlp_activation_means(model, calibration, batch_size=batch_size) if calibration is not None and new_inter < inter else None
    kept_groups = []
    for li, layer in enumerate(_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        if new_kv < kv:
            groups = kv_group_scores(attn, num_heads=heads, num_kv_heads=kv, head_dim=head_dim).topk(new_kv).indices.sort().values
            kv_idx = (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
            q_idx = (groups[:, None] * rep * head_dim + torch.arange(rep * head_dim)).flatten()
            attn.q_proj = _shrink(attn.q_proj, q_idx, dim=0)
            attn.k_proj = _shrink(attn.k_proj, kv_idx, dim=0)
            attn.v_proj = _shrink(attn.v_proj, kv_idx, dim=0)
            attn.o_proj = _shrink(attn.o_proj, q_idx, dim=1)
            kept_groups.append(groups.tolist())
        else:
            kept_groups.append(list(range(kv)))
        if new_inter < inter:
            idx = neuron_scores(mlp, mean_abs_act=None if acts is None else acts[li]).topk(new_inter).indices.sort().values
            mlp.gate_proj = _shrink(mlp.gate_proj, idx, dim=0)
            mlp.up_proj = _shrink(mlp.up_proj, idx, dim=0)
            mlp.down_proj = _shrink(mlp.down_proj, idx, dim=1)
            mlp.intermediate_size = new_inter
    cfg.head_dim = head_dim  # explicit: it no longer equals hidden_size // num_attention_heads
    cfg.num_key_value_heads = new_kv
    cfg.num_attention_heads = new_kv * rep
    cfg.intermediate_size = new_inter
    return WidthPruneReport(num_kv_heads_before=kv, num_kv_heads_after=new_kv, num_heads_after=new_kv * rep,
                            intermediate_size_before=inter, intermediate_size_after=new_inter, kv_groups_kept=kept_groups,
                            importance="activations" if acts is not None else "weights")
