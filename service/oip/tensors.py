"""The Open Inference Protocol's input tensors over REST as images: the elements out of JSON (base64
strings, nested lists) or the binary extension, then checked and decoded as every front does
(service/protocol/tensors.py)."""

from __future__ import annotations

import base64
import binascii

import torch
from fastapi import HTTPException

from service.oip.wire import InferRequest, RequestInput, WireError, flatten, split_bytes_elements
from service.protocol.tensors import SIZE as SIZE
from service.protocol.tensors import TensorError, TooManyImages, decode_images, image_count, pixel_images
from service.state import ServiceState


def _image_elements(tensor: RequestInput) -> list[bytes]:
    if tensor.raw is not None:
        return split_bytes_elements(tensor.raw, "input 'image'")
    strings = flatten(tensor.data, "input 'image'")
    if not all(isinstance(s, str) for s in strings):
        raise WireError("input 'image': JSON elements must be base64 strings of image files")
    elements = []
    for i, text in enumerate(strings):
        try:
            elements.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise WireError(f"image[{i}]: not base64 (as JSON, each element is a base64 image file)") from None
    return elements


async def tensor_images(tensor: RequestInput, state: ServiceState) -> list[torch.Tensor]:
    """One ``image`` or ``pixels`` tensor as images; a bad tensor is a WireError (400), too many images 413."""
    try:
        count = image_count(tensor.name, tensor.datatype, tensor.shape, state.settings.max_files)
        if tensor.name == "image":
            return await decode_images(_image_elements(tensor), count, state)
        values = None if tensor.raw is not None else flatten(tensor.data, "input 'pixels'")
        return pixel_images(count, tensor.shape, raw=tensor.raw, values=values)
    except TensorError as exc:
        raise WireError(str(exc)) from None
    except TooManyImages as exc:
        raise HTTPException(413, str(exc)) from None


async def request_images(infer: InferRequest, state: ServiceState) -> list[torch.Tensor]:
    if len(infer.inputs) != 1:
        raise WireError(f"send exactly one input, 'image' or 'pixels' (got {len(infer.inputs)})")
    return await tensor_images(infer.inputs[0], state)
