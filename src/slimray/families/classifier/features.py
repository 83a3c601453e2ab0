"""Feature (hidden-state) distillation between named layers (pure torch, no ray).

FitNets-style: the output of one student module is mapped by a learned projection onto the width of one
teacher module's output, and the mean squared error between the two is added to the loss. Layers are
picked by their module name (``dict(model.named_modules())``, e.g. ``features.3`` for the second conv of
a ``CNNSpec`` model or ``classifier.1`` for the ReLU after its first hidden layer); a name that does not
exist is refused, listing the names that do.

The projection is chosen from the two output shapes (measured with one dummy forward pass):

- both ``[N, C, H, W]``: a 1x1 convolution ``C_s -> C_t``; when the spatial sizes differ, the teacher's map is
  average-pooled to the student's ``H x W`` first;
- both ``[N, D]``: an ``nn.Linear(D_s, D_t)``;
- same shape on both sides: no projection (identity, no parameters).

Mixing a 4-d and a 2-d output is refused: pick layers on the same side of the flatten.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimray.schema import ConfigError, StrictModel


class FeatureKDSpec(StrictModel):
    """Which student layer learns to match which teacher layer, and how much that term weighs."""

    student_layer: str = Field(min_length=1, description="module name in the student, e.g. 'features.3'")
    teacher_layer: str = Field(min_length=1, description="module name in the teacher, e.g. 'features.3'")
    weight: float = Field(1.0, gt=0, description="weight of the feature MSE term added to the logit/label loss")


def layer_names(model: nn.Module) -> list[str]:
    """The module names a feature tap may name (every named submodule but the root)."""
    return [name for name, _ in model.named_modules() if name]


def find_layer(model: nn.Module, name: str, *, role: str) -> nn.Module:
    modules = dict(model.named_modules())
    if not name or name not in modules:
        raise ConfigError(f"feature_kd.{role}_layer: no module named {name!r} in the {role}; choose one of {layer_names(model)}")
    return modules[name]


class FeatureTap:
    """A forward hook that keeps the latest output of one module."""

    def __init__(self, module: nn.Module):
        self.output: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        self.output = output

    def take(self) -> torch.Tensor:
        out, self.output = self.output, None
        if out is None:
            raise RuntimeError("the tapped layer did not run in this forward pass")
        return out

    def remove(self) -> None:
        self._handle.remove()


@torch.no_grad()
def _output_shape(model: nn.Module, name: str, example: torch.Tensor, *, role: str) -> torch.Size:
    tap = FeatureTap(find_layer(model, name, role=role))
    try:
        was_training = model.training
        model.eval()
        model(example)
        model.train(was_training)
        out = tap.take()
    finally:
        tap.remove()
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"feature_kd.{role}_layer: {name!r} does not output a tensor")
    return out.shape


def make_projection(student_shape: torch.Size, teacher_shape: torch.Size, *, names: tuple[str, str]) -> nn.Module:
    """The learned map from the student's feature shape onto the teacher's (see the module docstring)."""
    s, t = tuple(student_shape[1:]), tuple(teacher_shape[1:])
    if len(s) != len(t) or len(s) not in (1, 3):
        raise ConfigError(
            f"feature_kd: student layer {names[0]!r} outputs {list(s)} per example and teacher layer {names[1]!r} "
            f"outputs {list(t)}; both must be feature maps [C, H, W] or both vectors [D]"
        )
    if s == t:
        return nn.Identity()
    if len(s) == 1:
        return nn.Linear(s[0], t[0])
    return nn.Conv2d(s[0], t[0], kernel_size=1)


def build_projection(student: nn.Module, teacher: nn.Module, spec: FeatureKDSpec, example: torch.Tensor) -> nn.Module:
    """Validate both layer names against the real modules and build the projection (fresh init)."""
    s = _output_shape(student, spec.student_layer, example, role="student")
    t = _output_shape(teacher, spec.teacher_layer, example.to(next(teacher.parameters()).dtype), role="teacher")
    return make_projection(s, t, names=(spec.student_layer, spec.teacher_layer))


class KDStudent(nn.Module):
    """The student plus the projection of its tapped layer; ``forward`` returns ``(logits, projected feature)``.

    DDP/FSDP wrap this module as a whole, so the projection is trained (and all-reduced) like the student;
    only ``student`` is kept at the end.
    """

    def __init__(self, student: nn.Module, projection: nn.Module, student_layer: str):
        super().__init__()
        self.student = student
        self.projection = projection
        self._tap = FeatureTap(find_layer(student, student_layer, role="student"))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.student(x)
        return logits, self.projection(self._tap.take())


class TeacherInLoop:
    """A frozen teacher run on every batch inside the training loop: eval mode, no grads, ``inference_mode``.

    ``__call__`` returns ``(logits, feature or None)`` as ordinary float32 tensors (cloned out of inference
    mode so the loss can save them for backward).
    """

    def __init__(self, teacher: nn.Module, *, feature_layer: str | None = None, dtype: torch.dtype = torch.float32):
        self.model = teacher.eval().requires_grad_(False).to(dtype)
        self.dtype = dtype
        self._tap = FeatureTap(find_layer(self.model, feature_layer, role="teacher")) if feature_layer else None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.inference_mode():
            logits = self.model(x.to(self.dtype)).float()
            feat = self._tap.take().float() if self._tap is not None else None
        return logits.clone(), (feat.clone() if feat is not None else None)


def feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """MSE between the projected student feature and the teacher's (teacher map pooled to the student's size)."""
    if teacher_feat.dim() == 4 and teacher_feat.shape[-2:] != student_feat.shape[-2:]:
        teacher_feat = F.adaptive_avg_pool2d(teacher_feat, student_feat.shape[-2:])
    return F.mse_loss(student_feat.float(), teacher_feat)
