"""Triton's model repository extension over the Open Inference Protocol: the index, and hot reload of the
bundle at ``CAMSERVE_MODEL_DIR``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request

from camcore.bundle import BundleError
from service.fronts.model import repository_index as models_index
from service.http.admission import AuthorizedState
from service.oip.model import PREFIX, serving
from service.oip.schemas import LoadResult, RepositoryModel, errors
from service.oip.wire import WireError, json_object

router = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol"])
LOAD_JSON_VALUES, LOAD_JSON_BYTES = 256, 64 * 1024  # a load takes no parameters: larger is refused unparsed

MODEL_CONTROL_OFF = (
    "model control is off: set CAMSERVE_MODEL_CONTROL=true to reload over HTTP (behind CAMSERVE_API_KEY when one is "
    "set), or send the server SIGHUP"
)


@router.post(
    "/repository/index",
    response_model=list[RepositoryModel],
    responses=errors(401, 408, 413, 503),
    summary="The models this server serves: the bundle's classifier and its explanations (<name>-cam)",
)
async def repository_index(state: AuthorizedState) -> list[dict[str, str]]:
    return models_index(state.engine)


@router.post(
    "/repository/models/{name}/load",
    response_model=LoadResult,
    responses=errors(400, 401, 403, 404, 408, 413, 503),
    summary="Reload the bundle at CAMSERVE_MODEL_DIR: verified, warmed, then swapped in between batches "
    "(with CAMSERVE_MODEL_CONTROL=true)",
)
async def load(request: Request, state: AuthorizedState, name: str) -> dict[str, Any]:
    if not state.settings.model_control:
        # Off by default, as Triton's --model-control-mode=none: each reload builds and warms a whole engine
        # (seconds of a model thread), which no client should be able to ask for unless the operator says so.
        raise HTTPException(403, MODEL_CONTROL_OFF)
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
