"""Class activation maps from one batched forward and backward (the pipeline of pytorch-grad-cam's
``BaseCAM``, batched).

Per image: the chosen block's activations A and the gradient G of the target class's *logit* (the
pre-softmax score) with respect to them; a method turns (A, G) into a map (Grad-CAM: the ReLU of
the channels of A weighted by G's spatial mean), which is min-max scaled to [0, 1] and upsampled
bilinearly to the input size: the same steps, in the same order, as the package.

Batched: one forward and one backward for the whole batch. Each image's score depends only on its
own activations (BatchNorm is in eval mode), so the gradient of the *sum* of the per-image target
logits gives every image exactly its own gradient. The blocks before the target layer run without
autograd, and the gradient is taken with ``torch.autograd.grad`` with respect to the activations
only: the model's weights never require or store gradients.

The forward around the split is :class:`camcore.forward.ServedForward`'s: the same normalisation,
precision and test-time views as a prediction, so the probabilities (and the default target) are
the ones /predict reports for the same image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from camcore.forward import ServedForward

# (activations, gradients), both float32 (N, C, h, w) -> the map before scaling, (N, h, w).
CamMethod = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def grad_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): channels weighted by the spatial mean of their gradient."""
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * activations).sum(dim=1))


METHODS: dict[str, CamMethod] = {"gradcam": grad_cam}
DEFAULT_METHOD = "gradcam"


@dataclass(frozen=True)
class CamOutput:
    heatmaps: torch.Tensor  # float32 (N, H, W) in [0, 1]
    logits: torch.Tensor  # float32 (N, classes), of the images as given, before temperature
    probabilities: torch.Tensor  # float32 (N, classes): what the forward recipe answers for them
    targets: torch.Tensor  # int64 (N,): the class each map explains


def scale_to_unit(cam: torch.Tensor) -> torch.Tensor:
    """Min-max scale each (h, w) map of a batch to [0, 1], as the package's ``scale_cam_image``."""
    flat = cam.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1)
    cam = cam - low
    high = cam.flatten(1).max(1).values.view(-1, 1, 1)
    return cam / (high + 1e-7)


def resolve_targets(requested: Sequence[int | None], probabilities: torch.Tensor) -> torch.Tensor:
    """Each image's class to explain: the one asked for, or where ``None`` its top-1 class."""
    predicted = probabilities.argmax(1).tolist()
    chosen = [top if asked is None else asked for asked, top in zip(requested, predicted, strict=True)]
    return torch.tensor(chosen, dtype=torch.int64, device=probabilities.device)


def class_activation_maps(
    forward: ServedForward,
    images: torch.Tensor,
    layer: str,
    targets: Sequence[int | None],
    method: str = DEFAULT_METHOD,
) -> CamOutput:
    """Maps of ``layer`` for uint8 ``images`` (N, 3, H, W), one target (or ``None``) per image.

    With flip test-time augmentation the mirrored images ride along in the same pass: the
    probabilities (and so the default target) are the mean over both views, while the map is still
    the gradient of the target's logit on the image as given (the mirrored rows' logits are not in
    the score, so their gradients are zero and no image's gradient mixes with another's).
    """
    blocks = forward.model.blocks
    if layer not in blocks:
        raise KeyError(f"unknown layer {layer!r}; valid: {list(blocks)}")
    if method not in METHODS:
        raise KeyError(f"unknown CAM method {method!r}; valid: {list(METHODS)}")
    if len(targets) != len(images):
        raise ValueError(f"{len(targets)} targets for {len(images)} images")
    names = list(blocks)
    split = names.index(layer) + 1
    n = images.shape[0]
    x = forward.inputs(images)
    with forward.autocast(x.device.type):
        with torch.no_grad():
            h = x
            for name in names[:split]:
                h = blocks[name](h)
        activations = h.detach().requires_grad_(True)
        with torch.enable_grad():
            h = activations
            for name in names[split:]:
                h = blocks[name](h)
            all_logits = forward.model.head(h).float()
            logits = all_logits[:n]
            probabilities = forward.probabilities(all_logits.detach())
            chosen = resolve_targets(targets, probabilities)
            score = logits.gather(1, chosen.view(-1, 1)).sum()
            (gradients,) = torch.autograd.grad(score, activations)
    cam = METHODS[method](activations[:n].detach().float(), gradients[:n].float())
    cam = scale_to_unit(cam)
    cam = F.interpolate(cam.unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    return CamOutput(cam.clamp_(0.0, 1.0), logits.detach(), probabilities, chosen)
