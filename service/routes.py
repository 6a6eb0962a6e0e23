"""HTTP endpoints. Handlers validate, decode, hand images to a batcher and shape the answer."""

from __future__ import annotations

import logging
import os
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from camcore.cam_methods import DEFAULT_METHOD, METHODS, MethodName
from service.auth import authorize, checks_key
from service.batcher import BatchFailed, DynamicBatcher, QueueFull, ShuttingDown
from service.engine import GradcamJob
from service.raw_body import REQUEST_BODY_OPENAPI, is_raw_image, read_raw_image
from service.reload import pin
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
from service.uploads import read_uploads
from service.web import STATIC_DIR

router = APIRouter()
log = logging.getLogger("camserve.routes")

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ValidationErrorResponse if code == 422 else ErrorResponse, "description": text}
    for code, text in {
        400: "not an image, or a corrupt one",
        401: "missing or wrong API key (when one is configured)",
        408: "request body arrived too slowly",
        413: "body, file count, pixels, frames or decoded size over the limit",
        415: "unsupported image type, or not multipart/form-data",
        422: "bad parameters",
        503: "queue full, decode budget busy or service draining; retry after Retry-After seconds",
        504: "waited longer than the request timeout",
    }.items()
}


async def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.camserve
    if not state.ready or state.engine is None:
        raise HTTPException(503, "service is not ready", headers={"Retry-After": "1"})
    return state


State = Annotated[ServiceState, Depends(get_state)]


@checks_key
async def authorized_state(request: Request) -> ServiceState:
    """The service, once it is ready (503) and the request carries the API key where one is set (401)."""
    state = await get_state(request)
    authorize(state, request.headers)
    return state


AuthorizedState = Annotated[ServiceState, Depends(authorized_state)]


def admit(state: ServiceState, kind: Literal["predict", "gradcam"]) -> None:
    """503 while the endpoint's queue is full or the service drains.

    Called before the handler reads the body, so an overloaded service answers at once, instead of
    after receiving and decoding an upload it would refuse anyway. (A request admitted here can still
    find the queue full after decoding; ``_run`` refuses it then.)
    """
    batcher: DynamicBatcher = getattr(state, f"{kind}_batcher")
    retry = {"Retry-After": str(state.settings.retry_after_s)}
    if state.draining or not batcher.accepting:
        state.metrics.rejections.labels("shutting_down").inc()
        raise HTTPException(503, "service is shutting down", headers=retry)
    if batcher.free <= 0:
        state.metrics.rejections.labels("queue_full").inc()
        detail = f"{kind} queue is full ({batcher.depth} of {batcher.queue_size} images)"
        raise HTTPException(503, detail, headers=retry)


def admitted(kind: Literal["predict", "gradcam"]) -> Any:
    """The one dependency of an endpoint that queues images: ready, authorised, and room in its queue,
    checked in that order before the body is read. One dependency, not three: FastAPI's solving of
    each costs the single-image request more than the check itself (service/auth.py)."""

    @checks_key
    async def dependency(request: Request) -> ServiceState:
        state = await authorized_state(request)
        admit(state, kind)
        return state

    return Annotated[ServiceState, Depends(dependency)]


PredictState = admitted("predict")
GradcamState = admitted("gradcam")


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
    if is_raw_image(request.headers.get("content-type", "")):
        files = await read_raw_image(request)
    else:
        files = await read_uploads(request, max_files=settings.max_files, max_bytes=settings.max_upload_bytes)
    images = await state.decoder.decode(files)
    request.state.images = len(images)
    return [name for name, _ in files], images


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra=REQUEST_BODY_OPENAPI,
    summary="Top-k classes for one or more images",
)
async def predict(
    request: Request,
    state: PredictState,
    top_k: Annotated[int, Query(ge=1, le=10, description="classes to return per image")] = 3,
) -> JSONResponse:
    engine = state.engine  # this request is answered by this model, even if another is loaded meanwhile
    classes = engine.bundle.classes
    if top_k > len(classes):
        raise HTTPException(422, f"top_k must be at most {len(classes)}")
    names, images = await _images(request, state)
    rows = await _run(state, state.predict_batcher, pin(engine, images))
    predictions = []
    for name, probabilities in zip(names, rows, strict=True):
        best = top_indices(probabilities, top_k)
        predictions.append(
            {
                "filename": name,
                "top_k": [
                    {"label": classes[i], "index": i, "probability": p}
                    for i, p in zip(best, probabilities[best].tolist(), strict=True)
                ],
            }
        )
    # Built to the response model's shape; returned as-is to skip re-validating it on the hot path.
    return JSONResponse({"model_version": engine.bundle.version, "predictions": predictions})


