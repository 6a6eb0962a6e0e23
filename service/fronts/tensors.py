"""The Open Inference Protocol's input tensors as images, whatever carried them: ``image`` (BYTES, encoded
files, decoded as ``/predict`` decodes uploads) or ``pixels`` (UINT8 [-1, 32, 32, 3], RGB, no decoding).

How the elements travel is each front's business (REST: JSON base64 strings or the binary extension;
gRPC: typed contents or ``raw_input_contents``); what they must be, and what they become, is here, so
both fronts check the same things in the same order and say so in the same words.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from service.state import ServiceState

SIZE = 32  # the network's input side
INPUTS = {"image": "BYTES", "pixels": "UINT8"}
SHAPES = {"image": [-1], "pixels": [-1, SIZE, SIZE, 3]}


class TensorError(ValueError):
    """A tensor that does not fit the model (name, datatype, shape, values, framing): HTTP 400, gRPC
    INVALID_ARGUMENT. The message says which tensor and what."""


class TooManyImages(Exception):
    """More images than ``CAMSERVE_MAX_FILES`` in one request: HTTP 413, gRPC RESOURCE_EXHAUSTED."""


def check_shape(name: str, shape: Sequence[int], expected: Sequence[int]) -> None:
    if len(shape) != len(expected) or any(e != -1 and d != e for d, e in zip(shape, expected, strict=True)):
        raise TensorError(f"input '{name}': shape {list(shape)}, expected {list(expected)}")


def image_count(name: str, datatype: str, shape: Sequence[int], max_images: int) -> int:
    """The number of images an ``image`` or ``pixels`` tensor holds (its first dimension), once its name,
    datatype and shape are the model's and the count is within the per-request limit."""
    if name not in INPUTS:
        raise TensorError(f"unknown input {name!r}; send 'image' (BYTES) or 'pixels' (UINT8)")
    if datatype != INPUTS[name]:
        raise TensorError(f"input '{name}': datatype {datatype}, expected {INPUTS[name]}")
    check_shape(name, shape, SHAPES[name])
    count = shape[0]
    if count < 1:
        raise TensorError(f"input '{name}': no images (first dimension 0)")
    if count > max_images:
        raise TooManyImages(f"too many images: at most {max_images} per request")
    return count


async def decode_images(elements: Sequence[bytes], count: int, state: ServiceState) -> list[torch.Tensor]:
    """An ``image`` tensor's elements (encoded files), priced, budgeted and decoded off the loop
    (service.decoding; its refusals, ImageRejected and DecodeBusy, pass through)."""
    if len(elements) != count:
        raise TensorError(f"input 'image': shape [{count}] but {len(elements)} elements")
    return await state.decoder.decode([(f"image[{i}]", bytes(data)) for i, data in enumerate(elements)])


def pixel_images(
    count: int, shape: Sequence[int], *, raw: bytes | None = None, values: Sequence | None = None, field: str = "'data'"
) -> list[torch.Tensor]:
    """A ``pixels`` tensor as uint8 images, channels first: from its raw bytes, or from its element
    ``values`` (``field`` names where they came from, for the error message)."""
    expected = count * SIZE * SIZE * 3
    if raw is not None:
        if len(raw) != expected:
            raise TensorError(f"input 'pixels': {len(raw)} bytes for shape {list(shape)} ({expected} bytes)")
        array = np.frombuffer(raw, dtype=np.uint8)
    else:
        try:
            numbers = np.asarray(values)
        except (ValueError, TypeError, OverflowError):
            raise TensorError(f"input 'pixels': {field} must be integers 0..255") from None
        if numbers.size != expected:
            raise TensorError(f"input 'pixels': {numbers.size} values for shape {list(shape)} ({expected} values)")
        if numbers.dtype.kind not in "iu" or numbers.min() < 0 or numbers.max() > 255:
            raise TensorError(f"input 'pixels': {field} must be integers 0..255")
        array = numbers.astype(np.uint8)
    channels_first = np.ascontiguousarray(array.reshape(count, SIZE, SIZE, 3).transpose(0, 3, 1, 2))
    return list(torch.from_numpy(channels_first))


def split_bytes_elements(raw: bytes, where: str, count: int | None = None) -> list[bytes]:
    """A raw BYTES tensor: each element a 4-byte little-endian length, then that many bytes (the framing of
    Triton's binary extension over REST and of ``raw_input_contents`` over gRPC). With ``count`` (its
    shape's), split no further: 16 MB of empty elements are 4 million of them."""
    elements, pos = [], 0
    while pos < len(raw):
        if count is not None and len(elements) == count:
            raise TensorError(f"{where}: more than the {count} elements of its shape")
        if pos + 4 > len(raw):
            raise TensorError(f"{where}: truncated element length at byte {pos}")
        length = int.from_bytes(raw[pos : pos + 4], "little")
        pos += 4
        if pos + length > len(raw):
            raise TensorError(f"{where}: element of {length} bytes runs past the tensor's end")
        elements.append(raw[pos : pos + length])
        pos += length
    return elements


def join_bytes_elements(elements: Sequence[bytes]) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)
