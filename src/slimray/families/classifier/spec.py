"""Architecture specs: small JSON documents that rebuild a model without pickle.

A spec names the layer widths; ``build_model(spec)`` makes the module and ``spec_from_model`` reads the
widths back from a (possibly pruned) module, so a pruned network is saved as its smaller spec plus a
safetensors file. Module names follow the ccexam MNIST CNN (``features.N`` / ``classifier.N``), so its
pretrained state dict loads into ``CNNSpec(conv_channels=[32, 64], fc_hidden=[128])`` unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import torch
from pydantic import Field, PositiveInt, TypeAdapter, field_validator, model_validator
from torch import nn

from slimray.schema import StrictModel


class InputSpec(StrictModel):
    """What one example looks like in the dataset's raw units, and how to normalise it.

    ``mean`` / ``std`` are one number, or one per channel (the first dimension of ``shape``)."""

    shape: list[PositiveInt] = Field(min_length=1, description="shape of one example, e.g. [1, 28, 28]")
    mean: float | list[float] = 0.0
    std: float | list[float] = 1.0
    min_value: float = Field(description="smallest raw value an input may take")
    max_value: float = Field(description="largest raw value an input may take")

    @model_validator(mode="after")
    def _range(self) -> InputSpec:
        if self.max_value <= self.min_value:
            raise ValueError("max_value must be greater than min_value")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if isinstance(v, list) and len(v) != self.shape[0]:
                raise ValueError(f"{name} has {len(v)} values; per-channel {name} needs one per channel ({self.shape[0]})")
        std = self.std if isinstance(self.std, list) else [self.std]
        if any(s <= 0 for s in std):
            raise ValueError("std must be > 0")
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std on a batch shaped (N, *shape), per channel when mean/std are lists."""
        extra = [1] * (len(self.shape) - 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).reshape(-1, *extra) if isinstance(self.mean, list) else self.mean
        std = torch.tensor(self.std, dtype=torch.float32).reshape(-1, *extra) if isinstance(self.std, list) else self.std
        return (x.float() - mean) / std


class CNNSpec(StrictModel):
    """conv(k, pad k//2) -> ReLU -> MaxPool(2) per entry of conv_channels, then an MLP head."""

    kind: Literal["cnn"] = "cnn"
    in_channels: PositiveInt = 1
    image_size: PositiveInt
    conv_channels: list[PositiveInt] = Field(min_length=1)
    fc_hidden: list[PositiveInt] = Field(default_factory=list)
    num_classes: PositiveInt
    kernel_size: Literal[3, 5] = 3

    @model_validator(mode="after")
    def _fits(self) -> CNNSpec:
        if self.image_size % (2 ** len(self.conv_channels)):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**len(conv_channels) "
                f"= {2 ** len(self.conv_channels)} (each conv block halves it)"
            )
        return self

    @property
    def feature_size(self) -> int:
        return self.image_size // 2 ** len(self.conv_channels)


class MLPSpec(StrictModel):
    """Flatten -> (Linear -> ReLU) per hidden width -> Linear."""

    kind: Literal["mlp"] = "mlp"
    in_features: PositiveInt
    hidden: list[PositiveInt] = Field(default_factory=list)
    num_classes: PositiveInt


class ModuleSpec(StrictModel):
    """The user's own ``nn.Module``: built by ``factory(**kwargs)``, resized by ``structure`` when pruned."""

    kind: Literal["module"] = "module"
    factory: str = Field(description="import path 'package.module:function' returning the nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory (JSON values)")
    code_dir: str | None = Field(
        None, description="folder put on sys.path to import the factory (the teacher's config; never written into an artifact)"
    )
    code: dict[str, str] = Field(
        default_factory=dict,
        description="the factory's module or package carried in the artifact: path relative to its code/ folder -> sha256",
    )
    resized_modules: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="module attributes structured pruning changed (in_channels, out_features, ...)"
    )
    resized_tensors: dict[str, list[int]] = Field(default_factory=dict, description="tensor shapes pruning changed")
    removed_modules: list[str] = Field(default_factory=list, description="repeated blocks dropped (replaced by identity)")
    note: str | None = Field(None, description="how this architecture was derived (e.g. 'teacher pruned to 50% of params')")

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str) -> str:
        from slimray.families.classifier.usermodule import check_factory_path

        return check_factory_path(v)

    @model_validator(mode="after")
    def _code(self) -> ModuleSpec:
        from slimray.families.classifier.carried import check_code_listing

        check_code_listing(self.code, self.factory)
        return self


