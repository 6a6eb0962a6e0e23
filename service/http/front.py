"""The one ASGI layer every HTTP request passes (pure ASGI: no ``BaseHTTPMiddleware``, which costs a task
per request), and the door that lets a hot endpoint skip FastAPI's routing. It wraps the whole FastAPI
app, Starlette's own middleware included (``service.app.CamserveApp``).

For every request, in one pass and one wrapper of ``send`` and ``receive``:

* its id: ``X-Request-ID`` accepted when safe or generated, echoed on the answer;
* its body's bounds (service/http/body_limit.py): a declared ``Content-Length`` over the limit is
  refused with 413 before a byte is read, a streamed body is counted, a slow one gets a deadline;
* the answer's headers (service/http/answer_headers.py): security headers, and redirects made relative;
* when it ends: the Prometheus count and latency, the trace span, and one JSON access-log line.

**Direct routes.** A :class:`DirectRoute` is an endpoint served here, without Starlette's routing,
FastAPI's dependency solving, its request and response objects or the layers between (most of what a
single-image ``/predict`` cost beyond its own work: bench/results/front_cost.md). It is taken only when
its :meth:`~DirectRoute.accepts` says so from the request's line and headers alone, before a byte of
the body is read; every other request (a bad parameter, a missing key, a full queue, an unknown type)
goes on to the FastAPI route of the same path, which answers it as it always has. So the OpenAPI
document, the validation errors and the refusals have one source. What a direct route raises is
answered by the app's own exception handlers (service/http/errors.py), looked up as Starlette does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import tracing
from service.http.answer_headers import relative_redirect, security_headers
from service.http.body_limit import BODY_METHODS, BoundedReceive, declared_too_large
from service.http.error_shape import error_body
from service.http.request_log import CLIENT_CLOSED, RequestIds, log_request
from service.metrics import ServiceMetrics

log = logging.getLogger("camserve")
ExceptionHandler = Callable[[Request, Exception], Awaitable[Any]]


class DirectRoute(Protocol):
    """An endpoint the front serves itself when the request is the common, valid case."""

    method: str
    path: str  # also the metrics' endpoint label, as the FastAPI route's path is

    def accepts(self, scope: Scope, headers: Mapping[bytes, bytes]) -> bool:
        """From the request line and ``headers`` (lower-cased names, the first of each) alone: serve it here?"""
        ...

    async def __call__(self, scope: Scope, receive: Receive, send: Send, headers: Mapping[bytes, bytes]) -> None: ...


class Front:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ServiceMetrics,
        max_body_bytes: int,
        body_timeout_s: float,
        log_requests: bool = True,
        direct: tuple[DirectRoute, ...] = (),
        exception_handlers: Mapping[Any, ExceptionHandler] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.log_requests = log_requests
        self.ids = RequestIds()
        self.direct = {(route.method, route.path): route for route in direct}
        self.exception_handlers = exception_handlers if exception_handlers is not None else {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method, path = scope["method"], scope["path"]
        headers: dict[bytes, bytes] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key, value)  # the first of each name, as Starlette's Headers.get reads them
        request_id = self.ids.accept_or_make(headers.get(b"x-request-id"))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        extra = (*security_headers(path), (b"x-request-id", request_id.encode()))
        status = 500  # what a client gets when the app ends without answering (uvicorn writes a 500)
        answered = False

        async def send_answer(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
                own = message.get("headers", ())
                if 300 <= status < 400:
                    own = relative_redirect(list(own))
                message["headers"] = [*own, *extra]
            await send(message)

        span = (
            tracing.start_request(  # None while tracing is off (service/tracing.py)
                method,
                _text(headers.get(b"traceparent")),
                _text(headers.get(b"tracestate")),
                {"http.request.method": method, "url.path": path},
            )
            if tracing.enabled()
            else None
        )
        endpoint = "unmatched"
        if method in BODY_METHODS:
            bounded = BoundedReceive(receive, self.max_body_bytes, self.body_timeout_s)
        else:
            bounded = BoundedReceive(receive)
        try:
            if method in BODY_METHODS and declared_too_large(headers.get(b"content-length"), self.max_body_bytes):
                declared = headers[b"content-length"].decode()
                message = f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes}"
                await _json_error(send_answer, 413, error_body(path, message))
                return
            route = self.direct.get((method, path))
            if route is not None and route.accepts(scope, headers):
                endpoint = route.path
                await self._serve_direct(route, scope, bounded, send_answer, headers, lambda: answered)
            else:
                await self.app(scope, bounded, send_answer)
                endpoint = getattr(scope.get("route"), "path", "unmatched")
        finally:
            if endpoint == "unmatched":  # an app that raised: the route it matched, if any
                endpoint = getattr(scope.get("route"), "path", "unmatched")
            if bounded.gone and not answered:
                status = CLIENT_CLOSED  # nobody was there to answer: not a server error
            elapsed = time.perf_counter() - started
            self.metrics.request_done(endpoint, method, status, elapsed)
            if span is not None:
                attributes = {"http.response.status_code": status, "http.route": endpoint}
                tracing.end_request(span, f"{method} {endpoint}", attributes, error=status >= 500)
            if self.log_requests:
                record: dict[str, Any] = {
                    "event": "request",
                    "request_id": request_id,
                    "method": method,
                    "path": path,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                }
                if "images" in state:
                    record["images"] = state["images"]
                if span is not None:
                    record["trace_id"] = tracing.trace_id(span)
                log_request(record)

    async def _serve_direct(
        self,
        route: DirectRoute,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: Mapping[bytes, bytes],
        answered: Callable[[], bool],
    ) -> None:
        """The route, its exceptions answered by the app's handler for the nearest class (Starlette's lookup)."""
        try:
            await route(scope, receive, send, headers)
        except Exception as exc:
            handlers = self.exception_handlers
            handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
            if handler is None or answered():
                raise
            response = await handler(Request(scope, receive), exc)
            if response is not None:
                await response(scope, receive, send)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


async def _json_error(send: Send, status: int, body: bytes) -> None:
    """An error answer written below the app: ``body`` from :func:`service.http.error_shape.error_body`."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
