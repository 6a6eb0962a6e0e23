"""The request body's two bounds, size and arrival time, applied to the ASGI ``receive`` of every
request that may carry one (:class:`BoundedReceive`), and whether the client went away meanwhile.

A declared ``Content-Length`` over the limit is refused before a byte is read (:func:`declared_too_large`);
a streamed (chunked) body is counted while it arrives and refused as soon as it passes the limit; a
slow sender gets ``timeout_s`` from the first ``receive`` for the whole body. The answers (413, 408)
come from the one error path (service/http/errors.py), which knows these two exceptions.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import Message, Receive

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")
        self.limit = limit


class BodyTimeout(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"request body not received within {seconds:g} s")


def declared_too_large(content_length: bytes | None, max_bytes: int) -> bool:
    """A ``Content-Length`` header over ``max_bytes`` (a malformed one is the HTTP parser's to refuse)."""
    return content_length is not None and content_length.isdigit() and int(content_length) > max_bytes


class BoundedReceive:
    """``receive`` with the body's bounds (when ``max_bytes`` is set), noting a ``http.disconnect``.

    One object per request instead of nested closures: the request's front reads ``gone`` once at
    the end to tell an answer nobody waited for (499) from one the app failed to write (500).
    """

    __slots__ = ("_complete", "_deadline", "_max_bytes", "_receive", "_received", "_timeout_s", "gone")

    def __init__(self, receive: Receive, max_bytes: int | None = None, timeout_s: float = 0.0) -> None:
        self._receive = receive
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s if max_bytes is not None else 0.0
        self._received = 0
        self._complete = max_bytes is None  # no bounds: nothing to count
        self.gone = False

    async def __call__(self) -> Message:
        if self._complete:  # the body is in (or unbounded): waiting now is for the disconnect, with no deadline
            message = await self._receive()
        else:
            message = await self._bounded()
        if message["type"] == "http.disconnect":
            self.gone = True
        return message

    async def _bounded(self) -> Message:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise BodyTimeout(self._timeout_s)
        try:
            async with asyncio.timeout(left):
                message = await self._receive()
        except TimeoutError:
            raise BodyTimeout(self._timeout_s) from None
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._max_bytes:  # type: ignore[operator]
                raise BodyTooLarge(self._max_bytes)  # type: ignore[arg-type]
            self._complete = not message.get("more_body", False)
        return message
