"""iresnet in the arcface_torch layout (``recognition/arcface_torch/backbones/iresnet.py`` of insightface).

The parameter names match arcface_torch's state_dict (``conv1``, ``bn1``, ``prelu``, ``layer1.0.bn1`` ...,
``fc``, ``features``), so its ``backbone.pth`` files load with ``load_state_dict``. Buffalo_l's
``w600k_r50.onnx`` is this network with ``layers=(3, 4, 14, 3)``. Tests use :func:`iresnet_tiny`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["IResNet", "iresnet50", "iresnet_tiny"]


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus the (downsampled) identity."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """``[B, 3, 112, 112]`` normalised RGB -> ``[B, num_features]`` (not normalised)."""

    def __init__(self, layers: Sequence[int], num_features: int = 512,
                 widths: Sequence[int] = (64, 128, 256, 512), input_size: int = 112):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            self._make_layer(w, n) for w, n in zip(widths, layers))
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-5)
        self.dropout = nn.Dropout(p=0.0)
        side = input_size // 16
        self.fc = nn.Linear(widths[3] * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False),
                                   nn.BatchNorm2d(planes, eps=1e-5))
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet50(**kwargs) -> IResNet:
    """The buffalo_l / arcface_torch r50 backbone (43.6 M parameters)."""
    return IResNet((3, 4, 14, 3), **kwargs)


def iresnet_tiny(**kwargs) -> IResNet:
    """A few-thousand-parameter iresnet for tests (one block per stage, widths 8/16/16/32)."""
    return IResNet((1, 1, 1, 1), widths=(8, 16, 16, 32), **kwargs)
