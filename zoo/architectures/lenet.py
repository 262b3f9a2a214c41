"""LeNet-5 as defined in DAFL, for 32x32 inputs.

Matches ``DAFL/lenet.py`` (class ``LeNet5``) of huawei-noah/Efficient-Computing
(Data-Efficient-Model-Compression), the MNIST teacher of DAFL and the data-free methods that followed
it: three 5x5 convolutions (6, 16, 120 filters) with ReLU and 2x2 max-pooling after the first two, then
``fc1`` (120 -> 84) and ``fc2`` (84 -> classes). No BatchNorm, so methods that match BN statistics
cannot use it as a teacher. Parameter names::

    conv1.weight, conv1.bias, conv2.weight, conv2.bias, conv3.weight, conv3.bias,
    fc1.weight, fc1.bias, fc2.weight, fc2.bias

``forward(x, return_features=True)`` returns the 84-d input of ``fc2`` (the vector fed to the final
Linear, as for every zoo network). DAFL's own ``out_feature=True`` returns the 120-d ``conv3`` output
instead. Inputs must be 32x32 (conv3 reduces the 5x5 map to 1x1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LeNet5", "lenet5"]


class LeNet5(nn.Module):
    """LeNet-5 (DAFL variant) for 32x32 inputs.

    Args:
        num_classes: size of the output layer.
        in_channels: channels of the input image (1 in DAFL; the first convolution adapts).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.conv3 = nn.Conv2d(16, 120, 5)
        self.fc1 = nn.Linear(120, 84)
        self.fc2 = nn.Linear(84, num_classes)
        self.feature_dim = 84

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits, or ``(logits, features)`` where features are the 84-d vector fed to ``fc2``."""
        if x.shape[-2:] != (32, 32):
            raise ValueError(f"LeNet-5 expects 32x32 inputs, got {tuple(x.shape[-2:])}")
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        out = torch.flatten(F.relu(self.conv3(out)), 1)
        features = F.relu(self.fc1(out))
        logits = self.fc2(features)
        return (logits, features) if return_features else logits


def lenet5(num_classes: int = 10, in_channels: int = 3) -> LeNet5:
    """LeNet-5 (DAFL ``LeNet5``); ``in_channels`` defaults to 3 like every registry entry."""
    return LeNet5(num_classes, in_channels)
