"""The HTTP/1.1 connection: uvicorn's httptools protocol with the bounds it lacks: header size and count,
and deadlines for connections that send nothing or never finish their headers; a client that half-closes is answered.

What plain uvicorn 0.54 does (read from ``uvicorn/protocols/http/httptools_impl.py``, and measured):

* httptools sets no limit on request headers: the parser keeps appending a header value in memory
  (20 MB of headers were read and answered 200), by concatenation, so the CPU grows with the square
  of the size (a 128 MiB chunked trailer: 16.6 s of event-loop time). Here every byte that is not
  body counts as it arrives: the request line and headers, and after the body has begun, the chunk
  framing between body bytes and the trailer fields after the last chunk; fields, header or trailer,
  are counted as parsed. Past ``max_header_bytes`` or ``max_headers`` the client gets 431 and the
  connection is closed. Trailer fields are then dropped, not added to the request's headers: they
  arrive after the app has read (and checked) those.
* Its keep-alive timer runs only between requests, and any byte received cancels it: a connection
  that sends nothing after connecting, or half a request line, or a header a byte at a time, stays open
  for good. Here a connection that has not started a request within ``idle_timeout_s`` is closed, and
  one that started a request but has not finished its headers ``header_timeout_s`` after its first
  byte gets 408 and is closed. (The body has its own deadline, in :class:`service.http.body_limit.BoundedReceive`.)
* On a half-close (the client's ``shutdown(SHUT_WR)`` after its request), ``eof_received`` returned
  None, so asyncio closed the transport and the answer was dropped while the app logged 200. Here a
  request that arrived complete keeps the connection open for its answer, then it is closed; one cut
  off mid-body is a disconnect, which the app logs as 499.

uvicorn's own ``limit_concurrency`` (503 for every request while the process holds that many
connections or tasks) is the connection cap; with these deadlines, connections that do nothing no
longer hold places under it for long. Every answer written here (431, 408, 400 for bytes that are
not HTTP, that 503) is JSON in the service's error shape with ``X-Content-Type-Options: nosniff``,
as the app's own answers are.

The h11 protocol has a header limit (``h11_max_incomplete_event_size``) but answers 400 rather than
431 and has no header deadline either, so this small subclass it is: against plain httptools it
costs nothing measurable, per request or in throughput (bench/results/bounds.md, section 4). Limits
are class attributes set once per process by :func:`uvicorn_bounds`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.http.error_shape import error_body
from service.settings import Settings

log = logging.getLogger("camserve.http")


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int  # request line and headers
    max_headers: int
    header_timeout_s: float  # from a request's first byte to the end of its headers
    idle_timeout_s: float  # a connection without a request in progress
    retry_after_s: int = 1  # sent with the connection cap's 503


class HeadersTooLarge(Exception):
    pass


NOSNIFF = b"x-content-type-options: nosniff\r\n"  # as service.http.answer_headers adds above


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    limits: HttpLimits = HttpLimits(max_header_bytes=16384, max_headers=100, header_timeout_s=10, idle_timeout_s=15)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True  # between requests or inside a request line and headers
        self._head_bytes = 0  # of this request's head, while reading it (for the 408's "started a request")
        # Bytes that are not body since the last check point (a body byte, the end of the head or of a
        # request): the head, chunk framing, trailer fields. Counted per read, so one read of body and
        # trailer together counts from its body on: the count lags by at most one read (asyncio's 256 KiB).
        self._unbodied = 0
        self._header_count = 0  # fields of this request, headers and trailers
        self._trailer_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None

    # -- deadlines -------------------------------------------------------------------------------
    def _arm(self, seconds: float) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(seconds, self._deadline_passed)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request's headers are late while the one before it is still being answered:
            # the connection is not idle, look again later.
            self._arm(self.limits.header_timeout_s)
            return
        if self._head_bytes:
            self._refuse(408, f"request headers not received within {self.limits.header_timeout_s:g} s")
        else:
            self.transport.close()  # idle: nothing to answer

    def _refuse(self, status: int, detail: str) -> None:
        log.debug("%s from %s: %s", status, self.client, detail)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # Refused mid-body (a trailer over the limit): the app, waiting for the rest of the body, sees
            # the client gone and writes nothing more (it logs the request as 499).
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:  # an answer is already on the wire: a 431 now would corrupt it
                self.transport.close()
                return
        self._write_and_close(status, error_body(self._path(), detail))

    def _write_and_close(self, status: int, body: bytes) -> None:
        head = [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            NOSNIFF,
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP, in the service's error shape and headers."""
        self._write_and_close(400, error_body(self._path(), msg))

    def _path(self) -> str:
        """The path of the request being refused, as far as it arrived (its error shape depends on it)."""
        url = getattr(self, "url", b"") or b""
        return url.split(b"?", 1)[0].decode("latin-1")

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # uvicorn answers a request over the connection cap with its own plain-text 503; ours is the
        # service's error shape, with nosniff and Retry-After, like every other 503.
        if app is service_unavailable:
            app = self._over_capacity
        super()._start_asgi_task(cycle, app)

    async def _over_capacity(self, scope: Any, receive: Any, send: Any) -> None:
        body = error_body(scope["path"], "too many connections: the server is at its connection limit")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"retry-after", str(self.limits.retry_after_s).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # -- protocol interface ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.idle_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's, plus the header byte count and the 431.
        self._unset_keepalive_if_required()
        if self._reading_head:
            self._head_bytes += len(data)
        self._unbodied += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, HeadersTooLarge):
                self._refuse(431, str(exc.__context__))
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._unbodied > self.limits.max_header_bytes and not self.transport.is_closing():
            if self._reading_head:
                self._refuse(431, f"request line and headers exceed {self.limits.max_header_bytes} bytes")
            else:
                self._refuse(431, f"chunk framing or trailer fields exceed {self.limits.max_header_bytes} bytes")

    def eof_received(self) -> bool | None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            cycle.keep_alive = False  # answer the request that arrived whole, then close
            return True
        return None  # nothing (complete) to answer: let the transport close

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._arm(self.limits.idle_timeout_s)

    # -- parser callbacks ------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0
        self._trailer_bytes = 0
        self._arm(self.limits.header_timeout_s)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            fields = "request headers" if self._reading_head else "request header and trailer fields"
            raise HeadersTooLarge(f"more than {self.limits.max_headers} {fields}")
        if self._reading_head:
            super().on_header(name, value)
            return
        # A trailer field (after a chunked body): counted exactly, then dropped.
        self._trailer_bytes += len(name) + len(value) + 4
        if self._trailer_bytes > self.limits.max_header_bytes:
            raise HeadersTooLarge(f"request trailer fields exceed {self.limits.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            raise HeadersTooLarge(f"request line and headers exceed {self.limits.max_header_bytes} bytes")
        self._reading_head = False
        self._unbodied = 0
        self._disarm()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._unbodied = 0  # body bytes have their own limit (service.http.body_limit.BoundedReceive)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True
        self._head_bytes = 0
        self._unbodied = 0


def uvicorn_bounds(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.run``/``uvicorn.Config`` that bound connections, from the settings.

    Sets the protocol's limits for this process (uvicorn makes one protocol object per connection);
    a worker process started by spawning imports this module afresh and must call it again.
    """
    BoundedHttpToolsProtocol.limits = HttpLimits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_timeout_s=settings.header_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
        retry_after_s=settings.retry_after_s,
    )
    return {
        "http": BoundedHttpToolsProtocol,
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.idle_timeout_s,
    }
