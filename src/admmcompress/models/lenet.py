"""LeNet models used by the published MNIST results."""

from __future__ import annotations

import torch
from torch import nn

from admmcompress.models.registry import register_model


class LeNet5(nn.Module):
    """LeNet-5, Caffe variant 20-50-500-10 (431,080 parameters with biases).

    conv1 5x5x1x20 -> maxpool -> conv2 5x5x20x50 -> maxpool -> fc1 800x500 -> ReLU -> fc2 500x10.
    ``dropout`` is applied to fc1's output while training (the TF reference recipe uses 0.5).

    >>> sum(p.numel() for p in LeNet5().parameters())
    431080
    """

    input_shape = (1, 28, 28)

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))
        x = self.pool(self.conv2(x))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(self.dropout(x))


class LeNet300100(nn.Module):
    """LeNet-300-100: a 784-300-100-10 MLP (266,610 parameters).

    >>> sum(p.numel() for p in LeNet300100().parameters())
    266610
    """

    input_shape = (1, 28, 28)

    def __init__(self, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        x = self.dropout(torch.relu(self.fc2(x)))
        return self.fc3(x)


register_model("lenet5", LeNet5)
register_model("lenet300100", LeNet300100)
