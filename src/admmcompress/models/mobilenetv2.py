"""MobileNetV2 (Sandler et al. 2018) for 32x32 inputs (CIFAR-10).

The CIFAR variant keeps the ImageNet layer table but uses stride 1 in the stem and in the second
stage (so a 32x32 image ends as a 4x4 map, as in the common CIFAR ports). Inverted residual
blocks: 1x1 expansion - BN - ReLU6 - 3x3 depthwise - BN - ReLU6 - 1x1 projection - BN, with an
identity shortcut when stride is 1 and the widths match.

>>> sum(p.numel() for p in mobilenetv2_cifar().parameters())
2236682
"""

from __future__ import annotations

import torch
from torch import nn

from admmcompress.models.registry import register_model
from admmcompress.models.widths import scaled

# (expansion t, output channels c, repeats n, first stride s); CIFAR strides.
CIFAR_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """One MobileNetV2 block; ``expansion == 1`` has no expansion conv."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        hidden = in_planes * expansion
        self.use_residual = stride == 1 and in_planes == out_planes
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with ``width_mult`` applied to every layer (plain rounding, see ``models.widths``)."""

    input_shape = (3, 32, 32)

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, settings=CIFAR_SETTINGS):
        super().__init__()
        in_planes = scaled(32, width_mult)
        last = scaled(1280, width_mult) if width_mult > 1.0 else 1280
        self.stem = nn.Sequential(
            nn.Conv2d(3, in_planes, 3, 1, 1, bias=False), nn.BatchNorm2d(in_planes), nn.ReLU6()
        )
        blocks = []
        for t, c, n, s in settings:
            out_planes = scaled(c, width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(in_planes, out_planes, t, s if i == 0 else 1))
                in_planes = out_planes
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(in_planes, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6())
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def mobilenetv2_cifar(num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2, CIFAR variant (stride-1 stem and second stage)."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult)


register_model("mobilenetv2_cifar", mobilenetv2_cifar)
