"""Test data the tests make themselves: tiny image folders and untrained bundles."""

from __future__ import annotations

import io
import tarfile
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


def animation(count: int, fmt: str = "GIF", seed: int = 0) -> tuple[bytes, Image.Image]:
    """``count`` distinct 16x16 noise frames as an animated GIF, WebP (lossless) or APNG, and frame 0.

    Frame 0 decodes to exactly the returned RGB image in all three formats, so what the service
    answers for the animation can be checked against frame 0 alone.
    """
    rng = np.random.default_rng(seed)
    frames = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).convert("P") for _ in range(count)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=10, **extra)
    return data, frames[0].convert("RGB")


def make_image_folder(root: Path, classes: list[str] = CLASSES, train_per_class: int = 6, test_per_class: int = 3):
    """``train/<class>/*.jpg`` and ``test/<class>/*.jpg``; each class a distinct mean colour plus noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([(c * 25) % 256, (c * 70) % 256, (255 - c * 25) % 256])
            for i in range(count):
                noise = rng.integers(-30, 30, (32, 32, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=95)
    return root


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
        "gradcam": {"default_layer": "layer2", "layers": [vars(r) for r in block_geometry(model)]},
        "misclassified": entries,
    }
    return write_bundle(path, model, metadata)


def real_test_slice(archive: Path, per_class: int) -> list[tuple[str, bytes, str]]:
    """The first ``per_class`` test JPEGs of each class in the archive: (filename, bytes, label)."""
    picked: dict[str, list[tuple[str, bytes, str]]] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] == "test":
                rows = picked.setdefault(parts[-2], [])
                if len(rows) < per_class:
                    rows.append((parts[-1], tar.extractfile(member).read(), parts[-2]))
            if len(picked) == 10 and all(len(r) == per_class for r in picked.values()):
                break
    return [row for rows in picked.values() for row in rows]


def served_probabilities(
    model: torch.nn.Module, x: torch.Tensor, tta: str = "flip", temperature: float = 1.0
) -> torch.Tensor:
    """What the service should answer for a normalised batch, written out independently of its engine:
    softmax of the logits divided by the bundle's temperature, averaged with the mirrored image's under
    flip test-time augmentation (the service's default, ``CAMSERVE_TTA``)."""
    with torch.inference_mode():
        probabilities = (model(x).float() / temperature).softmax(1)
        if tta == "flip":
            probabilities = (probabilities + (model(x.flip(3)).float() / temperature).softmax(1)) / 2
    return probabilities
