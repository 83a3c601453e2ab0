"""Structured pruning that really shrinks tensors, on torch-pruning's dependency graph.

Whole conv channels and hidden neurons are removed (the next layer's inputs with them, the flatten
between conv and linear included), so the pruned model is a smaller dense model that runs faster, and
``slimray.models.spec_from_model`` reads its new widths back into a spec.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch_pruning as tp
from pydantic import Field
from torch import nn

from slimray.schema import StrictModel


class PruneSpec(StrictModel):
    """Remove ``ratio`` of the channels of every prunable layer (the output layer is kept whole)."""

    ratio: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of channels/neurons removed per layer")
    importance: Literal["l1", "l2"] = Field("l1", description="magnitude norm ranking the channels")
    round_to: int | None = Field(None, ge=1, description="keep widths a multiple of this (kernel-friendly)")


def _output_layer(model: nn.Module) -> nn.Module:
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not last:
        raise ValueError("model has no Linear or Conv2d layer to prune")
    return last[-1]


def prune(model: nn.Module, spec: PruneSpec, *, example_inputs: torch.Tensor) -> nn.Module:
    """Prune ``model`` in place and return it. ``ratio == 0`` leaves it untouched."""
    if spec.ratio == 0.0:
        return model
    importance = tp.importance.MagnitudeImportance(p=1 if spec.importance == "l1" else 2)
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs,
        importance=importance,
        pruning_ratio=spec.ratio,
        ignored_layers=[_output_layer(model)],
        round_to=spec.round_to,
    )
    pruner.step()
    return model


def prunable_channels(model: nn.Module) -> int:
    """Channels/neurons the pruner may remove: the outputs of every layer but the last."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    return sum(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for m in layers)
