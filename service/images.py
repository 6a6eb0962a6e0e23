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

from camcore.preprocess import image_to_uint8
from service.settings import DEFAULT_MAX_IMAGE_FRAMES

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


def gif_frames(data: bytes, limit: int) -> int:
    """Frames in a GIF, counted from its block structure without decoding; stops at ``limit + 1``.

    Pillow's ``n_frames`` walks every frame in Python (``read(1)`` per data sub-block): 1.6 to 3 s
    for a 16 MiB GIF of 1.1 million one-pixel frames, measured on this project's 2-core EPYC. This
    walk stops once the count passes the limit (under 1 ms for that file at a limit of 1000). Its
    worst case is a frame whose data is 16 MiB of 1-byte sub-blocks, which must be skipped one by
    one: 0.45 to 0.65 s there (Pillow's ``n_frames``: 1.0 to 1.3 s), so the upload byte cap bounds
    it. Anything but an extension, an image or the trailer where a block should start ends the walk
    (Pillow would skip it byte by byte): a malformed tail can only hide frames that are never decoded,
    as only frame 0 is. Never raises: every read is bounds-checked.
    """
    end = len(data)
    if end < 13:
        return 0
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # header, screen, global colour table
    frames = 0
    while pos < end:
        block = data[pos]
        if block == 0x2C:  # image: descriptor, local colour table, LZW code size, data sub-blocks
            if pos + 10 >= end:
                break
            flags = data[pos + 9]
            pos += 11 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            frames += 1
            if frames > limit:
                break
        elif block == 0x21:  # extension: label, data sub-blocks
            pos += 2
        else:  # 0x3B trailer, or not a block
            break
        while pos < end and data[pos]:  # skip the sub-blocks up to their 0 terminator
            pos += data[pos] + 1
        pos += 1
    return frames


def decode_image(
    data: bytes, filename: str, *, max_pixels: int, max_frames: int = DEFAULT_MAX_IMAGE_FRAMES, size: int = 32
) -> torch.Tensor:
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
        # WebP (libwebp's demuxer, in C, at open), APNG (acTL) and MPO (MP index) know their frame count
        # already; a GIF's is counted, no further than the limit.
        frames = gif_frames(data, max_frames) if image.format == "GIF" else getattr(image, "n_frames", 1)
        if frames > max_frames:
            raise ImageRejected(413, filename, f"too many frames: at most {max_frames} per image")
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
