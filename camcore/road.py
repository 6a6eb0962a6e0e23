"""ROAD, "remove and debias" (Rong et al. 2022): how faithful a heatmap is to the network, batched.

Remove the pixels a heatmap ranks highest and the target class's probability should fall; remove
those it ranks lowest and it should hold. For each percentile p in 10, 20, ..., 90, as
``pytorch_grad_cam.metrics.road.ROADCombined`` with ``ClassifierOutputSoftmaxTarget`` computes it:

* most relevant first (MoRF): keep the pixels whose heat is below the p-th percentile of the map,
  remove the rest;
* least relevant first (LeRF): the same on ``1 - heat``, so the coolest pixels go;
* fill the removed pixels by linear imputation (:mod:`camcore.imputation`) of the *normalised*
  image, and run the network plain (no test-time views, no temperature) at the serving precision;
* score = softmax probability of the target class after removal, minus before.

ROAD = mean over p of (LeRF score - MoRF score) / 2. The "before" cancels in that difference, so it
takes 18 forward passes per image (9 percentiles x 2 orders), all images and removals of a batch
in as few passes as the chunk size allows. Higher is more faithful; a random heatmap scores about 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from camcore.forward import ServedForward
from camcore.imputation import linear_impute

PERCENTILES: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)
# Images whose 18 imputed copies are solved and run together: bounds the memory (the elimination keeps
# a 32x32 float64 block per image row and copy: ~75 MB for 16 images) without small passes.
IMAGES_PER_PASS = 16


def removal_masks(heatmaps: np.ndarray, percentiles: Sequence[int] = PERCENTILES) -> np.ndarray:
    """Which pixels each removal keeps: bool (N, 2, P, H, W), [:, 0] most relevant first removed,
    [:, 1] least relevant first removed.

    As the package's ``RemoveMostRelevantFirst``: the threshold is ``np.percentile`` of the float32
    map (linear interpolation) and a pixel is kept when strictly below it, compared in float32; for
    LeRF the map is ``1 - heat``, computed in float32.
    """
    heat = np.asarray(heatmaps, dtype=np.float32)
    masks = []
    for ranked in (heat, np.float32(1) - heat):
        thresholds = np.percentile(ranked, list(percentiles), axis=(1, 2)).astype(np.float32)  # (P, N)
        masks.append(ranked[:, None] < thresholds.T[:, :, None, None])
    return np.stack(masks, axis=1)


def _target_probabilities(forward: ServedForward, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain network's softmax probability of each row's target, for normalised inputs ``x``."""
    with torch.inference_mode(), forward.autocast(x.device.type):
        logits = forward.model(x.contiguous(memory_format=torch.channels_last)).float()
    return forward.probabilities(logits).gather(1, targets.to(x.device).view(-1, 1)).view(-1).cpu()


def road_scores(
    forward: ServedForward,
    images: torch.Tensor,
    heatmaps: torch.Tensor | np.ndarray,
    targets: Sequence[int] | torch.Tensor,
    percentiles: Sequence[int] = PERCENTILES,
    images_per_pass: int = IMAGES_PER_PASS,
) -> np.ndarray:
    """ROAD of each heatmap (N, H, W) for its uint8 image (N, 3, H, W) and target class: float32 (N,).

    ``forward`` must be the plain recipe (``tta="none"``, temperature 1): the metric is defined on
    the network's own softmax, not on what test-time views or calibration make of it.
    """
    if forward.tta != "none" or forward.temperature != 1.0:
        raise ValueError("ROAD runs the plain network: a ServedForward with tta='none' and temperature 1.0")
    n = len(images)
    heat = heatmaps.detach().cpu().numpy() if isinstance(heatmaps, torch.Tensor) else np.asarray(heatmaps)
    if heat.shape != (n, *images.shape[2:]):
        raise ValueError(f"heatmaps {heat.shape} do not match images {tuple(images.shape)}")
    targets = torch.as_tensor(targets, dtype=torch.int64)
    device = forward.normalize.mean.device
    keep = torch.from_numpy(removal_masks(heat, percentiles))  # (N, 2, P, H, W)
    copies = keep.shape[1] * keep.shape[2]
    scores = []
    for start in range(0, n, images_per_pass):
        part = slice(start, start + images_per_pass)
        with torch.inference_mode():
            normalised = forward.normalize(images[part].to(device)).contiguous()
            imputed = linear_impute(normalised.repeat_interleave(copies, 0), keep[part].flatten(0, 2).to(device))
        scores.append(_target_probabilities(forward, imputed, targets[part].repeat_interleave(copies)))
    if not scores:
        return np.zeros(0, dtype=np.float32)
    most_first, least_first = torch.cat(scores).numpy().reshape(n, 2, len(percentiles)).transpose(1, 0, 2)
    return ((least_first.mean(1) - most_first.mean(1)) / 2).astype(np.float32)
