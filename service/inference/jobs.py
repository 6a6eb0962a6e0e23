"""What the batchers carry to an engine and back: one job per image, one row per job.

A /predict job is the image itself (uint8, channels first); its row is the probability vector. A
/gradcam job carries its own layer, target and method, so one batch can mix them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from camcore.cam_methods import DEFAULT_METHOD

PredictJob = torch.Tensor  # uint8 (3, H, W)
PredictRow = np.ndarray  # float32 (classes,): the served probabilities


@dataclass(frozen=True)
class GradcamJob:
    image: torch.Tensor  # uint8 (3, H, W)
    layer: str
    target: int | None  # None: explain the predicted class
    method: str = DEFAULT_METHOD  # a name in camcore.cam_methods.METHODS
    road: bool = False  # also score the heatmap's faithfulness (ROAD: 18 more forward passes)


@dataclass(frozen=True)
class GradcamRow:
    heatmap: torch.Tensor  # float32 (H, W)
    probabilities: torch.Tensor  # float32 (classes,)
    target: int
    road: float | None = None  # the heatmap's ROAD score, when the job asked for it
