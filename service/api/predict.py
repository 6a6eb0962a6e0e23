"""``POST /predict``: the top-k classes of each image."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from service.api.schemas import ERRORS, PredictResponse
from service.http.admission import admitted, submit
from service.http.image_body import read_images
from service.http.raw_body import REQUEST_BODY_OPENAPI
from service.inference.registry import pin

BATCHER = "predict"
router = APIRouter()
PredictState = admitted(BATCHER)


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
    names, images = await read_images(request, state)
    rows = await submit(state, BATCHER, pin(engine, images), request)
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
