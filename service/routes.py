"""HTTP endpoints. Handlers validate, decode, hand images to a batcher and shape the answer."""

from __future__ import annotations

import hmac
import logging
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from camcore.cam_methods import DEFAULT_METHOD, METHODS, MethodName
from service.batcher import BatchFailed, DynamicBatcher, QueueFull, ShuttingDown
from service.engine import GradcamJob
from service.render import colormap_lut, overlay, png_base64, png_bytes
from service.schemas import (
    CamFaithfulness,
    ErrorResponse,
    GradcamResponse,
    Health,
    MisclassifiedResponse,
    PredictResponse,
    ValidationErrorResponse,
)
from service.state import ServiceState
from service.uploads import MULTIPART_OPENAPI, decode_uploads, read_uploads
from service.web import STATIC_DIR

router = APIRouter()
log = logging.getLogger("camserve.routes")

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ValidationErrorResponse if code == 422 else ErrorResponse, "description": text}
    for code, text in {
        400: "not an image, or a corrupt one",
        401: "missing or wrong API key (when one is configured)",
        408: "request body arrived too slowly",
        413: "body, file count or pixel count over the limit",
        415: "unsupported image type, or not multipart/form-data",
        422: "bad parameters",
        503: "queue full or service draining; retry after Retry-After seconds",
        504: "waited longer than the request timeout",
    }.items()
}


async def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.camserve
    if not state.ready or state.engine is None:
        raise HTTPException(503, "service is not ready", headers={"Retry-After": "1"})
    return state


State = Annotated[ServiceState, Depends(get_state)]


async def require_api_key(request: Request, state: State) -> None:
    """``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, compared in constant time."""
    expected = state.settings.api_key
    if expected is None:
        return
    supplied = request.headers.get("x-api-key", "")
    authorization = request.headers.get("authorization", "")
    if not supplied and authorization.lower().startswith("bearer "):
        supplied = authorization[7:].strip()
    if not hmac.compare_digest(supplied.encode(), expected.get_secret_value().encode()):
        state.metrics.rejections.labels("unauthorized").inc()
        raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})


Authorized = Depends(require_api_key)


async def _run(state: ServiceState, batcher: DynamicBatcher, payloads: list) -> list:
    """Submit to a batcher, turning its refusals into HTTP answers."""
    settings = state.settings
    try:
        return await batcher.submit(payloads, settings.request_timeout_s)
    except QueueFull as exc:
        state.metrics.rejections.labels("queue_full").inc()
        raise HTTPException(503, str(exc), headers={"Retry-After": str(settings.retry_after_s)}) from None
    except ShuttingDown as exc:
        state.metrics.rejections.labels("shutting_down").inc()
        raise HTTPException(503, str(exc), headers={"Retry-After": str(settings.retry_after_s)}) from None
    except TimeoutError:
        state.metrics.rejections.labels("timeout").inc()
        raise HTTPException(504, f"no answer within {settings.request_timeout_s:g} s") from None
    except BatchFailed as exc:
        state.metrics.rejections.labels("batch_failed").inc()
        raise HTTPException(500, f"inference failed for the batch holding this request: {exc}") from None


async def _images(request: Request, state: ServiceState) -> tuple[list[str], list[torch.Tensor]]:
    settings = state.settings
    files = await read_uploads(request, max_files=settings.max_files, max_bytes=settings.max_upload_bytes)
    images = await decode_uploads(files, max_pixels=settings.max_image_pixels, max_frames=settings.max_image_frames)
    request.state.images = len(images)
    return [name for name, _ in files], images


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra=MULTIPART_OPENAPI,
    dependencies=[Authorized],
    summary="Top-k classes for one or more images",
)
async def predict(
    request: Request,
    state: State,
    top_k: Annotated[int, Query(ge=1, le=10, description="classes to return per image")] = 3,
) -> JSONResponse:
    classes = state.bundle.classes
    if top_k > len(classes):
        raise HTTPException(422, f"top_k must be at most {len(classes)}")
    names, images = await _images(request, state)
    rows = await _run(state, state.predict_batcher, images)
    predictions = []
    for name, probabilities in zip(names, rows, strict=True):
        values, indices = probabilities.topk(top_k)
        predictions.append(
            {
                "filename": name,
                "top_k": [
                    {"label": classes[i], "index": i, "probability": p}
                    for p, i in zip(values.tolist(), indices.tolist(), strict=True)
                ],
            }
        )
    # Built to the response model's shape; returned as-is to skip re-validating it on the hot path.
    return JSONResponse({"model_version": state.bundle.version, "predictions": predictions})


def _resolve_target(target: str | None, classes: list[str]) -> int | None:
    """The query's ``target`` as a class index; ``None`` (absent or empty) means the predicted class,
    and stays ``None`` all the way to the CAM code, which resolves it per image."""
    if not target:
        return None
    # isdecimal, not isdigit: "²" is a digit that int() refuses, and that would be a 500.
    if target.lstrip("-").isdecimal() and target.count("-") <= 1:
        index = int(target)
        if 0 <= index < len(classes):
            return index
        raise HTTPException(422, f"target index {index} out of range 0..{len(classes) - 1}")
    lowered = {name.lower(): i for i, name in enumerate(classes)}
    if target.lower() in lowered:
        return lowered[target.lower()]
    raise HTTPException(422, f"unknown target {target!r}; valid: {classes} or an index")


