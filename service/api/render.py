"""Heatmaps as a person sees them: the viridis colour map, the overlay on the image, PNG bytes.

The web page composites the same overlay in the browser from the heatmap in the answer, with the
same colour map (``colormap_lut`` is what ``/health`` hands it) and the same blend, so both agree.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

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


def colormap_lut() -> list[list[int]]:
    """The 256 colours ``colorize`` maps heatmap values 0/255 .. 255/255 to, for the web page."""
    return colorize(np.arange(256, dtype=np.float64) / 255).tolist()