def top_indices(probabilities: np.ndarray, k: int) -> list[int]:
    """The k most probable classes, most probable first; ties go to the lower index."""
    return np.argsort(-probabilities, kind="stable")[:k].tolist()


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
    openapi_extra=REQUEST_BODY_OPENAPI,
    summary="Class activation maps (Grad-CAM and four more methods) and overlays for one or more images",
)
async def gradcam(
    request: Request,
    state: GradcamState,
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
    engine = state.engine
    classes = engine.bundle.classes
    layers = list(engine.model.blocks)
    layer = layer or engine.bundle.default_cam_layer
    if layer not in layers:
        raise HTTPException(422, f"unknown layer {layer!r}; valid layers: {layers}")
    target_index = _resolve_target(target, classes)
    names, images = await _images(request, state)
    if format == "png" and len(images) != 1:
        raise HTTPException(422, "format=png returns one image: send exactly one file")
    road = faithfulness == "road"
    jobs = [GradcamJob(img, layer, target_index, method, road) for img in images]
    rows = await _run(state, state.gradcam_batcher, pin(engine, jobs))
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
    return JSONResponse({"model_version": engine.bundle.version, "results": results})


def calibration_info(meta: dict[str, Any]) -> dict[str, Any] | None:
    """model.json's calibration record as /health reports it; None for a bundle never calibrated."""
    record = meta.get("calibration")
    if not isinstance(record, dict):
        return None
    return {
        "temperature": record.get("temperature", 1.0),
        "fitted_for_tta": record.get("fitted_for_tta"),
        "fitted_on_images": (record.get("fitted_on") or {}).get("images"),
        "ece_bins": record.get("ece_bins"),
        "test": record.get("test") or {},
    }


def served_test_accuracy(meta: dict[str, Any], tta: str) -> float | None:
    """The test accuracy of what this server answers: under flip TTA a temperature can tip the mean of the
    two views for a few images, so a calibrated bundle's own after-temperature figure wins."""
    after = meta.get("calibration", {}).get("test", {}).get(tta, {}).get("after", {}).get("accuracy")
    if after is not None:
        return after
    return meta.get("test_accuracy_flip_tta" if tta == "flip" else "test_accuracy")


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
            "served_test_accuracy": served_test_accuracy(meta, engine.tta),
            "val_accuracy": meta.get("val_accuracy"),
            "per_class_accuracy": meta.get("per_class_accuracy", {}),
            "trained_epochs": meta.get("trained_epochs"),
            "training_seconds": meta.get("training_seconds"),
            "hardware": meta.get("hardware"),
            "dataset": meta.get("dataset"),
            "calibration": calibration_info(meta),
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
            "queue_size": state.worker.total_queue_size if state.worker else settings.queue_size,
            "model_lanes": state.lanes,
            "torch_threads": state.torch_threads,
            "traced": engine.traced is not None,
        },
        "workers": _workers(state),
    }


def _workers(state: ServiceState) -> dict[str, Any]:
    """The service's worker processes; one process: itself."""
    if state.worker is not None:
        return state.worker.describe()
    status = "draining" if state.draining else "ready" if state.ready else "loading"
    slot = {"index": 0, "pid": os.getpid(), "status": status, "queue_size": state.settings.queue_size}
    return {
        "count": 1,
        "ready": int(status == "ready"),
        "this_worker": 0,
        "queue_size": slot["queue_size"],
        "slots": [slot],
    }


@router.get(
    "/misclassified",
    response_model=MisclassifiedResponse,
    responses=ERRORS,
    summary="Test images the model got wrong, most confident first",
)
async def misclassified(
    state: AuthorizedState, n: Annotated[int, Query(ge=1, description="how many")] = 12
) -> dict[str, Any]:
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
    # With several workers, the one answering speaks for itself (a draining one must fail its probe)
    # and says how many of the service's workers are ready.
    extra = {}
    if state.worker is not None:
        view = state.worker.describe()
        extra = {"workers": view["count"], "workers_ready": view["ready"]}
    if state.ready and not state.draining:
        return JSONResponse({"status": "ready", **extra})
    return JSONResponse(
        {"status": "draining" if state.draining else "loading", **extra}, 503, headers={"Retry-After": "1"}
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    metrics = request.app.state.camserve.metrics
    metrics.refresh()
    return Response(generate_latest(metrics.exposed), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


def _answer_head_where_get() -> None:
    """HEAD on every GET endpoint, by the same handler (the server sends the headers without the body),
    as Starlette's plain routes do; FastAPI's answer 405. Kept out of the OpenAPI schema."""
    for route in list(router.routes):
        if isinstance(route, APIRoute) and "GET" in route.methods and "HEAD" not in route.methods:
            router.add_api_route(
                route.path,
                route.endpoint,
                methods=["HEAD"],
                response_model=route.response_model,
                response_class=route.response_class,
                dependencies=route.dependencies,
                include_in_schema=False,
            )


_answer_head_where_get()
