"""The lab's two model families: a (residual) MLP and a plain or residual CNN ending in GAP + Linear."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from config import SHORTCUTS, RunConfig


def block_sizes(num_layers: int, residual_step: int) -> list[int]:
    """Split `num_layers` layers into blocks of `residual_step` (0 = one layer per block, no shortcuts).

    The last block takes the remainder when `residual_step` does not divide `num_layers`.
    """
    step = residual_step if residual_step > 0 else 1
    sizes = [step] * (num_layers // step)
    if num_layers % step:
        sizes.append(num_layers % step)
    return sizes


class MLPBlock(nn.Module):
    """`num_layers` x [Linear(width, width), ReLU], with an optional identity shortcut around them."""

    def __init__(self, width: int, num_layers: int, shortcut: bool):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return out + x if self.shortcut else out


class MLP(nn.Module):
    """Flatten, Linear+ReLU, `num_hidden_layers` hidden Linear+ReLU (in residual blocks of `residual_step`), Linear."""

    def __init__(self, input_size: int, width: int, num_hidden_layers: int, num_classes: int,
                 residual_step: int = 0):
        super().__init__()
        if residual_step > 0 and num_hidden_layers % residual_step:
            raise ValueError(f"--num_hidden_layers {num_hidden_layers} is not a multiple of "
                             f"--residual_step {residual_step}")
        self.input = nn.Sequential(nn.Flatten(), nn.Linear(input_size, width), nn.ReLU())
        self.hidden = nn.Sequential(*[MLPBlock(width, n, residual_step > 0)
                                      for n in block_sizes(num_hidden_layers, residual_step)])
        self.head = nn.Linear(width, num_classes)
        self.depth = num_hidden_layers + 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.input(x)))


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """A bias-free convolution followed by batch norm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels))


class PaddedIdentity(nn.Module):
    """He et al.'s option A where the shape changes: the input subsampled by `stride`, its new channels zero.
    Parameter-free, so a residual network has exactly the parameters of its plain twin."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride, self.extra_channels = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra_channels))


class ConvBlock(nn.Module):
    """`num_convs` 3x3 conv+BN layers with ReLUs; with a `shortcut` (identity or projection), the input is added
    before the last ReLU. Where the shape changes, identity is He et al.'s option A (subsample, zero-pad the new
    channels) and projection their option B (1x1 convolution and batch norm)."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, stride: int, shortcut: str | None):
        super().__init__()
        convs = [conv_bn(in_channels, out_channels, 3, stride)]
        convs += [conv_bn(out_channels, out_channels, 3) for _ in range(num_convs - 1)]
        self.convs = nn.ModuleList(convs)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if shortcut is not None and shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}; choose {' or '.join(SHORTCUTS)}")
        if shortcut is not None:
            if stride == 1 and in_channels == out_channels:
                self.shortcut = nn.Identity()
            elif shortcut == "identity":
                self.shortcut = PaddedIdentity(in_channels, out_channels, stride)
            else:
                self.shortcut = conv_bn(in_channels, out_channels, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i, conv in enumerate(self.convs):
            out = conv(out)
            if i < len(self.convs) - 1:
                out = self.relu(out)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.relu(out)


class ResNet(nn.Module):
    """Stem, `num_levels` levels of 3x3 convs (channels doubling, stride 2 between levels), GAP, Linear.

    `residual_step = k > 0` groups every k convolutions of a level into a block with a `shortcut` (identity: He et
    al.'s option A, parameter-free; projection: option B); 0 gives the same network without shortcuts.
    """

    def __init__(self, in_channels: int, num_classes: int, out_channels: int = 64, num_levels: int = 4,
                 num_conv_per_level: int = 4, residual_step: int = 0, stem: str = "cifar",
                 shortcut: str = "identity"):
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(conv_bn(in_channels, out_channels, 3), nn.ReLU(inplace=True))
        elif stem == "imagenet":
            self.stem = nn.Sequential(conv_bn(in_channels, out_channels, 7, stride=2), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        else:
            raise ValueError(f"unknown stem {stem!r}; choose cifar or imagenet")
        levels = []
        channels = out_channels
        for level in range(num_levels):
            level_channels = out_channels * 2 ** level
            blocks = []
            for b, n in enumerate(block_sizes(num_conv_per_level, residual_step)):
                stride = 2 if level > 0 and b == 0 else 1
                blocks.append(ConvBlock(channels, level_channels, n, stride, shortcut if residual_step > 0 else None))
                channels = level_channels
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.Sequential(*levels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.depth = 1 + num_levels * num_conv_per_level + 1
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, (N, C, h, w), before global average pooling."""
        return self.levels(self.stem(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from a feature map: global average pooling, then the linear classifier."""
        return self.fc(torch.flatten(self.pool(features), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_model(config: RunConfig) -> nn.Module:
    """Build the model a run's config describes."""
    if config.model_name == "MLP":
        return MLP(config.in_channels * config.input_size ** 2, config.width, config.num_hidden_layers,
                   config.num_classes, config.residual_step)
    if config.model_name == "ResNet":
        return ResNet(config.in_channels, config.num_classes, config.out_channels, config.num_levels,
                      config.num_conv_per_level, config.residual_step, config.stem, config.shortcut)
    raise ValueError(f"unknown model {config.model_name!r}; choose MLP or ResNet")
