"""Preprocessing shared by the training job and the service: the resize policy and normalisation.

Both sides feed the network exactly the same tensors: uint8 RGB images, 32x32, scaled to [0, 1],
normalised with the bundle's mean/std, in channels_last memory order (the fast layout for this
network's convolutions on CPU and GPU alike).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

# CIFAR-10 training-set channel statistics (on 0..1 pixels); recorded in every bundle.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """uint8 (N, 3, H, W) -> float normalised, channels_last. Works on any device."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


def image_to_uint8(image: Image.Image, size: int = 32) -> torch.Tensor:
    """Any PIL image -> uint8 (3, size, size) RGB tensor, the network's input before `Normalize`.

    Training data and uploaded images both go through here, so a served image is preprocessed the
    way the test set was. Images already at ``size`` are untouched (CIFAR-10 itself); others are
    resized with Pillow's antialiased bilinear filter.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    # numpy, not torch, makes the channel-first copy: a torch op lets go of the GIL and must take it back,
    # which costs a hand-over each time when this runs on a decode thread beside a busy event loop.
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
