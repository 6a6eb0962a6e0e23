"""The Open Inference Protocol's input tensors as images: ``image`` (BYTES, encoded files, decoded as
``/predict`` decodes uploads) or ``pixels`` (UINT8 [-1, 32, 32, 3], no decoding).

:func:`read_input` is plain work on bytes and lists, run with the request's parse off the event loop
(:mod:`service.oip.inference`); every count in it is checked against the per-request image limit
before work that grows with it (issue 24). :func:`request_images` then decodes the files, if any,
in the decoder's threads.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import HTTPException

from service.oip.wire import InferRequest, RequestInput, WireError, flatten, split_bytes_elements
from service.state import ServiceState

SIZE = 32  # the network's input side
_ENVELOPE_VALUES = 1024  # the request's own JSON around its tensor data: names, shapes, parameters


def json_value_limit(max_images: int) -> int:
    """The most JSON values a request of ``max_images`` images needs: ``pixels`` nested [N][32][32][3] as
    arrays (N * (3072 numbers + 1057 arrays)), plus its envelope. Anything larger is refused unparsed."""
    return max_images * (SIZE * SIZE * 3 + SIZE * SIZE + SIZE + 1) + _ENVELOPE_VALUES


@dataclass(frozen=True)
class TensorInput:
    """What the request's one input holds: encoded image files to decode, or the images themselves."""

    files: list[tuple[str, bytes]] | None = None
    pixels: list[torch.Tensor] | None = None


def _batch_size(tensor: RequestInput, shape: list[int], max_images: int) -> int:
    """The tensor's first dimension, checked against the expected shape and the per-request image limit."""
    if len(tensor.shape) != len(shape) or any(e != -1 and d != e for d, e in zip(tensor.shape, shape, strict=True)):
        raise WireError(f"input '{tensor.name}': shape {tensor.shape}, expected {shape}")
    count = tensor.shape[0]
    if count < 1:
        raise WireError(f"input '{tensor.name}': no images (first dimension 0)")
    if count > max_images:
        raise HTTPException(413, f"too many images: at most {max_images} per request")
    return count


def _image_files(tensor: RequestInput, max_images: int) -> list[tuple[str, bytes]]:
    count = _batch_size(tensor, [-1], max_images)
    if tensor.raw is not None:
        elements = split_bytes_elements(tensor.raw, "input 'image'", count)
    else:
        strings = flatten(tensor.data, "input 'image'")
        if len(strings) != count:
            raise WireError(f"input 'image': shape [{count}] but {len(strings)} elements")
        if not all(isinstance(s, str) for s in strings):
            raise WireError("input 'image': JSON elements must be base64 strings of image files")
        elements = []
        for i, text in enumerate(strings):
            try:
                elements.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                raise WireError(f"image[{i}]: not base64 (as JSON, each element is a base64 image file)") from None
    if len(elements) != count:
        raise WireError(f"input 'image': shape [{count}] but {len(elements)} elements")
    return [(f"image[{i}]", data) for i, data in enumerate(elements)]


def _pixel_input(tensor: RequestInput, max_images: int) -> list[torch.Tensor]:
    count = _batch_size(tensor, [-1, SIZE, SIZE, 3], max_images)
    expected = count * SIZE * SIZE * 3
    if tensor.raw is not None:
        if len(tensor.raw) != expected:
            raise WireError(f"input 'pixels': {len(tensor.raw)} bytes for shape {tensor.shape} ({expected} bytes)")
        array = np.frombuffer(tensor.raw, dtype=np.uint8)
    else:
        flat = flatten(tensor.data, "input 'pixels'")
        if len(flat) != expected:
            raise WireError(f"input 'pixels': {len(flat)} values for shape {tensor.shape} ({expected} values)")
        try:
            values = np.asarray(flat)
        except (ValueError, TypeError, OverflowError):
            raise WireError("input 'pixels': 'data' must be integers 0..255") from None
        # JSON has one number type: 7.0 is the integer 7 (JSON Schema says so too), 7.5 is not
        whole = values.dtype.kind in "iu" or (values.dtype.kind == "f" and bool(np.all(np.floor(values) == values)))
        if not whole or values.min() < 0 or values.max() > 255:
            raise WireError("input 'pixels': 'data' must be integers 0..255")
        array = values.astype(np.uint8)
    channels_first = np.ascontiguousarray(array.reshape(count, SIZE, SIZE, 3).transpose(0, 3, 1, 2))
    return list(torch.from_numpy(channels_first))


def read_input(infer: InferRequest, max_images: int) -> TensorInput:
    """The request's one input, checked and split (no decoding): off the event loop for a large body."""
    if len(infer.inputs) != 1:
        raise WireError(f"send exactly one input, 'image' or 'pixels' (got {len(infer.inputs)})")
    return read_tensor(infer.inputs[0], max_images)


def read_tensor(tensor: RequestInput, max_images: int) -> TensorInput:
    """One ``image`` or ``pixels`` tensor, checked and split (no decoding)."""
    expected = {"image": "BYTES", "pixels": "UINT8"}
    if tensor.name not in expected:
        raise WireError(f"unknown input {tensor.name!r}; send 'image' (BYTES) or 'pixels' (UINT8)")
    if tensor.datatype != expected[tensor.name]:
        raise WireError(f"input '{tensor.name}': datatype {tensor.datatype}, expected {expected[tensor.name]}")
    if tensor.name == "image":
        return TensorInput(files=_image_files(tensor, max_images))
    return TensorInput(pixels=_pixel_input(tensor, max_images))


async def request_images(tensor: TensorInput, state: ServiceState) -> list[torch.Tensor]:
    if tensor.pixels is not None:
        return tensor.pixels
    return await state.decoder.decode(tensor.files or [])  # priced, budgeted and decoded off the loop


async def tensor_images(tensor: RequestInput, state: ServiceState) -> list[torch.Tensor]:
    """One ``image`` or ``pixels`` tensor as images (the explanation model's picture input)."""
    return await request_images(read_tensor(tensor, state.settings.max_files), state)
