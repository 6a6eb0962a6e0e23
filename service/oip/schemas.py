"""The Open Inference Protocol's JSON shapes, for ``/openapi.json`` (and so ``/docs`` and schemathesis).

Written from kserve's ``docs/predict-api/v2/required_api.md`` and Triton's model repository
extension. The handlers in :mod:`service.oip.routes` parse requests themselves (the binary extension puts
raw bytes after the JSON, which no JSON schema describes), so :data:`INFER_REQUEST_BODY` documents
the JSON form only.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.http.errors import error_responses
from service.oip.model import PREFIX
from service.oip.tensors import SIZE
from service.oip.wire import MAX_TENSORS
from service.state import ServiceState


class ProtocolError(BaseModel):
    error: str = Field(examples=["input 'image': datatype FP32, expected BYTES"])


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the sha256 of the served weights")
    platform: str
    inputs: list[TensorMetadata] = Field(description="send exactly one of them")
    outputs: list[TensorMetadata]


class ResponseTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size when the data follows in binary")
    data: list[Any] | None = Field(None, description="row-major, flat; absent when sent in binary")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="sha256 of the weights that answered")
    id: str | None = None
    outputs: list[ResponseTensor]


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: str
    reason: str


class LoadResult(BaseModel):
    name: str
    version: str = Field(description="sha256 of the weights now serving")
    previous_version: str


# A real 32x32 PNG (137 bytes: a warm gradient with a darker square), so that the documented example is a
# request the service answers 200 (tests/test_schema.py posts it), not a placeholder a client would copy.
EXAMPLE_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAUElEQVR42mOclmLDzMBAO8TCwMRAUzBqwagFoxYQtGDZkUeMDAxMDAx4yDwbOQp8"
    "wEiEI5kYRi0YtWDUgpFtQZSnHMF2w2h9MGrBqAUDbgEALHMGdr0zy2cAAAAASUVORK5CYII="
)
INFER_PATH = "/v2/models/{name}/infer"
DEFAULT_MAX_IMAGES = 64  # the default CAMSERVE_MAX_FILES; the served document says the configured one


def _exactly(count: int, items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "minItems": count, "maxItems": count, "items": items}


def _tensor(name: str, datatype: str, shape: dict[str, Any], data: dict[str, Any], what: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": what,
        "required": ["name", "datatype", "shape", "data"],
        "properties": {
            "name": {"type": "string", "enum": [name]},
            "datatype": {"type": "string", "enum": [datatype]},
            "shape": shape,
            "data": data,
            # binary_data_size only with the binary extension, whose body is not application/json
            "parameters": {"type": "object", "not": {"required": ["binary_data_size"]}},
        },
    }


def infer_request_body(max_images: int) -> dict[str, Any]:
    """The JSON form of an inference request, as far as JSON Schema can say it: exactly one input, ``image``
    or ``pixels``, of 1..``max_images`` images. What it cannot say is in the descriptions: the shape's first
    dimension is the number of images in ``data``, and each ``image`` element is the base64 of an image file."""
    count = {"type": "integer", "minimum": 1, "maximum": max_images}
    image = _tensor(
        "image",
        "BYTES",
        {"type": "array", "minItems": 1, "maxItems": 1, "items": count, "description": "[number of images]"},
        {
            "type": "array",
            "minItems": 1,
            "maxItems": max_images,
            "items": {"type": "string", "format": "byte", "description": "base64 of a JPEG, PNG, WebP, BMP or GIF"},
        },
        "encoded image files, decoded as /predict decodes uploads",
    )
    channel = {"type": "integer", "minimum": 0, "maximum": 255}
    pixels = _tensor(
        "pixels",
        "UINT8",
        {
            "type": "array",
            "prefixItems": [count, {"const": SIZE}, {"const": SIZE}, {"const": 3}],
            "minItems": 4,
            "maxItems": 4,
            "description": f"[number of images, {SIZE}, {SIZE}, 3]",
        },
        {
            "type": "array",
            "minItems": 1,
            "maxItems": max_images,
            "items": _exactly(SIZE, _exactly(SIZE, _exactly(3, channel))),
            "description": "row-major RGB values; the same values flat are accepted too",
        },
        f"RGB images of {SIZE}x{SIZE}, no decoding",
    )
    output = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "enum": ["probabilities", "label"]},
            "parameters": {
                "type": "object",
                "properties": {"binary_data": {"type": "boolean"}},
                "not": {"required": ["classification"]},  # the classification extension is not served
            },
        },
    }
    request = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {"oneOf": [image, pixels]}},
            "outputs": {"type": "array", "maxItems": MAX_TENSORS, "items": output},
        },
    }
    example = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [EXAMPLE_PNG_BASE64]}]}
    return {
        "requestBody": {
            "required": True,
            "description": "JSON; or, with the binary tensor data extension, this JSON followed by the tensors' "
            "bytes and an Inference-Header-Content-Length header giving the JSON's length",
            "content": {"application/json": {"schema": request, "example": example}},
        }
    }


INFER_REQUEST_BODY = infer_request_body(DEFAULT_MAX_IMAGES)


def document_limits(schema: dict[str, Any], state: ServiceState) -> None:
    """The served model's name and this process's image limit, into an OpenAPI document built before either
    was known (FastAPI builds it from the routes)."""
    name = {"type": "string", "enum": [state.engine.bundle.name]}
    for path, operations in schema.get("paths", {}).items():
        if not path.startswith(PREFIX + "/"):
            continue
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter.get("name") == "name":
                    parameter["schema"] = {**parameter.get("schema", {}), **name}
    infer = schema.get("paths", {}).get(INFER_PATH, {}).get("post")
    if infer is not None:
        infer["requestBody"] = infer_request_body(state.settings.max_files)["requestBody"]


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The protocol's error answers for ``responses=`` (descriptions shared with the JSON API)."""
    return error_responses(ProtocolError, *codes)
