"""Bundles and images that tests and benchmarks make for themselves: an untrained but complete
bundle (when the shipped one is absent, or to control the weights) and seeded noise images.

Lives in ``bench/`` because the benchmarks must not import ``tests/``; the tests import it from here.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from camcore.bundle import MISCLASSIFIED_DIR, write_bundle
from camcore.network import block_geometry, build_network
from camcore.preprocess import CIFAR10_MEAN, CIFAR10_STD

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def random_image(seed: int, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def make_bundle(path: Path, seed: int = 0, misclassified: int = 6) -> Path:
    """An untrained but complete bundle (valid format, real weights file, misclassified PNGs)."""
    torch.manual_seed(seed)
    model = build_network(len(CLASSES)).eval()
    path.mkdir(parents=True, exist_ok=True)
    (path / MISCLASSIFIED_DIR).mkdir(exist_ok=True)
    entries = []
    for i in range(misclassified):
        name = f"{MISCLASSIFIED_DIR}/{i:03d}-test{i:05d}.png"
        random_image(100 + i).save(path / name)
        entries.append(
            {
                "file": name,
                "test_index": i,
                "true_label": CLASSES[i % 10],
                "predicted_label": CLASSES[(i + 1) % 10],
                "confidence": 0.5,
            }
        )
    metadata = {
        "name": "test-bundle",
        "classes": CLASSES,
        "mean": list(CIFAR10_MEAN),
        "std": list(CIFAR10_STD),
        "input_size": 32,
        "test_accuracy": 0.1,
        "test_accuracy_flip_tta": 0.125,
        "val_accuracy": 0.1,
        "per_class_accuracy": dict.fromkeys(CLASSES, 0.1),
        "precision_agreement": {"fp32": 1.0, "bf16": 1.0},
        "trained_epochs": 0,
        "dataset": {"source": "none"},
        "gradcam": {"default_layer": model.default_cam_layer, "layers": [vars(r) for r in block_geometry(model)]},
        "misclassified": entries,
    }
    return write_bundle(path, model, metadata)
