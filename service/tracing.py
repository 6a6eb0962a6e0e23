"""OpenTelemetry traces: a span per request (HTTP or gRPC), child spans for decoding, the queue wait and
the model batch, and one span per batch linked to every request it served; exported over OTLP.

On only where the standard variables ask for an exporter: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set, ``OTEL_TRACES_EXPORTER`` not ``none`` and ``OTEL_SDK_DISABLED``
not ``true``; ``OTEL_EXPORTER_OTLP_PROTOCOL`` picks ``http/protobuf`` (the default) or ``grpc``,
``OTEL_SERVICE_NAME`` the service's name (default ``camserve``), and every other ``OTEL_*`` variable
(headers, timeouts, the batch processor's delays, ``OTEL_RESOURCE_ATTRIBUTES``) is read by the SDK
itself. A W3C ``traceparent`` (and ``tracestate``) on the request makes its span a child of the caller's.

Off, every hook here is a check of one module global and returns at once (its cost per request is
measured by ``bench/tracing_overhead.py``: bench/results/tracing.md); the SDK is not even imported.
Each process (every worker) starts its own provider in the app's lifespan and flushes it at the end.
Beneath every room: the batcher and the decoder call it, and it knows no web framework.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger("camserve.tracing")

_tracer: Any = None  # an opentelemetry Tracer while tracing is on; None: off
_provider: Any = None
_NOTHING = contextlib.nullcontext()


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the standard variables ask for traces to be exported."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def enabled() -> bool:
    return _tracer is not None


def start(service_version: str, env: Mapping[str, str] = os.environ) -> bool:
    """This process's tracer provider and OTLP exporter, where the environment asks for them."""
    global _tracer, _provider
    if _tracer is not None or not wanted(env):
        return _tracer is not None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    if protocol.strip().lower() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    resource = Resource.create(
        {"service.name": env.get("OTEL_SERVICE_NAME") or "camserve", "service.version": service_version}
    )
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = _provider.get_tracer("camserve", service_version)
    log.info("tracing on: OTLP over %s as %s", protocol, resource.attributes.get("service.name"))
    return True


def stop() -> None:
    """Export what is left and turn tracing off (the app's lifespan, at the end)."""
    global _tracer, _provider
    provider, _tracer, _provider = _provider, None, None
    if provider is not None:
        provider.shutdown()


# -- requests ------------------------------------------------------------------------------------------
def start_request(
    name: str, traceparent: str | None, tracestate: str | None, attributes: Mapping[str, Any], kind: str = "SERVER"
) -> Any:
    """The span of one request, made current (a child of the caller's when ``traceparent`` is valid); pass
    what this returns to :func:`end_request`. None while tracing is off."""
    if _tracer is None:
        return None
    from opentelemetry import context, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = None
    if traceparent:
        carrier = {"traceparent": traceparent, **({"tracestate": tracestate} if tracestate else {})}
        parent = TraceContextTextMapPropagator().extract(carrier)
    span = _tracer.start_span(name, context=parent, kind=trace.SpanKind[kind], attributes=attributes)
    return span, context.attach(trace.set_span_in_context(span))


def end_request(handle: Any, name: str | None = None, attributes: Mapping[str, Any] | None = None, error: bool = False):
    """End the request's span (renamed, e.g. to its route, once known), and make its parent current again."""
    if handle is None:
        return
    from opentelemetry import context, trace

    span, token = handle
    if name:
        span.update_name(name)
    if attributes:
        span.set_attributes(attributes)
    if error:
        span.set_status(trace.StatusCode.ERROR)
    context.detach(token)
    span.end()


def trace_id(handle: Any) -> str | None:
    """The request's trace id (32 hex digits), for its log line."""
    return None if handle is None else format(handle[0].get_span_context().trace_id, "032x")


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager:
    """A child span of the current one (the request's), e.g. decoding; nothing while tracing is off."""
    if _tracer is None:
        return _NOTHING
    return _tracer.start_as_current_span(name, attributes=attributes)


# -- batches ---------------------------------------------------------------------------------------
def waiting() -> Any:
    """What a batcher keeps with a request's images to trace them later: the current span's context and the
    time it was queued; None while tracing is off or outside a request."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return (context, time.time_ns()) if context.is_valid else None


def record_batch(batcher: str, requests: Sequence[Any], size: int, started_ns: int, ended_ns: int) -> None:
    """After a batch ran (on its model thread): one ``batch <name>`` span linked to every request it served,
    and in each request's trace a ``queue wait`` and a ``model batch`` child span. ``requests``: what
    :func:`waiting` gave each request's images (several images of one request count once)."""
    tracer = _tracer
    if tracer is None or not requests:
        return
    from opentelemetry import trace

    unique = list({id(r): r for r in requests}.values())
    attributes = {"camserve.batcher": batcher, "camserve.batch.size": size, "camserve.batch.requests": len(unique)}
    links = [trace.Link(context) for context, _ in unique]
    batch = tracer.start_span(
        f"batch {batcher}", context=None, links=links, attributes=attributes, start_time=started_ns
    )
    batch.end(end_time=ended_ns)
    batch_link = [trace.Link(batch.get_span_context())]
    for context, queued_ns in unique:
        parent = trace.set_span_in_context(trace.NonRecordingSpan(context))
        tracer.start_span("queue wait", context=parent, start_time=queued_ns).end(end_time=started_ns)
        model = tracer.start_span(
            "model batch", context=parent, links=batch_link, attributes=attributes, start_time=started_ns
        )
        model.end(end_time=ended_ns)
