"""The explanation model over REST, ``<bundle name>-cam``: its metadata, readiness and infer, through
``/gradcam``'s batcher and limits (what it takes and answers: service/fronts/model.py).

Its paths are the protocol's (``/v2/models/{name}/infer``...), so its routes match only when ``name`` is
the explanation model's (:class:`ExplanationRoute`); they come before the classifier's routes, which
answer every other name. Not in the OpenAPI document, which cannot tell two models apart by a path
parameter's value: the model's own metadata (``GET /v2/models/<name>-cam``) describes it.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.routing import APIRoute
from starlette.routing import Match

from service.fronts.infer import cam_options, explain, targets, wanted_outputs
from service.fronts.model import CAM_SUFFIX, metadata
from service.fronts.tensors import TensorError
from service.http.admission import State, admitted
from service.oip.inference import _read_request  # the protocol's body, read as infer reads it (bounds and all)
from service.oip.model import PREFIX, served
from service.oip.tensors import tensor_images
from service.oip.wire import HEADER_LENGTH, RequestInput, WireError, bytes_output, encode_response, float32_output

BATCHER = "gradcam"


class ExplanationRoute(APIRoute):
    """Matches only when the path's ``name`` is the explanation model of the bundle serving now."""

    def matches(self, scope: MutableMapping[str, Any]) -> tuple[Match, MutableMapping[str, Any]]:
        match, child = super().matches(scope)
        if match == Match.NONE:
            return match, child
        state = getattr(scope.get("app"), "state", None)
        engine = getattr(getattr(state, "camserve", None), "engine", None)
        if engine is None or child.get("path_params", {}).get("name") != engine.bundle.name + CAM_SUFFIX:
            return Match.NONE, {}
        return match, child


router = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol"], route_class=ExplanationRoute)
ExplainState = admitted(BATCHER)


@router.get("/models/{name}", include_in_schema=False)
@router.get("/models/{name}/versions/{version}", include_in_schema=False)
async def explanation_metadata(state: State, name: str, version: str | None = None) -> dict[str, Any]:
    return metadata(served(state, name, version))


@router.get("/models/{name}/ready", include_in_schema=False)
@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def explanation_ready(state: State, name: str, version: str | None = None) -> dict[str, Any]:
    served(state, name, version)
    return {"name": name, "ready": True}


def _target(tensor: RequestInput | None) -> tuple[Any, list[int] | None]:
    """The ``target`` input's values (JSON integers, or little-endian INT32 in the binary part) and shape."""
    if tensor is None:
        return None, None
    if tensor.datatype != "INT32":
        raise WireError(f"input 'target': datatype {tensor.datatype}, expected INT32")
    if tensor.raw is not None:
        if len(tensor.raw) % 4:
            raise WireError(f"input 'target': {len(tensor.raw)} bytes is not a whole number of INT32 values")
        return np.frombuffer(tensor.raw, dtype="<i4"), tensor.shape
    values = tensor.data
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise WireError("input 'target': 'data' must be a flat list of integers")
    return values, tensor.shape


@router.post("/models/{name}/infer", response_model=None, include_in_schema=False)
@router.post("/models/{name}/versions/{version}/infer", response_model=None, include_in_schema=False)
async def explanation_infer(request: Request, state: ExplainState, name: str, version: str | None = None) -> Response:
    model = served(state, name, version)  # answered by this engine, even if another is loaded meanwhile
    engine = model.engine
    try:
        infer_request, _ = await _read_request(request, state, split_input=False)
        options = cam_options(engine, infer_request.parameters)
        requested = infer_request.outputs
        wanted = wanted_outputs(None if requested is None else [o.name for o in requested], options)
        binary = {o.name: o.binary for o in requested or ()}
        by_name = {tensor.name: tensor for tensor in infer_request.inputs}
        if len(by_name) != len(infer_request.inputs):
            raise WireError("an input is sent twice")
        pictures = [tensor for tensor in infer_request.inputs if tensor.name != "target"]
        if len(pictures) != 1:
            raise WireError(
                f"send exactly one input, 'image' or 'pixels', and optionally 'target' (got {len(pictures)})"
            )
        images = await tensor_images(pictures[0], state)
        chosen = targets(*_target(by_name.get("target")), len(images), len(engine.bundle.classes))
    except (WireError, TensorError) as exc:
        raise HTTPException(400, str(exc)) from None
    request.state.images = len(images)
    answer = await explain(state, engine, images, chosen, options)
    tensors = {
        "heatmap": lambda: float32_output("heatmap", answer.heatmaps),
        "label": lambda: bytes_output("label", answer.labels),
        "probability": lambda: float32_output("probability", answer.probabilities),
        "road": lambda: float32_output("road", answer.road),
    }
    head: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if infer_request.id is not None:
        head["id"] = infer_request.id
    outputs = [(tensors[name](), binary.get(name, infer_request.binary_default)) for name in wanted]
    body, header_length = encode_response(head, outputs)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})
