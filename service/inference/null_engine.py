"""A stand-in engine (``CAMSERVE_ENGINE=null``) to measure the HTTP front alone.

It answers with valid rows of the right shape and type (a probability vector per image, a heatmap
per Grad-CAM job), derived cheaply from the pixels so different images get different answers, and
never runs the network. ``batch_ms`` > 0 sleeps that long per batch with the GIL released
(``time.sleep``), standing in for a GPU that computes while the CPU parses the next requests: the
front's capacity measured this way is what an accelerator host could at best serve.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from camcore.bundle import Bundle
from service.inference.jobs import GradcamJob, GradcamRow


class NullEngine:
    """An :class:`service.inference.contract.Engine` that does none of the network's work."""

    device_name = "null"
    runtime = "null"
    runtime_reason = "set by CAMSERVE_ENGINE=null"
    precision = "fp32"
    compiled = False  # the contract's (service.inference.contract.Engine): /health reads it
    trace_reason = "off (null engine)"

    def __init__(self, bundle: Bundle, batch_ms: float = 0.0, tta: str = "none") -> None:
        self.bundle = bundle
        self.model = bundle.model  # for its named blocks (Grad-CAM layers, /health); never called
        self.batch_s = batch_ms / 1000
        self.tta = tta
        self.precision_reason = f"null engine (CAMSERVE_ENGINE=null): no network, {batch_ms:g} ms per batch"
        generator = torch.Generator().manual_seed(0)
        self._mix = torch.randn(3, len(bundle.classes), generator=generator)

    def _probabilities(self, images: torch.Tensor) -> torch.Tensor:
        means = images.float().mean(dim=(2, 3)) / 255  # (N, 3)
        return (means @ self._mix * 4).softmax(1)

    def predict(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        if self.batch_s:
            time.sleep(self.batch_s)
        return list(self._probabilities(torch.stack(images)).numpy())

    def gradcam(self, jobs: list[GradcamJob]) -> list[GradcamRow]:
        if self.batch_s:
            time.sleep(self.batch_s)
        images = torch.stack([job.image for job in jobs])
        probabilities = self._probabilities(images)
        heatmaps = images.float().mean(1) / 255  # (N, H, W) in [0, 1]
        rows = []
        for i, job in enumerate(jobs):
            target = job.target if job.target is not None else int(probabilities[i].argmax())
            rows.append(GradcamRow(heatmaps[i], probabilities[i], target))
        return rows

    def warm_up(self) -> None:
        pass
