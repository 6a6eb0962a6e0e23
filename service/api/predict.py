"""``POST /predict``: the top-k classes of each image.

Two doors to one answer. :class:`DirectPredict` is the front's direct route (service/http/front.py):
a request that is ready to serve as sent (the service ready, the key right, room in the queue, an
image or a form as the body, ``top_k`` absent or valid) is served without FastAPI's routing and
dependency solving. Every other request goes to the FastAPI route :func:`predict`, which documents the
endpoint and answers every refusal, as before. Both read the body with
:func:`service.http.image_body.read_images` and answer :func:`answer`, so they cannot disagree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from camcore.bundle import Bundle
from service.api.schemas import ERRORS, PredictResponse
from service.fronts import gate
from service.http.admission import admitted, submit, submit_watching
from service.http.auth import key_in_raw_headers
from service.http.image_body import read_images, read_request_images
from service.http.raw_body import REQUEST_BODY_OPENAPI, asgi_body, is_raw_image
from service.http.uploads import is_multipart
from service.inference.registry import pin
from service.state import ServiceState

BATCHER = "predict"
DEFAULT_TOP_K = 3
MAX_TOP_K = 10
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
    top_k: Annotated[int, Query(ge=1, le=MAX_TOP_K, description="classes to return per image")] = DEFAULT_TOP_K,
) -> JSONResponse:
    engine = state.engine  # this request is answered by this model, even if another is loaded meanwhile
    classes = engine.bundle.classes
    if top_k > len(classes):
        raise HTTPException(422, f"top_k must be at most {len(classes)}")
    names, images = await read_request_images(request, state)
    rows = await submit(state, BATCHER, pin(engine, images), request)
    # Built to the response model's shape; returned as-is to skip re-validating it on the hot path.
    return JSONResponse(answer(engine.bundle, names, rows, top_k))


def answer(bundle: Bundle, names: Sequence[str], rows: Sequence[np.ndarray], top_k: int) -> dict[str, Any]:
    """The answer's body (:class:`PredictResponse`'s shape): per image, its ``top_k`` classes."""
    classes = bundle.classes
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
    return {"model_version": bundle.version, "predictions": predictions}


def top_indices(probabilities: np.ndarray, k: int) -> list[int]:
    """The k most probable classes, most probable first; ties go to the lower index."""
    return np.argsort(-probabilities, kind="stable")[:k].tolist()


class DirectPredict:
    """``POST /predict`` for the front (service.http.front.DirectRoute), when nothing about it needs refusing."""

    method = "POST"
    path = "/predict"

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def _top_k(self, query: bytes) -> int | None:
        """``top_k`` from a query that holds nothing else, when valid for the model serving now; else None."""
        if not query:
            return DEFAULT_TOP_K
        name, _, value = query.partition(b"=")
        if name != b"top_k" or not value.isdigit() or len(value) > 2:
            return None
        top_k = int(value)
        engine = self.state.engine
        return top_k if engine is not None and 1 <= top_k <= min(MAX_TOP_K, len(engine.bundle.classes)) else None

    def accepts(self, scope: Scope, headers: Mapping[bytes, bytes]) -> bool:
        state = self.state
        if gate.readiness(state) != "ready" or not gate.has_room(state, BATCHER):
            return False
        if self._top_k(scope["query_string"]) is None:
            return False
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if not (is_raw_image(content_type) or is_multipart(content_type)):
            return False
        return state.settings.api_key is None or gate.key_matches(state, key_in_raw_headers(headers))

    async def __call__(self, scope: Scope, receive: Receive, send: Send, headers: Mapping[bytes, bytes]) -> None:
        state = self.state
        engine = state.engine
        assert engine is not None  # accepts() saw it ready
        top_k = self._top_k(scope["query_string"]) or DEFAULT_TOP_K
        disposition = headers.get(b"content-disposition")
        names, images = await read_images(
            state,
            headers.get(b"content-type", b"").decode("latin-1"),
            None if disposition is None else disposition.decode("latin-1"),
            asgi_body(receive),
            scope["state"],
        )
        rows = await submit_watching(state, BATCHER, pin(engine, images), receive)
        # As Starlette's JSONResponse renders and frames it, byte for byte.
        body = json.dumps(
            answer(engine.bundle, names, rows, top_k), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode()
        start = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": start})
        await send({"type": "http.response.body", "body": body})
