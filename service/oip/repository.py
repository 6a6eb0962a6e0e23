"""Triton's model repository extension over the Open Inference Protocol: the index, and hot reload of the
bundle at ``CAMSERVE_MODEL_DIR``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request

from camcore.bundle import BundleError
from service.http.admission import AuthorizedState
from service.oip.model import PREFIX, serving
from service.oip.schemas import LoadResult, RepositoryModel, errors
from service.oip.wire import WireError, json_object

router = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol"])
LOAD_JSON_VALUES, LOAD_JSON_BYTES = 256, 64 * 1024  # a load takes no parameters: larger is refused unparsed


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
    serving(state, name)
    body = await request.body()
    if body.strip():
        try:  # bounded before parsing, its nesting too: a 4xx for any body (issue 24)
            parameters = json_object(body, "the load request", LOAD_JSON_VALUES, LOAD_JSON_BYTES).get("parameters", {})
        except WireError as exc:
            raise HTTPException(exc.status_code, str(exc)) from None
        if parameters:
            raise HTTPException(400, "load takes no parameters: it reloads the bundle at CAMSERVE_MODEL_DIR")
    previous = state.engine.bundle.version
    try:
        engine = await state.registry.reload()
    except BundleError as exc:
        state.metrics.rejections.labels("reload_refused").inc()
        raise HTTPException(400, f"bundle refused, still serving {previous}: {exc}") from None
    if state.worker is not None:  # one worker of several: the supervisor has every other worker reload too
        state.worker.ask_others_to_reload()
    return {"name": engine.bundle.name, "version": engine.bundle.version, "previous_version": previous}
