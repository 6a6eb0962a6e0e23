"""Upload bytes -> the network's uint8 input, or a precise 4xx reason.

Everything a client can send ends either as a (3, 32, 32) uint8 tensor or as an
:class:`ImageRejected` carrying the HTTP status and a message naming the file; nothing else
escapes, so a hostile upload can never become a 500.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from service.transforms import image_to_uint8

SUPPORTED_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "BMP": "BMP", "GIF": "GIF"}


class ImageRejected(Exception):
    def __init__(self, status_code: int, filename: str, reason: str) -> None:
        super().__init__(f"{filename}: {reason}")
        self.status_code = status_code
        self.filename = filename
        self.reason = reason


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB: 16-bit scaled (not clipped), transparency composited on white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def decode_image(data: bytes, filename: str, *, max_pixels: int, size: int = 32) -> torch.Tensor:
    """Decode one upload (first frame of animations, EXIF orientation applied) to uint8 (3, size, size)."""
    if not data:
        raise ImageRejected(400, filename, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected(400, filename, "not an image (unrecognised data)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(413, filename, "image has too many pixels (decompression bomb?)") from None
    except Exception as exc:  # Pillow raises many types for hostile headers
        raise ImageRejected(400, filename, f"corrupt image header ({type(exc).__name__})") from None
    with image:
        if image.format not in SUPPORTED_FORMATS:
            raise ImageRejected(
                415, filename, f"unsupported image type {image.format}; send JPEG, PNG, WebP, BMP or GIF"
            )
        width, height = image.size
        if width * height > max_pixels:
            raise ImageRejected(413, filename, f"{width}x{height} pixels exceeds the limit of {max_pixels}")
        if width < 1 or height < 1:
            raise ImageRejected(400, filename, "image has no pixels")
        try:
            image.seek(0)
            if image.format == "JPEG":
                image.draft("RGB", (size * 2, size * 2))  # decode at reduced scale: big photos stay cheap
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return image_to_uint8(_to_rgb(image), size)
        except ImageRejected:
            raise
        except Exception as exc:
            raise ImageRejected(400, filename, f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None
