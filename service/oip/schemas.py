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


_PARAMETERS = {"type": "object", "additionalProperties": True}
INFER_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "JSON; or, with the binary tensor data extension, this JSON followed by the tensors' bytes "
        "and an Inference-Header-Content-Length header giving the JSON's length",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": _PARAMETERS,
                        "inputs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "datatype", "shape"],
                                "properties": {
                                    "name": {"type": "string", "enum": ["image", "pixels"]},
                                    "datatype": {"type": "string", "enum": ["BYTES", "UINT8"]},
                                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                                    "parameters": _PARAMETERS,
                                    "data": {"type": "array"},
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string", "enum": ["probabilities", "label"]},
                                    "parameters": _PARAMETERS,
                                },
                            },
                        },
                    },
                },
                "example": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["<base64 PNG>"]}]},
            }
        },
    }
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The protocol's error answers for ``responses=`` (descriptions shared with the JSON API)."""
    return error_responses(ProtocolError, *codes)
