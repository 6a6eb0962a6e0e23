"""Upload bytes -> the network's uint8 input, or a precise 4xx reason.

Decoding is two steps so that its cost is known before any pixel is decoded:

* :func:`probe_image` reads only the header (and, for a JPEG, picks the reduced scale libjpeg will
  decode at) and says what decoding will cost: the pixels times bands times bytes per sample that
  will be decoded (the unit of the per-image and per-request budgets) and the memory the decode
  will peak at (what :mod:`service.decoding.pool` reserves from the process's decode budget);
* :func:`decode_probed` decodes, shrinks by an integer factor in the image's own mode while it is
  still big (Pillow's ``reduce``), then converts and resizes the small image.

Everything a client can send ends either as a (3, 32, 32) uint8 tensor or as an
:class:`ImageRejected` carrying the HTTP status and a message naming the file; nothing else
escapes, so a hostile upload can never become a 500.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from camcore.preprocess import image_to_uint8
from service.settings import DEFAULT_MAX_IMAGE_FRAMES

SUPPORTED_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "BMP": "BMP", "GIF": "GIF"}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Bytes Pillow stores per pixel, by mode: RGB and other 3-band modes are padded to 4 bytes.
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# A decode's peak memory, from the header: the decoded image as Pillow stores it, times the copies
# the decoder makes (libwebp decodes into its own canvases, then Pillow copies the pixels out), plus
# the 4-byte-per-pixel copy :func:`_shrink` makes of modes it cannot reduce directly or reduces
# premultiplied, plus a progressive JPEG's coefficients. Checked against measured peaks of each kind
# by bench/bounds.py (`calibrate`; bench/results/bounds.md): never under them.
_DECODER_COPIES = {"WEBP": 3.0, "BMP": 1.5}
_CONVERTED_MODES = {"P", "PA", "1", "RGBA", "LA", "La", "RGBa", *SIXTEEN_BIT_MODES}
PEAK_OVERHEAD_BYTES = 256 * 1024
# EXIF orientation -> the transpose that shows the image upright (ImageOps.exif_transpose's table).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageRejected(Exception):
    def __init__(self, status_code: int, filename: str, reason: str) -> None:
        super().__init__(f"{filename}: {reason}")
        self.status_code = status_code
        self.filename = filename
        self.reason = reason


@dataclass
class Probe:
    """An opened upload whose header has been read and no pixel decoded, and what decoding it costs."""

    image: Image.Image
    filename: str
    decoded_bytes: int  # width x height x bands x bytes per sample, at the scale that will be decoded
    peak_bytes: int  # memory the decode is expected to peak at: reserved from the decode budget

    def close(self) -> None:
        """Close the image and let go of it: a decoded WebP's image keeps libwebp's canvases (twice the
        decoded size) until the object itself is freed, and a request holds its probes until its last
        image is decoded."""
        if self.image is not None:
            self.image.close()
            self.image = None  # type: ignore[assignment]


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


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


def probe_image(
    data: bytes,
    filename: str,
    *,
    max_pixels: int,
    max_frames: int = DEFAULT_MAX_IMAGE_FRAMES,
    max_decoded_bytes: int | None = None,
    size: int = 32,
) -> Probe:
    """Open an upload and price its decoding from the header alone; refuse it if it is over a limit.

    ``max_pixels`` caps the declared width x height (any format); ``max_decoded_bytes`` caps what will
    actually be decoded: for a JPEG that is the reduced scale libjpeg decodes at (``draft``: a
    4000x3000 phone photo decodes as 500x375), for the other formats the full canvas.
    """
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
    try:
        return _price(image, data, filename, max_pixels, max_frames, max_decoded_bytes, size)
    except BaseException:
        image.close()
        raise


def _price(
    image: Image.Image,
    data: bytes,
    filename: str,
    max_pixels: int,
    max_frames: int,
    max_decoded_bytes: int | None,
    size: int,
) -> Probe:
    if image.format not in SUPPORTED_FORMATS:
        raise ImageRejected(415, filename, f"unsupported image type {image.format}; send JPEG, PNG, WebP, BMP or GIF")
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
    coefficients = 0
    if image.format in ("JPEG", "MPO"):
        bands = len(image.getbands())
        if image.info.get("progressive") or image.info.get("progression"):
            # libjpeg keeps every DCT coefficient of a progressive image (2 bytes each) whatever the scale.
            coefficients = width * height * bands * 2
        try:
            image.draft("RGB", (size * 2, size * 2))  # decode at reduced scale: big photos stay cheap
        except Exception as exc:
            raise ImageRejected(400, filename, f"corrupt image header ({type(exc).__name__})") from None
    width, height = image.size
    bands = len(image.getbands())
    sample_bytes = 2 if image.mode in SIXTEEN_BIT_MODES else 4 if image.mode in ("I", "F") else 1
    decoded = width * height * bands * sample_bytes
    if max_decoded_bytes is not None and decoded > max_decoded_bytes:
        raise ImageRejected(
            413,
            filename,
            f"decoding {width}x{height} {image.mode} ({mib(decoded)}) exceeds the limit of {mib(max_decoded_bytes)} "
            "per image",
        )
    pixels = width * height
    stored = pixels * _STORED_BYTES.get(image.mode, 4) * _DECODER_COPIES.get(image.format, 1.0)
    converted = pixels * 4 if image.mode in _CONVERTED_MODES or "transparency" in image.info else 0
    peak = int(stored) + converted + coefficients + PEAK_OVERHEAD_BYTES
    return Probe(image, filename, decoded, peak)


def _shrink(image: Image.Image, size: int) -> Image.Image:
    """Reduce a big decoded image by an integer factor (box filter), leaving at least twice ``size``.

    Done in the image's own mode, before any conversion, so the conversions and the final
    antialiased resize work on a small image: a 5000x5000 RGBA upload is composited on white at
    625x625. Palette images are expanded first (averaging palette indices means nothing), 16-bit
    ones widened to 32-bit (``reduce`` does not take them). RGBA is reduced premultiplied, so the
    result matches compositing first, up to rounding.
    """
    factor = min(image.width, image.height) // (2 * size)
    if factor < 2:
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        image = image.convert("I")
    elif image.mode in ("P", "PA", "1"):
        transparent = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if transparent else "L" if image.mode == "1" else "RGB")
    return image.reduce(factor)


def _to_rgb(image: Image.Image, sixteen_bit: bool) -> Image.Image:
    """Any mode to RGB: 16-bit scaled (not clipped), transparency composited on white."""
    if image.mode in (*SIXTEEN_BIT_MODES, "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if sixteen_bit or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def decode_probed(probe: Probe, size: int = 32) -> torch.Tensor:
    """Decode a probed upload (first frame, EXIF orientation applied) to uint8 (3, size, size)."""
    image = probe.image
    try:
        image.load()
        sixteen_bit = image.mode in SIXTEEN_BIT_MODES
        orientation = image.getexif().get(0x0112)
        small = _shrink(image, size)
        if small is not image:
            image.close()  # the full-size pixels go now, not when the probe does
        if orientation in _ORIENTATION:
            small = small.transpose(_ORIENTATION[orientation])
        return image_to_uint8(_to_rgb(small, sixteen_bit), size)
    except ImageRejected:
        raise
    except Exception as exc:
        raise ImageRejected(400, probe.filename, f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None
    finally:
        probe.close()


def decode_image(
    data: bytes,
    filename: str,
    *,
    max_pixels: int,
    max_frames: int = DEFAULT_MAX_IMAGE_FRAMES,
    max_decoded_bytes: int | None = None,
    size: int = 32,
) -> torch.Tensor:
    """Probe and decode one upload on the calling thread (benchmarks, tests; the service goes through
    :mod:`service.decoding.pool`, which prices every file of a request before decoding any)."""
    probe = probe_image(
        data, filename, max_pixels=max_pixels, max_frames=max_frames, max_decoded_bytes=max_decoded_bytes, size=size
    )
    return decode_probed(probe, size)
