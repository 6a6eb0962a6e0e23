"""OpenTelemetry traces (service/tracing.py), exported by the SDK's OTLP exporter to a receiver this test
runs (OTLP over HTTP/protobuf, and over gRPC), decoded with opentelemetry-proto."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from harness import free_port
from helpers import encode, random_image

from service import tracing
from service.app import create_app
from service.settings import Settings

trace_service_pb2 = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc  # noqa: E402

grpcclient = pytest.importorskip("tritonclient.grpc")

HTTP_TRACE = "0af7651916cd43dd8448eb211c80319c"
HTTP_PARENT = "b7ad6b7169203331"
GRPC_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
GRPC_PARENT = "00f067aa0ba902b7"


def test_off_unless_the_standard_variables_ask():
    assert not tracing.enabled()
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"})
    assert tracing.start_request("GET", None, None, {}) is None and tracing.waiting() is None
    with tracing.span("decode"):
        pass


# -- receivers -----------------------------------------------------------------------------------------
class Received:
    def __init__(self) -> None:
        self.requests: list = []
        self.lock = threading.Lock()

    def add(self, request) -> None:
        with self.lock:
            self.requests.append(request)

    def spans(self) -> list[tuple[dict, object]]:
        """(resource attributes, span) for every span received."""
        out = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    out.extend((resource, span) for span in scope.spans)
        return out


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, Received]]:
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                received.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200 if self.path == "/v1/traces" else 404)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[str, Received]]:
    received = Received()

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.add(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(0)


# -- the service's spans -------------------------------------------------------------------------------
def serve_and_call(bundle_dir: Path, caplog) -> None:
    """One app: /predict with a traceparent, gRPC ModelInfer with another; then it stops (and flushes)."""
    port = free_port()
    settings = Settings(model_dir=bundle_dir, precision="fp32", max_batch_size=8, grpc_port=port, log_requests=True)
    app = create_app(settings)
    png = encode(random_image(5))
    with caplog.at_level(logging.INFO, logger="camserve.access"), TestClient(app) as client:
        assert tracing.enabled()
        response = client.post(
            "/predict",
            files=[("files", ("a.png", png, "image/png")), ("files", ("b.png", png, "image/png"))],
            headers={"traceparent": f"00-{HTTP_TRACE}-{HTTP_PARENT}-01"},
        )
        assert response.status_code == 200
        triton = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = grpcclient.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([png], dtype=np.object_))
        triton.infer("test-bundle", [tensor], headers={"traceparent": f"00-{GRPC_TRACE}-{GRPC_PARENT}-01"})
        triton.close()
    assert not tracing.enabled()  # stopped with the app, after exporting


def by_trace(spans, trace_id: str) -> dict[str, list]:
    named: dict[str, list] = {}
    for _, span in spans:
        if span.trace_id.hex() == trace_id:
            named.setdefault(span.name, []).append(span)
    return named


def int_attributes(span) -> dict[str, int]:
    return {a.key: a.value.int_value for a in span.attributes if a.value.HasField("int_value")}


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_spans_reach_the_otlp_receiver(bundle_dir, monkeypatch, caplog, request, protocol):
    endpoint, received = request.getfixturevalue("http_receiver" if protocol == "http/protobuf" else "grpc_receiver")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "camserve-under-test")
    serve_and_call(bundle_dir, caplog)
    spans = received.spans()
    assert spans, "nothing exported"
    assert {resource["service.name"] for resource, _ in spans} == {"camserve-under-test"}

    http = by_trace(spans, HTTP_TRACE)
    (root,) = http["POST /predict"]
    assert root.parent_span_id.hex() == HTTP_PARENT and root.kind == root.SPAN_KIND_SERVER
    assert int_attributes(root)["http.response.status_code"] == 200
    for child in ("decode", "queue wait", "model batch"):
        for span in http[child]:
            assert span.parent_span_id == root.span_id, child
            assert root.start_time_unix_nano <= span.start_time_unix_nano <= root.end_time_unix_nano, child
    # The request's two images ran in one batch or in two (two model lanes share a burst): each batch its
    # images went into is a "model batch" child with the batch's size, linked to that batch's own span.
    batches = {span.span_id: span for _, span in spans if span.name == "batch predict"}
    served = http["model batch"]
    assert sum(int_attributes(span)["camserve.batch.size"] for span in served) == 2
    for span in served:
        (link,) = span.links
        batch = batches[link.span_id]
        assert int_attributes(batch)["camserve.batch.size"] == int_attributes(span)["camserve.batch.size"]
        assert (HTTP_TRACE, root.span_id) in {(link.trace_id.hex(), link.span_id) for link in batch.links}

    rpc = by_trace(spans, GRPC_TRACE)
    (call,) = rpc["inference.GRPCInferenceService/ModelInfer"]
    assert call.parent_span_id.hex() == GRPC_PARENT
    assert {"decode", "queue wait", "model batch"} <= set(rpc)
    linked = {(link.trace_id.hex(), link.span_id) for batch in batches.values() for link in batch.links}
    assert (GRPC_TRACE, call.span_id) in linked

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "camserve.access"]
    assert {line["trace_id"] for line in lines if line["path"] == "/predict"} == {HTTP_TRACE}
    assert {line["trace_id"] for line in lines if line["method"] == "gRPC"} == {GRPC_TRACE}
