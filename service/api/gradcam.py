"""``POST /gradcam``: class activation maps (five methods), their overlays and, on request, ROAD scores."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse

from camcore.cam_methods import DEFAULT_METHOD, MethodName
from service.api.render import overlay, png_base64, png_bytes
from service.api.schemas import ERRORS, GradcamResponse
from service.http.admission import admitted, submit
from service.http.image_body import read_request_images
from service.http.raw_body import REQUEST_BODY_OPENAPI
from service.inference.jobs import GradcamJob
from service.inference.registry import pin

BATCHER = "gradcam"
MAX_INDEX_DIGITS = 6  # a class index has a few digits; a longer number is out of range without parsing it
router = APIRouter()
GradcamState = admitted(BATCHER)


def _resolve_target(target: str | None, classes: list[str]) -> int | None:
    """The query's ``target`` as a class index; ``None`` (absent or empty) means the predicted class,
    and stays ``None`` all the way to the CAM code, which resolves it per image."""
    if not target:
        return None
    # isdecimal, not isdigit: "²" is a digit that int() refuses, and that would be a 500. And no int() of
    # more digits than an index can have: past 4,300 digits int() raises (Python's digit limit), a 500 too.
    digits = target.lstrip("-")
    if digits.isdecimal() and target.count("-") <= 1:
        index = int(target) if len(digits) <= MAX_INDEX_DIGITS else None
        if index is not None and 0 <= index < len(classes):
            return index
        shown = target if index is not None else f"{target[:12]}... ({len(digits)} digits)"
        raise HTTPException(422, f"target index {shown} out of range 0..{len(classes) - 1}")
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
    names, images = await read_request_images(request, state)
    if format == "png" and len(images) != 1:
        raise HTTPException(422, "format=png returns one image: send exactly one file")
    road = faithfulness == "road"
    jobs = [GradcamJob(img, layer, target_index, method, road) for img in images]
    rows = await submit(state, BATCHER, pin(engine, jobs), request)
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
