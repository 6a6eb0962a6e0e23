"""The Open Inference Protocol (KServe V2) over REST, beside camserve's own API, and Triton's model
repository extension for hot reload.

One model, named as the bundle (``Bundle.name``, ``cifar10-resnet`` for the shipped one), version its
weights' sha256. Inputs: ``image`` (BYTES [-1], one encoded image file per element, decoded exactly as
``/predict`` decodes uploads; as JSON, base64 strings, since JSON strings cannot carry raw bytes) or
``pixels`` (UINT8 [-1, 32, 32, 3], RGB, no decoding). Outputs: ``probabilities`` (FP32 [-1, classes],
classes in ``/health``'s order) and ``label`` (BYTES [-1]). Requests go through ``/predict``'s batcher,
limits and API key; errors are the protocol's ``{"error": "..."}`` with the status ``/predict`` would
give (see :func:`install_oip`).
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import os
import signal
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from camcore.bundle import BundleError
from service.engine import InferenceEngine
from service.oip_schemas import (
    INFER_REQUEST_BODY,
    InferenceResponse,
    Live,
    LoadResult,
    ModelMetadata,
    ModelReady,
    Ready,
    RepositoryModel,
    ServerMetadata,
    errors,
)
from service.oip_wire import (
    HEADER_LENGTH,
    InferRequest,
    RequestInput,
    WireError,
    bytes_output,
    encode_response,
    flatten,
    float32_output,
    parse_request,
    split_body,
    split_bytes_elements,
)
from service.reload import pin, reload_model
from service.routes import AuthorizedState, PredictState, _run, get_state
from service.state import ServiceState

PREFIX = "/v2"
SIZE = 32  # the network's input side
INLINE_PARSE_BYTES = 256 * 1024  # larger JSON bodies are parsed off the event loop
EXTENSIONS = ["binary_tensor_data", "model_repository"]

router = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol"])
State = Annotated[ServiceState, Depends(get_state)]


def _serving(state: ServiceState, name: str, version: str | None = None) -> InferenceEngine:
    """The engine that answers ``name`` (and ``version``, when the path names one), else 404."""
    engine = state.engine
    bundle = engine.bundle
    if name != bundle.name:
        raise HTTPException(404, f"unknown model {name!r}; this server serves {bundle.name!r}")
    if version is not None and version != bundle.version:
        raise HTTPException(404, f"model {name!r} has no version {version!r}; serving {bundle.version}")
    return engine


# -- health and metadata -----------------------------------------------------------------------------
@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "camserve", "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live", response_model=Live, summary="The process is up")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/health/ready",
    response_model=Ready,
    responses={503: {"model": Ready, "description": "loading or draining"}},
    summary="The model is loaded and warm, and the service is not draining",
)
async def ready(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.camserve
    is_ready = state.ready and not state.draining
    return JSONResponse(
        {"ready": is_ready}, 200 if is_ready else 503, headers=None if is_ready else {"Retry-After": "1"}
    )


def _metadata(engine: InferenceEngine) -> dict[str, Any]:
    bundle = engine.bundle
    return {
        "name": bundle.name,
        "versions": [bundle.version],
        "platform": "pytorch",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, SIZE, SIZE, 3]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(bundle.classes)]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
    }


@router.get(
    "/models/{name}",
    response_model=ModelMetadata,
    responses=errors(404, 503),
    summary="Model metadata: one of the two inputs, both outputs",
)
@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, include_in_schema=False)
async def model_metadata(state: State, name: str, version: str | None = None) -> dict[str, Any]:
    return _metadata(_serving(state, name, version))


@router.get(
    "/models/{name}/ready", response_model=ModelReady, responses=errors(404, 503), summary="The model is ready to infer"
)
@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReady, include_in_schema=False)
async def model_ready(state: State, name: str, version: str | None = None) -> dict[str, Any]:
    _serving(state, name, version)
    return {"name": name, "ready": True}


# -- inference ---------------------------------------------------------------------------------------
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


async def _decode_image_input(tensor: RequestInput, state: ServiceState) -> list[torch.Tensor]:
    settings = state.settings
    count = _batch_size(tensor, [-1], settings.max_files)
    if tensor.raw is not None:
        elements = split_bytes_elements(tensor.raw, "input 'image'")
    else:
        strings = flatten(tensor.data, "input 'image'")
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
    files = [(f"image[{i}]", data) for i, data in enumerate(elements)]
    return await state.decoder.decode(files)  # priced, budgeted and decoded off the loop (service.decoding)


def _pixel_input(tensor: RequestInput, max_images: int) -> list[torch.Tensor]:
    count = _batch_size(tensor, [-1, SIZE, SIZE, 3], max_images)
    expected = count * SIZE * SIZE * 3
    if tensor.raw is not None:
        if len(tensor.raw) != expected:
            raise WireError(f"input 'pixels': {len(tensor.raw)} bytes for shape {tensor.shape} ({expected} bytes)")
        array = np.frombuffer(tensor.raw, dtype=np.uint8)
    else:
        try:
            values = np.asarray(flatten(tensor.data, "input 'pixels'"))
        except (ValueError, TypeError, OverflowError):
            raise WireError("input 'pixels': 'data' must be integers 0..255") from None
        if values.size != expected:
            raise WireError(f"input 'pixels': {values.size} values for shape {tensor.shape} ({expected} values)")
        if values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255:
            raise WireError("input 'pixels': 'data' must be integers 0..255")
        array = values.astype(np.uint8)
    channels_first = np.ascontiguousarray(array.reshape(count, SIZE, SIZE, 3).transpose(0, 3, 1, 2))
    return list(torch.from_numpy(channels_first))


async def _images(infer: InferRequest, state: ServiceState) -> list[torch.Tensor]:
    if len(infer.inputs) != 1:
        raise WireError(f"send exactly one input, 'image' or 'pixels' (got {len(infer.inputs)})")
    tensor = infer.inputs[0]
    expected = {"image": "BYTES", "pixels": "UINT8"}
    if tensor.name not in expected:
        raise WireError(f"unknown input {tensor.name!r}; send 'image' (BYTES) or 'pixels' (UINT8)")
    if tensor.datatype != expected[tensor.name]:
        raise WireError(f"input '{tensor.name}': datatype {tensor.datatype}, expected {expected[tensor.name]}")
    if tensor.name == "image":
        return await _decode_image_input(tensor, state)
    return _pixel_input(tensor, state.settings.max_files)


async def _read_request(request: Request) -> InferRequest:
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise HTTPException(415, "compressed requests are not supported: send the body uncompressed")
    body = await request.body()
    header_length = request.headers.get(HEADER_LENGTH)
    if len(body) > INLINE_PARSE_BYTES:
        return await run_in_threadpool(lambda: parse_request(*split_body(body, header_length)))
    return parse_request(*split_body(body, header_length))


@router.post(
    "/models/{name}/infer",
    response_model=None,
    responses={
        200: {
            "model": InferenceResponse,
            "description": "JSON; or, when an output was asked in binary, this JSON then the outputs' bytes",
            "content": {"application/octet-stream": {}},
        },
        **errors(400, 401, 404, 408, 413, 415, 503, 504),
    },
    openapi_extra=INFER_REQUEST_BODY,
    summary="Class probabilities and labels",
)
@router.post("/models/{name}/versions/{version}/infer", response_model=None, include_in_schema=False)
async def infer(request: Request, state: PredictState, name: str, version: str | None = None) -> Response:
    engine = _serving(state, name, version)  # this request is answered by this model, even if another is loaded
    try:
        infer_request = await _read_request(request)
        images = await _images(infer_request, state)
        requested = infer_request.outputs
        available = ("probabilities", "label")
        if requested is None:
            wanted = [(output, infer_request.binary_default) for output in available]
        else:
            unknown = [o.name for o in requested if o.name not in available]
            if unknown:
                raise WireError(f"unknown output(s) {unknown}; this model has {list(available)}")
            wanted = [(o.name, o.binary) for o in requested]
    except WireError as exc:
        raise HTTPException(400, str(exc)) from None
    request.state.images = len(images)
    rows = await _run(state, state.predict_batcher, pin(engine, images))
    probabilities = np.stack(rows)
    classes = engine.bundle.classes
    tensors = {
        "probabilities": float32_output("probabilities", probabilities),
        "label": bytes_output("label", [classes[i] for i in probabilities.argmax(axis=1).tolist()]),
    }
    head: dict[str, Any] = {"model_name": engine.bundle.name, "model_version": engine.bundle.version}
    if infer_request.id is not None:
        head["id"] = infer_request.id
    body, header_length = encode_response(head, [(tensors[output], binary) for output, binary in wanted])
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


# -- model repository extension: hot reload ------------------------------------------------------------
@router.post(
    "/repository/index",
    response_model=list[RepositoryModel],
    responses=errors(401, 408, 413, 503),
    summary="The model this server serves",
)
async def repository_index(state: AuthorizedState) -> list[dict[str, str]]:
    bundle = state.engine.bundle
    return [{"name": bundle.name, "version": bundle.version, "state": "READY", "reason": ""}]


@router.post(
    "/repository/models/{name}/load",
    response_model=LoadResult,
    responses=errors(400, 401, 404, 408, 413, 503),
    summary="Reload the bundle at CAMSERVE_MODEL_DIR: verified, warmed, then swapped in between batches",
)
async def load(request: Request, state: AuthorizedState, name: str) -> dict[str, Any]:
    _serving(state, name)
    body = await request.body()
    if body.strip():
        try:
            parameters = json.loads(body).get("parameters", {})
        except (ValueError, AttributeError):
            raise HTTPException(400, "the load request must be a JSON object") from None
        if parameters:
            raise HTTPException(400, "load takes no parameters: it reloads the bundle at CAMSERVE_MODEL_DIR")
    previous = state.engine.bundle.version
    try:
        engine = await reload_model(state)
    except BundleError as exc:
        state.metrics.rejections.labels("reload_refused").inc()
        raise HTTPException(400, f"bundle refused, still serving {previous}: {exc}") from None
    if state.worker is not None:  # one worker of several: the supervisor has every other worker reload too
        os.kill(os.getppid(), signal.SIGHUP)
    return {"name": engine.bundle.name, "version": engine.bundle.version, "previous_version": previous}


# -- the protocol's error shape ------------------------------------------------------------------------
def install_oip(app: FastAPI) -> None:
    """Mount the protocol and give its paths the protocol's error shape, ``{"error": "..."}``.

    The app's exception handlers (401, 413, 415, 503, image rejections, validation, 500) are wrapped,
    not replaced: metrics and status codes stay the same as everywhere else, only the body under
    ``/v2`` changes. Call after the app's own handlers are registered.
    """
    app.include_router(router)
    for exc_class, handler in list(app.exception_handlers.items()):
        app.exception_handlers[exc_class] = _protocol_errors(handler)


def _protocol_errors(handler: Any) -> Any:
    async def handle(request: Request, exc: Exception) -> Response:
        response = handler(request, exc)
        if inspect.isawaitable(response):
            response = await response
        if not request.url.path.startswith(PREFIX) or not isinstance(response, JSONResponse):
            return response
        detail = json.loads(response.body).get("detail", "")
        message = detail if isinstance(detail, str) else "; ".join(_validation_message(e) for e in detail)
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return JSONResponse({"error": message}, response.status_code, headers=headers)

    return handle


def _validation_message(error: Any) -> str:
    if isinstance(error, dict):
        return f"{'.'.join(str(p) for p in error.get('loc', ()))}: {error.get('msg', '')}"
    return str(error)
