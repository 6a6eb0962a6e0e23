"""The RPCs of ``inference.GRPCInferenceService``: health, metadata, inference and Triton's repository
extension, answered as the REST side answers them (same checks in the same order, same models, same
batchers, same words in the refusals).

Who needs what, as over REST: health and metadata are open; ModelInfer, RepositoryIndex and
RepositoryModelLoad need the API key (``x-api-key`` metadata, or ``authorization: Bearer <key>``) where
one is set; ModelMetadata, ModelInfer and the repository need a ready service. Each handler raises
its refusals (service/grpc/status.py turns them into status codes) and notes how many images it took
in ``call.images`` for the log line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import grpc

from camcore.bundle import BundleError
from service.fronts import gate
from service.fronts.infer import cam_options, classify, explain, targets, wanted_outputs
from service.fronts.model import Served, UnknownModel, metadata, repository_index, serving
from service.grpc import inference_pb2 as pb
from service.grpc.status import Abort
from service.grpc.tensors import Inputs, add_output, input_images, int32_input, request_parameters
from service.state import ServiceState

EXTENSIONS = ["model_repository"]


@dataclass
class Call:
    """What one RPC leaves for its log line and metrics."""

    images: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    span: Any = None  # the call's span while tracing is on (service/tracing.py)


def supplied_key(context: grpc.aio.ServicerContext) -> bytes:
    """``x-api-key``, else ``authorization: Bearer <key>`` (the scheme in any case); empty when neither."""
    metadata = {key: value for key, value in context.invocation_metadata() or ()}
    key = metadata.get("x-api-key")
    if isinstance(key, str) and key:
        return key.encode("utf-8")
    scheme, _, credentials = str(metadata.get("authorization") or "").partition(" ")
    return credentials.strip().encode("utf-8") if scheme.lower() == "bearer" else b""


class InferenceService:
    """The handlers, each ``(request, context, call) -> response``."""

    def __init__(self, state: ServiceState, version: str) -> None:
        self.state = state
        self.version = version

    # -- admission -----------------------------------------------------------------------------------
    def _ready(self) -> None:
        refusal = gate.not_ready(self.state)
        if refusal is not None:
            raise refusal

    def _authorized(self, context: grpc.aio.ServicerContext) -> None:
        """Ready (UNAVAILABLE), then the key where one is set (UNAUTHENTICATED)."""
        self._ready()
        if not gate.key_accepted(self.state, supplied_key(context)):
            raise Abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")

    # -- health and metadata -------------------------------------------------------------------------
    async def server_live(self, request: pb.ServerLiveRequest, context, call: Call) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest, context, call: Call) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=gate.readiness(self.state) == "ready")

    async def model_ready(self, request: pb.ModelReadyRequest, context, call: Call) -> pb.ModelReadyResponse:
        """Ready: the service is, and it serves this model (an unknown one is simply not ready, as in Triton)."""
        if gate.readiness(self.state) != "ready":
            return pb.ModelReadyResponse(ready=False)
        try:
            serving(self.state, request.name, request.version)
        except UnknownModel:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def server_metadata(self, request, context, call: Call) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="camserve", version=self.version, extensions=EXTENSIONS)

    async def model_metadata(self, request: pb.ModelMetadataRequest, context, call: Call) -> pb.ModelMetadataResponse:
        self._ready()
        meta = metadata(serving(self.state, request.name, request.version))
        response = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for tensor in meta["inputs"]:
            response.inputs.add(**tensor)
        for tensor in meta["outputs"]:
            response.outputs.add(**tensor)
        # The protocol's gRPC metadata has no parameters; the explanation model's allowed values go in the
        # initial metadata (JSON), as REST's metadata carries them in "parameters".
        if "parameters" in meta:
            await context.send_initial_metadata((("camserve-parameters", json.dumps(meta["parameters"])),))
        return response

    # -- inference -----------------------------------------------------------------------------------
    async def model_infer(self, request: pb.ModelInferRequest, context, call: Call) -> pb.ModelInferResponse:
        self._authorized(context)
        served = serving(self.state, request.model_name, request.model_version)
        refusal = gate.queue_refusal(self.state, "predict" if served.kind == "predict" else "gradcam")
        if refusal is not None:
            raise refusal
        inputs = Inputs.of(request)
        requested = [output.name for output in request.outputs]
        response = pb.ModelInferResponse(model_name=served.name, model_version=served.version, id=request.id)
        if served.kind == "predict":
            wanted = wanted_outputs(requested, None)
            images = await input_images(inputs, self.state)
            call.images = len(images)
            answer = await classify(self.state, served.engine, images)
            tensors: dict[str, Any] = {"probabilities": answer.probabilities, "label": answer.labels}
        else:
            tensors, wanted = await self._explain(served, request, inputs, requested, call)
        for name in wanted:
            add_output(response, name, tensors[name])
        return response

    async def _explain(
        self, served: Served, request: pb.ModelInferRequest, inputs: Inputs, requested: list[str], call: Call
    ) -> tuple[dict[str, Any], list[str]]:
        engine = served.engine
        options = cam_options(engine, request_parameters(request))
        wanted = wanted_outputs(requested, options)
        images = await input_images(inputs, self.state, others=("target",))
        call.images = len(images)
        target = int32_input(inputs, "target")
        chosen = targets(*(target or (None, None)), len(images), len(engine.bundle.classes))
        answer = await explain(self.state, engine, images, chosen, options)
        tensors = {
            "heatmap": answer.heatmaps,
            "label": answer.labels,
            "probability": answer.probabilities,
            "road": answer.road,
        }
        return tensors, wanted

    # -- Triton's model repository extension ---------------------------------------------------------
    async def repository_index(self, request, context, call: Call) -> pb.RepositoryIndexResponse:
        self._authorized(context)
        response = pb.RepositoryIndexResponse()
        for entry in repository_index(self.state.engine):
            response.models.add(**entry)
        return response

    async def repository_model_load(self, request: pb.RepositoryModelLoadRequest, context, call: Call):
        """Reload the bundle at CAMSERVE_MODEL_DIR (either model's name reloads both), where model control is on."""
        self._authorized(context)
        state = self.state
        if not state.settings.model_control:
            state.metrics.rejections.labels("model_control_off").inc()
            raise Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "model control is off: set CAMSERVE_MODEL_CONTROL=true to allow load requests",
            )
        serving(state, request.model_name)
        if request.parameters:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "load takes no parameters: it reloads the bundle at CAMSERVE_MODEL_DIR",
            )
        previous = state.engine.bundle.version
        try:
            engine = await state.registry.reload()
        except BundleError as exc:
            state.metrics.rejections.labels("reload_refused").inc()
            raise Abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"bundle refused, still serving {previous}: {exc}"
            ) from None
        if state.worker is not None:  # one worker of several: the supervisor has every other worker reload too
            state.worker.ask_others_to_reload()
        call.extra = {"version": engine.bundle.version, "previous_version": previous}
        return pb.RepositoryModelLoadResponse()
