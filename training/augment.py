"""Whole-batch augmentation (crop with reflect padding, horizontal flip, cutout).

Each op draws its randomness per image but runs as a handful of tensor ops on the whole batch, on
whatever device the batch is on; this is airbench's approach and what keeps 2 CPU cores fed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from camcore.preprocess import CIFAR10_MEAN, CIFAR10_STD, Normalize


def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect-pad by ``pad`` and take a random same-size window per image."""
    if pad == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    rows = (dy + torch.arange(h, device=x.device)).view(n, h, 1)
    cols = (dx + torch.arange(w, device=x.device)).view(n, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def random_flip(x: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def cutout(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero (the mean, after normalisation) a ``size`` square at a random centre per image."""
    if size == 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), device=x.device)
    cx = torch.randint(0, w, (n, 1, 1), device=x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    half = size // 2
    mask = ((ys - cy).abs() <= half - (size % 2 == 0)) & ((xs - cx).abs() <= half - (size % 2 == 0))
    return x.masked_fill(mask.unsqueeze(1), 0.0)


def cutmix(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al., 2019): paste one random box from a shuffled copy of the batch.

    Returns the mixed batch, the labels of the pasted images and the fraction of each image that is
    still its own, which weights the two losses. One box for the whole batch, as in the paper's code.
    """
    n, _, h, w = x.shape
    kept = float(torch.rand(()))  # lambda ~ Beta(1, 1)
    cut_h, cut_w = int(h * (1 - kept) ** 0.5), int(w * (1 - kept) ** 0.5)
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    perm = torch.randperm(n, device=x.device)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
    kept = 1.0 - (bottom - top) * (right - left) / (h * w)  # the box was clipped at the border
    return mixed, y[perm], kept


class TrainTransform(nn.Module):
    """uint8 batch -> normalised, augmented float batch in channels_last."""

    def __init__(
        self,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        crop_padding: int = 4,
        cutout_size: int = 8,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.crop_padding = crop_padding
        self.cutout_size = cutout_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        x = random_crop(x, self.crop_padding)
        x = random_flip(x)
        x = cutout(x, self.cutout_size)
        return x.contiguous(memory_format=torch.channels_last)
