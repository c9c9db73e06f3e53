"""Small models shared by the driver tests (imported as a plain module: the test folders are not packages)."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """stem -> BN -> [conv-BN-ReLU-conv-BN] + identity -> Linear: the residual stream couples stem and conv2."""

    def __init__(self, width: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv1, self.bn1 = nn.Conv2d(width, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden)
        self.conv2, self.bn2 = nn.Conv2d(hidden, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.relu(x + y).mean(dim=(2, 3)))
