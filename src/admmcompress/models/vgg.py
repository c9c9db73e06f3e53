"""VGG-16 with BatchNorm for 32x32 inputs (CIFAR-10): 13 conv3x3-BN-ReLU layers and one Linear.

Convolutions carry no bias (the BN after each one has its own shift), which gives the
14,724,042 parameters of the reference model in ``BENCHMARKING.md``.

>>> sum(p.numel() for p in vgg16_cifar().parameters())
14724042
>>> sum(p.numel() for p in vgg16_cifar(width_mult=0.5).parameters())
3684842
"""

from __future__ import annotations

import torch
from torch import nn

from admmcompress.models.registry import register_model
from admmcompress.models.widths import scaled

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """Conv-BN-ReLU stacks with 2x2 max-pools ("M" in ``config``), then a Linear on the flattened 1x1 map.

    >>> VGG((8, "M", 16, "M"), num_classes=3)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 3])
    """

    input_shape = (3, 32, 32)

    def __init__(self, config: tuple[int | str, ...] = VGG16, num_classes: int = 10, width_mult: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            if not isinstance(item, int):
                raise ValueError(f"VGG config entry {item!r} must be a channel count or 'M' (max-pool)")
            width = scaled(item, width_mult)
            conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
            layers += [conv, nn.BatchNorm2d(width), nn.ReLU()]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def vgg16_cifar(num_classes: int = 10, width_mult: float = 1.0) -> VGG:
    """VGG-16-BN, CIFAR variant (one Linear classifier on 512 features)."""
    return VGG(VGG16, num_classes=num_classes, width_mult=width_mult)


register_model("vgg16_cifar", vgg16_cifar)
