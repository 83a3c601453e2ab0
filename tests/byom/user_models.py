"""Models slimray does not ship, written the way a user would: their own classes, their own factories.

No source file of slimray names this module; the tests reach it only through `teacher.factory` in a config.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class TinyResNet(nn.Module):
    """stem conv + BN, residual blocks, a strided transition, global average pooling, a linear head."""

    def __init__(self, in_channels: int, num_classes: int, width: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = nn.Sequential(ResidualBlock(width), ResidualBlock(width))
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.stage2 = ResidualBlock(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.pool(x).flatten(1))


def resnet(in_channels: int = 1, num_classes: int = 10, width: int = 24) -> nn.Module:
    return TinyResNet(in_channels, num_classes, width)


class FeatureMLP(nn.Module):
    def __init__(self, num_features: int, num_classes: int, hidden: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.GELU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x.flatten(1)))


def mlp(num_features: int = 64, num_classes: int = 10, hidden: list[int] | None = None) -> nn.Module:
    return FeatureMLP(num_features, num_classes, hidden or [256, 128])


class TinyViT(nn.Module):
    """A vision transformer as a user writes one: patch embedding (a strided conv), learned positions,
    ``nn.TransformerEncoder`` (batch first, pre-norm off), mean pooling over tokens, a linear head."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, patch: int, dim: int, depth: int, heads: int, mlp: int):
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=mlp, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(tokens)).mean(1))


def vit(in_channels: int = 1, num_classes: int = 10, image_size: int = 8, patch: int = 2, dim: int = 64, depth: int = 4,
        heads: int = 4, mlp: int = 128) -> nn.Module:
    return TinyViT(in_channels, num_classes, image_size, patch, dim, depth, heads, mlp)
