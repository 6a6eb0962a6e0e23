"""The gradient CAM methods: each turns one layer's activations and gradients into a map.

One small function per method, each a transcription of pytorch-grad-cam's class of the same name
(``grad_cam.py``, ``hirescam.py``, ``grad_cam_plusplus.py``, ``xgrad_cam.py``, ``layer_cam.py``),
in float32 like the package's numpy. As there, a method returns the map *before* the ReLU: the
pipeline (:mod:`camcore.cam`, the package's ``BaseCAM``) applies the ReLU, the min-max scaling
and the upsampling, the same for every method. All of them read the same activations ``A`` and
gradients ``G`` (float32, (N, C, h, w)) of one forward and backward, so serving several methods
costs one pass, not one per method.

Methods that weight channels (Grad-CAM, Grad-CAM++, XGrad-CAM) return ``sum_c w_c A_c``;
HiResCAM and LayerCAM weight every activation by its own gradient, which keeps the map faithful
to the gradient where spatial pooling would average it away.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F

# (activations, gradients), both float32 (N, C, h, w) -> the map before ReLU and scaling, (N, h, w).
CamMethod = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MethodName = Literal["gradcam", "hirescam", "gradcampp", "xgradcam", "layercam"]


def _weighted_channels(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """``BaseCAM.get_cam_image``: per-image channel weights (N, C) times the activations, summed."""
    return (weights[:, :, None, None] * activations).sum(dim=1)


def grad_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): channels weighted by the spatial mean of their gradient."""
    return _weighted_channels(gradients.mean(dim=(2, 3)), activations)


def hires_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin 2020): every activation times its own gradient, summed over channels.

    For a network ending in global *average* pooling and a linear layer this is exactly the
    target's contribution per location; Grad-CAM's spatial mean of the gradient is not."""
    return (gradients * activations).sum(dim=1)


def grad_cam_plus_plus(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018), eq. 19 with the package's closed form for alpha.

    alpha = G^2 / (2 G^2 + sum_ij(A) G^3 + 1e-6), zero where G is zero; the channel weight is
    sum_ij(alpha ReLU(G)), so only locations whose gradient raises the target count."""
    squared = gradients.pow(2)
    cubed = squared * gradients
    activation_sums = activations.sum(dim=(2, 3), keepdim=True)
    alpha = squared / (2 * squared + activation_sums * cubed + 1e-6)
    alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
    weights = (F.relu(gradients) * alpha).sum(dim=(2, 3))
    return _weighted_channels(weights, activations)


def xgrad_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020): channel weight sum_ij(G A) / (sum_ij(A) + 1e-7), an
    activation-weighted mean of the gradient where Grad-CAM takes a plain mean."""
    activation_sums = activations.sum(dim=(2, 3), keepdim=True)
    weights = (gradients * activations / (activation_sums + 1e-7)).sum(dim=(2, 3))
    return _weighted_channels(weights, activations)


def layer_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): every activation times the ReLU of its own gradient, summed over
    channels; meant for shallow layers, whose gradients change sign from place to place."""
    return (F.relu(gradients) * activations).sum(dim=1)


# The names are MethodName's, in its order (one list): each with its channel weighting.
METHODS: dict[str, CamMethod] = dict(
    zip(get_args(MethodName), (grad_cam, hires_cam, grad_cam_plus_plus, xgrad_cam, layer_cam), strict=True)
)
DEFAULT_METHOD: MethodName = "gradcam"
