"""The model zoo's factories, written as a user's code folder would hold them: ``zoo_models:timm_model`` and
``zoo_models:torchvision_model`` build an architecture (random init, nothing downloaded) by name, so a config
or a test names it as ``teacher.factory``.

Where the packages come from: ``make install`` puts timm and torchvision (``--no-deps``) in
``.venv/zoo-packages``, outside the venv's own path, because the torchvision wheels that pair with the CPU torch
pinned here are CUDA builds whose C extension does not load; installed normally, their failing import breaks
transformers. Only the Python parts of torchvision are needed for classification models, so before importing it
this module declares the two operator schemas (``torchvision::nms`` / ``qnms``) that its import registers fake
kernels for; they have no kernel and are never called.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

ZOO_PACKAGES = Path(sys.prefix) / "zoo-packages"
ZOO_DIR = Path(__file__).resolve().parent
BYOM_DIR = ZOO_DIR.parent / "byom"
IMAGE = [3, 32, 32]

# the zoo: id -> (factory, kwargs, code folder, input shape); tests/zoo/test_zoo.py and bench/zoo.py read it
ZOO: dict[str, tuple[str, dict, Path, list[int]]] = {
    "timm-mobilenetv3_small_050": ("zoo_models:timm_model", {"name": "mobilenetv3_small_050"}, ZOO_DIR, IMAGE),
    "timm-vit_tiny_patch16": ("zoo_models:timm_model", {"name": "vit_tiny_patch16_224", "img_size": 32}, ZOO_DIR, IMAGE),
    "user-vit-nn.TransformerEncoder": ("user_models:vit", {}, BYOM_DIR, [1, 8, 8]),
    "timm-resnet18": ("zoo_models:timm_model", {"name": "resnet18"}, ZOO_DIR, IMAGE),
    "timm-efficientnet_b0": ("zoo_models:timm_model", {"name": "efficientnet_b0"}, ZOO_DIR, IMAGE),
    "timm-convnext_atto": ("zoo_models:timm_model", {"name": "convnext_atto"}, ZOO_DIR, IMAGE),
    "timm-regnety_002": ("zoo_models:timm_model", {"name": "regnety_002"}, ZOO_DIR, IMAGE),
    "timm-ghostnet_050": ("zoo_models:timm_model", {"name": "ghostnet_050"}, ZOO_DIR, IMAGE),
    "timm-deit_tiny_patch16": ("zoo_models:timm_model", {"name": "deit_tiny_patch16_224", "img_size": 32}, ZOO_DIR, IMAGE),
    "torchvision-mobilenet_v3_small": ("zoo_models:torchvision_model", {"name": "mobilenet_v3_small"}, ZOO_DIR, IMAGE),
    "torchvision-resnet18": ("zoo_models:torchvision_model", {"name": "resnet18"}, ZOO_DIR, IMAGE),
}
_LIB = None  # the torch.library fragment holding the declared schemas (kept alive)


def _import_vision() -> None:
    global _LIB
    if ZOO_PACKAGES.is_dir() and str(ZOO_PACKAGES) not in sys.path:
        sys.path.append(str(ZOO_PACKAGES))
    try:
        import torchvision  # noqa: F401

        return
    except RuntimeError as err:  # the CUDA build's extension did not load: declare the schemas it expects
        if "torchvision::" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811


def timm_model(name: str, num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    """``timm.create_model(name)`` with random weights."""
    _import_vision()
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def torchvision_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """``torchvision.models.get_model(name)`` with random weights."""
    _import_vision()
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
