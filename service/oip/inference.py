"""The Open Inference Protocol (KServe V2) over REST, beside camserve's own API, and Triton's model
repository extension for hot reload.

One model, named as the bundle (``Bundle.name``, ``cifar10-resnet`` for the shipped one), version its
weights' sha256. Inputs: ``image`` (BYTES [-1], one encoded image file per element, decoded exactly as
``/predict`` decodes uploads; as JSON, base64 strings, since JSON strings cannot carry raw bytes) or
``pixels`` (UINT8 [-1, 32, 32, 3], RGB, no decoding). Outputs: ``probabilities`` (FP32 [-1, classes],
classes in ``/health``'s order) and ``label`` (BYTES [-1]). Requests go through ``/predict``'s batcher,
limits and API key; errors are the protocol's ``{"error": "..."}`` with the status ``/predict`` would
give (one error path: :mod:`service.http.errors`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.http.admission import State, admitted, readiness, retry_after, service_state, submit
from service.inference.registry import pin
from service.oip.model import EXTENSIONS, PREFIX, metadata, serving
from service.oip.schemas import (
    INFER_REQUEST_BODY,
    InferenceResponse,
    Live,
    ModelMetadata,
    ModelReady,
    Ready,
    ServerMetadata,
    errors,
)
from service.oip.tensors import TensorInput, json_value_limit, read_input, request_images
from service.oip.wire import (
    HEADER_LENGTH,
    InferRequest,
    WireError,
    bytes_output,
    encode_response,
    float32_output,
    parse_request,
    split_body,
)
from service.state import ServiceState

BATCHER = "predict"  # the protocol's infer runs through /predict's batcher
# Larger bodies are parsed and split in a thread. The most a body this small costs on the loop is
# 0.7 ms (JSON of 5,400 empty arrays, bench/results/bounds.md section 5); a thread hop costs more
# than parsing a one-image request.
INLINE_PARSE_BYTES = 16 * 1024

router = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol"])
PredictState = admitted(BATCHER)


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
    state = service_state(request)
    is_ready = readiness(state) == "ready"
    return JSONResponse({"ready": is_ready}, 200 if is_ready else 503, headers=None if is_ready else retry_after(state))


@router.get(
    "/models/{name}",
    response_model=ModelMetadata,
    responses=errors(404, 503),
    summary="Model metadata: one of the two inputs, both outputs",
)
@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, include_in_schema=False)
async def model_metadata(state: State, name: str, version: str | None = None) -> dict[str, Any]:
    return metadata(serving(state, name, version))


@router.get(
    "/models/{name}/ready", response_model=ModelReady, responses=errors(404, 503), summary="The model is ready to infer"
)
@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReady, include_in_schema=False)
async def model_ready(state: State, name: str, version: str | None = None) -> dict[str, Any]:
    serving(state, name, version)
    return {"name": name, "ready": True}


# -- inference ---------------------------------------------------------------------------------------
def _parse(
    body: bytes, header_length: str | None, max_images: int, split_input: bool
) -> tuple[InferRequest, TensorInput | None]:
    """The whole request, parsed, checked against its limits and (``split_input``: a request with one input)
    split into its input: bytes in, no I/O."""
    infer_request = parse_request(*split_body(body, header_length, json_value_limit(max_images)))
    return infer_request, read_input(infer_request, max_images) if split_input else None


async def _read_request(
    request: Request, state: ServiceState, split_input: bool = True
) -> tuple[InferRequest, TensorInput | None]:
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise HTTPException(415, "compressed requests are not supported: send the body uncompressed")
    body = await request.body()
    header_length = request.headers.get(HEADER_LENGTH)
    parse = (body, header_length, state.settings.max_files, split_input)
    if len(body) > INLINE_PARSE_BYTES:
        return await run_in_threadpool(_parse, *parse)
    return _parse(*parse)


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
    engine = serving(state, name, version)  # this request is answered by this model, even if another is loaded
    try:
        infer_request, tensor = await _read_request(request, state)
        images = await request_images(tensor, state)
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
        raise HTTPException(exc.status_code, str(exc)) from None
    request.state.images = len(images)
    rows = await submit(state, BATCHER, pin(engine, images), request)
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
