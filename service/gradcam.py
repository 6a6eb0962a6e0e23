"""Batched Grad-CAM (Selvaraju et al., 2017) and its overlay rendering.

Per image: channel weights are the spatial mean of the gradient of the target class's *logit*
(the pre-softmax score) with respect to the chosen block's activations; the map is the ReLU of the
weighted sum of activation channels, min-max scaled to [0, 1] and upsampled bilinearly to the input
size -- the same steps, in the same order, as pytorch-grad-cam's ``BaseCAM``.

Batched: one forward and one backward for the whole batch. Each image's score depends only on its
own activations (BatchNorm is in eval mode), so the gradient of the *sum* of the per-image target
logits gives every image exactly its own gradient. The blocks before the target layer run without
autograd, and the gradient is taken with ``torch.autograd.grad`` with respect to the activations
only: the model's weights never require or store gradients.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from service.network import CifarResNet


@dataclass(frozen=True)
class CamOutput:
    heatmaps: torch.Tensor  # float32 (N, H, W) in [0, 1]
    logits: torch.Tensor  # float32 (N, classes), of the images as given
    probabilities: torch.Tensor  # float32 (N, classes); with flip TTA, the mean over both views
    targets: torch.Tensor  # int64 (N,)


def _scale_to_unit(cam: torch.Tensor) -> torch.Tensor:
    flat = cam.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1)
    cam = cam - low
    high = cam.flatten(1).max(1).values.view(-1, 1, 1)
    return cam / (high + 1e-7)


def grad_cam(
    model: CifarResNet,
    x: torch.Tensor,
    layer: str,
    targets: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
    flip_tta: bool = False,
) -> CamOutput:
    """Grad-CAM heatmaps of ``layer`` for a normalised batch ``x``.

    ``targets`` holds a class index per image; ``None``, or -1 for an image, means its top-1 class.
    With ``flip_tta`` the mirrored images ride along in the same pass: the probabilities (and so the
    default target) are the mean over both views, as /predict reports them, while the heatmap is
    still the gradient of the target's logit on the image as given (the mirrored rows' logits are
    not in the score, so their gradients are zero and no image's gradient mixes with another's).
    """
    blocks = model.blocks
    if layer not in blocks:
        raise KeyError(f"unknown layer {layer!r}; valid: {list(blocks)}")
    names = list(blocks)
    split = names.index(layer) + 1
    device_type = x.device.type
    n = x.shape[0]
    if flip_tta:
        x = torch.cat([x, x.flip(3)])
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        with torch.no_grad():
            h = x
            for name in names[:split]:
                h = blocks[name](h)
        activations = h.detach().requires_grad_(True)
        with torch.enable_grad():
            h = activations
            for name in names[split:]:
                h = blocks[name](h)
            all_logits = model.head(h).float()
            logits = all_logits[:n]
            probabilities = logits.softmax(1)
            if flip_tta:
                probabilities = (probabilities + all_logits[n:].softmax(1)) / 2
            predicted = probabilities.argmax(1)
            targets = predicted if targets is None else torch.where(targets < 0, predicted, targets)
            score = logits.gather(1, targets.view(-1, 1)).sum()
            (gradients,) = torch.autograd.grad(score, activations)
    weights = gradients[:n].float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations[:n].detach().float()).sum(dim=1))
    cam = _scale_to_unit(cam)
    cam = F.interpolate(cam.unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    return CamOutput(cam.clamp_(0.0, 1.0), logits.detach(), probabilities.detach(), targets.detach())


# Viridis, sampled at nine evenly spaced points: perceptually uniform and colour-blind safe.
_VIRIDIS = np.array(
    [
        [68, 1, 84],
        [71, 44, 122],
        [59, 81, 139],
        [44, 113, 142],
        [33, 144, 141],
        [39, 173, 129],
        [92, 200, 99],
        [170, 220, 50],
        [253, 231, 37],
    ],
    dtype=np.float32,
)
_VIRIDIS_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_VIRIDIS)), _VIRIDIS[:, c]) for c in range(3)], axis=1
)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """[0, 1] heatmap (H, W) -> uint8 RGB (H, W, 3) in viridis."""
    index = np.clip(np.rint(heatmap * 255), 0, 255).astype(np.intp)
    return _VIRIDIS_LUT[index].astype(np.uint8)


def overlay(image: np.ndarray, heatmap: np.ndarray, opacity: float) -> np.ndarray:
    """Blend the coloured heatmap over the uint8 (H, W, 3) image."""
    blended = (1.0 - opacity) * image.astype(np.float32) + opacity * colorize(heatmap).astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(rgb: np.ndarray) -> str:
    return base64.b64encode(png_bytes(rgb)).decode("ascii")
