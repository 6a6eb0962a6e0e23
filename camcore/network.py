"""The one definition of the network, shared by training and serving.

The architecture is the custom ResNet of the DAWNBench CIFAR-10 family (David Page's "ResNet-9"):
four `nn.Sequential` blocks (`prep`, `layer1`, `layer2`, `layer3`) and a `head`. Every block is an
attribute *and* an entry of :attr:`CifarResNet.blocks`, so Grad-CAM (and anyone else) can target a
block by name. This module imports nothing beyond torch so the serving image never needs Lightning.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

ARCHITECTURE = "cifar-resnet9"


def conv_bn_relu(c_in: int, c_out: int, *, pool: bool = False) -> nn.Sequential:
    """3x3 conv (no bias: BN follows), optional 2x2 max-pool, BN, ReLU.

    Pooling sits between conv and BN as in Page's net: BN then normalises the pooled statistics.
    """
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """``x + branch(x)``; the branch keeps shape, so no projection is needed."""

    def __init__(self, branch: nn.Sequential) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class Scale(nn.Module):
    """Multiplies the logits by a constant.

    Page's net scales the final linear layer's output by 1/8; without it the large unnormalised
    logits of a max-pooled 512-channel feature make early training unstable at high learning rates.
    """

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class CifarResNet(nn.Module):
    """Custom ResNet for 32x32 images; ``forward`` returns logits (pre-softmax scores)."""

    block_names: tuple[str, ...] = ("prep", "layer1", "layer2", "layer3")
    # The block Grad-CAM explains unless told otherwise: its 8x8 cells each see a 20-pixel window of a
    # 32x32 input (see `block_geometry`), local enough to point somewhere, deep enough to carry class
    # evidence. Bundles record it in model.json; everything else reads it from the bundle.
    default_cam_layer: str = "layer2"

    def __init__(self, num_classes: int = 10, width: int = 64, logit_scale: float = 0.125) -> None:
        super().__init__()
        w = width
        self.prep = conv_bn_relu(3, w)
        self.layer1 = nn.Sequential(
            *conv_bn_relu(w, 2 * w, pool=True),
            Residual(nn.Sequential(conv_bn_relu(2 * w, 2 * w), conv_bn_relu(2 * w, 2 * w))),
        )
        self.layer2 = conv_bn_relu(2 * w, 4 * w, pool=True)
        self.layer3 = nn.Sequential(
            *conv_bn_relu(4 * w, 8 * w, pool=True),
            Residual(nn.Sequential(conv_bn_relu(8 * w, 8 * w), conv_bn_relu(8 * w, 8 * w))),
        )
        self.head = nn.Sequential(
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(8 * w, num_classes, bias=False),
            Scale(logit_scale),
        )
        self.num_classes = num_classes

    @property
    def blocks(self) -> OrderedDict[str, nn.Module]:
        """Name -> block, in forward order; the valid Grad-CAM target layers."""
        return OrderedDict((name, getattr(self, name)) for name in self.block_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks.values():
            x = block(x)
        return self.head(x)


def build_network(num_classes: int = 10) -> CifarResNet:
    """The network as training builds it and bundles store it (fp32, default width)."""
    return CifarResNet(num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class BlockGeometry:
    """Where a block's output cells sit in the input image."""

    name: str
    channels: int
    output_size: int
    receptive_field: int
    jump: int  # input pixels between neighbouring output cells


def _walk(module: nn.Module, size: int, rf: int, jump: int, channels: int) -> tuple[int, int, int, int]:
    """Propagate (size, receptive field, jump, channels) through a module, in forward order."""
    if isinstance(module, nn.Conv2d | nn.MaxPool2d):
        k = _as_int(module.kernel_size)
        s = _as_int(module.stride)
        p = _as_int(module.padding)
        rf += (k - 1) * jump
        jump *= s
        size = math.floor((size + 2 * p - k) / s) + 1
        if isinstance(module, nn.Conv2d):
            channels = module.out_channels
        return size, rf, jump, channels
    if isinstance(module, Residual):
        # The identity path sees less than the branch, so the branch bounds the receptive field.
        return _walk(module.branch, size, rf, jump, channels)
    for child in module.children():
        size, rf, jump, channels = _walk(child, size, rf, jump, channels)
    return size, rf, jump, channels


def _as_int(value: int | tuple[int, ...]) -> int:
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise ValueError(f"non-square geometry {value} is not supported")
        return value[0]
    return value


def block_geometry(model: CifarResNet, input_size: int = 32) -> list[BlockGeometry]:
    """Receptive field and output size of every named block, derived from the modules themselves.

    This is what makes ``layer2`` the default Grad-CAM layer for 32x32 inputs: its 8x8 map has cells
    that each see a 20-pixel window (local enough to point somewhere), while ``layer3``'s 4x4 cells
    each see more than the whole image.
    """
    size, rf, jump, channels = input_size, 1, 1, 3
    rows = []
    for name, block in model.blocks.items():
        size, rf, jump, channels = _walk(block, size, rf, jump, channels)
        rows.append(BlockGeometry(name, channels, size, rf, jump))
    return rows
