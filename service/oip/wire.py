"""The Open Inference Protocol's wire format: JSON tensors and Triton's binary tensor data extension.

An inference request is a JSON object; with the binary extension the body is that JSON followed by
raw tensor bytes, the JSON's length given by the ``Inference-Header-Content-Length`` header, and each
input whose bytes follow says how many in ``parameters.binary_data_size`` (in input order). BYTES
tensors are serialised element by element, each a 4-byte little-endian length and its bytes; numeric
tensors are their little-endian values, row-major. Answers use the same layout for the outputs a
client asked to get in binary (``parameters.binary_data`` per output, or ``binary_data_output`` for all).

Everything here is model-agnostic: :mod:`service.oip.routes` maps tensors to images and rows to tensors.
Every malformed request ends as :class:`WireError` (HTTP 400, or 413 for :class:`WireTooLarge`), never
as another exception.

Nothing here does work that grows with a count before the count is bounded (issue 24): a JSON text
is refused before it is parsed when it holds more values than ``max_values`` (counted from its
``[``, ``{`` and ``,``, in C, a mebibyte at a time), and its nesting is bounded by the parser's recursion limit
(a RecursionError is a 400 here, not a 500); a BYTES tensor is split no further than the elements
its shape declares; a request names at most :data:`MAX_TENSORS` inputs and outputs.
References: kserve ``docs/predict-api/v2/required_api.md``, triton ``docs/protocol/extension_binary_data.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.fronts import tensors

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_TENSORS = 16  # inputs, and outputs asked for, in one request
_LENGTH_DIGITS = 18  # any length of a body that fits in memory, and int() never sees 5,000 digits
_STRUCTURE = b",[{"  # every JSON value but the first is after one of these (outside strings: fewer)
_SCAN_WINDOW = 1 << 20


class WireError(ValueError):
    """A request that does not follow the protocol; the message says what and where."""

    status_code = 400


class WireTooLarge(WireError):
    """A request over a count limit (values, elements)."""

    status_code = 413


def more_json_values_than(text: bytes, limit: int) -> bool:
    """Whether a JSON text may hold more than ``limit`` values: every value but the first follows a ``[``,
    ``{`` or ``,`` (outside strings, at least), counted by ``bytes.translate`` a window at a time, so that
    no single C call holds the GIL for long and a hostile text is refused from its first window."""
    count = 1
    for start in range(0, len(text), _SCAN_WINDOW):
        window = text[start : start + _SCAN_WINDOW]
        count += len(window) - len(window.translate(None, _STRUCTURE))
        if count > limit:
            return True
    return False


def json_object(text: bytes, what: str, max_values: int, max_bytes: int | None = None) -> dict[str, Any]:
    """``text`` parsed as a JSON object, refused before parsing when it may hold over ``max_values`` values
    (or is over ``max_bytes``).

    The bound is counted only for a text longer than ``max_values`` bytes (a value takes a byte at
    least). Nesting deeper than the interpreter's recursion limit is a WireError, not a RecursionError.
    """
    if max_bytes is not None and len(text) > max_bytes:
        raise WireTooLarge(f"{what} is over {max_bytes} bytes")
    if len(text) > max_values and more_json_values_than(text, max_values):
        raise WireTooLarge(f"{what} holds more than {max_values} JSON values")
    try:
        value = json.loads(text)
    except RecursionError:
        raise WireError(f"{what} is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise WireError(f"{what} must be a JSON object")
    return value


@dataclass(frozen=True)
class RequestInput:
    name: str
    datatype: str
    shape: list[int]
    data: Any = None  # the JSON "data", when the tensor came as JSON
    raw: bytes | memoryview | None = None  # its bytes, when it came in the binary part (a view of the body)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    inputs: list[RequestInput]
    outputs: list[RequestedOutput] | None  # None: every output, binary as ``binary_default`` says
    binary_default: bool = False
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def _parameters(owner: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = owner.get("parameters", {})
    if not isinstance(parameters, dict):
        raise WireError(f"{where}: 'parameters' must be an object")
    return parameters


def _flag(parameters: dict[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise WireError(f"{where}: parameter '{key}' must be true or false")
    return value


def _shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise WireError(f"{where}: 'shape' must be a list of non-negative integers")
    return value


def split_body(body: bytes, header_length: str | None, max_values: int) -> tuple[dict[str, Any], bytes | memoryview]:
    """(the JSON request, the binary part after it); the JSON may hold at most ``max_values`` values."""
    if header_length is None:
        head, binary = body, b""
    else:
        valid = header_length.isascii() and header_length.isdecimal() and len(header_length) <= _LENGTH_DIGITS
        if not valid or not 0 < int(header_length) <= len(body):
            shown = header_length if len(header_length) <= 40 else header_length[:40] + "..."
            raise WireError(f"{HEADER_LENGTH} {shown!r} is not a length within the {len(body)}-byte body")
        # The binary part as a view: 16 MB copied twice (here and per input) held the GIL for milliseconds.
        head, binary = body[: int(header_length)], memoryview(body)[int(header_length) :]
    return json_object(head, "the inference request", max_values), binary


def parse_request(request: dict[str, Any], binary: bytes | memoryview) -> InferRequest:
    inputs_json = request.get("inputs")
    if not isinstance(inputs_json, list) or not inputs_json:
        raise WireError("'inputs' must be a non-empty list")
    if len(inputs_json) > MAX_TENSORS:
        raise WireError(f"'inputs': {len(inputs_json)} tensors, at most {MAX_TENSORS}")
    inputs, offset = [], 0
    for i, tensor in enumerate(inputs_json):
        where = f"input {i}"
        if not isinstance(tensor, dict):
            raise WireError(f"{where}: must be an object")
        name, datatype = tensor.get("name"), tensor.get("datatype")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise WireError(f"{where}: 'name' and 'datatype' must be strings")
        where = f"input '{name}'"
        shape = _shape(tensor.get("shape"), where)
        size = _parameters(tensor, where).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise WireError(f"{where}: 'binary_data_size' must be a non-negative integer")
            if offset + size > len(binary):
                raise WireError(f"{where}: binary_data_size {size} runs past the {len(binary) - offset} bytes left")
            inputs.append(RequestInput(name, datatype, shape, raw=binary[offset : offset + size]))
            offset += size
        elif "data" in tensor:
            inputs.append(RequestInput(name, datatype, shape, data=tensor["data"]))
        else:
            raise WireError(f"{where}: neither 'data' nor a 'binary_data_size' parameter")
    if offset != len(binary):
        raise WireError(f"{len(binary) - offset} bytes of binary data after the inputs that claim any")
    parameters = _parameters(request, "request")
    binary_default = _flag(parameters, "binary_data_output", "request")
    outputs = None
    if "outputs" in request:
        outputs_json = request["outputs"]
        if not isinstance(outputs_json, list):
            raise WireError("'outputs' must be a list")
        if len(outputs_json) > MAX_TENSORS:
            raise WireError(f"'outputs': {len(outputs_json)} asked for, at most {MAX_TENSORS}")
        outputs = []
        for i, output in enumerate(outputs_json):
            if not isinstance(output, dict) or not isinstance(output.get("name"), str):
                raise WireError(f"output {i}: must be an object with a 'name'")
            where = f"output '{output['name']}'"
            output_parameters = _parameters(output, where)
            if output_parameters.get("classification"):
                raise WireError(f"{where}: the classification extension is not supported; read 'label'")
            binary_flag = _flag(output_parameters, "binary_data", where) if "binary_data" in output_parameters else None
            outputs.append(RequestedOutput(output["name"], binary_default if binary_flag is None else binary_flag))
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise WireError("'id' must be a string")
    return InferRequest(inputs, outputs, binary_default, request_id, parameters)


def flatten(data: Any, where: str) -> list[Any]:
    """JSON tensor data, nested (row-major) or flat, as one flat list."""
    if not isinstance(data, list):
        raise WireError(f"{where}: 'data' must be a list")
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def split_bytes_elements(raw: bytes | memoryview, where: str, count: int) -> list[bytes]:
    """A binary BYTES tensor of ``count`` elements (its shape's), split by the framing both fronts share
    (:func:`service.fronts.tensors.split_bytes_elements`: no further than ``count``); a bad framing is a
    WireError (400)."""
    try:
        return [bytes(element) for element in tensors.split_bytes_elements(raw, where, count)]
    except tensors.TensorError as exc:
        raise WireError(str(exc)) from None


join_bytes_elements = tensors.join_bytes_elements


@dataclass(frozen=True)
class ResponseOutput:
    name: str
    datatype: str
    shape: list[int]
    json_data: list[Any]  # flat, row-major
    raw: bytes  # the binary extension's serialisation of the same values


def float32_output(name: str, values: np.ndarray) -> ResponseOutput:
    values = np.ascontiguousarray(values, dtype="<f4")
    return ResponseOutput(name, "FP32", list(values.shape), values.ravel().tolist(), values.tobytes())


def bytes_output(name: str, strings: list[str]) -> ResponseOutput:
    encoded = [s.encode() for s in strings]
    return ResponseOutput(name, "BYTES", [len(strings)], strings, join_bytes_elements(encoded))


def encode_response(head: dict[str, Any], outputs: list[tuple[ResponseOutput, bool]]) -> tuple[bytes, int | None]:
    """(body, JSON header length or None): ``outputs`` as (tensor, in binary?), binary parts after the JSON."""
    tensors, binary = [], []
    for output, as_binary in outputs:
        tensor: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if as_binary:
            tensor["parameters"] = {"binary_data_size": len(output.raw)}
            binary.append(output.raw)
        else:
            tensor["data"] = output.json_data
        tensors.append(tensor)
    header = json.dumps({**head, "outputs": tensors}, separators=(",", ":")).encode()
    if not binary:
        return header, None
    return header + b"".join(binary), len(header)
