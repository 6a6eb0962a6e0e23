"""Test data the tests make themselves: tiny image folders, animations, a slice of the real test set,
and the reference probabilities. Bundles and noise images come from ``bench/fixtures.py``, which the
benchmarks share."""

from __future__ import annotations

import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fixtures import CLASSES, encode, make_bundle, random_image
from PIL import Image

__all__ = [
    "CLASSES",
    "animation",
    "encode",
    "gif_declaring",
    "grad_cam_by_hand",
    "jpeg_declaring",
    "make_bundle",
    "make_image_folder",
    "png_declaring",
    "point",
    "random_image",
    "real_test_slice",
    "served_probabilities",
    "webp_declaring",
]


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


# -- bombs: headers that declare huge images, with next to nothing behind them --------------------------
# The service prices an image from its header alone, so a test of that pricing needs only the header:
# these take microseconds, where encoding a real 5000x5000 image takes seconds and hundreds of MiB.
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, colour_type: int = 6, bit_depth: int = 8) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` (colour type 6: RGBA, 0: grey, 2: RGB, at
    ``bit_depth``) followed by one tiny IDAT: opens like the real thing, decodes to nothing."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def webp_declaring(width: int, height: int, alpha: bool = True) -> bytes:
    """A lossless WebP whose VP8L header declares ``width`` x ``height`` (libwebp's demuxer reads the
    size from it when the file is opened) and whose bitstream is a few bytes of nothing."""
    bits = (width - 1) | (height - 1) << 14 | int(alpha) << 28  # version 0 in the top 3 bits
    payload = b"\x2f" + struct.pack("<I", bits) + bytes(11)
    chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def gif_declaring(width: int, height: int) -> bytes:
    """A valid one-pixel GIF whose logical screen is ``width`` x ``height``: tiny bytes, huge canvas."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def jpeg_declaring(width: int, height: int, progressive: bool = False) -> bytes:
    """A real 64x64 JPEG whose frame header (SOF0, or SOF2 when progressive) is rewritten to declare
    ``width`` x ``height``."""
    data = bytearray(encode(random_image(0, (64, 64)), "JPEG", quality=90, progressive=progressive))
    sof = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


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


def grad_cam_by_hand(model: torch.nn.Module, x: torch.Tensor, layer: str, target: int) -> torch.Tensor:
    """Grad-CAM for one normalised image (1, 3, H, W), written out independently of camcore.cam: the
    gradient of the target's logit with respect to the layer's output (a hook keeps it), channels
    weighted by its spatial mean, ReLU, min-max scaled to [0, 1], bilinear upsampling to (H, W), min-max again."""
    kept: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        kept["activations"] = output

    handle = getattr(model, layer).register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x.detach().clone().requires_grad_(True))
            logits[0, target].backward()
    finally:
        handle.remove()
    activations = kept["activations"].detach()[0]
    gradients = kept["activations"].grad[0]
    cam = torch.relu((gradients.mean(dim=(1, 2))[:, None, None] * activations).sum(0))
    cam = cam - cam.min()
    cam = cam / (cam.max() + 1e-7)
    cam = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()  # min-max once more after upsampling, as pytorch-grad-cam's BaseCAM aggregates
    return cam / (cam.max() + 1e-7)


def point(link: Path, target: Path) -> None:
    """Repoint the served directory at once, as a deployment would (a symlink swapped by rename)."""
    staged = link.with_name(link.name + ".new")
    staged.unlink(missing_ok=True)
    staged.symlink_to(target, target_is_directory=True)
    os.replace(staged, link)
