"""ResNets for 32x32 inputs (CIFAR-10): ResNet-20/56 (He et al. 2016, 3 stages) and ResNet-18.

Both use projection shortcuts (1x1 conv + BN, "option B") wherever the shape changes, so every
channel coupling is an ordinary module that the dependency graph understands. The CIFAR ResNet-20
paper model uses zero-padding shortcuts ("option A"); option B adds 2,752 parameters to it.

>>> sum(p.numel() for p in resnet18_cifar().parameters())
11173962
>>> sum(p.numel() for p in resnet20().parameters())
272474
"""

from __future__ import annotations

import torch
from torch import nn

from admmcompress.models.registry import register_model
from admmcompress.models.widths import scaled


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (identity or 1x1-conv) shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, mid_planes: int | None = None):
        super().__init__()
        mid = planes if mid_planes is None else mid_planes
        self.conv1 = nn.Conv2d(in_planes, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A stem conv, stages of basic blocks, global average pooling and one Linear classifier.

    Args:
        blocks: number of blocks per stage, e.g. ``(3, 3, 3)`` for ResNet-20.
        planes: output channels per stage, e.g. ``(16, 32, 64)``.
        stem: stem channels (defaults to ``planes[0]``).
        num_classes: classifier outputs.
        width_mult: every channel count is ``round(c * width_mult)`` (see ``models.widths``).
    """

    input_shape = (3, 32, 32)

    def __init__(
        self,
        blocks: tuple[int, ...],
        planes: tuple[int, ...],
        stem: int | None = None,
        num_classes: int = 10,
        width_mult: float = 1.0,
    ):
        super().__init__()
        if len(blocks) != len(planes):
            raise ValueError(f"blocks={blocks} and planes={planes} must have one entry per stage")
        widths = [scaled(p, width_mult) for p in planes]
        in_planes = scaled(stem if stem is not None else planes[0], width_mult)
        self.conv1 = nn.Conv2d(3, in_planes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        stages = []
        for i, (n, width) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, width, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.layers = nn.ModuleList(stages)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        for stage in self.layers:
            out = stage(out)
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def resnet20(num_classes: int = 10, width_mult: float = 1.0) -> CifarResNet:
    """ResNet-20 for CIFAR: 3 stages x 3 blocks, 16/32/64 channels."""
    return CifarResNet((3, 3, 3), (16, 32, 64), num_classes=num_classes, width_mult=width_mult)


def resnet56(num_classes: int = 10, width_mult: float = 1.0) -> CifarResNet:
    """ResNet-56 for CIFAR: 3 stages x 9 blocks, 16/32/64 channels."""
    return CifarResNet((9, 9, 9), (16, 32, 64), num_classes=num_classes, width_mult=width_mult)


def resnet18_cifar(num_classes: int = 10, width_mult: float = 1.0) -> CifarResNet:
    """ResNet-18, CIFAR variant: 3x3 stride-1 stem, no max-pool, 4 stages x 2 blocks, 64..512 channels."""
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes=num_classes, width_mult=width_mult)


register_model("resnet20", resnet20)
register_model("resnet56", resnet56)
register_model("resnet18_cifar", resnet18_cifar)
