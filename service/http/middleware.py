"""Pure-ASGI middleware (no BaseHTTPMiddleware: it costs a task per request on the hot path).

* :class:`RequestContext`: accepts or generates ``X-Request-ID``, echoes it, times the request,
  counts it in Prometheus and writes one JSON log line per request.
* :class:`BodyLimit`: refuses bodies over the limit from ``Content-Length`` before reading a byte,
  caps streamed (chunked) bodies while they arrive, and gives a slow sender a deadline.
* :class:`SecurityHeaders`: ``X-Content-Type-Options: nosniff`` and a framing refusal on every answer, and
  on the web page a Content-Security-Policy that allows only its own scripts, styles and images.
* :class:`RelativeRedirects`: a redirect's ``Location`` carries no host. Starlette builds it absolute
  from the request's ``Host`` header (``GET /static`` -> ``http://<Host>/static/``), which reflects
  whatever a client sent; a relative one means the same to every browser and reflects nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import tracing
from service.http.error_shape import error_body
from service.metrics import ServiceMetrics

access_log = logging.getLogger("camserve.access")
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before its answer
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIds:
    """Ids for requests that bring none: unique without a syscall per request (``uuid4`` reads
    ``os.urandom`` each time): a random prefix per app (each worker process builds its own), then a
    counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"  # 32 hex digits, as uuid4().hex


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")
        self.limit = limit


class BodyTimeout(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"request body not received within {seconds:g} s")


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, log_requests: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests
        self.ids = RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = _header(scope, b"x-request-id")
        request_id = given if given and _SAFE_ID.match(given) else self.ids.next()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500  # what a client gets when the app ends without answering (uvicorn writes a 500)
        started_answer = gone = False

        async def receive_watched() -> Message:
            nonlocal gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        span = (
            tracing.start_request(  # None while tracing is off (service/tracing.py)
                scope["method"],
                _header(scope, b"traceparent"),
                _header(scope, b"tracestate"),
                {"http.request.method": scope["method"], "url.path": scope["path"]},
            )
            if tracing.enabled()
            else None
        )

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_answer
            if message["type"] == "http.response.start":
                status, started_answer = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive_watched, send_with_id)
        finally:
            if gone and not started_answer:
                status = CLIENT_CLOSED  # nobody was there to answer: not a server error
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(elapsed)
            if span is not None:
                attributes = {"http.response.status_code": status, "http.route": endpoint}
                tracing.end_request(span, f"{scope['method']} {endpoint}", attributes, error=status >= 500)
            if self.log_requests:
                record: dict[str, Any] = {
                    "event": "request",
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                }
                if "images" in state:
                    record["images"] = state["images"]
                if span is not None:
                    record["trace_id"] = tracing.trace_id(span)
                access_log.info(json.dumps(record))


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > self.max_bytes:
            message = f"request body of {declared} bytes exceeds the limit of {self.max_bytes}"
            await _json_error(send, 413, error_body(scope["path"], message))
            return
        received = 0
        complete = False
        deadline = time.monotonic() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # the body is in; waiting now is for the disconnect, which has no deadline
                return await receive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise BodyTimeout(self.timeout_s)
            try:
                async with asyncio.timeout(left):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


# The page loads only its own script and stylesheet, and draws overlays from data: URLs and blobs.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# JSON, PNG and metrics answers are never documents to render: nothing may load or frame them.
API_POLICY = "default-src 'none'; frame-ancestors 'none'"
# FastAPI's /docs and /redoc pages run inline scripts of their own: framing refused, nothing else changed.
DOCS_PATHS = ("/docs", "/redoc")
# Encoded once: every answer gets one of these three lists.
_BASE_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"))
_PAGE_HEADERS = (*_BASE_HEADERS, (b"content-security-policy", PAGE_POLICY.encode()))
_API_HEADERS = (*_BASE_HEADERS, (b"content-security-policy", API_POLICY.encode()))


class SecurityHeaders:
    """Headers that tell a browser how to treat every answer (OWASP's secure headers for an API and a page)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/":
            extra = _PAGE_HEADERS
        elif path.startswith(DOCS_PATHS) or path.startswith("/static/"):
            extra = _BASE_HEADERS
        else:
            extra = _API_HEADERS

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RelativeRedirects:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_relative(message: Message) -> None:
            if message["type"] == "http.response.start" and 300 <= message["status"] < 400:
                message["headers"] = [
                    (key, _relative(value) if key.lower() == b"location" else value)
                    for key, value in message.get("headers", ())
                ]
            await send(message)

        await self.app(scope, receive, send_relative)


def _relative(location: bytes) -> bytes:
    """This app redirects only within itself: keep the path, query and fragment, drop scheme and host.

    Leading slashes (and backslashes, which browsers read as slashes) collapse to one:
    ``//evil.example/`` would be a link to another host."""
    parts = urlsplit(location.decode("latin-1"))
    if not parts.scheme and not parts.netloc and not parts.path.startswith(("//", "/\\")):
        return location
    path = "/" + parts.path.lstrip("/\\")
    return urlunsplit(("", "", path, parts.query, parts.fragment)).encode("latin-1")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


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
