"""Structured pruning that really shrinks tensors, on torch-pruning's dependency graph.

Whole conv channels and hidden neurons are removed (the next layer's inputs with them, the flatten
between conv and linear included), so the pruned model is a smaller dense model that runs faster, and
``slimray.families.classifier.spec_from_model`` reads its new widths back into a spec.

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
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs,
        importance=importance,
        pruning_ratio=spec.ratio,
        ignored_layers=[_output_layer(model)],
        round_to=spec.round_to,
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
