"""One image as the whole request body (``Content-Type: image/jpeg``, ``image/png``, ...).

Beside multipart (still the documented default, and the only way to send several images at once),
a raw body spares the server the multipart parser: no boundary scan, no form object, no spooled
temporary file per part, which is most of the per-request CPU of a small image
(bench/results/front_profile.md). The bytes are decoded exactly as a multipart file's are (by their
content, not by the declared type), so the answer is the same either way. The body's size and
arrival time are bounded by the same middleware as any other body.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

from starlette.requests import ClientDisconnect
from starlette.types import Receive

from service.http.disposition import filename
from service.http.uploads import IMAGE_TYPES, MULTIPART_OPENAPI

DEFAULT_NAME = "image"
RAW_TYPES = IMAGE_TYPES

REQUEST_BODY_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            **MULTIPART_OPENAPI["requestBody"]["content"],
            **{
                media: {"schema": {"type": "string", "format": "binary", "description": "one image as the body"}}
                for media in RAW_TYPES
            },
        },
    }
}


def is_raw_image(content_type: str) -> bool:
    """``image/<anything>``: the body is one image (an unsupported format is refused when decoded)."""
    return content_type[:6].lower() == "image/"


def raw_name(disposition: str | None) -> str:
    """The name from an optional ``Content-Disposition: inline; filename="cat.jpg"``, for answers and errors."""
    return (filename(disposition) if disposition else None) or DEFAULT_NAME


async def read_raw_image(disposition: str | None, chunks: AsyncIterable[bytes]) -> list[tuple[str, bytes]]:
    """The body as the one upload of this request: [(filename, bytes)]."""
    parts = [chunk async for chunk in chunks]
    return [(raw_name(disposition), parts[0] if len(parts) == 1 else b"".join(parts))]


async def asgi_body(receive: Receive) -> AsyncIterator[bytes]:
    """The body's chunks straight from ASGI ``receive`` (as Starlette's ``Request.stream``, without a Request)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return