ModelSpec = Annotated[Union[CNNSpec, MLPSpec, ModuleSpec], Field(discriminator="kind")]
_SPEC_ADAPTER = TypeAdapter(ModelSpec)


def parse_spec(data: dict[str, Any]) -> CNNSpec | MLPSpec | ModuleSpec:
    """A model spec from its JSON form (any kind)."""
    return _SPEC_ADAPTER.validate_python(data)


def _head(in_features: int, hidden: list[int], num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    def __init__(self, spec: CNNSpec):
        super().__init__()
        layers: list[nn.Module] = []
        width = spec.in_channels
        for c in spec.conv_channels:
            layers += [nn.Conv2d(width, c, spec.kernel_size, padding=spec.kernel_size // 2), nn.ReLU(), nn.MaxPool2d(2)]
            width = c
        self.features = nn.Sequential(*layers)
        self.classifier = _head(width * spec.feature_size**2, spec.fc_hidden, spec.num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class MLPNet(nn.Module):
    def __init__(self, spec: MLPSpec):
        super().__init__()
        self.classifier = _head(spec.in_features, spec.hidden, spec.num_classes)

    def forward(self, x):
        return self.classifier(x.flatten(1))


def build_model(spec: CNNSpec | MLPSpec | ModuleSpec) -> nn.Module:
    """A freshly initialised float32 model for ``spec`` (a user module: the factory's, resized as recorded)."""
    if isinstance(spec, CNNSpec):
        return ConvNet(spec)
    if isinstance(spec, MLPSpec):
        return MLPNet(spec)
    if isinstance(spec, ModuleSpec):
        from slimray.families.classifier.usermodule import apply_structure, build_from_spec, drop_modules

        model = build_from_spec(spec)
        drop_modules(model, spec.removed_modules)
        return apply_structure(model, spec.resized_modules, spec.resized_tensors)
    raise TypeError(f"unknown spec type {type(spec).__name__}")


def _linears(seq: nn.Sequential) -> list[nn.Linear]:
    return [m for m in seq if isinstance(m, nn.Linear)]


def spec_from_model(model: nn.Module, like: CNNSpec | MLPSpec | ModuleSpec) -> CNNSpec | MLPSpec | ModuleSpec:
    """Read the layer widths of ``model`` (for instance after structured pruning) into a new spec."""
    if isinstance(like, ModuleSpec):
        from slimray.families.classifier.usermodule import build_from_spec, drop_modules, removed_modules, structure_changes

        original = build_from_spec(like)
        removed = removed_modules(original, model)
        drop_modules(original, removed)
        attrs, shapes = structure_changes(original, model)
        return like.model_copy(update={"resized_modules": attrs, "resized_tensors": shapes, "removed_modules": removed})
    hidden = [lin.out_features for lin in _linears(model.classifier)[:-1]]
    if isinstance(like, CNNSpec):
        convs = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
        return like.model_copy(update={"conv_channels": convs, "fc_hidden": hidden})
    return like.model_copy(update={"hidden": hidden})


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def scale_spec(spec: CNNSpec | MLPSpec, *, width: float = 1.0, depth: int | None = None) -> CNNSpec | MLPSpec:
    """A student family around ``spec``: every hidden width times ``width`` (rounded, at least 1), and
    ``depth`` conv blocks (CNN) or hidden layers (MLP): the first ``depth`` of the given ones, or the last
    one repeated (doubling its width for a CNN) when ``depth`` is larger. Raises ValueError when the result
    is not a valid spec (a CNN whose image size is not divisible by 2**depth)."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    if isinstance(spec, ModuleSpec):
        raise ValueError("width/depth scaling needs a built-in student spec (cnn or mlp); a user module is derived by pruning")

    def scaled(ws: list[int]) -> list[int]:
        return [max(1, round(w * width)) for w in ws]

    if isinstance(spec, CNNSpec):
        convs = list(spec.conv_channels)
        if depth is not None:
            if depth < 1:
                raise ValueError(f"a CNN needs depth >= 1 conv block, got {depth}")
            while len(convs) < depth:
                convs.append(convs[-1] * 2)
            convs = convs[:depth]
        return CNNSpec.model_validate({**spec.model_dump(), "conv_channels": scaled(convs), "fc_hidden": scaled(spec.fc_hidden)})
    hidden = list(spec.hidden)
    if depth is not None:
        if depth < 0:
            raise ValueError(f"depth must be >= 0 hidden layers, got {depth}")
        while len(hidden) < depth:
            hidden.append(hidden[-1] if hidden else 64)
        hidden = hidden[:depth]
    return MLPSpec.model_validate({**spec.model_dump(), "hidden": scaled(hidden)})
