"""The gRPC messages' tensors: inputs out of typed ``contents`` or ``raw_input_contents`` (one entry per
input, in order, never both), outputs into ``raw_output_contents`` as Triton answers them (what
``tritonclient.grpc``'s ``as_numpy`` reads); what the tensors must be is service/fronts/tensors.py's."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from service.fronts.tensors import (
    TensorError,
    decode_images,
    image_count,
    join_bytes_elements,
    pixel_images,
    split_bytes_elements,
)
from service.grpc import inference_pb2 as pb
from service.state import ServiceState

Input = pb.ModelInferRequest.InferInputTensor


@dataclass(frozen=True)
class Inputs:
    """A request's tensors by name, each with its raw bytes when it came in ``raw_input_contents``."""

    tensors: dict[str, tuple[Input, bytes | None]]

    @classmethod
    def of(cls, request: pb.ModelInferRequest) -> Inputs:
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise TensorError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send one per input")
        tensors: dict[str, tuple[Input, bytes | None]] = {}
        for i, tensor in enumerate(request.inputs):
            if tensor.name in tensors:
                raise TensorError(f"input {tensor.name!r} sent twice")
            if any(d < 0 for d in tensor.shape):
                raise TensorError(f"input {tensor.name!r}: shape {list(tensor.shape)} has a negative dimension")
            if raw and tensor.HasField("contents"):
                raise TensorError(f"input {tensor.name!r}: both contents and raw_input_contents; send one of them")
            tensors[tensor.name] = (tensor, raw[i] if raw else None)
        return cls(tensors)


async def input_images(inputs: Inputs, state: ServiceState, others: tuple[str, ...] = ()) -> list[torch.Tensor]:
    """The one ``image`` or ``pixels`` input as images (``others``: the further inputs the model takes)."""
    images = [name for name in inputs.tensors if name not in others]
    if len(images) != 1:
        raise TensorError(f"send exactly one input, 'image' or 'pixels' (got {len(images)})")
    tensor, raw = inputs.tensors[images[0]]
    count = image_count(tensor.name, tensor.datatype, list(tensor.shape), state.settings.max_files)
    if tensor.name == "image":
        elements = (
            split_bytes_elements(raw, "input 'image'", count) if raw is not None else tensor.contents.bytes_contents
        )
        return await decode_images(list(elements), count, state)
    values = None if raw is not None else tensor.contents.uint_contents
    return pixel_images(count, list(tensor.shape), raw=raw, values=values, field="'uint_contents'")


def int32_input(inputs: Inputs, name: str) -> tuple[np.ndarray, list[int]] | None:
    """An INT32 input's values and shape, or None when it was not sent."""
    if name not in inputs.tensors:
        return None
    tensor, raw = inputs.tensors[name]
    if tensor.datatype != "INT32":
        raise TensorError(f"input '{name}': datatype {tensor.datatype}, expected INT32")
    if raw is not None:
        if len(raw) % 4:
            raise TensorError(f"input '{name}': {len(raw)} bytes is not a whole number of INT32 values")
        return np.frombuffer(raw, dtype="<i4"), list(tensor.shape)
    return np.asarray(tensor.contents.int_contents, dtype=np.int64), list(tensor.shape)


def request_parameters(request: pb.ModelInferRequest) -> dict[str, object]:
    """The request's parameters as plain values (a string, an integer, a boolean or a float)."""
    values: dict[str, object] = {}
    for key, parameter in request.parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, choice) if choice else None
    return values


def add_output(response: pb.ModelInferResponse, name: str, value: np.ndarray | list[str]) -> None:
    """One output, its bytes in ``raw_output_contents``: FP32 little-endian values, BYTES length-prefixed."""
    if isinstance(value, list):
        response.outputs.add(name=name, datatype="BYTES", shape=[len(value)])
        response.raw_output_contents.append(join_bytes_elements([s.encode() for s in value]))
        return
    array = np.ascontiguousarray(value, dtype="<f4")
    response.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
    response.raw_output_contents.append(array.tobytes())
