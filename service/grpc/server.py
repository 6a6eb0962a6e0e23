"""The gRPC server of one process: ``grpc.aio`` on the app's event loop, started and stopped by the app's
lifespan (service/app.py), in every worker.

* Every worker binds ``CAMSERVE_GRPC_PORT``: grpc sets ``SO_REUSEPORT`` (``grpc.so_reuseport``, on by
  default), so the kernel spreads new connections over the workers, as it does for the HTTP socket the
  supervisor shares. An HTTP/2 connection stays with the worker that accepted it.
* Bounds: a message over ``CAMSERVE_MAX_UPLOAD_BYTES`` is refused by grpc itself (RESOURCE_EXHAUSTED)
  before any handler runs; the decode budget and the queues are the REST side's (service/fronts/).
* Every RPC goes through :meth:`GrpcServer._wrap`: its refusal becomes a status code
  (service/grpc/status.py), it is counted in the Prometheus metrics as ``grpc <Method>`` and gets one
  JSON log line, as an HTTP request does.
* The standard health service (``grpc.health.v1.Health/Check``, for Kubernetes' ``grpc`` probes):
  SERVING exactly when ``/readyz`` says ready.
* Stopping (SIGTERM, after uvicorn has drained HTTP): the service is marked draining first, so new
  calls get UNAVAILABLE, then the server stops with ``CAMSERVE_REQUEST_TIMEOUT_S`` of grace for the
  calls in flight, and only then do the batchers stop.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import tracing
from service.fronts import gate
from service.grpc import inference_pb2 as pb
from service.grpc.service import Call, InferenceService
from service.grpc.status import Abort, status_of
from service.state import ServiceState

log = logging.getLogger("camserve.grpc")
access_log = logging.getLogger("camserve.access")

SERVICE = "inference.GRPCInferenceService"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# method -> (handler name, request type, response type)
METHODS: dict[str, tuple[str, type, type]] = {
    "ServerLive": ("server_live", pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": ("server_ready", pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": ("model_ready", pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": ("server_metadata", pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": ("model_metadata", pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": ("model_infer", pb.ModelInferRequest, pb.ModelInferResponse),
    "RepositoryIndex": ("repository_index", pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
    "RepositoryModelLoad": ("repository_model_load", pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
}


class Malformed:
    """A request whose bytes are not its message (protobuf's DecodeError): answered INVALID_ARGUMENT by the
    handler's wrapper, where grpc itself would answer UNKNOWN for a deserializer that raised."""

    def __init__(self, message_type: type, error: Exception) -> None:
        self.message = f"the request is not a valid {message_type.DESCRIPTOR.full_name} message ({error})"


def parser(message_type: type) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Malformed(message_type, exc)

    return parse


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ReadinessHealth(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health/Check``: SERVING while the service is ready, for the server ("") and the
    inference service alike; NOT_SERVING while it loads or drains."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):
        if request.service not in ("", SERVICE):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        ready = gate.readiness(self.state) == "ready"
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


class GrpcServer:
    """The Open Inference Protocol over gRPC for one process, on ``settings.host:settings.grpc_port``."""

    def __init__(self, state: ServiceState, version: str, port: int | None = None) -> None:
        settings = state.settings
        self.state = state
        self.port = settings.grpc_port if port is None else port
        self.service = InferenceService(state, version)
        prefix = os.urandom(8).hex()  # request ids as the HTTP side makes them: a random prefix per process, a counter
        self._ids = (f"{prefix}{n:016x}" for n in itertools.count(1))
        limit = settings.max_upload_bytes
        self.server = grpc.aio.server(
            maximum_concurrent_rpcs=settings.max_connections,  # beyond: RESOURCE_EXHAUSTED, as REST's 503s
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", -1),  # answers are bounded by the requests' image counts
                ("grpc.so_reuseport", 1),  # every worker binds the port (grpc's default, stated)
            ],
        )
        handlers = {
            method: grpc.unary_unary_rpc_method_handler(
                self._wrap(method, getattr(self.service, name)),
                request_deserializer=parser(request_type),
                response_serializer=response_type.SerializeToString,
            )
            for method, (name, request_type, response_type) in METHODS.items()
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(ReadinessHealth(state), self.server)
        self.bound = self.server.add_insecure_port(address(settings.host, self.port))

    async def start(self) -> None:
        await self.server.start()
        log.info("gRPC Open Inference Protocol on %s", address(self.state.settings.host, self.bound))

    async def stop(self, grace_s: float) -> None:
        """No new calls (the caller marked the service draining); the ones in flight get ``grace_s``."""
        await self.server.stop(grace_s)

    def _wrap(self, method: str, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        endpoint = f"grpc {method}"
        path = f"/{SERVICE}/{method}"
        metrics = self.state.metrics
        settings = self.state.settings

        attributes = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method}

        async def rpc(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            call = Call()
            code = grpc.StatusCode.OK
            failure: tuple[grpc.StatusCode, str] | None = None
            if tracing.enabled():  # service/tracing.py; the caller's traceparent in the call's metadata
                metadata = dict(context.invocation_metadata() or ())
                traceparent, tracestate = metadata.get("traceparent"), metadata.get("tracestate")
                call.span = tracing.start_request(f"{SERVICE}/{method}", traceparent, tracestate, attributes)
            try:
                if isinstance(request, Malformed):
                    raise Abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                return await handler(request, context, call)
            except Exception as exc:
                mapped = status_of(exc)
                if mapped is None:
                    log.exception("unhandled error in %s", path)
                    failure = (grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")
                else:
                    failure, reason = mapped[:2], mapped[2]
                    if reason is not None:
                        metrics.rejections.labels(reason).inc()
                code = failure[0]
            except BaseException:  # cancelled: the client went away or its deadline passed
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                elapsed = time.perf_counter() - started
                metrics.requests.labels(endpoint, "gRPC", code.name).inc()
                metrics.latency.labels(endpoint).observe(elapsed)
                if settings.log_requests:
                    self._log(context, path, code, elapsed, call)
                if call.span is not None:
                    error = code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED)
                    tracing.end_request(call.span, None, {"rpc.grpc.status_code": code.value[0]}, error=error)
            if code == grpc.StatusCode.UNAVAILABLE:  # as REST's Retry-After
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(settings.retry_after_s * 1000)),))
            await context.abort(failure[0], failure[1])

        return rpc

    def _log(self, context: grpc.aio.ServicerContext, path: str, code: grpc.StatusCode, elapsed: float, call: Call):
        given = dict(context.invocation_metadata() or ()).get("x-request-id")
        request_id = given if isinstance(given, str) and _SAFE_ID.match(given) else next(self._ids)
        record: dict[str, Any] = {
            "event": "request",
            "request_id": request_id,
            "method": "gRPC",
            "path": path,
            "status": code.name,
            "duration_ms": round(elapsed * 1000, 2),
        }
        if call.images is not None:
            record["images"] = call.images
        if call.span is not None:
            record["trace_id"] = tracing.trace_id(call.span)
        access_log.info(json.dumps(record))
