"""A classifier teacher from a local Hugging Face folder (``teacher.source: huggingface``): an image classifier
saved with ``save_pretrained`` (ResNet, ViT, ConvNeXt, ... anything ``AutoModelForImageClassification``
builds), used as a tensor -> logits module like any other classifier.

The folder is read once: its ``config.json`` becomes the factory's keyword argument, so an artifact of the
teacher or of a student derived from it records ``slimray.families.classifier.hf:from_config`` with that
config (plus the pruned widths) and is rebuilt anywhere without the folder, the hub or pickle. No remote code:
folders asking for it are refused (``slimray.families.hf``). Pure torch (transformers), no ray.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FACTORY = "slimray.families.classifier.hf:from_config"


class HFImageClassifier(nn.Module):
    """``model(pixel_values=x).logits`` as a plain ``forward(x) -> logits``. The folder's ``model.safetensors``
    loads into ``.model`` (its keys have no prefix); artifacts hold the wrapper's state (``model.`` prefix)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def from_config(*, config: dict[str, Any]) -> nn.Module:
    """The architecture ``config`` (a ``config.json`` dict) describes, randomly initialised (weights are loaded
    afterwards from safetensors)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError("config.json has no model_type")
    hf_config = AutoConfig.for_model(model_type, **cfg)
    model = AutoModelForImageClassification.from_config(hf_config)
    return HFImageClassifier(model.eval())


def image_classifier_types() -> set[str]:
    """The model types ``AutoModelForImageClassification`` can build (from this transformers)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return set(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
