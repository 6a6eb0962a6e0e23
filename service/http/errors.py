"""The one error path: every refusal, from a handler, a dependency, the middleware or the connection
itself, is rendered here, in the shape of the API that was asked.

camserve's JSON API answers ``{"detail": "..."}`` (FastAPI's shape; validation errors keep FastAPI's
list of field errors); the Open Inference Protocol's paths (``/v2``) answer ``{"error": "..."}``, as
KServe and Triton do. Status codes, headers and metrics are the same either way.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.decoding.budget import DecodeBusy
from service.decoding.probe import ImageRejected
from service.http.body_limit import BodyTimeout, BodyTooLarge
from service.http.error_shape import error_content, is_protocol_path
from service.metrics import ServiceMetrics

log = logging.getLogger("camserve")

# What each status means, for the OpenAPI document of both APIs.
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "a malformed request: not an image or a corrupt one, a bad tensor (datatype, shape, size, framing), "
    "a refused bundle",
    401: "missing or wrong API key (when one is configured)",
    403: "model control is off (CAMSERVE_MODEL_CONTROL=false)",
    404: "no such model (or version)",
    408: "request body arrived too slowly",
    413: "body, file count, element count, pixels, frames or decoded size over the limit",
    415: "unsupported image type, not multipart/form-data, or a compressed request",
    422: "bad parameters",
    503: "not ready, queue full, decode budget busy or draining; retry after Retry-After seconds",
    504: "waited longer than the request timeout",
}


def error_responses(model: type[BaseModel], *codes: int, **models: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each code's description, with ``model`` (or ``models["c422"]``...)."""
    return {code: {"model": models.get(f"c{code}", model), "description": ERROR_DESCRIPTIONS[code]} for code in codes}


def error_response(request: Request, status: int, message: Any, headers: dict[str, str] | None = None) -> Response:
    if status in (204, 304):
        return Response(status_code=status, headers=headers)
    return JSONResponse(error_content(request.url.path, message), status, headers=headers)


def _validation_message(error: Any) -> str:
    if isinstance(error, dict):
        return f"{'.'.join(str(p) for p in error.get('loc', ()))}: {error.get('msg', '')}"
    return str(error)


def install_error_handlers(app: FastAPI, metrics: ServiceMetrics, retry_after_s: int) -> None:
    """Every exception a request can raise, to its status, headers, metric and body."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(request, exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        if is_protocol_path(request.url.path):
            return JSONResponse({"error": "; ".join(_validation_message(e) for e in errors)}, 422)
        return JSONResponse({"detail": jsonable_encoder(errors)}, 422)

    @app.exception_handler(ImageRejected)
    async def image_rejected(request: Request, exc: ImageRejected) -> Response:
        metrics.rejections.labels(f"image_{exc.status_code}").inc()
        return error_response(request, exc.status_code, str(exc))

    @app.exception_handler(DecodeBusy)
    async def decode_busy(request: Request, exc: DecodeBusy) -> Response:
        metrics.rejections.labels("decode_busy").inc()
        return error_response(request, 503, str(exc), {"Retry-After": str(retry_after_s)})

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge) -> Response:
        metrics.rejections.labels("body_too_large").inc()
        return error_response(request, 413, str(exc), {"Connection": "close"})

    @app.exception_handler(BodyTimeout)
    async def body_timeout(request: Request, exc: BodyTimeout) -> Response:
        metrics.rejections.labels("slow_body").inc()
        return error_response(request, 408, str(exc), {"Connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, exc: ClientDisconnect) -> Response:
        # The client hung up before its answer: nobody to answer, and no server error (no 500, no
        # traceback). 499 is nginx's "client closed request": it is what metrics and the log record.
        metrics.rejections.labels("client_disconnected").inc()
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        request_id = request.scope.get("state", {}).get("request_id", "")
        return error_response(request, 500, f"internal error ({type(exc).__name__}); request id {request_id}")
