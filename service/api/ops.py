"""What operators and tools ask: probes (``/livez``, ``/readyz``), Prometheus ``/metrics``, and the test
images the model got wrong (``/misclassified``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.schemas import ERRORS, MisclassifiedResponse
from service.http.admission import AuthorizedState, readiness, retry_after, service_state

router = APIRouter()
SHOWN = 12  # without ?n=, as many as the page's gallery shows


@router.get(
    "/misclassified",
    response_model=MisclassifiedResponse,
    responses=ERRORS,
    summary="Test images the model got wrong, most confident first",
)
async def misclassified(
    state: AuthorizedState,
    n: Annotated[int | None, Query(ge=1, description=f"how many (default {SHOWN}, or all if fewer)")] = None,
) -> dict[str, Any]:
    total = len(state.misclassified)
    if n is None:
        n = min(SHOWN, total)
    elif n > total:
        raise HTTPException(422, f"n must be between 1 and {total}")
    return {"model_version": state.bundle.version, "total": total, "items": state.misclassified[:n]}


@router.get("/livez", summary="The process is up")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", summary="The model is loaded and warm, and the service is not draining")
async def readyz(request: Request) -> JSONResponse:
    state = service_state(request)
    # With several workers, the one answering speaks for itself (a draining one must fail its probe)
    # and says how many of the service's workers are ready.
    extra = {}
    if state.worker is not None:
        view = state.worker.describe()
        extra = {"workers": view["count"], "workers_ready": view["ready"]}
    status = readiness(state)
    if status == "ready":
        return JSONResponse({"status": status, **extra})
    return JSONResponse({"status": status, **extra}, 503, headers=retry_after(state))


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    metrics = request.app.state.camserve.metrics
    metrics.refresh()
    return Response(generate_latest(metrics.exposed), media_type=CONTENT_TYPE_LATEST)
