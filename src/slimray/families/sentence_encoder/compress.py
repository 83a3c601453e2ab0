"""Structured head + FFN pruning of BERT encoders on torch-pruning's dependency graph, and timing (pure torch).

Per layer, the ``ratio`` least important attention heads (L2 norm of their q/k/v rows and output-projection
columns) and FFN neurons (L2 of the intermediate rows and output columns) are really removed.
``MetaPruner(prune_num_heads=True)`` silently removed nothing on transformers 5.x BERT (project notes), so
each head group is taken from ``DependencyGraph.get_pruning_group(query, prune_linear_out_channels, idxs)``
(which ties q/k/v and the output projection), then ``num_attention_heads`` / ``all_head_size`` are set;
the artifact spec records the per-layer widths so the model loads again.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from slimray.families.sentence_encoder.models import layer_widths, mean_pool, tokenize


def _head_scores(layer: nn.Module) -> torch.Tensor:
    att = layer.attention.self
    d = att.attention_head_size
    rows = sum(m.weight.detach().reshape(-1, d, m.weight.shape[1]).pow(2).sum((1, 2)) for m in (att.query, att.key, att.value))
    o = layer.attention.output.dense.weight.detach()
    cols = o.reshape(o.shape[0], -1, d).pow(2).sum((0, 2))
    return rows + cols


def _ffn_scores(layer: nn.Module) -> torch.Tensor:
    return layer.intermediate.dense.weight.detach().pow(2).sum(1) + layer.output.dense.weight.detach().pow(2).sum(0)


def prune_heads_ffn(model: nn.Module, *, ratio: float, example_inputs: dict[str, torch.Tensor], round_ffn_to: int = 8) -> nn.Module:
    """Remove ``ratio`` of each layer's heads and FFN neurons in place (float BERT); returns ``model``."""
    if ratio <= 0:
        return model
    model.eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    for layer in model.encoder.layer:
        att = layer.attention.self
        d = att.attention_head_size
        heads = att.query.out_features // d
        n_drop = min(heads - 1, int(round(heads * ratio)))
        if n_drop > 0:
            drop = _head_scores(layer).argsort()[:n_drop].tolist()
            idxs = [h * d + j for h in sorted(drop) for j in range(d)]
            group = dg.get_pruning_group(att.query, tp.prune_linear_out_channels, idxs)
            group.prune()
            kept = heads - n_drop
            for m in (att.key, att.value):  # the group must have shrunk k and v with q
                if m.out_features != kept * d:
                    raise RuntimeError(f"head pruning left {m} at {m.out_features} outputs, expected {kept * d}")
            if layer.attention.output.dense.in_features != kept * d:
                raise RuntimeError("head pruning did not shrink the attention output projection")
            att.num_attention_heads, att.all_head_size = kept, kept * d
        ffn = layer.intermediate.dense.out_features
        keep = max(round_ffn_to, int(round(ffn * (1 - ratio) / round_ffn_to)) * round_ffn_to)
        if keep < ffn:
            drop = _ffn_scores(layer).argsort()[: ffn - keep].tolist()
            group = dg.get_pruning_group(layer.intermediate.dense, tp.prune_linear_out_channels, sorted(drop))
            group.prune()
            if layer.output.dense.in_features != keep:
                raise RuntimeError("FFN pruning did not shrink the FFN output projection")
    heads, ffn = layer_widths(model)
    model.config.num_attention_heads = heads[0]  # informational: the spec keeps the per-layer widths
    model.config.intermediate_size = ffn[0]
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def timing_batches(tokenizer, texts: Sequence[str], *, batch_size: int, max_seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Tokenised batches in the given order (padding to each batch's longest, truncation at ``max_seq_len``)."""
    return [tokenize(tokenizer, texts[i : i + batch_size], max_seq_len=max_seq_len) for i in range(0, len(texts) - batch_size + 1, batch_size)]


def sentences_per_s(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, num_threads: int, repeats: int,
                    warmup: int = 1) -> dict[str, float]:
    """Median over ``repeats`` passes over ``batches`` (forward + mean pooling, tokenisation excluded)."""
    old = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        n = sum(len(ids) for ids, _ in batches)
        times = []
        with torch.inference_mode():
            for r in range(warmup + repeats):
                t0 = time.perf_counter()
                for ids, mask in batches:
                    mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
                if r >= warmup:
                    times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        return {"sentences_per_s": n / med, "ms_per_batch": 1000 * med / len(batches)}
    finally:
        torch.set_num_threads(old)
