"""Class activation maps from one batched forward and backward (the pipeline of pytorch-grad-cam's
``BaseCAM``, batched).

Per image: the chosen block's activations A and the gradient G of the target class's *logit* (the
pre-softmax score) with respect to them; a method (:mod:`camcore.cam_methods`, e.g. Grad-CAM: the
channels of A weighted by G's spatial mean) turns (A, G) into a map, whose ReLU is min-max scaled to
[0, 1], upsampled bilinearly to the input size and min-max scaled again: the same steps, in the
same order, as the package's ``compute_cam_per_layer`` and ``aggregate_multi_layers``. Every
method reads the same A and G, so one batch may mix methods.

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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from camcore.cam_methods import DEFAULT_METHOD, METHODS
from camcore.forward import ServedForward


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
    method: str | Sequence[str] = DEFAULT_METHOD,
) -> CamOutput:
    """Maps of ``layer`` for uint8 ``images`` (N, 3, H, W), one target (or ``None``) per image, and
    one method for all or one per image (one forward and backward either way).

    With flip test-time augmentation the mirrored images ride along in the same pass: the
    probabilities (and so the default target) are the mean over both views, while the map is still
    the gradient of the target's logit on the image as given (the mirrored rows' logits are not in
    the score, so their gradients are zero and no image's gradient mixes with another's).
    """
    blocks = forward.model.blocks
    if layer not in blocks:
        raise KeyError(f"unknown layer {layer!r}; valid: {list(blocks)}")
    methods = [method] * len(images) if isinstance(method, str) else list(method)
    for name in dict.fromkeys(methods):
        if name not in METHODS:
            raise KeyError(f"unknown CAM method {name!r}; valid: {list(METHODS)}")
    if len(targets) != len(images) or len(methods) != len(images):
        raise ValueError(f"{len(targets)} targets and {len(methods)} methods for {len(images)} images")
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
    cam = maps_of_methods(methods, activations[:n].detach().float(), gradients[:n].float())
    return CamOutput(to_heatmaps(cam, tuple(x.shape[-2:])), logits.detach(), probabilities, chosen)


def to_heatmaps(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A method's (N, h, w) maps -> (N, H, W) heatmaps in [0, 1]: ReLU, min-max, bilinear upsampling,
    min-max again (``BaseCAM.compute_cam_per_layer`` then ``aggregate_multi_layers``, one layer)."""
    cam = scale_to_unit(F.relu(cam))
    cam = F.interpolate(cam.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return scale_to_unit(cam).clamp_(0.0, 1.0)


def maps_of_methods(methods: Sequence[str], activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Each image's map by its own method, (N, h, w): every method runs once, on its images only."""
    if len(set(methods)) == 1:
        return METHODS[methods[0]](activations, gradients)
    cam = activations.new_empty(activations.shape[0], *activations.shape[2:])
    for name in dict.fromkeys(methods):
        rows = torch.tensor([i for i, m in enumerate(methods) if m == name], device=activations.device)
        cam[rows] = METHODS[name](activations[rows], gradients[rows])
    return cam
