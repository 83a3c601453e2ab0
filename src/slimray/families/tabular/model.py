"""The tabular family's model and artifact (pure torch): an MLP regressor, and its folder of safetensors + a JSON
spec that records the widths (after pruning), the quantization, and the feature and target scaling, so that the
served model rebuilds from the folder alone and takes rows in the data's own units."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from slimray.compress.quantize import QuantSpec, quantize
from slimray.schema import StrictModel
from slimray.storage import SPEC, WEIGHTS, decode_state, write_state_artifact

FORMAT = "slimray.tabular/1"


class MLPRegressor(nn.Module):
    """Features -> hidden ReLU layers -> one value (the standardised target)."""

    def __init__(self, in_dim: int, hidden: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def build(spec: dict[str, Any]) -> MLPRegressor:
    return MLPRegressor(int(spec["in_dim"]), [int(h) for h in spec["hidden"]])


class Scaling(StrictModel):
    """Features and target are standardised with the training split's mean and std; the codec applies both."""

    x_mean: list[float]
    x_std: list[float]
    y_mean: float
    y_std: float


class TabularSpec(StrictModel):
    format: str = FORMAT
    in_dim: int
    hidden: list[int]
    features: list[str]
    target: str
    scaling: Scaling
    quantization: str = "none"
    state: dict[str, dict[str, Any]] = {}
    module_versions: dict[str, dict[str, Any]] = {}
    files: dict[str, str] = {}


def save_artifact(path: str | Path, model: nn.Module, spec: TabularSpec) -> TabularSpec:
    """Write the folder atomically (the weights as stored: int8 when quantized)."""
    return write_state_artifact(path, model.state_dict(), spec)


def load_artifact(path: str | Path) -> tuple[nn.Module, TabularSpec]:
    path = Path(path)
    spec = TabularSpec.from_file(path / SPEC)
    if spec.format != FORMAT:
        raise ValueError(f"{path}: artifact format {spec.format!r}, expected {FORMAT!r}")
    model = build({"in_dim": spec.in_dim, "hidden": spec.hidden}).eval()
    if spec.quantization != "none":
        model = quantize(model, QuantSpec(method=spec.quantization))
    state = OrderedDict(decode_state(load_file(str(path / WEIGHTS)), spec.state))
    state._metadata = OrderedDict((k, dict(v)) for k, v in spec.module_versions.items())  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)
    return model.eval(), spec