@router.post(
    "/gradcam",
    response_model=GradcamResponse,
    responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "JSON, or a PNG with format=png"}},
    openapi_extra=MULTIPART_OPENAPI,
    dependencies=[Authorized],
    summary="Class activation maps (Grad-CAM and four more methods) and overlays for one or more images",
)
async def gradcam(
    request: Request,
    state: State,
    layer: Annotated[str | None, Query(description="named block; default: the bundle's (/health)")] = None,
    method: Annotated[
        MethodName, Query(description="gradcam, hirescam, gradcampp (Grad-CAM++), xgradcam or layercam")
    ] = DEFAULT_METHOD,
    target: Annotated[str | None, Query(description="class label or index; default: the predicted class")] = None,
    opacity: Annotated[float, Query(ge=0.0, le=1.0, description="heatmap opacity in the overlay")] = 0.5,
    format: Annotated[Literal["json", "png"], Query(description="png: the overlay image (one file only)")] = "json",
    faithfulness: Annotated[
        Literal["road"] | None,
        Query(description="road: also score each heatmap with ROAD (18 more forward passes per image)"),
    ] = None,
) -> Any:
    classes = state.bundle.classes
    layers = list(state.engine.model.blocks)
    layer = layer or state.bundle.default_cam_layer
    if layer not in layers:
        raise HTTPException(422, f"unknown layer {layer!r}; valid layers: {layers}")
    target_index = _resolve_target(target, classes)
    names, images = await _images(request, state)
    if format == "png" and len(images) != 1:
        raise HTTPException(422, "format=png returns one image: send exactly one file")
    road = faithfulness == "road"
    jobs = [GradcamJob(img, layer, target_index, method, road) for img in images]
    rows = await _run(state, state.gradcam_batcher, jobs)
    results = []
    for name, image, row in zip(names, images, rows, strict=True):
        heatmap = row.heatmap.numpy()
        blended = overlay(image.permute(1, 2, 0).numpy(), heatmap, opacity)
        if format == "png":
            headers = {"X-ROAD-Score": f"{row.road:.4f}"} if row.road is not None else None
            return Response(png_bytes(blended), media_type="image/png", headers=headers)
        predicted = int(row.probabilities.argmax())
        results.append(
            {
                "filename": name,
                "label": classes[predicted],
                "probability": float(row.probabilities[predicted]),
                "target": classes[row.target],
                "target_index": row.target,
                "target_probability": float(row.probabilities[row.target]),
                "layer": layer,
                "method": method,
                "road": None if row.road is None else round(row.road, 4),
                "heatmap": np.round(heatmap.astype(np.float64), 4).tolist(),
                "overlay_png": png_base64(blended),
            }
        )
    return JSONResponse({"model_version": state.bundle.version, "results": results})


def _cam_faithfulness(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The bundle's ROAD table (``bench/cam_faithfulness.py``), or None when it has none or a malformed one:
    a bad optional key in model.json must not take /health down."""
    record = meta.get("cam_faithfulness")
    if record is None:
        return None
    try:
        return CamFaithfulness.model_validate(record).model_dump()
    except ValidationError:
        log.warning("model.json: 'cam_faithfulness' does not match the schema; not shown in /health")
        return None


@router.get("/health", response_model=Health, summary="Model, accuracy, device and batching")
async def health(state: State) -> dict[str, Any]:
    meta = state.bundle.metadata
    engine = state.engine
    settings = state.settings
    return {
        "status": "ok",
        "device": engine.device_name,
        "precision": engine.precision,
        "precision_reason": engine.precision_reason,
        "test_time_augmentation": engine.tta,
        "model": {
            "name": meta.get("name", "model"),
            "version": state.bundle.version,
            "architecture": meta["architecture"],
            "parameters": meta.get("parameters", 0),
            "classes": state.bundle.classes,
            "test_accuracy": meta.get("test_accuracy"),
            "test_accuracy_flip_tta": meta.get("test_accuracy_flip_tta"),
            "served_test_accuracy": meta.get("test_accuracy_flip_tta" if engine.tta == "flip" else "test_accuracy"),
            "val_accuracy": meta.get("val_accuracy"),
            "per_class_accuracy": meta.get("per_class_accuracy", {}),
            "trained_epochs": meta.get("trained_epochs"),
            "training_seconds": meta.get("training_seconds"),
            "hardware": meta.get("hardware"),
            "dataset": meta.get("dataset"),
        },
        "gradcam": {
            "layers": state.layers,
            "default_layer": state.bundle.default_cam_layer,
            "methods": list(METHODS),
            "default_method": DEFAULT_METHOD,
            "faithfulness": _cam_faithfulness(meta),
            "colormap": colormap_lut(),
        },
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "queue_size": settings.queue_size,
            "model_lanes": state.lanes,
            "torch_threads": state.torch_threads,
            "traced": engine.traced is not None,
        },
    }


@router.get(
    "/misclassified",
    response_model=MisclassifiedResponse,
    responses=ERRORS,
    dependencies=[Authorized],
    summary="Test images the model got wrong, most confident first",
)
async def misclassified(state: State, n: Annotated[int, Query(ge=1, description="how many")] = 12) -> dict[str, Any]:
    total = len(state.misclassified)
    if n > total:
        raise HTTPException(422, f"n must be between 1 and {total}")
    return {"model_version": state.bundle.version, "total": total, "items": state.misclassified[:n]}


@router.get("/livez", summary="The process is up")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", summary="The model is loaded and warm, and the service is not draining")
async def readyz(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.camserve
    if state.ready and not state.draining:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "draining" if state.draining else "loading"}, 503, headers={"Retry-After": "1"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    registry = request.app.state.camserve.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")
